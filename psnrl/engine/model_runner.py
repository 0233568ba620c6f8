"""Turns a scheduled step into model inputs, runs the model and returns the sampling rows' logits."""
from __future__ import annotations

from typing import Sequence

import torch

from psnrl.engine import cuda_graphs
from psnrl.engine.attention import AttentionMetadata
from psnrl.engine.model import CausalLM
from psnrl.engine.noise_spec import BatchNoise, NoiseSpec
from psnrl.engine.scheduler import ScheduledSeq


class ModelRunner:
    """Runs scheduled steps. With ``use_cuda_graphs`` on CUDA, pure decode steps of up to
    ``max_num_seqs`` sequences replay CUDA graphs (psnrl/engine/cuda_graphs.py); other steps,
    and every step on a CPU, run eagerly."""

    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, *, use_cuda_graphs: bool = False, max_num_seqs: int = 256,
                 max_model_len: int | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = model.model.embed_tokens.weight.device
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        if cuda_graphs.enabled(self.device, enforce_eager=not use_cuda_graphs):
            self.graphs = cuda_graphs.DecodeGraphs(
                model, kv_caches, block_size, max_num_seqs,
                max_model_len or model.config.max_position_embeddings)

    def close(self) -> None:
        """Release the KV cache and the decode graphs (the model belongs to the caller)."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        self.kv_caches = []

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
    def run(self, seqs: list[ScheduledSeq], block_tables: list[list[int]],
            specs: Sequence[NoiseSpec | None]) -> torch.Tensor:
        """Logits (fp32) [num sampling seqs, vocab], in the order of the sampling entries of ``seqs``."""
        if self.graphs is not None:
            logits = self.graphs.run(seqs, block_tables, specs)
            if logits is not None:
                return logits
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_spec: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        last_rows: list[int] = []
        for entry, table in zip(seqs, block_tables):
            seq = entry.seq
            start, end = seq.num_computed, seq.num_computed + entry.num_new
            ids.extend(seq.tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            row_spec.extend([seq.noise] * entry.num_new)
            cu.append(cu[-1] + entry.num_new)
            context_lens.append(end)
            if entry.samples:
                last_rows.append(cu[-1] - 1)
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [-1] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            block_tables=tables.to(self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device))
        noise = BatchNoise(row_spec, specs, self.device) if any(s >= 0 for s in row_spec) else None
        hidden = self.model(torch.tensor(ids, device=self.device),
                            torch.tensor(positions, device=self.device), meta, self.kv_caches, noise)
        last = torch.tensor(last_rows, dtype=torch.long)
        return self.model.logits(hidden[last.to(self.device)],
                                 noise.select(last) if noise is not None else None)
