"""CUDA graphs for pure decode steps at bucketed batch sizes (CUDA only).

A decode step of a small batch is bound by the host: ~10 kernel launches per
layer, each a few microseconds of Python and driver time, for kernels that run
for a few microseconds. Like vLLM and nano-vllm, the engine records the whole
decode forward (embedding, every layer, final norm, lm_head) once per batch-size
bucket in a CUDA graph and replays it: one launch per step. Prefill and mixed
prefill + decode steps stay eager.

What an eager decode step does on the host, and how the graph avoids it
(``ModelRunner.run`` -> ``CausalLM`` -> attention / StreamLinear):

* Inputs (token ids, positions, slot mapping, context lengths, block tables,
  cu_seqlens) are ``torch.tensor``-s of Python lists, a new size each step.
  Graph: fixed-size device buffers, one flat int32 buffer written from pinned
  host staging with one asynchronous copy before ``replay()``. Block tables stay
  on the device: each sequence's table is a row of one ``[rows, ceil(max_model_len
  / block_size)]`` table (the row is its sampling slot), and a step copies only
  the entries a row lacks (new blocks, copy-on-write replacements; a whole row
  when a sequence first runs in a graph), as (flat index, block) pairs the graph
  scatters before it gathers the step's rows for attention. The block manager
  tracks what each row holds (``BlockManager.sync_decode_tables``), and also
  writes the new tokens' KV slots, so the host never walks a table. Rows past
  the batch are padding: position 0, context 0 (attention output 0), slot -1
  (the K/V store skips them, ``store_kv_skip_padding``), clean noise.
* Attention: the dispatcher reads ``cu_seqlens_q`` back (``.tolist()``, decode or
  not), ``_check_lengths`` reads the lengths and block ids back, and the split
  count of the split-K decode kernel follows the step's longest context. Graph:
  ``AttentionMetadata.decode_splits`` sends attention straight to the decode
  kernel with no device reads and a split count fixed per bucket from
  ``max_model_len`` (``pick_num_splits``); a shorter context leaves some splits
  empty, which the reduce ignores. The host checks the lengths and table widths.
  (Graph decode always runs the Triton kernel, also where eager mode would pick
  flash-attn: block sizes that are multiples of 256 with flash-attn installed.)
* Noise: ``BatchNoise`` / ``StreamRows`` build per-row stream ids, a seed and a
  sigma table sized by the call's specs, and the noisy kernel's work tiles, all
  on the host. The tiles follow runs of equal ids (``_pack``), so the kernel's
  grid (tiles) and ``SLOTS`` (a constexpr) depend on the data. Graph: the same
  kernel, fed fixed-size tables:

  - the batch's noisy specs become local streams 1..D (D <= bucket), so the
    seed / sigma tables have ``bucket + 1`` entries whatever the call's specs;
  - rows are reordered by stream (stable; clean first): rows of a stream are one
    run, which keeps the tiles few; the logits rows are put back in order;
  - ``SLOTS`` is always ``MAX_SLOTS`` (an empty slot costs a dot of zero rows and no
    noise: decode is bound by the weight reads, which a tile makes once for all slots);
  - the tile tables have a fixed capacity and the grid launches that many tiles;
    unused tiles are empty row ranges that skip the K loop (no weight reads).
    ``max_work_tiles`` bounds the tiles of any batch, but launching that bound when a batch needs few
    (``bucket / 4`` against ``bucket / block_m + 2`` for clean + one spec) would
    cost thousands of idle programs per linear, so the capacity is a *level*:
    ``(ceil(bucket / block_m) + 2) * 2**level``, capped by the bound. The level is
    the smallest that fits the step's tiles.

  Besides, the autograd Function of ``noisy_linear`` looked up the clean rows on
  the device (``nonzero``) even without grad; ``noisy_linear`` now launches the
  kernel directly when no graph is recorded (no_grad / inference_mode).

  Which target groups carry noise changes the forward itself (a group with no
  noisy row runs ``F.linear``, cuBLAS, as in eager mode), so a graph is keyed by
  (bucket, noisy groups, tile level). Clean, noisy and mixed batches all replay
  graphs; a run typically needs one or two graphs per bucket. The alternative of
  one graph per bucket with fixed row tiles fails whenever a tile of rows holds
  more than ``MAX_SLOTS`` streams (per-prompt specs), and a per-row kernel would
  regenerate the noise once per row.

* Logits: eager mode gathers the sampling rows (``torch.tensor(last_rows)``, and
  ``BatchNoise.select`` builds another BatchNoise for the lm_head). Graph: lm_head
  runs on every row inside the graph, and the graph writes the sampling rows to the
  shared output in the step's order through a device index that came with the
  inputs. The sampler graphs (psnrl/engine/sample_graphs.py) sample them there.

Graphs are captured lazily, at the first step that needs one, with that step's
real data: a warm-up run (compiles the Triton kernels, computes the step and
writes its K/V), the capture, then a replay (rewrites the same K/V). All graphs
share one memory pool; their logits go to one shared ``[max bucket, vocab]``
fp32 buffer, so pool memory is the largest graph's working set. Graph inputs
live outside the pool, and logits are copied out right after each replay, so
graphs that reuse each other's scratch memory never clobber live data. Every
Python scalar a kernel receives (shapes, strides, param keys, the split count)
is baked in at capture; everything that changes per step is in the buffers.

Buckets: 1, 2, 4, ..., up to ``max_num_seqs`` (and ``max_num_seqs`` itself).
A step of n sequences runs the smallest bucket >= n. CPU: always eager
(``enabled``). ``EngineConfig.enforce_eager=True`` turns graphs off. If a capture
fails, a warning says so and decoding stays eager.

``DecodeGraphs(..., capture=False)`` runs the same static-buffer forward without
capturing (the tests' way to check the padding, reordering and noise tables on
a CPU, and a debugging aid on a GPU).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import triton

from psnrl.engine.attention import AttentionMetadata
from psnrl.engine.block_manager import BlockManager
from psnrl.engine.layers import StreamLinear
from psnrl.engine.noise_spec import TARGET_GROUPS, NoiseSpec
from psnrl.engine.scheduler import Step
from psnrl.engine.sequence import noise_of, num_computed_of, seq_id_of, slot_of
from psnrl.kernels import noise as noise_mod
from psnrl.kernels.noise_rows import MAX_SLOTS, NoiseRows, NoiseStream, max_work_tiles, pack_work_tiles
from psnrl.kernels.noisy_linear import pick_tiles
from psnrl.kernels.splitk_workspace import workspace_pins
from psnrl.kernels.paged_attention import pick_num_splits

# Noise-stream slots per work tile in graphs (a constexpr of the noisy kernel).
SLOTS = MAX_SLOTS


def enabled(device: torch.device | str, enforce_eager: bool) -> bool:
    """Whether decode steps run CUDA graphs: on CUDA unless ``enforce_eager``; never on a CPU."""
    return torch.device(device).type == "cuda" and not enforce_eager


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get graphs: powers of two below ``max_num_seqs``, then ``max_num_seqs``."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = []
    b = 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    sizes.append(max_num_seqs)
    return sizes


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``n`` rows (None: more rows than the largest)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def tile_capacity(bucket: int, block_m: int, level: int) -> int:
    """Work tiles a graph's noisy linears launch at a tile ``level`` (see the module docstring)."""
    bound = max_work_tiles(bucket, block_m, SLOTS)
    return min(bound, (triton.cdiv(bucket, block_m) + 2) << level)


