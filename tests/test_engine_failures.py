"""The engine survives any exception: ``generate`` is all or nothing, the prefix cache never
serves KV that a failed step did not write, bad token ids are refused up front, and no request
is lost or duplicated under heavy preemption."""
from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch
from tiny_checkpoints import save_tiny_qwen2

from psnrl.engine import llm as llm_module
from psnrl.engine.llm import LLM
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
NOISY = NoiseSpec(seed=7, sigma=0.05)


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # The kernels are tested on their own; the CPU torch paths keep hundreds of calls fast.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-failures")
    save_tiny_qwen2(path, vocab=256, hidden=32, inter=64, max_pos=64)
    return path


def make(path, **kw) -> LLM:
    return LLM(path, **{"dtype": "float32", "device": "cpu", "block_size": 4, "num_kv_blocks": 48,
                        "max_model_len": 48, **kw})


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def assert_idle(llm: LLM) -> None:
    """Nothing stranded: no sequence anywhere, every block free, the manager consistent."""
    llm.blocks.check_invariants()
    assert not llm.scheduler.has_work()
    assert llm.blocks.num_sequences() == 0
    assert llm.blocks.num_free_blocks() == llm.num_kv_blocks


PROMPTS = [[5, 17, 33, 2, 9, 100, 7, 8, 9, 10, 11, 12], [42, 43], [7] * 9, list(range(20, 36))]
PARAMS = [GREEDY, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=3), GREEDY, GREEDY]
NOISE = [None, NOISY, None, NOISY]


@pytest.fixture(scope="module")
def reference(checkpoint):
    return tokens(make(checkpoint).generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False))


# -- failures at every stage ------------------------------------------------------------------


class Boom(Exception):
    pass


def failing(fn, after: int, exc: type[BaseException] = Boom):
    """``fn`` that raises ``exc`` on its ``after``-th call (0-based), and works otherwise."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] - 1 == after:
            raise exc("injected")
        return fn(*args, **kwargs)
    return wrapped


STAGES = ["schedule", "forward", "sample", "fork", "finish"]


class FailingSampler:
    """The engine's sampler, failing on one call (its seeds still come from the real one)."""

    def __init__(self, inner, after: int, exc: type[BaseException]):
        self.inner, self.call = inner, failing(inner, after, exc)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def sample_seeds(self, params):
        return self.inner.sample_seeds(params)


def inject(llm: LLM, monkeypatch, stage: str, after: int, exc: type[BaseException] = Boom) -> None:
    if stage == "sample":
        monkeypatch.setattr(llm, "sampler", FailingSampler(llm.sampler, after, exc))
        return
    target = {"schedule": (llm.scheduler, "schedule"), "forward": (llm.runner, "run"),
              "fork": (llm, "_fork"), "finish": (llm, "_finish")}[stage]
    monkeypatch.setattr(*target, failing(getattr(*target), after, exc))


# _fork runs once per request with n > 1, and PARAMS has one: it fails at its only call.
@pytest.mark.parametrize("stage, after", [(s, a) for s in STAGES for a in (0, 3) if (s, a) != ("fork", 3)])
def test_a_failure_at_any_stage_leaves_the_engine_ready(checkpoint, reference, monkeypatch, stage, after):
    llm = make(checkpoint)
    with monkeypatch.context() as m:
        inject(llm, m, stage, after)
        with pytest.raises(Boom):
            llm.generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False)
    assert_idle(llm)
    assert tokens(llm.generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False)) == reference
    assert_idle(llm)


def test_a_failure_in_the_progress_bar_and_at_submission(checkpoint, reference, monkeypatch):
    llm = make(checkpoint)

    class BrokenBar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise Boom("progress bar")

    with monkeypatch.context() as m:
        m.setattr(llm_module, "tqdm", BrokenBar)
        with pytest.raises(Boom):
            llm.generate(PROMPTS, PARAMS, noise=NOISE)
    assert_idle(llm)
    # Submission: the second prompt is text and this checkpoint has no tokenizer; nothing is queued.
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate([[5, 6, 7], "hello"], GREEDY, use_tqdm=False)
    assert_idle(llm)
    assert tokens(llm.generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False)) == reference


def test_ctrl_c_from_a_timer_mid_call(checkpoint, reference):
    """A real SIGINT at several moments of a call: the call raises KeyboardInterrupt, the next one
    returns exactly the outputs of an uninterrupted call."""
    llm = make(checkpoint)
    slow = [p + p[:4] for p in PROMPTS] * 4
    interrupted = 0
    for delay in (0.001, 0.005, 0.02, 0.05):
        previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                llm.generate(slow, GREEDY, use_tqdm=False)
            finally:  # the timer may also fire here, after the call: caught below all the same
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            signal.signal(signal.SIGALRM, previous)
        assert_idle(llm)
        assert tokens(llm.generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False)) == reference
    assert interrupted >= 2  # the timer did land inside calls


