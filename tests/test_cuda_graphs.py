"""CUDA graphs for decode (psnrl/engine/cuda_graphs.py).

CPU: the pure-Python parts (buckets, tile capacities, the decode plan), the wiring
of ``enforce_eager``, and the static-buffer forward without capture
(``DecodeGraphs(capture=False)``: padding, row reordering, fixed-size noise tables,
fixed split count, the padded K/V store), which must give the eager logits; the block
tables kept on the device; and, as a proxy for capture, the graphs' recorded parts run on
the meta device with every op checked for host tensors.
GPU (``gpu``): captured graphs against eager decode, logits and greedy tokens; sampler
graphs (psnrl/engine/sample_graphs.py) against the eager sampler. On a CPU the sampler
graphs run uncaptured inside ``LLM.generate`` (the ``use_graphs`` tests).
"""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from psnrl.engine import cuda_graphs as cg
from tiny_checkpoints import save_tiny_qwen2
from psnrl.engine.block_manager import BlockManager
from psnrl.engine.cuda_graphs import (DecodeGraph, DecodeGraphs, bucket_for, bucket_sizes, plan_decode, tile_capacity,
                                tile_level)
from psnrl.engine.llm import LLM, EngineConfig
from psnrl.engine.loader import load_model
from psnrl.engine.model_runner import FromSamples, ModelRunner
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sample_graphs import SampleGraphs
from psnrl.engine.sampling import Sampler, SamplingParams, pack
from psnrl.engine.sampling_slots import SamplingSlots
from psnrl.engine.scheduler import Step
from psnrl.engine.sequence import Sequence
from psnrl.kernels.attention_reference import paged_attention_reference
from psnrl.kernels.noise_rows import MAX_SLOTS, StreamRows, max_work_tiles, pack_work_tiles
from psnrl.kernels.noisy_linear import TileConfig, noisy_linear
from psnrl.kernels.kv_store import store_kv_skip_padding
from psnrl.kernels.paged_attention import paged_decode_attention

SPEC_ALL = NoiseSpec(seed=2**40 + 7, sigma=0.05, targets="all")
SPEC_MLP = NoiseSpec(seed=11, sigma=0.08, targets="mlp")
SPEC_ZERO = NoiseSpec(seed=3, sigma=0.0, targets="all")  # sigma 0: the clean policy


def save_tiny(path, **sizes):
    save_tiny_qwen2(path, **sizes)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-graphs"))


# ---------------------------------------------------------------------------
# Pure Python
# ---------------------------------------------------------------------------

def test_bucket_sizes_and_selection():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    buckets = bucket_sizes(12)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9, 12)] == [1, 2, 4, 4, 8, 8, 12, 12]
    assert bucket_for(13, buckets) is None
    with pytest.raises(ValueError, match="max_num_seqs"):
        bucket_sizes(0)


def test_graphs_only_on_cuda_and_only_without_enforce_eager():
    assert cg.enabled("cuda", enforce_eager=False)
    assert not cg.enabled("cuda", enforce_eager=True)
    assert not cg.enabled("cpu", enforce_eager=False)
    assert not cg.enabled(torch.device("cpu"), enforce_eager=True)
    assert EngineConfig().enforce_eager is False


def test_pack_work_tiles_matches_stream_rows_and_stays_under_the_bound():
    rng = random.Random(0)
    for _ in range(300):
        rows = rng.randint(1, 300)
        streams = rng.randint(1, 40)
        ids = [rng.randrange(streams) for _ in range(rows)]
        if rng.random() < 0.5:
            ids.sort()
        for bm in (16, 32, 64, 128):
            for slots in (1, 2, 3, MAX_SLOTS):
                ranges, table = pack_work_tiles(ids, bm, slots)
                assert len(ranges) <= max_work_tiles(rows, bm, slots)
                covered = [r for a, b in ranges for r in range(a, b)]
                assert covered == list(range(rows))
                for (a, b), present in zip(ranges, table):
                    assert b - a <= bm and set(ids[a:b]) == {s for s in present if s >= 0}
    # The same tiles as StreamRows (which packs with its own slot count).
    ids = [0, 0, 3, 1, 1, 0, 2, 2, 2, 0, 4, 5]
    rows = StreamRows(torch.tensor(ids), [cg.NoiseStream(i, 0.1) for i in range(5)])
    ranges, table = rows.work_tiles(4)
    assert (ranges.tolist(), table.tolist()) == pack_work_tiles(ids, 4, rows.slots)