def tile_level(bucket: int, tiles_needed: dict[int, int]) -> int:
    """The smallest level whose capacity holds ``tiles_needed[block_m]`` tiles for every block_m."""
    level = 0
    while any(t > tile_capacity(bucket, bm, level) for bm, t in tiles_needed.items()):
        if all(tile_capacity(bucket, bm, level) == max_work_tiles(bucket, bm, SLOTS) for bm in tiles_needed):
            raise ValueError(f"{tiles_needed} tiles exceed the bound of {bucket} rows")  # _pack broke its bound
        level += 1
    return level


@dataclass
class DecodePlan:
    """A decode step laid out for a graph of ``bucket`` rows (host side; graph row order).

    Graph row r runs entry ``order[r]`` of the step; rows n..bucket-1 are padding.
    """

    bucket: int
    order: list[int]
    seq_ids: list[int]
    table_rows: list[int]  # the rows of the device block table that hold their tables
    tokens: list[int] | None  # None: every input token is a previous sample (token_rows)
    positions: list[int]
    streams: list[NoiseStream]  # local stream s (1-based) is streams[s - 1]
    group_ids: dict[str, list[int]]  # per noisy group: the stream of each of the bucket's rows
    out_rows: list[int]  # graph rows of the sampling entries, in the step's order
    token_rows: list[int] | None = None  # per graph row, the sample row its input token is (overlap)

    @property
    def num_rows(self) -> int:
        return len(self.order)

    @property
    def noisy_groups(self) -> tuple[str, ...]:
        return tuple(g for g in TARGET_GROUPS if g in self.group_ids)


