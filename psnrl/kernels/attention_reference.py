"""Torch reference of attention over a paged KV cache (the oracle of the Triton attention kernels).

KV cache of one layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and V.
A step's new tokens are written at their cache slots (block * block_size + offset),
then every sequence attends causally to its whole context, read through its block
table. Prefill (many new tokens per sequence) and decode (one) are the same call.
"""
from __future__ import annotations

import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write a step's K/V rows ([tokens, kv_heads, head_dim]) into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                              block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context (SDPA, GQA).

    q: [tokens, heads, head_dim]; the new tokens of sequence b are rows
    [cu_seqlens_q[b], cu_seqlens_q[b+1]) and are the last of its ``context_lens[b]``
    cached tokens. Returns [tokens, heads, head_dim].
    """
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b in range(len(lens)):
        q_b = q[cu[b]:cu[b + 1]]
        n_new, n_ctx = q_b.shape[0], lens[b]
        if n_new == 0:
            continue
        blocks = block_tables[b, :(n_ctx + block_size - 1) // block_size].long()
        k_b = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:n_ctx]
        v_b = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:n_ctx]
        # New token i sits at context position n_ctx - n_new + i and sees positions <= it.
        pos_q = torch.arange(n_ctx - n_new, n_ctx, device=q.device)
        mask = torch.arange(n_ctx, device=q.device)[None, :] <= pos_q[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q_b.transpose(0, 1).unsqueeze(0), k_b.transpose(0, 1).unsqueeze(0).to(q.dtype),
            v_b.transpose(0, 1).unsqueeze(0).to(q.dtype), attn_mask=mask, scale=scale,
            enable_gqa=True)
        out[cu[b]:cu[b + 1]] = o.squeeze(0).transpose(0, 1)
    return out


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention within each packed sequence, no cache (training; autograd).

    q: [tokens, heads, D], k/v: [tokens, kv_heads, D]; sequence b is rows
    [cu_seqlens[b], cu_seqlens[b+1]). Sequences are right-padded into one batch:
    with a causal mask a real token never sees the padding after it.
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    t_max = max(lens)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=q.device),
                                  torch.tensor(lens, device=q.device))
    pos = torch.arange(q.shape[0], device=q.device) - cu_seqlens[:-1].long()[seq]

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(len(lens), t_max, *x.shape[1:])
        out[seq, pos] = x
        return out.transpose(1, 2)  # [B, heads, T, D]

    o = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True,
                                                         scale=scale, enable_gqa=True)
    return o.transpose(1, 2)[seq, pos]
