"""The engine's overlap (``EngineConfig.overlap``): a decode step launched before the previous
step's samples are read, its input tokens read on the device.

On a CPU the decode and sampler graphs run uncaptured (``ModelRunner.use_graphs`` with
``DecodeGraphs(capture=False)``), so the overlap's whole host path runs: placeholders, the
device-side token gather, stop checks one step late, publishing KV only once the tokens are
known. Every run is compared with the same engine one step at a time (``overlap=False``):
the tokens, log-probs, finish reasons and prefix-cache hits must be identical.
"""
from __future__ import annotations

import random

import pytest
import torch

from psnrl.engine.cuda_graphs import DecodeGraphs, bucket_for
from psnrl.engine.llm import LLM, UNREAD_TOKEN
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import SamplingParams, derive_sample_seed
from tiny_checkpoints import save_tiny_qwen2

MAX_LEN = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-overlap")
    save_tiny_qwen2(path)
    return path


def engine(path, overlap: bool, **kwargs) -> LLM:
    """An engine on a CPU whose decode steps go through the (uncaptured) graphs, counting the
    steps it launches ahead."""
    options = dict(dtype="float32", block_size=4, max_num_seqs=8, max_model_len=MAX_LEN, overlap=overlap)
    llm = LLM(path, **{**options, **kwargs})
    llm.runner.use_graphs(DecodeGraphs(llm.model, llm.runner.kv_caches, llm.blocks,
                                       llm.config.max_num_seqs, MAX_LEN, capture=False, verbose=False))
    llm.launched_ahead = 0
    launch = llm._launch_ahead

    def counted(*args):
        llm.launched_ahead += 1
        return launch(*args)
    llm._launch_ahead = counted
    return llm


def prompts_for(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(200) for _ in range(rng.randint(2, 13))] for _ in range(n)]


def mixed_params(n: int) -> list[SamplingParams]:
    """Greedy and sampled rows, truncation, stop tokens hit often (ids 0..39 of 256) and barred
    for a while, EOS, several samples per prompt, various lengths."""
    out = []
    for i in range(n):
        out.append(SamplingParams(
            n=(1, 3, 1, 2)[i % 4], temperature=(1.0, 0.8, 0.0, 1.2)[i % 4], top_p=(1.0, 0.9)[i % 2],
            top_k=(-1, 50, -1)[i % 3], max_tokens=6 + 5 * (i % 5), min_tokens=(0, 3)[i % 2],
            stop_token_ids=list(range(40)) if i % 3 else [], ignore_eos=i % 5 == 0, seed=100 + i))
    return out


def outcome(outputs) -> list:
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in r.outputs] for r in outputs]


def assert_same_but_batching(a: list, b: list) -> None:
    """Equal tokens and finish reasons; log-probs within fp32 rounding (the two runs computed the
    rows in batches of other shapes, whose sums round differently)."""
    assert [[(t, r) for t, _, r in req] for req in a] == [[(t, r) for t, _, r in req] for req in b]
    for ra, rb in zip(a, b):
        for (_, la, _), (_, lb, _) in zip(ra, rb):
            torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=0, atol=1e-5)


def test_overlap_gives_the_tokens_of_one_step_at_a_time_and_launches_ahead(tiny):
    prompts, params = prompts_for(7, seed=1), mixed_params(7)
    noise = [None, NoiseSpec(seed=5, sigma=0.05), None, NoiseSpec(seed=6, sigma=0.03, targets="mlp"), None, None,
             NoiseSpec(seed=5, sigma=0.05)]
    ref, llm = engine(tiny, overlap=False), engine(tiny, overlap=True)
    expected = outcome(ref.generate(prompts, params, noise, use_tqdm=False))
    assert outcome(llm.generate(prompts, params, noise, use_tqdm=False)) == expected
    assert ref.launched_ahead == 0 and llm.launched_ahead > 10
    reasons = {c[2] for r in expected for c in r}
    assert {"stop", "length"} <= reasons  # sequences stopped by tokens while a step ran ahead
    # Nothing left behind: no step in flight, no blocks held, no placeholder in any output.
    assert llm._ahead is None and not llm.blocks.sequence_ids()
    assert all(UNREAD_TOKEN not in c[0] for r in expected for c in r)