def test_tile_levels_grow_from_the_common_case_to_the_bound():
    for bucket in (1, 2, 8, 16, 64, 256):
        for bm in (16, 64, 128):
            caps = [tile_capacity(bucket, bm, level) for level in range(12)]
            assert caps == sorted(caps) and caps[-1] == max_work_tiles(bucket, bm, MAX_SLOTS)
            assert caps[0] >= min(-(-bucket // bm) + 2, max_work_tiles(bucket, bm, MAX_SLOTS))
    # clean rows, then one noisy stream, then padding: level 0
    ids = [0] * 100 + [1] * 120 + [0] * 36
    assert tile_level(256, {64: len(pack_work_tiles(ids, 64, MAX_SLOTS)[0])}) == 0
    # a stream per row: the bound
    ids = list(range(256))
    need = len(pack_work_tiles(ids, 64, MAX_SLOTS)[0])
    level = tile_level(256, {64: need})
    assert tile_capacity(256, 64, level) >= need > tile_capacity(256, 64, level - 1)


def make_step(seqs, num_new):
    step = Step()
    for seq, n in zip(seqs, num_new):
        step.add(seq, n)
    step.num_tokens = sum(num_new)
    return step


def _seq(seq_id, tokens, num_computed, noise):
    seq = Sequence(seq_id, seq_id, 0, 1, list(tokens), SamplingParams(), 0, noise, slot=10 + seq_id)
    seq.num_computed = num_computed
    return seq


def test_decode_plan_orders_rows_by_stream_pads_and_maps_logits_back():
    specs = [SPEC_MLP, SPEC_ZERO, SPEC_ALL]
    # (tokens, num_computed, noise); entry 3 has two uncomputed tokens: it runs one, samples none
    seqs = [_seq(0, [5, 6, 7], 2, 2), _seq(1, [8, 9], 1, -1), _seq(2, [1, 2, 3, 4, 5], 4, 0),
            _seq(3, [4, 4, 4], 1, 1), _seq(4, [9] * 9, 8, 2)]
    step = make_step(seqs, [1] * 5)
    assert step.sampling_entries() == [0, 1, 2, 4] and step.partial == [3]
    plan = plan_decode(step, specs, bucket=8)
    # local streams: spec 0 -> 1, spec 2 -> 2; spec 1 (sigma 0) is clean
    assert [s.seed for s in plan.streams] == [SPEC_MLP.seed, SPEC_ALL.seed]
    assert plan.order == [1, 3, 2, 0, 4]  # clean (stable), then stream 1, then stream 2
    assert plan.seq_ids == [1, 3, 2, 0, 4] and plan.table_rows == [11, 13, 12, 10, 14]
    assert plan.tokens == [9, 4, 5, 7, 9]
    assert plan.positions == [1, 1, 4, 2, 8]
    assert plan.group_ids == {"mlp": [0, 0, 1, 2, 2, 0, 0, 0], "attn": [0, 0, 0, 2, 2, 0, 0, 0],
                              "lm_head": [0, 0, 0, 2, 2, 0, 0, 0]}
    assert plan.noisy_groups == ("mlp", "attn", "lm_head")
    # sampling entries 0, 1, 2, 4 sit at graph rows 3, 0, 2, 4
    assert plan.out_rows == [3, 0, 2, 4]
    # tokens still on the device: the plan carries their sample rows, in graph order
    ahead = plan_decode(step, specs, bucket=8, token_rows=[40, 41, 42, 43, 44])
    assert ahead.tokens is None and ahead.token_rows == [41, 43, 42, 40, 44]

    clean = plan_decode(make_step(seqs[:2], [1, 1]), [SPEC_ZERO, SPEC_ZERO, SPEC_ZERO], 2)
    assert clean.group_ids == {} and clean.streams == [] and clean.noisy_groups == ()
    with pytest.raises(ValueError, match="noise index 5"):
        plan_decode(make_step([_seq(0, [1, 2], 1, 5)], [1]), specs, 1)
    with pytest.raises(ValueError, match="one new token"):
        plan_decode(make_step([_seq(0, [1, 2, 3], 1, -1)], [2]), specs, 1)
    with pytest.raises(ValueError, match="1..2 sequences"):
        plan_decode(make_step(seqs[:3], [1, 1, 1]), specs, 2)


def test_enforce_eager_is_honored_and_a_cpu_never_captures(tiny, monkeypatch):
    llm = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    assert llm.config.enforce_eager is False and llm.runner.graphs is None  # CPU: eager
    model = llm.model
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, llm.runner.kv_caches, llm.blocks, 8, 64)  # capturing needs CUDA

    # Pretend to be on CUDA: the runner builds graphs exactly when not enforce_eager.
    made = []

    class Recorder:
        buckets, device = [1, 2, 4, 8], torch.device("cpu")  # what the sampler graphs read

        def __init__(self, *args, **kwargs):
            made.append(args)

        def run(self, *args):
            return None

    monkeypatch.setattr(cg, "enabled", lambda device, enforce_eager: not enforce_eager)
    monkeypatch.setattr(cg, "DecodeGraphs", Recorder)
    assert ModelRunner(model, llm.runner.kv_caches, llm.blocks, use_cuda_graphs=False).graphs is None
    assert not made
    runner = ModelRunner(model, llm.runner.kv_caches, llm.blocks, use_cuda_graphs=True, max_num_seqs=8,
                         max_model_len=64)
    assert isinstance(runner.graphs, Recorder) and made[-1][3:] == (8, 64)
    assert LLM(tiny, dtype="float32", block_size=4, enforce_eager=True).runner.graphs is None
    eager_count = len(made)
    built = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=6, max_model_len=32)
    assert isinstance(built.runner.graphs, Recorder) and len(made) == eager_count + 1
    assert built.runner.sample_graphs is not None and built.runner.sample_graphs.owner is built.runner.graphs
    assert made[-1][3:] == (6, 32)


