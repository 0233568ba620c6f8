"""What a step's tokens attend to, and the attention call of the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from psnrl.kernels.attention_reference import store_kv, varlen_causal_attention
from psnrl.kernels.paged_attention import paged_attention as attend
from psnrl.kernels.kv_store import store_kv_skip_padding
from psnrl.kernels.paged_attention import paged_decode_attention


@dataclass
class AttentionMetadata:
    """Where a step's tokens go and what they attend to (one entry per sequence)."""

    cu_seqlens_q: torch.Tensor  # [B + 1] int32: new tokens of sequence b are rows [cu[b], cu[b+1])
    # With a KV cache (generation); None for a cache-free training forward over whole sequences.
    context_lens: torch.Tensor | None = None  # [B] int32: tokens in the cache for b after this step
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, -1 padded
    slot_mapping: torch.Tensor | None = None  # [tokens] int64 cache slot of each new token
    # CUDA-graph decode (psnrl/engine/cuda_graphs.py): one new token per sequence, padding rows
    # have slot -1 and context 0, and attention runs the split-K decode kernel with this
    # many splits, without the checks that read the device. None: any step (eager).
    decode_splits: int | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor] | None, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Store the step's K/V in the paged cache, then attend (q: [tokens, heads, head_dim]).

    Triton kernels on CUDA (decode: split-K; otherwise varlen prefill), the torch
    reference on a CPU. With ``meta.decode_splits``: the graph-capturable decode path
    (padding rows skipped, no host sync). Without a cache: causal attention within each
    sequence (training, differentiable).
    """
    if kv_cache is None:
        return varlen_causal_attention(q, k, v, meta.cu_seqlens_q, scale)
    slots, context_lens, tables = meta.slot_mapping, meta.context_lens, meta.block_tables
    assert slots is not None and context_lens is not None and tables is not None  # generation metadata
    if meta.decode_splits is not None:
        store_kv_skip_padding(k, v, kv_cache[0], kv_cache[1], slots)
        return paged_decode_attention(q, kv_cache[0], kv_cache[1], tables, context_lens,
                                      scale, num_splits=meta.decode_splits, check=False)
    store_kv(k, v, kv_cache[0], kv_cache[1], slots)
    return attend(q, kv_cache[0], kv_cache[1], meta.cu_seqlens_q, context_lens, tables, scale)