def test_random_failure_points_for_hundreds_of_calls(checkpoint, reference, monkeypatch):
    rng = random.Random(0)
    llm = make(checkpoint, num_kv_blocks=20)  # preemption too
    failures = 0
    for _ in range(200):
        stage, after = rng.choice(STAGES), rng.randrange(8)
        with monkeypatch.context() as m:
            inject(llm, m, stage, after, rng.choice([Boom, KeyboardInterrupt]))
            try:
                got = tokens(llm.generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False))
            except (Boom, KeyboardInterrupt):
                failures += 1
            else:
                assert got == reference  # the failure point was never reached
        assert_idle(llm)
    assert failures > 100
    assert tokens(llm.generate(PROMPTS, PARAMS, noise=NOISE, use_tqdm=False)) == reference


# -- the prefix cache never serves unwritten KV ----------------------------------------------------


@pytest.mark.parametrize("max_num_batched_tokens", [64, 5], ids=["whole-prefill", "chunked-prefill"])
def test_an_interrupted_prefill_publishes_nothing(checkpoint, monkeypatch, max_num_batched_tokens):
    prompt = list(range(50, 66))  # four full blocks: all would be cacheable
    want = tokens(make(checkpoint).generate([prompt] * 4, GREEDY, use_tqdm=False))
    llm = make(checkpoint, max_num_batched_tokens=max_num_batched_tokens)
    gen = torch.Generator().manual_seed(0)
    for k, v in llm.runner.kv_caches:  # blocks hold what earlier requests left, never zeros
        k.copy_(10 * torch.randn(k.shape, generator=gen))
        v.copy_(10 * torch.randn(v.shape, generator=gen))
    for after in range(3):  # fail the first, second, third forward of the prefill
        with monkeypatch.context() as m:
            inject(llm, m, "forward", after)
            with pytest.raises(Boom):
                llm.generate([prompt] * 4, GREEDY, use_tqdm=False)
        assert_idle(llm)
        assert tokens(llm.generate([prompt] * 4, GREEDY, use_tqdm=False)) == want
    # A completed call does publish: the same prompt now hits the cache.
    llm.blocks.reset_stats()
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.blocks.stats()["prefix_cache_hits"] == 12


# -- token ids -----------------------------------------------------------------------------------


def test_integer_scalars_of_any_kind_are_token_ids(checkpoint):
    llm = make(checkpoint)
    want = tokens(llm.generate([[5, 17, 33]], GREEDY, use_tqdm=False))
    for prompt in ([np.int64(5), np.int32(17), 33], np.array([5, 17, 33]), torch.tensor([5, 17, 33]),
                   [torch.tensor(5), 17, np.uint8(33)]):
        assert tokens(llm.generate([prompt], GREEDY, use_tqdm=False)) == want
    assert tokens(llm.generate([5, 17, 33], GREEDY, use_tqdm=False)) == want  # one prompt, flat


@pytest.mark.parametrize("prompt, message", [
    ([5, True, 7], r"prompt 0, position 1: True is a bool"),
    ([[1, 2], [3, np.bool_(False)]], r"prompt 1, position 1: .*False.* is a bool"),
    ([[1, 2.0]], r"prompt 0, position 1: 2.0 is a float"),
    ([[1, torch.tensor(2.5)]], r"prompt 0, position 1: tensor\(2.5000\) is a Tensor"),
    ([np.zeros((2, 2), dtype=np.int64)], r"prompt 0: token ids must be 1-D"),
    ([{"ids": [1]}], r"prompt 0: a prompt must be a string or a sequence of token ids, got dict"),
])
def test_bools_floats_and_other_things_are_refused_before_anything_runs(checkpoint, prompt, message):
    llm = make(checkpoint)
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_idle(llm)


# -- nothing lost under load -----------------------------------------------------------------------


def test_no_request_lost_or_changed_with_room_for_two_sequences(checkpoint):
    rng = random.Random(1)
    prompts = [[rng.randrange(250) for _ in range(rng.randrange(1, 20))] for _ in range(40)]
    noise = [NOISY if i % 3 == 0 else None for i in range(40)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 10), ignore_eos=True,
                             n=rng.choice([1, 1, 2])) for _ in range(40)]
    alone = make(checkpoint)
    want = [tokens(alone.generate([p], [q], noise=[n], use_tqdm=False))[0] for p, q, n in zip(prompts, params, noise)]
    # Room for about two sequences of max_model_len 48 (12 blocks each), admission watermark included.
    llm = make(checkpoint, num_kv_blocks=26)
    outs = llm.generate(prompts, params, noise=noise, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert tokens(outs) == want
    assert all(len(o.outputs) == q.n for o, q in zip(outs, params))
    assert llm.scheduler.num_preemptions > 0
    assert_idle(llm)