# ---------------------------------------------------------------------------
# Kernel entry points of the graph path (the interpreter on a CPU, CUDA on a GPU)
# ---------------------------------------------------------------------------

def test_store_kv_skip_padding_writes_only_real_rows(device, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(6, 4, 2, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(5, 2, 16, generator=gen).to(device)
    v = torch.randn(5, 2, 16, generator=gen).to(device)
    slots = torch.tensor([9, -1, 0, 23, -1], dtype=torch.int32, device=device)
    for interpret in ("1", "0") if device == "cpu" else ("-",):
        if interpret != "-":
            monkeypatch.setenv("TRITON_INTERPRET", interpret)  # "0": the torch path
        k_cache.zero_()
        v_cache.zero_()
        store_kv_skip_padding(k, v, k_cache, v_cache, slots)
        flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
        for row, slot in ((0, 9), (2, 0), (3, 23)):
            assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
        assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == 3 and int((flat_v.abs().sum((1, 2)) > 0).sum()) == 3
    with pytest.raises(ValueError, match="do not match"):
        store_kv_skip_padding(k, v, k_cache, v_cache, slots[:4])


def test_unchecked_decode_with_fixed_splits_and_padding_rows(device):
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, d, bs = 4, 2, 16, 4
    ctx = [5, 1, 0, 13, 0]  # rows 2 and 4 are padding (context 0)
    tables = torch.tensor([[0, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0], [3, 4, 5, 6], [7, 7, 7, 7]],
                          dtype=torch.int32, device=device)
    k_cache = torch.randn(8, bs, kv_heads, d, generator=gen).to(device)
    v_cache = torch.randn(8, bs, kv_heads, d, generator=gen).to(device)
    q = torch.randn(5, heads, d, generator=gen).to(device)
    lens = torch.tensor(ctx, dtype=torch.int32, device=device)
    real = torch.tensor([0, 1, 3])
    cu = torch.arange(4, dtype=torch.int32, device=device)
    ref = paged_attention_reference(q[real], k_cache, v_cache, cu, lens[real], tables[real], d ** -0.5)
    for splits in (1, 3, 8):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=splits,
                                     check=False)
        torch.testing.assert_close(out[real], ref, atol=3e-5, rtol=3e-5)
        assert not out[[2, 4]].any()
    with pytest.raises(ValueError, match="needs num_splits"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, check=False)


def graph_rows(ids, streams, block_m, capacity, device) -> cg._GraphRows:
    """The rows a decode graph passes the noisy kernel: fixed-capacity tile tables, padded."""
    ref = StreamRows(torch.tensor(ids), streams)
    ranges, table = pack_work_tiles(ids, block_m, MAX_SLOTS)
    ranges += [[0, 0]] * (capacity - len(ranges))  # unused tiles: no rows
    table += [[-1] * MAX_SLOTS] * (capacity - len(table))
    tiles = (torch.tensor(ranges, dtype=torch.int32, device=device),
             torch.tensor(table, dtype=torch.int32, device=device))
    rows = cg._GraphRows(torch.tensor(ids, dtype=torch.int32, device=device), ref.seeds.to(device),
                         ref.sigmas.to(device), {block_m: tiles})
    rows.streams = list(streams)
    return rows


def test_noisy_linear_with_graph_rows_equals_stream_rows(device):
    """The graph's rows (NoiseRows over fixed-capacity device tables) through the kernel give what
    StreamRows gives: a change to what the kernel reads that the graph rows lack fails here."""
    gen = torch.Generator().manual_seed(2)
    streams = [cg.NoiseStream(5, 0.1), cg.NoiseStream(2**63 + 1, 0.05), cg.NoiseStream(9, 0.0)]
    ids = [0] * 10 + [1] * 7 + [2] * 3 + [3] * 12 + [0] * 9 + [1] * 20
    x = torch.randn(len(ids), 40, generator=gen).to(device)
    w = torch.randn(24, 40, generator=gen).to(device)
    b = torch.randn(24, generator=gen).to(device)
    tiles = TileConfig(16, 16, 16, 4, 1)
    ref = noisy_linear(x, w, b, rows=StreamRows(torch.tensor(ids, device=device), streams), param_key=77,
                       tiles=tiles)
    for split in (1, 2):
        cfg = TileConfig(16, 16, 16, 4, 1, split)  # several tiles, then unused ones
        rows = graph_rows(ids, streams, 16, max_work_tiles(len(ids), 16, MAX_SLOTS) + 2, device)
        assert len(pack_work_tiles(ids, 16, MAX_SLOTS)[0]) < rows.work_tiles(16)[0].shape[0]
        with torch.no_grad():
            out = noisy_linear(x, w, b, rows=rows, param_key=77, tiles=cfg)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# The graph's forward against eager decode (CPU: static buffers without capture)
# ---------------------------------------------------------------------------

class Pair:
    """The same sequences on two KV caches: eager decode on one, graph decode on the other,
    fed the same tokens (the eager argmax). Each side has its own block manager, given the same
    calls, so both lay their caches out alike."""

    def __init__(self, path, device, dtype, prompts, noise, specs, *, block_size=4, max_num_seqs=8,
                 max_model_len=1024, capture=False):
        self.model = load_model(path, dtype=dtype, device=device)
        num_blocks = -(-max_model_len // block_size) * len(prompts)
        self.caches = [self.model.allocate_kv_cache(num_blocks, block_size) for _ in range(2)]
        self.blocks = [BlockManager(num_blocks, block_size, watermark=0.0) for _ in range(2)]
        self.eager = [ModelRunner(self.model, c, b) for c, b in zip(self.caches, self.blocks)]
        self.graphs = DecodeGraphs(self.model, self.caches[1], self.blocks[1], max_num_seqs, max_model_len,
                                   capture=capture, verbose=False)
        self.specs = specs
        self.seqs = [[Sequence(i, i, 0, len(p), list(p), SamplingParams(), 0, noise[i], slot=i)
                      for i, p in enumerate(prompts)] for _ in range(2)]
        for side in range(2):
            for s in self.seqs[side]:
                self.blocks[side].allocate(s.seq_id, s.tokens, num_scheduled=0)
            step = make_step(self.seqs[side], [s.num_tokens for s in self.seqs[side]])
            logits = self.eager[side].run(step, specs)
            for s in self.seqs[side]:
                s.num_computed = s.num_tokens
        self.next = logits.argmax(-1).tolist()
        for side in range(2):
            for s, t in zip(self.seqs[side], self.next):
                self.append(side, s, t)

    def append(self, side, seq, token):
        seq.tokens.append(token)
        self.blocks[side].append_token(seq.seq_id, token)

    def step(self, which):
        """Decode the sequences ``which`` (in that order) on both sides; (eager, graph) logits."""
        out = []
        for side in range(2):
            step = make_step([self.seqs[side][i] for i in which], [1] * len(which))
            if side == 0:
                out.append(self.eager[0].run(step, self.specs))
            else:
                logits = self.graphs.run(step, self.specs)
                assert logits is not None
                out.append(logits)
        for i, t in zip(which, out[0].argmax(-1).tolist()):
            for side in range(2):
                self.seqs[side][i].num_computed += 1
                self.append(side, self.seqs[side][i], t)
        return out

    def used_slots(self):
        """Cache slots that hold a token of some sequence (the rest must stay untouched)."""
        slots = []
        for s in self.seqs[0]:
            slots += self.blocks[0].slot_mapping(s.seq_id, 0, s.num_computed)
        return torch.tensor(slots, device=self.caches[0][0][0].device)


NOISE_MODES = {
    "clean": lambda n: ([-1] * n, [SPEC_ALL]),
    "noisy": lambda n: ([0] * n, [SPEC_ALL]),
    "mixed": lambda n: ([(-1, 0, 1, 2)[i % 4] for i in range(n)], [SPEC_ALL, SPEC_MLP, SPEC_ZERO]),
    "per-prompt": lambda n: (list(range(n)), [NoiseSpec(100 + i, 0.05, "all" if i % 2 else "mlp")
                                              for i in range(n)]),
}


def prompts_for(n, seed=0, vocab=256, longest=11):
    rng = random.Random(seed)
    return [[rng.randrange(vocab - 1) for _ in range(rng.randint(1, longest))] for _ in range(n)]


@pytest.mark.parametrize("mode", ["clean", "mixed", "per-prompt"])
def test_static_graph_forward_equals_eager_decode_on_cpu(tiny, mode):
    noise, specs = NOISE_MODES[mode](6)
    pair = Pair(tiny, "cpu", torch.float32, prompts_for(6), noise, specs, max_num_seqs=8)
    # 5 rows (bucket 8), shuffled; 3 rows (bucket 4); 1 row; then the bucket size itself
    for which in ([4, 0, 2, 5, 1], [3, 1, 5], [2], [0, 1, 2, 3]):
        eager, graph = pair.step(which)
        assert graph.shape == eager.shape == (len(which), 256)
        torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    assert pair.graphs.graphs and all(g.graph is None for g in pair.graphs.graphs.values())
    groups = {key[1] for key in pair.graphs.graphs}
    if mode == "clean":
        assert groups == {()}
    else:  # step [2] runs a spec of the mlp only
        assert groups == {("mlp", "attn", "lm_head"), ("mlp",)}
    # Padding rows wrote nothing: both caches agree, and no slot outside the sequences was written.
    used = pair.used_slots()
    for (ke, ve), (kg, vg) in zip(*pair.caches):
        for e, g in ((ke, kg), (ve, vg)):
            flat_e, flat_g = e.view(-1, *e.shape[2:]), g.view(-1, *g.shape[2:])
            torch.testing.assert_close(flat_g[used], flat_e[used], atol=1e-5, rtol=1e-5)
            mask = torch.ones(flat_g.shape[0], dtype=torch.bool)
            mask[used] = False
            assert not flat_g[mask].any()


def test_static_graph_forward_skips_non_sampling_rows_and_reuses_graphs(tiny):
    noise, specs = NOISE_MODES["mixed"](4)
    pair = Pair(tiny, "cpu", torch.float32, prompts_for(4, seed=1), noise, specs, max_num_seqs=4)
    for side in range(2):  # sequence 2 gets two new tokens: it computes one, samples none
        pair.append(side, pair.seqs[side][2], 17)
    eager = pair.eager[0].run(make_step(pair.seqs[0], [1] * 4), specs)
    graph = pair.graphs.run(make_step(pair.seqs[1], [1] * 4), specs)
    assert eager.shape == graph.shape == (3, 256)
    torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    for side in range(2):
        for s in pair.seqs[side]:
            s.num_computed += 1
        for i, t in zip([0, 1, 3], eager.argmax(-1).tolist()):
            pair.append(side, pair.seqs[side][i], t)
    graphs_before = dict(pair.graphs.graphs)
    eager, graph = pair.step([0, 1, 2, 3])
    torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    assert pair.graphs.graphs == graphs_before  # same key: the same graph, refilled
    assert pair.graphs.num_replays == 2
    # Not a decode step, or too many rows: the caller runs it eagerly.
    assert pair.graphs.run(make_step([pair.seqs[1][0]], [2]), specs) is None
    assert not pair.graphs.fits(make_step([pair.seqs[1][0]] * 5, [1] * 5))


def test_llm_generate_with_static_graphs_equals_eager_on_cpu(tiny):
    prompts = prompts_for(5, seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (6, 2, 4, 5, 3)]
    params[0] = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    # Sampled rows too: truncated, and barring its stop tokens for the first steps.
    params[3] = SamplingParams(temperature=0.9, top_p=0.8, top_k=30, max_tokens=5, seed=4)
    params[4] = SamplingParams(temperature=1.0, min_tokens=2, max_tokens=3, seed=5, stop_token_ids=[9, 17, 40])
    noise = [SPEC_ALL, None, SPEC_MLP, SPEC_ALL, None]
    ref = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    llm = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    llm.runner.use_graphs(DecodeGraphs(llm.model, llm.runner.kv_caches, llm.blocks, 8, 64, capture=False,
                                       verbose=False))
    a = ref.generate(prompts, params, noise, use_tqdm=False)
    b = llm.generate(prompts, params, noise, use_tqdm=False)
    for ra, rb in zip(a, b):
        assert [c.token_ids for c in ra.outputs] == [c.token_ids for c in rb.outputs]
        for ca, cb in zip(ra.outputs, rb.outputs):
            torch.testing.assert_close(torch.tensor(cb.logprobs), torch.tensor(ca.logprobs), atol=1e-5, rtol=1e-5)
    assert llm.runner.graphs.num_replays > 0
    assert {key[0] for key in llm.runner.graphs.graphs} >= {8, 4}  # the batch shrank through buckets
    # The graph steps sampled through sampler graphs, with and without stop tokens barred and truncation.
    sampler_keys = set(llm.runner.sample_graphs.graphs)
    assert {masked for _, masked, _ in sampler_keys} == {True, False}
    assert {truncates for _, _, truncates in sampler_keys} == {True, False}


def test_block_tables_stay_on_the_device_and_slots_past_its_rows_run_eagerly(tiny, monkeypatch):
    """After every graph step the device rows of its sequences hold their block tables (sent
    entry by entry), and a step with a sequence whose slot is past the device table's rows runs
    eagerly, with the same tokens."""
    prompts = prompts_for(6, seed=12, longest=9)
    # Slots follow the first samples: requests 0-5, then request 0's fork (slot 6), which ends
    # first, then request 5 (slot 5): the last steps fit the 5 rows.
    params = [SamplingParams(temperature=1.0, max_tokens=14 - i, seed=i, ignore_eos=True) for i in range(6)]
    params[0] = SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=2, ignore_eos=True)  # a fork: CoW
    ref = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    llm = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    graphs = DecodeGraphs(llm.model, llm.runner.kv_caches, llm.blocks, 8, 64, capture=False, verbose=False,
                          table_rows=5)
    llm.runner.use_graphs(graphs)
    run, ran, declined, sent = graphs.run, [], [], []

    class CountedSyncs:  # the engine's block manager, counting the entries each step sends
        def __getattr__(self, name):
            return getattr(llm.blocks, name)

        def sync_decode_tables(self, *args):
            sent.append(llm.blocks.sync_decode_tables(*args))
            return sent[-1]

    def checked(step, specs, from_samples=None):
        logits = run(step, specs, from_samples)
        if graphs.fits(step):  # a decode step
            (ran if logits is not None else declined).append(max(seq.slot for seq in step.seqs))
        if logits is not None:
            for seq in step.seqs:
                table = llm.blocks.block_table(seq.seq_id)
                assert graphs.device_tables[seq.slot, :len(table)].tolist() == table
        return logits
    monkeypatch.setattr(graphs, "run", checked)
    graphs.blocks = CountedSyncs()
    a = ref.generate(prompts, params, use_tqdm=False)
    with pytest.warns(RuntimeWarning, match="do not fit the device table"):
        b = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in r.outputs] for r in a] == [[c.token_ids for c in r.outputs] for r in b]
    assert ran and max(ran) < 5 and declined and min(declined) >= 5  # 7 sequences, 5 rows
    assert graphs.declined == len(declined)
    # The first graph step sends its rows whole; later ones at most a new block per sequence.
    sent = [n for n in sent if n >= 0]
    assert len(sent) == len(ran) and sent[0] > 4 and all(n <= 4 for n in sent[1:])