def plan_decode(step: Step, specs: Sequence[NoiseSpec | None], bucket: int,
                token_rows: Sequence[int] | None = None) -> DecodePlan:
    """Lay out a pure decode step (every entry has one new token) in ``bucket`` rows.

    Rows are ordered by noise stream (clean first, stable), the order that keeps the noisy
    kernel's work tiles fewest. A sequence's block table lives in row ``seq.slot`` of the
    device table (its sampling slot). ``token_rows``: per entry, the row of the previous step's
    samples that is its input token (the tokens are still on the device).
    """
    seqs = step.seqs
    n = len(seqs)
    if not 1 <= n <= bucket:
        raise ValueError(f"a decode plan needs 1..{bucket} sequences, got {n}")
    if step.num_new.count(1) != n:
        raise ValueError(f"a decode plan takes one new token per sequence, got {step.num_new}")
    noise = list(map(noise_of, seqs))
    kinds = set(noise)
    bad = [i for i in kinds if not -1 <= i < len(specs)]
    if bad:
        raise ValueError(f"sequence noise index {bad[0]} is outside [-1, {len(specs) - 1}]")
    noisy_specs = sorted(i for i in kinds if i >= 0 and specs[i] is not None and specs[i].sigma > 0)
    local = {s: i + 1 for i, s in enumerate(noisy_specs)}
    sid = [local.get(i, 0) for i in noise] if local else [0] * n
    order = sorted(range(n), key=sid.__getitem__) if local else list(range(n))
    ordered = [seqs[i] for i in order] if local else seqs
    positions = list(map(num_computed_of, ordered))
    tokens = [seq.tokens[p] for seq, p in zip(ordered, positions)] if token_rows is None else None
    streams = [NoiseStream(specs[s].seed, specs[s].sigma) for s in noisy_specs]
    group_ids: dict[str, list[int]] = {}
    for group in TARGET_GROUPS:
        targeted = {local[s] for s in noisy_specs if group in specs[s].groups}
        if not targeted:
            continue
        ids = [sid[i] if sid[i] in targeted else 0 for i in order] + [0] * (bucket - n)
        if any(ids):
            group_ids[group] = ids
    # The graph rows of the sampling entries, in the step's order.
    out_rows = step.sampling_entries()
    if local:  # rows were reordered by noise stream
        row_of = [0] * n
        for row, i in enumerate(order):
            row_of[i] = row
        out_rows = [row_of[i] for i in out_rows]
    rows = ([token_rows[i] for i in order] if local else list(token_rows)) if token_rows is not None else None
    return DecodePlan(bucket, order, list(map(seq_id_of, ordered)), list(map(slot_of, ordered)), tokens, positions,
                      streams, group_ids, out_rows, rows)


