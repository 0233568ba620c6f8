"""Turns a scheduled step into model inputs, runs the model, and samples the rows' next tokens."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from psnrl.engine import cuda_graphs
from psnrl.engine.attention import AttentionMetadata
from psnrl.engine.block_manager import BlockManager
from psnrl.engine.model import CausalLM
from psnrl.engine.noise_spec import BatchNoise, NoiseSpec
from psnrl.engine.sample_graphs import Draw, SampleGraphs
from psnrl.engine.sampling_slots import SamplingSlots
from psnrl.engine.scheduler import Step


class FromSamples(NamedTuple):
    """A step whose input tokens are still on the device, sampled by the step before (the engine's
    overlap): entry i's token is ``samples[rows[i], 0]`` (``sampling.pack``'s layout)."""

    rows: list[int]
    samples: torch.Tensor


class Samples:
    """A step's packed samples on their way to the host: the copy is queued behind the step
    (pinned memory on CUDA), so the host can prepare the next step before ``wait``."""

    def __init__(self, host: torch.Tensor, copied: torch.cuda.Event | None):
        self.host, self.copied = host, copied

    def wait(self) -> tuple[list[int], list[float]]:
        """The rows' tokens and log-probs, once the step has run."""
        if self.copied is not None:
            self.copied.synchronize()
        values = self.host.numpy()
        return values[:, 0].astype(np.int64).tolist(), values[:, 1].tolist()


class ModelRunner:
    """Runs scheduled steps on the KV cache whose blocks ``blocks`` hands out. With
    ``use_cuda_graphs`` on CUDA, pure decode steps of up to ``max_num_seqs`` sequences replay
    CUDA graphs (psnrl/engine/cuda_graphs.py), and so does their sampling
    (psnrl/engine/sample_graphs.py); other steps, and every step on a CPU, run eagerly.
    ``slots`` and ``draw`` (the engine's sampling tables and sampler) are needed by ``sample``
    only."""

    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 blocks: BlockManager, *, slots: SamplingSlots | None = None, draw: Draw | None = None,
                 use_cuda_graphs: bool = False, max_num_seqs: int = 256, max_model_len: int | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.slots, self.draw = slots, draw
        self.device = model.model.embed_tokens.weight.device
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        self.sample_graphs: SampleGraphs | None = None
        self._graph_logits: torch.Tensor | None = None  # the logits the last replay returned
        self.sampled_by_graph = False  # the last ``sample`` replayed a sampler graph
        # Two read-back buffers: one step's samples are read while the next step's are copied.
        self._pinned = [torch.empty(0, 2, dtype=torch.float64) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if self.device.type == "cuda" else None
        self._turn = 0
        if cuda_graphs.enabled(self.device, enforce_eager=not use_cuda_graphs):
            self.use_graphs(cuda_graphs.DecodeGraphs(
                model, kv_caches, blocks, max_num_seqs, max_model_len or model.config.max_position_embeddings,
                table_rows=slots.capacity if slots is not None else None))  # a device table row per slot

    def use_graphs(self, graphs: cuda_graphs.DecodeGraphs) -> None:
        """Replay ``graphs`` for decode steps, and sampler graphs on their logits."""
        self.graphs = graphs
        self.sample_graphs = SampleGraphs(graphs, self.slots, self.draw) \
            if self.slots is not None and self.draw is not None else None
        # A step of the overlap reads its input tokens from the sampler graphs' output.
        graphs.samples = self.sample_graphs.out if self.sample_graphs is not None else None

    def close(self) -> None:
        """Release the KV cache and the decode graphs (the model belongs to the caller)."""
        if self.sample_graphs is not None:
            self.sample_graphs.close_graphs()
            self.sample_graphs = None
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        self.kv_caches = []
        self._graph_logits = None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate KV blocks (src -> dst) in every layer before the step."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    @torch.inference_mode()
    def run(self, step: Step, specs: Sequence[NoiseSpec | None],
            from_samples: FromSamples | None = None) -> torch.Tensor:
        """Logits (fp32) [sampling entries, vocab] of a scheduled step, in the order of
        ``step.sampling_entries()``. ``from_samples``: a decode step whose input tokens are the
        previous step's samples."""
        self._graph_logits = None
        if self.graphs is not None:
            logits = self.graphs.run(step, specs, from_samples)
            if logits is not None:
                self._graph_logits = logits
                return logits
        block_tables = self.blocks.block_tables([seq.seq_id for seq in step.seqs])
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_spec: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        for seq, num_new, table in zip(step.seqs, step.num_new, block_tables):
            start, end = seq.num_computed, seq.num_computed + num_new
            ids.extend(seq.tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            row_spec.extend([seq.noise] * num_new)
            cu.append(cu[-1] + num_new)
            context_lens.append(end)
        last_rows = [cu[i + 1] - 1 for i in step.sampling_entries()]
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [-1] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            block_tables=tables.to(self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device))
        noise = BatchNoise(row_spec, specs, self.device) if any(s >= 0 for s in row_spec) else None
        if from_samples is None:
            input_ids = torch.tensor(ids, device=self.device)
        else:  # one token per sequence, sampled on the device (a bad row's -1 clamped: see cuda_graphs)
            rows = torch.tensor(from_samples.rows, device=self.device)
            input_ids = from_samples.samples[rows, 0].long().clamp(min=0)
        hidden = self.model(input_ids,
                            torch.tensor(positions, device=self.device), meta, self.kv_caches, noise)
        last = torch.tensor(last_rows, dtype=torch.long)
        return self.model.logits(hidden[last.to(self.device)],
                                 noise.select(last) if noise is not None else None)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, slots: list[int], steps: list[int]) -> torch.Tensor:
        """float64 [rows, 2] on the device: each row's token and log-prob (``sampling.pack``),
        row i drawn from ``logits[i]`` with the constants of slot ``slots[i]`` at step ``steps[i]``.
        The logits of a decode graph (``run``'s result, untouched) are sampled by a sampler graph."""
        if self.slots is None or self.draw is None:
            raise RuntimeError("ModelRunner.sample needs the engine's sampling slots and sampler (slots=, draw=)")
        self.sampled_by_graph = False
        if self.sample_graphs is not None and logits is self._graph_logits:
            packed = self.sample_graphs.run(slots, steps)
            if packed is not None:
                self.sampled_by_graph = True
                return packed
        return self.draw(logits, self.slots.rows(slots, steps))

    def read_back(self, packed: torch.Tensor) -> Samples:
        """Queue the copy of ``sample``'s result to the host (the buffers alternate: the caller
        waits for one step's samples before it queues the copy after next)."""
        if self._events is None:  # a CPU: copy now (a sampler graph's output is overwritten next step)
            return Samples(packed.clone(), None)
        self._turn ^= 1
        n, buf = packed.shape[0], self._pinned[self._turn]
        if buf.shape[0] < n:
            buf = self._pinned[self._turn] = torch.empty(max(n, 2 * buf.shape[0]), 2, dtype=torch.float64,
                                                         pin_memory=True)
        host = buf[:n]
        host.copy_(packed, non_blocking=True)
        event = self._events[self._turn]
        event.record()
        return Samples(host, event)