def test_sampler_graphs_are_recorded_again_when_the_slot_tables_move(tiny, monkeypatch):
    """More live sequences than slots, or more stop tokens than a slot row holds, reallocates
    the tables the sampler graphs read: they are dropped and recorded again, and the draws stay
    those of eager sampling."""
    prompts = prompts_for(6, seed=8)
    params = [SamplingParams(temperature=1.0, max_tokens=4 + 6 * (i < 2), seed=i, ignore_eos=True) for i in range(6)]
    params[5] = SamplingParams(temperature=1.0, max_tokens=4, seed=5, min_tokens=3,
                               stop_token_ids=list(range(20, 29)))  # 9 ids: wider than the tables' 4
    ref = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    llm = LLM(tiny, dtype="float32", block_size=4, max_num_seqs=8, max_model_len=64)
    llm.slots = llm.runner.slots = SamplingSlots(llm.device, 256, capacity=2)
    llm.runner.use_graphs(DecodeGraphs(llm.model, llm.runner.kv_caches, llm.blocks, 8, 64, capture=False,
                                       verbose=False))
    graphs = llm.runner.sample_graphs
    dropped = []  # how many sampler graphs each drop found
    close = graphs.close_graphs
    monkeypatch.setattr(graphs, "close_graphs", lambda: dropped.append(len(graphs.graphs)) or close())
    outputs = []
    for engine in (ref, llm):
        engine.add_requests(prompts[:2], params[:2])
        done = [engine.step() for _ in range(3)]  # a prefill, then decode steps through the graphs
        engine.add_requests(prompts[2:], params[2:])  # 4 more live sequences: the tables grow
        while engine.has_unfinished_requests():
            done.append(engine.step())
        outputs.append({r.request_id: r.outputs[0].token_ids for out in done for r in out.finished})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6
    assert llm.slots.capacity == 8 and llm.slots.stops.shape[1] >= 9
    assert max(dropped) > 0 and graphs.graphs  # graphs recorded before the growth, and after it


