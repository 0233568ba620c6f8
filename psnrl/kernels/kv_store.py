"""Writing a step's K and V into the paged cache, skipping padding rows (slot -1)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from psnrl.kernels import noise


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return  # a padding row
    offs = tl.arange(0, BLOCK)
    ok = offs < ROW
    k = tl.load(k_ptr + t.to(tl.int64) * stride_k + offs, mask=ok)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_v + offs, mask=ok)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv_skip_padding(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``store_kv`` of the reference, except that rows with a negative slot are not written.

    k, v: [tokens, kv_heads, head_dim]; slot_mapping: [tokens] int32/int64. One kernel
    that reads nothing back on the host: the store of CUDA-graph decode, whose padding
    rows have slot -1. On a CPU without the Triton interpreter, torch indexing.
    """
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != k_cache.shape[2:] \
            or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"store_kv_skip_padding: k {noise.describe(k)}, v {noise.describe(v)}, cache "
                         f"{noise.describe(k_cache)}, slot_mapping {noise.describe(slot_mapping)} do not match")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if k.shape[0] == 0:
        return
    if not noise.runs_triton(k):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
        return
    k2 = k.reshape(k.shape[0], -1)
    v2 = v.reshape(v.shape[0], -1)
    k2 = k2 if k2.stride(1) == 1 else k2.contiguous()
    v2 = v2 if v2.stride(1) == 1 else v2.contiguous()
    row = k2.shape[1]
    _store_kv_kernel[(k.shape[0],)](k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0),
                                    ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)