def test_the_prefix_cache_publishes_the_same_blocks(tiny):
    """KV of a step launched ahead is published only once its input tokens are read, under the
    real tokens' hashes: a second call whose prompts are the first call's whole sequences hits
    exactly the blocks it hits one step at a time."""
    prompts = prompts_for(4, seed=2)
    params = SamplingParams(temperature=1.0, max_tokens=23, ignore_eos=True, seed=9)
    hits = []
    for overlap in (False, True):
        llm = engine(tiny, overlap=overlap)
        first = llm.generate(prompts, params, use_tqdm=False)
        llm.blocks.reset_stats()
        again = [p + r.outputs[0].token_ids for p, r in zip(prompts, first)]
        second = llm.generate(again, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
        hits.append((llm.blocks.stats()["prefix_cache_hits"], outcome(first), outcome(second)))
    assert hits[0] == hits[1] and hits[0][0] > 0


def test_requests_joining_mid_run_and_preemption(tiny):
    """Requests added between steps wait until the overlap lets them in; a cache too small for
    every sequence preempts (steps that need a block run one at a time)."""
    results = []
    for overlap in (False, True):
        llm = engine(tiny, overlap=overlap, num_kv_blocks=40)
        params = [SamplingParams(temperature=1.0, max_tokens=30, seed=i, ignore_eos=True) for i in range(6)]
        outs = llm.add_requests(prompts_for(3, seed=3), params[:3])
        for _ in range(5):
            llm.step()
        outs += llm.add_requests(prompts_for(3, seed=4), params[3:])
        while llm.has_unfinished_requests():
            llm.step()
        results.append((outcome(outs), llm.launched_ahead > 0))
    assert_same_but_batching(results[0][0], results[1][0])
    assert results[1][1]
    assert llm.scheduler.num_preemptions > 0


def test_a_failure_in_a_step_launched_ahead_leaves_the_engine_ready(tiny, monkeypatch):
    prompts, params = prompts_for(3, seed=5), SamplingParams(temperature=1.0, max_tokens=12, seed=3, ignore_eos=True)
    expected = outcome(engine(tiny, overlap=False).generate(prompts, params, use_tqdm=False))
    llm = engine(tiny, overlap=True)
    run = llm.runner.run

    def fail_ahead(step, specs, from_samples=None):
        if from_samples is not None:
            raise KeyboardInterrupt
        return run(step, specs, from_samples)
    monkeypatch.setattr(llm.runner, "run", fail_ahead)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    assert llm._ahead is None and not llm.blocks.sequence_ids() and not llm.has_unfinished_requests()
    monkeypatch.setattr(llm.runner, "run", run)
    # The prompts' first blocks are cached now, so their prefill runs other kernels: log-probs agree
    # to rounding (as a second call one step at a time does).
    assert_same_but_batching(expected, outcome(llm.generate(prompts, params, use_tqdm=False)))


class PoisonedSampler:
    """The engine's sampler, with NaN logits for the rows of one seed at one step (whatever the
    batch): that sequence ends with an error while a step runs ahead of it."""

    def __init__(self, inner, seed: int, step: int):
        self.inner, self.seed, self.step = inner, seed, step

    def __call__(self, logits, rows):
        hit = (rows.seeds == self.seed) & (rows.steps == self.step)
        return self.inner(logits.masked_fill(hit[:, None], float("nan")), rows)

    def sample_seeds(self, params):
        return self.inner.sample_seeds(params)


def test_a_sequence_with_bad_logits_ends_with_an_error_while_a_step_runs_ahead(tiny):
    prompts = prompts_for(4, seed=8)
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=40 + i, ignore_eos=True) for i in range(4)]
    results = []
    for overlap in (False, True):
        llm = engine(tiny, overlap=overlap)
        llm.sampler = PoisonedSampler(llm.sampler, seed=derive_sample_seed(42, 0), step=5)
        results.append(outcome(llm.generate(prompts, params, use_tqdm=False)))
        assert (llm.launched_ahead > 0) == overlap
    assert results[0] == results[1]
    bad = results[1][2][0]
    assert bad[2] == "error: non-finite logits" and len(bad[0]) == 5 and UNREAD_TOKEN not in bad[0]
    assert all(r[0][2] == "length" for i, r in enumerate(results[1]) if i != 2)