class DeviceOnly(TorchDispatchMode):
    """Fails any op given a tensor off ``device`` (a 0-dim host tensor, a scalar, excepted)."""

    def __init__(self, device):
        super().__init__()
        self.device, self.ops = torch.device(device), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                assert t.device == self.device, f"{func}: a tensor on {t.device} in a graph on {self.device}"
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_what_the_graphs_record_stays_on_the_model_device(tiny, monkeypatch):
    """A CPU proxy for capture on CUDA: the model stubbed on the meta device, decode and sampler
    graphs (noisy rows, stop tokens barred, truncation, input tokens from the last samples) run
    their recorded parts under a mode that fails any op handed a host tensor."""
    meta = torch.device("meta")
    model = load_model(tiny, dtype=torch.float32, device="cpu").to(meta)
    vocab = model.config.vocab_size
    model.forward = lambda input_ids, positions, *args: torch.zeros(input_ids.shape[0], 8, device=meta)
    model.logits = lambda hidden, noise=None: torch.zeros(hidden.shape[0], vocab, device=meta)
    blocks = BlockManager(64, 4, 0.0)
    graphs = DecodeGraphs(model, [], blocks, 8, 64, capture=False, verbose=False)
    slots = SamplingSlots(meta, vocab, capacity=16)
    sampler = Sampler(0)
    samplers = SampleGraphs(graphs, slots, lambda logits, rows: pack(sampler(logits, rows)))
    graphs.samples = samplers.out
    mode = DeviceOnly(meta)

    def checked(recorded):
        def run(self, *args):
            with mode:
                return recorded(self, *args)
        return run
    monkeypatch.setattr(DecodeGraph, "forward", checked(DecodeGraph.forward))
    monkeypatch.setattr(SampleGraphs, "_forward", checked(SampleGraphs._forward))
    params = SamplingParams(temperature=1.0, top_p=0.9, min_tokens=2, stop_token_ids=[3])
    seqs = []
    for i in range(5):
        tokens = list(range(1, 3 + i))
        seq = Sequence(i, i, 0, len(tokens) - 1, tokens, params, i, (-1, 0)[i % 2], num_computed=len(tokens) - 1)
        seq.slot = slots.acquire(seq.seed, params, [3])
        blocks.allocate(i, tokens, num_scheduled=0)
        seqs.append(seq)
    assert graphs.run(make_step(seqs, [1] * 5), [SPEC_ALL]).device == meta
    assert samplers.run([seq.slot for seq in seqs], [1] * 5).device == meta
    for seq in seqs[:3]:  # the next step reads its input tokens from those samples
        seq.num_computed += 1
        seq.tokens.append(-1)
        blocks.append_token(seq.seq_id, -1)
    logits = graphs.run(make_step(seqs[:3], [1] * 3), [SPEC_ALL], FromSamples([0, 1, 2], samplers.out))
    assert logits.shape == (3, vocab) and logits.device == meta
    assert graphs.num_replays == 2 and mode.ops > 20