class _GraphRows(NoiseRows):
    """The rows of one noise group in a graph, as the noisy kernel reads them (``NoiseRows``),
    backed by the graph's fixed-size device tables (refilled every step)."""

    all_clean = False

    def __init__(self, ids: torch.Tensor, seeds: torch.Tensor, sigmas: torch.Tensor,
                 tiles: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.ids = ids
        self.shape = tuple(ids.shape)
        self.seeds = seeds
        self.sigmas = sigmas
        self._tiles = tiles
        self.streams: list[NoiseStream] = []  # host copy (the torch reference path reads it)

    @property
    def num_rows(self) -> int:
        return self.ids.numel()

    def work_tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if block_m not in self._tiles:
            raise RuntimeError(f"a decode graph has work tiles for block_m {sorted(self._tiles)}, "
                               f"the noisy kernel asked for {block_m}")
        return self._tiles[block_m]


class _GraphNoise:
    """The ``BatchNoise`` of a graph: ``rows(group)`` for the linears."""

    def __init__(self, rows: dict[str, _GraphRows]):
        self._rows = rows

    def rows(self, group: str) -> _GraphRows | None:
        return self._rows.get(group)


class DecodeGraph:
    """One captured decode forward: ``bucket`` rows, the given noisy groups, a tile level."""

    def __init__(self, owner: "DecodeGraphs", bucket: int, groups: tuple[str, ...], level: int):
        self.owner = owner
        self.bucket = bucket
        self.groups = groups
        self.level = level
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pinned: list[torch.Tensor] = []
        dev = owner.device
        pin = dev.type == "cuda"
        # Layout of the flat int32 buffer: name -> (offset, length), 16-element aligned.
        self._slices: dict[str, tuple[int, int]] = {}
        size = 0

        def add(name: str, length: int) -> None:
            nonlocal size
            size = (size + 15) // 16 * 16
            self._slices[name] = (size, length)
            size += length

        for name in ("tokens", "positions", "slots", "context_lens", "out_rows", "token_rows", "table_rows"):
            add(name, bucket)
        add("seeds", 2 * (bucket + 1))
        add("sigmas", bucket + 1)
        self.caps: dict[tuple[str, int], int] = {}
        for g in groups:
            add(f"ids.{g}", bucket)
            for bm in owner.block_ms(bucket, g):
                cap = tile_capacity(bucket, bm, level)
                self.caps[(g, bm)] = cap
                add(f"ranges.{g}.{bm}", 2 * cap)
                add(f"tiles.{g}.{bm}", SLOTS * cap)
        self.flat = torch.zeros(size, dtype=torch.int32, device=dev)
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self._np = self.host.numpy()
        # The rows' block tables, gathered from the device table inside the graph.
        self.tables = torch.zeros(bucket, owner.table_width, dtype=torch.int32, device=dev)
        self._streams: list[NoiseStream] | None = None  # whose seeds and sigmas the buffers hold

        v = self._view
        self.tokens, self.positions, self.slots = v("tokens"), v("positions"), v("slots")
        self.context_lens, self.out_rows, self.token_rows = v("context_lens"), v("out_rows"), v("token_rows")
        self.table_rows = v("table_rows")
        self.meta = AttentionMetadata(
            cu_seqlens_q=torch.arange(bucket + 1, dtype=torch.int32, device=dev),
            context_lens=self.context_lens, block_tables=self.tables, slot_mapping=self.slots,
            decode_splits=owner.num_splits(bucket))
        seeds = v("seeds").view(bucket + 1, 2)
        sigmas = v("sigmas").view(torch.float32)
        self.rows = {g: _GraphRows(v(f"ids.{g}"), seeds, sigmas,
                                   {bm: (v(f"ranges.{g}.{bm}").view(-1, 2), v(f"tiles.{g}.{bm}").view(-1, SLOTS))
                                    for bm in owner.block_ms(bucket, g)})
                     for g in groups}
        self.noise = _GraphNoise(self.rows) if groups else None

    def _view(self, name: str) -> torch.Tensor:
        off, length = self._slices[name]
        return self.flat[off:off + length]

    def _put(self, name: str, values, pad: int = 0) -> None:
        off, length = self._slices[name]
        values = np.asarray(values, dtype=np.int32).reshape(-1)
        self._np[off:off + values.size] = values
        self._np[off + values.size:off + length] = pad

    def fill(self, plan: DecodePlan, tiles: dict[tuple[str, int], tuple[list, list]]) -> bool:
        """Write the step into the graph's input buffers and the block-table entries the device
        lacks into the owner's (two asynchronous copies on CUDA). False: the step's tables do not
        fit the device table (nothing was copied; the step runs eagerly)."""
        o = self.owner
        if o.copied is not None:
            o.copied.synchronize()  # the previous step's copies have read the staging buffers
        n, b = plan.num_rows, self.bucket
        off, _ = self._slices["slots"]
        count = o.blocks.sync_decode_tables(plan.seq_ids, plan.positions, plan.table_rows, o.table_rows,
                                            o.table_width, self._np[off:off + n], o.pairs_np[:b * o.table_width])
        if count < 0:
            return False
        self._np[off + n:off + b] = -1  # padding rows store no K/V
        if plan.tokens is not None:
            self._put("tokens", plan.tokens)
        self._put("positions", plan.positions)
        off, _ = self._slices["context_lens"]
        self._np[off:off + n] = plan.positions
        self._np[off:off + n] += 1
        self._np[off + n:off + b] = 0
        self._put("out_rows", plan.out_rows)
        self._put("token_rows", plan.token_rows if plan.token_rows is not None else [], pad=-1)
        self._put("table_rows", plan.table_rows, pad=o.table_rows)  # padding rows: the spare row
        if plan.streams != self._streams:  # they change with the step's noise specs only
            self._put("seeds", noise_mod.seed_table([0] + [s.seed for s in plan.streams], "cpu").numpy())
            sig_off, sig_len = self._slices["sigmas"]
            sig = self._np[sig_off:sig_off + sig_len].view(np.float32)
            sig[:] = 0.0
            sig[1:1 + len(plan.streams)] = [s.sigma for s in plan.streams]
            self._streams = list(plan.streams)
        for g in self.groups:
            self._put(f"ids.{g}", plan.group_ids.get(g, [0] * b))
            self.rows[g].streams = list(plan.streams)
            for bm in self.owner.block_ms(b, g):
                ranges, table = tiles[(g, bm)]
                self._put(f"ranges.{g}.{bm}", ranges)  # unused tiles: [0, 0), no rows
                self._put(f"tiles.{g}.{bm}", table, pad=-1)
        o.updates_np[0] = count
        cuda = self.flat.is_cuda
        self.flat.copy_(self.host, non_blocking=cuda)
        o.updates[:2 + 2 * count].copy_(o.updates_host[:2 + 2 * count], non_blocking=cuda)
        if cuda:
            o.copied = event = torch.cuda.Event()
            event.record()
        return True

    def refresh_tables(self) -> None:
        """Apply the block-table entries of this step (the first ``count`` pairs; the rest of the
        bucket's capacity goes to the spare row) and gather the rows' tables for attention."""
        o = self.owner
        cap = self.bucket * o.table_width
        pairs = o.update_pairs[:cap]
        index = torch.where(o.update_index[:cap] < o.updates[:1], pairs[:, 0], o.table_rows * o.table_width)
        o.device_tables.view(-1).scatter_(0, index.long(), pairs[:, 1])
        torch.index_select(o.device_tables, 0, self.table_rows.long(), out=self.tables)

    def forward(self) -> None:
        """The recorded computation: the model on the static buffers, logits into the shared output."""
        o = self.owner
        self.refresh_tables()
        tokens = self.tokens.long()
        if o.samples is not None:  # rows with a token row take the token sampled there last step
            # (a bad row's -1 becomes 0: that sequence ends with an error, its next token unread)
            sampled = o.samples[self.token_rows.clamp(min=0).long(), 0].long().clamp(min=0)
            tokens = torch.where(self.token_rows >= 0, sampled, tokens)
        hidden = o.model(tokens, self.positions.long(), self.meta, o.kv_caches, self.noise)
        assert o.out is not None  # allocated before the first graph is built
        # In the step's order (padding rows repeat row 0): the sampler reads the first rows.
        torch.index_select(o.model.logits(hidden, self.noise), 0, self.out_rows, out=o.out[:self.bucket])

    def capture(self) -> None:
        o = self.owner
        torch.cuda.synchronize(o.device)
        self.forward()  # warm-up: compiles kernels; computes this step (and writes its K/V)
        torch.cuda.synchronize(o.device)
        graph = torch.cuda.CUDAGraph()
        with workspace_pins() as pins, torch.cuda.graph(graph, pool=o.pool):
            self.forward()
        torch.cuda.synchronize(o.device)
        self.graph, self.pinned = graph, pins  # replays write into the pinned workspaces

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.forward()


class DecodeGraphs:
    """Decode CUDA graphs of one model and KV cache (``ModelRunner`` owns one on CUDA).

    ``run`` returns the logits of a pure decode step that fits a bucket, or None
    (the caller runs the step eagerly).
    """

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], blocks: BlockManager,
                 max_num_seqs: int, max_model_len: int, capture: bool = True, verbose: bool = True,
                 table_rows: int | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_model_len = max_model_len
        self.buckets = bucket_sizes(max_num_seqs)
        self.table_width = triton.cdiv(max_model_len, self.block_size)
        self.device = dev = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.capture_graphs = capture
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, got one on {self.device}")
        self.verbose = verbose
        # Block tables on the device: a sequence's table is row ``seq.slot`` (its sampling slot) of
        # ``device_tables``, refreshed entry by entry (BlockManager.sync_decode_tables); the last
        # row is a spare that padding rows read and masked updates write. A step whose slots reach
        # past ``table_rows`` (default: the engine's initial sampling-slot capacity) runs eagerly.
        self.table_rows = table_rows if table_rows is not None else 2 * max_num_seqs
        self.device_tables = torch.zeros(self.table_rows + 1, self.table_width, dtype=torch.int32, device=dev)
        blocks.forget_device_rows()  # whatever an earlier table of these blocks held, this one holds nothing
        # A step's updates: [count, unused, (flat index, block) pairs...], room for a full rewrite
        # of the largest bucket's rows; a graph applies the first count pairs (update_index < count).
        capacity = self.buckets[-1] * self.table_width
        pin = dev.type == "cuda"
        self.updates = torch.zeros(2 + 2 * capacity, dtype=torch.int32, device=dev)
        self.updates_host = torch.zeros(2 + 2 * capacity, dtype=torch.int32, pin_memory=pin)
        self.updates_np = self.updates_host.numpy()
        self.pairs_np = self.updates_np[2:].reshape(capacity, 2)
        self.update_pairs = self.updates[2:].view(capacity, 2)
        self.update_index = torch.arange(capacity, dtype=torch.int32, device=dev)
        self.copied: torch.cuda.Event | None = None  # after the last step's host -> device copies (CUDA)
        self.graphs: dict[tuple[int, tuple[str, ...], int], DecodeGraph] = {}
        self.pool: Any = None  # the graphs' shared memory pool (CUDA)
        self.out: torch.Tensor | None = None
        self.disabled = False  # a capture failed: eager from then on
        self.declined = 0  # decode steps whose tables did not fit the device table (eager; warned once)
        # The sampler graphs' packed output ([rows, 2] float64), where a step of the overlap finds
        # its input tokens (ModelRunner.use_graphs sets it before any capture); None: never read.
        self.samples: torch.Tensor | None = None
        self.num_replays = 0
        cfg = model.config
        self._kv_heads = cfg.num_kv_heads
        self._linears: dict[str, list[tuple[int, int]]] = {g: [] for g in TARGET_GROUPS}
        for module in model.modules():
            if isinstance(module, StreamLinear):
                self._linears[module.group].append((module.weight.shape[0], module.weight.shape[1]))
        self._block_ms: dict[tuple[int, str], list[int]] = {}

    # -- sizes ----------------------------------------------------------------------------

    def num_splits(self, bucket: int) -> int:
        """Decode attention splits of a bucket: as for contexts of max_model_len."""
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else None
        return pick_num_splits(bucket, self._kv_heads, self.max_model_len, sms)

    def block_ms(self, bucket: int, group: str) -> list[int]:
        """Row-block sizes the noisy kernel picks for the group's linears at ``bucket`` rows."""
        key = (bucket, group)
        if key not in self._block_ms:
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
                if self.device.type == "cuda" else None
            self._block_ms[key] = sorted({pick_tiles(bucket, n, k, self.dtype, sms).block_m
                                          for n, k in self._linears[group]})
        return self._block_ms[key]

    # -- a step ---------------------------------------------------------------------------

    def fits(self, step: Step) -> bool:
        """A pure decode step of at most the largest bucket (the tables' width is checked as
        they are synced)."""
        return 0 < len(step.seqs) <= self.buckets[-1] and step.num_new.count(1) == len(step.seqs)

    @torch.inference_mode()
    def run(self, step: Step, specs, from_samples=None) -> torch.Tensor | None:
        """Logits (fp32) [sampling entries, vocab] of a decode step, or None if it is not one
        (or its block tables do not fit the device table).
        ``from_samples`` (``model_runner.FromSamples``): the input tokens are the previous step's
        samples, which a graph reads only from ``samples``."""
        if self.disabled or not self.fits(step):
            return None
        if from_samples is not None and (self.samples is None or
                                         from_samples.samples.data_ptr() != self.samples.data_ptr()):
            return None
        bucket = bucket_for(len(step.seqs), self.buckets)
        assert bucket is not None  # fits() checked it
        plan = plan_decode(step, specs, bucket, from_samples.rows if from_samples is not None else None)
        tiles: dict[tuple[str, int], tuple[list, list]] = {}
        for g, ids in plan.group_ids.items():
            for bm in self.block_ms(bucket, g):
                tiles[(g, bm)] = pack_work_tiles(ids, bm, SLOTS)
        needed: dict[int, int] = {}
        for (g, bm), (ranges, _) in tiles.items():
            needed[bm] = max(needed.get(bm, 0), len(ranges))
        key = (bucket, plan.noisy_groups, tile_level(bucket, needed))
        if self.out is None:
            self.out = torch.empty(self.buckets[-1], self.model.config.vocab_size, dtype=torch.float32,
                                   device=self.device)
        graph = self.graphs.get(key)
        new = graph is None
        if graph is None:
            graph = DecodeGraph(self, *key)
        if not graph.fill(plan, tiles):
            if not self.declined:
                warnings.warn(f"a decode step's block tables do not fit the device table ({self.table_rows} rows "
                              f"of {self.table_width} blocks; slots up to {max(plan.table_rows)}): such steps run "
                              f"eagerly", RuntimeWarning, stacklevel=3)
            self.declined += 1
            return None
        if new:
            if self.capture_graphs and not self._capture(graph):
                return None
            self.graphs[key] = graph
        graph.replay()
        self.num_replays += 1
        return self.out[:len(plan.out_rows)]

    def close(self) -> None:
        """Drop every graph, the graphs' memory pool and the shared output buffer; the object
        runs nothing afterwards (``run`` returns None, so a caller falls back to eager)."""
        for graph in self.graphs.values():
            if graph.graph is not None:
                graph.graph.reset()
        self.graphs.clear()
        self.pool = self.out = None
        self.disabled = True

    def _capture(self, graph: DecodeGraph) -> bool:
        start = time.perf_counter()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph.capture()
        except Exception as exc:  # a kernel or op that cannot be captured: stay correct, go eager
            self.disabled = True
            warnings.warn(f"capturing the decode CUDA graph (batch {graph.bucket}) failed: {exc!r}; "
                          f"decode steps run eagerly from now on (EngineConfig.enforce_eager=True "
                          f"skips graphs)", RuntimeWarning, stacklevel=3)
            return False
        if self.verbose:
            groups = "+".join(graph.groups) or "clean"
            from tqdm.auto import tqdm
            tqdm.write(f"[psnrl] captured decode CUDA graph {len(self.graphs) + 1}: batch {graph.bucket}, "
                       f"noise {groups}, tile level {graph.level} ({time.perf_counter() - start:.2f}s)",
                       file=sys.stderr)
        return True