def test_a_step_launched_ahead_leaves_the_sampler_inputs_of_the_step_before_untouched(tiny):
    """On a GPU a step's copy of its sampler inputs may still be queued behind the step before's
    forward when the step launched ahead writes its own: they go to the other host staging."""
    llm = engine(tiny, overlap=True)
    graphs = llm.runner.sample_graphs
    run, staged = graphs.run, []

    def checked(slots, steps):
        if staged:  # the previous call's staging still holds what it copied
            turn, values = staged[-1]
            assert torch.equal(graphs.host[turn][:len(values)], values)
        packed = run(slots, steps)
        n, b = len(slots), bucket_for(len(slots), graphs.owner.buckets)
        staged.append((graphs._turn, graphs.host[graphs._turn][:2 * b].clone()))
        values = staged[-1][1]  # the staging this call took: its slots, then its steps
        assert values[:n].tolist() == slots and values[b:b + n].tolist() == steps
        return packed
    graphs.run = checked
    expected = outcome(engine(tiny, overlap=False).generate(prompts_for(4, seed=3), mixed_params(4), use_tqdm=False))
    assert_same_but_batching(expected, outcome(llm.generate(prompts_for(4, seed=3), mixed_params(4), use_tqdm=False)))
    assert llm.launched_ahead > 0 and len({turn for turn, _ in staged}) == 2


def test_time_steps_times_steps_launched_ahead(tiny):
    llm = engine(tiny, overlap=True, time_steps=True)
    llm.add_requests(prompts_for(2, seed=6), SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True))
    outs = []
    while llm.has_unfinished_requests():
        outs.append(llm.step())
    assert llm.launched_ahead > 0
    assert all(o.forward_ms > 0 and o.sample_ms > 0 for o in outs if o.num_seqs)


def test_the_block_manager_sets_a_reserved_token_and_rehashes_its_full_block():
    from psnrl.engine.block_manager import BlockManager

    a, b = BlockManager(8, 4), BlockManager(8, 4)
    a.allocate(1, [5, 6, 7], num_scheduled=3)
    b.allocate(1, [5, 6, 7], num_scheduled=3)
    a.append_token(1, UNREAD_TOKEN)  # fills the block under the placeholder
    b.append_token(1, 8)
    a.set_last_tokens([1], [8])
    for m in (a, b):
        m.mark_computed(1, 4)
    assert a.token_ids(1) == b.token_ids(1) == [5, 6, 7, 8]
    for m in (a, b):  # the published block is found under the real tokens
        assert m.allocate(2, [5, 6, 7, 8, 9]) == 4
    with pytest.raises(ValueError, match="already computed"):
        a.set_last_tokens([1], [3])
    assert a.can_append_all([1, 2])  # a free block each (3 of 8 used)
    full = BlockManager(2, 4, 0.0)
    full.allocate(1, [1, 2, 3, 4])
    full.allocate(2, [5, 6, 7, 8])
    assert not full.can_append_all([1]) and full.can_append_all([])


@pytest.mark.gpu
def test_gpu_overlap_with_captured_graphs_gives_the_tokens_of_one_step_at_a_time(tmp_path):
    save_tiny_qwen2(tmp_path, vocab=1024, hidden=256, inter=512, layers=2, heads=8, kv_heads=2, max_pos=2048, seed=1)
    prompts, params = prompts_for(13, seed=7), mixed_params(13)
    runs = []
    for overlap in (False, True):
        llm = LLM(tmp_path, dtype="float32", block_size=16, max_num_seqs=16, max_model_len=512,
                  num_kv_blocks=16 * 512 // 16 + 16, overlap=overlap)
        launch, llm.launched_ahead = llm._launch_ahead, 0

        def counted(*args, llm=llm, launch=launch):
            llm.launched_ahead += 1
            return launch(*args)
        llm._launch_ahead = counted
        runs.append(outcome(llm.generate(prompts, params, use_tqdm=False)))
        assert not llm.runner.graphs.disabled and not llm.runner.sample_graphs.disabled
        assert (llm.launched_ahead > 0) == overlap
    assert_same_but_batching(runs[0], runs[1])


def test_a_step_launched_ahead_that_the_graphs_decline_runs_eagerly_on_the_same_tokens(tiny, monkeypatch):
    """Where the decode graphs cannot take a step launched ahead, the eager forward reads its input
    tokens from the previous step's samples on the device instead."""
    prompts, params = prompts_for(5, seed=9), mixed_params(5)
    expected = outcome(engine(tiny, overlap=False).generate(prompts, params, use_tqdm=False))
    llm = engine(tiny, overlap=True)
    graphs, declined = llm.runner.graphs, []
    run = graphs.run

    def decline_ahead(step, specs, from_samples=None):
        if from_samples is not None:
            declined.append(len(step.seqs))
            return None
        return run(step, specs)
    monkeypatch.setattr(graphs, "run", decline_ahead)
    # Eager and graph forwards round differently: equal tokens, log-probs to rounding.
    assert_same_but_batching(expected, outcome(llm.generate(prompts, params, use_tqdm=False)))
    assert declined and len(declined) == llm.launched_ahead