# ---------------------------------------------------------------------------
# GPU: captured graphs
# ---------------------------------------------------------------------------

GPU_VOCAB = 1024
# LLM tests size their KV caches by blocks, not by memory, so they can share a GPU under pytest -n:
# room for 16 sequences of max_model_len 512 (block 16), above the admission watermark.
GPU_KV_BLOCKS = 16 * 512 // 16 + 16


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gpu-graphs"), vocab=GPU_VOCAB, hidden=256, inter=512, layers=2,
                     heads=8, kv_heads=2, max_pos=2048, seed=1)


def bf16_tol(ref):
    # bf16 activations: graph and eager round the same values after sums in another order
    # (split count from max_model_len, GEMM shapes of the bucket): rel. ~2^-8 per layer.
    return dict(atol=3e-2 * ref.pow(2).mean().sqrt().item(), rtol=3e-2)


GPU_STEPS = ([12, 3, 7, 0, 9, 1, 5, 11, 2, 10, 4, 6, 8], list(range(13)), list(range(9)), [8, 1, 5, 3, 0],
             [2, 4, 6], [7, 0], [5])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", list(NOISE_MODES))
def test_gpu_graph_logits_equal_eager(gpu_model, mode, dtype):
    noise, specs = NOISE_MODES[mode](13)
    pair = Pair(gpu_model, "cuda", dtype, prompts_for(13, seed=4, vocab=GPU_VOCAB, longest=40), noise, specs,
                block_size=16, max_num_seqs=16, max_model_len=2048, capture=True)
    for _ in range(3):  # replays with refilled buffers, contexts crossing block boundaries
        for which in GPU_STEPS:
            eager, graph = pair.step(which)
            if dtype == torch.float32:
                torch.testing.assert_close(graph, eager, atol=2e-4, rtol=2e-4)
            else:
                torch.testing.assert_close(graph, eager, **bf16_tol(eager))
                # greedy agrees wherever eager's top-2 margin exceeds the rounding noise
                top2 = eager.topk(2, dim=-1).values
                sure = (top2[:, 0] - top2[:, 1]) > 0.1 * eager.std()
                assert torch.equal(graph.argmax(-1)[sure], eager.argmax(-1)[sure])
    g = pair.graphs
    assert not g.disabled and g.pool is not None
    assert all(graph.graph is not None for graph in g.graphs.values())
    assert {key[0] for key in g.graphs} == {16, 8, 4, 2, 1}
    assert g.num_replays == 3 * len(GPU_STEPS)
    used = pair.used_slots()
    for k, v in pair.caches[1]:
        for c in (k, v):
            flat = c.view(-1, *c.shape[2:])
            mask = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
            mask[used] = False
            assert not flat[mask].any()  # padding rows never wrote the cache


@pytest.mark.gpu
def test_gpu_per_prompt_noise_in_a_large_bucket_uses_a_higher_tile_level(gpu_model):
    n = 100  # 100 streams in bucket 128: more tiles than level 0 holds
    noise, specs = NOISE_MODES["per-prompt"](n)
    pair = Pair(gpu_model, "cuda", torch.float32, prompts_for(n, seed=5, vocab=GPU_VOCAB, longest=20), noise,
                specs, block_size=16, max_num_seqs=128, max_model_len=256, capture=True)
    for which in (list(range(n)), list(range(0, n, 2)), list(range(n))):
        eager, graph = pair.step(which)
        torch.testing.assert_close(graph, eager, atol=2e-4, rtol=2e-4)
    assert max(key[2] for key in pair.graphs.graphs) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["clean", "noisy", "mixed"])
def test_gpu_llm_greedy_tokens_identical_with_and_without_graphs(gpu_model, mode):
    prompts = prompts_for(13, seed=6, vocab=GPU_VOCAB, longest=30)
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(13)]
    params[1] = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, n=3)
    noise = {"clean": [None] * 13, "noisy": [SPEC_ALL] * 13,
             "mixed": [(None, SPEC_ALL, SPEC_MLP)[i % 3] for i in range(13)]}[mode]
    outs = []
    for eager in (True, False):
        llm = LLM(gpu_model, dtype="float32", block_size=16, max_num_seqs=16, max_model_len=512,
                  num_kv_blocks=GPU_KV_BLOCKS, enforce_eager=eager)
        outs.append(llm.generate(prompts, params, noise, use_tqdm=False))
        if eager:
            assert llm.runner.graphs is None
        else:
            graphs = llm.runner.graphs
            assert graphs is not None and not graphs.disabled and graphs.num_replays > 0
            assert len({key[0] for key in graphs.graphs}) >= 3  # the batch shrank through buckets
    for ra, rb in zip(*outs):
        assert [c.token_ids for c in ra.outputs] == [c.token_ids for c in rb.outputs]
    # bf16 with graphs runs and stays close to eager (tokens may part at near-ties)
    llm = LLM(gpu_model, dtype="bfloat16", block_size=16, max_num_seqs=16, max_model_len=512,
              num_kv_blocks=GPU_KV_BLOCKS)
    out = llm.generate(prompts, params, noise, use_tqdm=False)
    assert all(len(c.token_ids) == p.max_tokens for r, p in zip(out, params) for c in r.outputs)
    assert not llm.runner.graphs.disabled


@pytest.mark.gpu
def test_gpu_sampler_graphs_draw_exactly_what_the_eager_sampler_draws(gpu_model):
    llm = LLM(gpu_model, dtype="float32", block_size=16, max_num_seqs=16, max_model_len=512,
              num_kv_blocks=GPU_KV_BLOCKS)
    params = [SamplingParams(temperature=(1.0, 0.7, 0.0)[i % 3], top_p=(1.0, 0.9)[i % 2],
                             top_k=50 if i % 4 == 0 else -1, min_tokens=i % 5, stop_token_ids=[3, 5],
                             max_tokens=12, seed=i) for i in range(11)]
    runner, checked = llm.runner, []
    sample = runner.sample

    def sample_both_ways(logits, slots, steps):
        graphed = logits is runner._graph_logits
        packed = sample(logits, slots, steps)
        if graphed:  # the same kernel on the same inputs, eagerly
            eager = runner.draw(logits.clone(), runner.slots.rows(slots, steps))
            assert torch.equal(packed, eager)
            checked.append(len(slots))
        return packed
    runner.sample = sample_both_ways
    llm.generate(prompts_for(11, seed=9, vocab=GPU_VOCAB, longest=30), params, use_tqdm=False)
    graphs = runner.sample_graphs
    assert len(checked) > 5 and not graphs.disabled
    assert graphs.graphs and all(g is not None for g in graphs.graphs.values())
    assert {masked for _, masked, _ in graphs.graphs} == {True, False}
