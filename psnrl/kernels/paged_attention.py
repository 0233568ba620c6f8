"""Triton attention over a paged KV cache: split-K decode and varlen causal prefill.

Cache of one layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and V
(psnrl/kernels/attention_reference.py, the oracle). A sequence's tokens live in the blocks
named by its row of ``block_tables``; token ``n`` sits at block
``block_tables[b, n // block_size]``, offset ``n % block_size``. Kernels gather K/V
rows token by token through the table, so a key tile may span several blocks (block
size < tile) or a part of one (block size > tile): any power-of-two block size works.

Decode (one new token per sequence), ``paged_decode_attention``:
  grid (batch, kv_heads, splits). A program takes the G = heads / kv_heads query heads
  of one KV head as the rows of a [BLOCK_H, D] tile (BLOCK_H = G padded to >= 16, the
  smallest ``tl.dot``), so each K/V tile is read once per group, and walks its split of
  the context in BLOCK_N-token tiles with an online softmax in fp32 (exp2, the scale
  folded with log2 e). With one split it writes the output; with several each split
  writes its running max, sum and unnormalised output (fp32) and ``_decode_reduce_kernel``
  merges them. A sequence's context is cut into ``splits`` equal, BLOCK_N-aligned
  parts, so long and short sequences share one launch.

Prefill / chunked prefill / prefix-cached prefill, ``prefill_attention``:
  grid (row tiles, batch, kv_heads). The rows of a sequence's (new token, query head
  of the group) pairs are packed G to a token, so a BLOCK_M tile holds BLOCK_M / G
  tokens and every K/V tile is again read once per group. New token i of a sequence
  with q_len new tokens and context_len cached ones sits at position
  context_len - q_len + i and sees keys <= it. Key tiles entirely below the tile's
  first query position run unmasked; the rest (the diagonal) run with the causal mask.

head_dim is padded to a power of two (>= 16) with masks, so 80 or 96 work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from psnrl.kernels import noise

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634

# SMs of the GPU the split-K heuristic plans for when none is present (an H100 SXM).
DEFAULT_SMS = 132
# A decode split covers at least this many tokens (below it the reduce costs more than it saves).
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # (token, head) rows per tile
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def pick_decode_config(dtype: torch.dtype, head_dim: int) -> DecodeConfig:
    """Tiles of the decode kernel. fp32 (tests, the exact path) uses small tiles."""
    if dtype == torch.float32:
        return DecodeConfig(16, 4 if _pow2_at_least_16(head_dim) <= 64 else 8, 1)
    if _pow2_at_least_16(head_dim) <= 128:
        return DecodeConfig(64, 4, 2)
    return DecodeConfig(32, 4, 2)


def pick_prefill_config(dtype: torch.dtype, head_dim: int) -> PrefillConfig:
    """Tiles of the prefill kernel (psnrl/bench/kernel_sass-checked for spills on sm_90)."""
    d = _pow2_at_least_16(head_dim)
    if dtype == torch.float32:
        return PrefillConfig(32, 16, 4 if d <= 64 else 8, 1)
    if d <= 64:
        return PrefillConfig(128, 64, 4, 2)
    if d <= 128:
        return PrefillConfig(128, 64, 8, 2)
    return PrefillConfig(64, 32, 8, 2)


def pick_num_splits(batch: int, num_kv_heads: int, max_context: int, sms: int | None = None) -> int:
    """Splits of the context for decode: enough programs for ~2 per SM, each split >= 256 tokens.

    The programs without split-K are batch * kv_heads; a batch that fills the GPU
    alone, or short contexts, get 1 split (no reduce launch).
    """
    if sms is None:
        sms = torch.cuda.get_device_properties(0).multi_processor_count \
            if torch.cuda.is_available() else DEFAULT_SMS
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, max_context // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _load_kv_tile(base_ptr, bt_row_ptr, n, n_ok, d, d_ok, SLOT_STRIDE: tl.constexpr,
                  PAGE: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows n (tokens of one sequence) of one KV head, gathered through the block table.

    MASKED: rows beyond ``n_ok`` read as 0; EVEN_D: head_dim needs no padding mask."""
    if MASKED:
        blk = tl.load(bt_row_ptr + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row_ptr + n // PAGE).to(tl.int64)
    slot = blk * PAGE + (n % PAGE)  # contiguous cache: block stride = PAGE * slot stride
    ptrs = base_ptr + slot[:, None] * SLOT_STRIDE + d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, part_m_ptr, part_l_ptr, part_o_ptr,
    qk_scale, num_splits, stride_btb,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr,
    IEEE: tl.constexpr, ALIGNED: tl.constexpr,
):
    # q, out: contiguous [B, NUM_HEADS, HEAD_DIM]; caches: contiguous [blocks, PAGE, KV, HEAD_DIM].
    SLOT_STRIDE = NUM_HEADS // GROUP * HEAD_DIM  # constexpr arithmetic
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # This split's tokens: an equal, BLOCK_N-aligned share of the sequence's context.
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = sid * split_len
    end = tl.minimum(ctx, start + split_len)

    h = tl.arange(0, BLOCK_H)
    h_ok = h < GROUP
    heads = kvh * GROUP + h
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_row = q_ptr + b.to(tl.int64) * (NUM_HEADS * HEAD_DIM)
    out_row = out_ptr + b.to(tl.int64) * (NUM_HEADS * HEAD_DIM)
    part_o = part_o_ptr + b.to(tl.int64) * (NUM_HEADS * HEAD_DIM) * num_splits
    k_base = k_ptr + kvh * HEAD_DIM
    v_base = v_ptr + kvh * HEAD_DIM
    if ALIGNED:
        # 16-byte aligned (the wrapper checked it), as the launcher's specialisation would
        # say of the arguments: tiles then move in 16-byte vectors. (In the kernel body:
        # a hint on a helper's argument is lost.)
        q_row = tl.multiple_of(q_row, 16)
        out_row = tl.multiple_of(out_row, 16)
        part_o = tl.multiple_of(part_o, 16)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
    q = tl.load(q_row + heads[:, None] * HEAD_DIM + d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k = _load_kv_tile(k_base, bt_row, n, n_ok, d, d_ok, SLOT_STRIDE, PAGE, True, False)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_base, bt_row, n, n_ok, d, d_ok, SLOT_STRIDE, PAGE, True, False)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SPLIT:
        seq = b.to(tl.int64) * NUM_HEADS * num_splits
        row = heads * num_splits + sid
        tl.store(part_m_ptr + seq + row, m_i, mask=h_ok)
        tl.store(part_l_ptr + seq + row, l_i, mask=h_ok)
        tl.store(part_o + row[:, None] * HEAD_DIM + d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_row + heads[:, None] * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_m_ptr, part_l_ptr, part_o_ptr, out_ptr, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    hd = tl.program_id(1)
    row = (b * NUM_HEADS + hd).to(tl.int64) * num_splits
    s = tl.arange(0, S_PAD)
    s_ok = s < num_splits
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    m_s = tl.load(part_m_ptr + row + s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + row + s, mask=s_ok, other=0.0)
    m = tl.max(m_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    w = tl.exp2(m_s - m)
    l = tl.sum(w * l_s, 0)
    o_s = tl.load(part_o_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(l > 0, l, 1.0)
    tl.store(out_ptr + (b * NUM_HEADS + hd).to(tl.int64) * HEAD_DIM + d,
             o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _prefill_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, n0, kv_end, q_pos, d, d_ok,
                  qk_scale, SLOT_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr,
                  IEEE: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < kv_end
    k = _load_kv_tile(k_base, bt_row, n, n_ok, d, d_ok, SLOT_STRIDE, PAGE, MASKED,
                      HEAD_DIM == D_PAD)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv_tile(v_base, bt_row, n, n_ok, d, d_ok, SLOT_STRIDE, PAGE, MASKED,
                      HEAD_DIM == D_PAD)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr, qk_scale, stride_btb,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # q, out: contiguous [T, NUM_HEADS, HEAD_DIM]; caches: contiguous [blocks, PAGE, KV, HEAD_DIM].
    SLOT_STRIDE = NUM_HEADS // GROUP * HEAD_DIM  # constexpr arithmetic
    tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    row0 = tile * BLOCK_M
    if row0 >= q_len * GROUP:
        return
    ctx = tl.load(ctx_ptr + b)

    # Rows of the tile: (new token, head of the group) pairs, GROUP rows per token.
    r = row0 + tl.arange(0, BLOCK_M)
    r_ok = r < q_len * GROUP
    tok = r // GROUP
    heads = kvh * GROUP + r % GROUP
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_seq = q_ptr + q_start.to(tl.int64) * (NUM_HEADS * HEAD_DIM)
    out_seq = out_ptr + q_start.to(tl.int64) * (NUM_HEADS * HEAD_DIM)
    k_base = k_ptr + kvh * HEAD_DIM
    v_base = v_ptr + kvh * HEAD_DIM
    if ALIGNED:  # as in _decode_kernel
        q_seq = tl.multiple_of(q_seq, 16)
        out_seq = tl.multiple_of(out_seq, 16)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
    q_offs = (tok * NUM_HEADS + heads)[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_seq + q_offs,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx - q_len + tok  # context position of each row's token
    first_pos = ctx - q_len + row0 // GROUP
    kv_end = tl.minimum(ctx, ctx - q_len + (row0 + BLOCK_M - 1) // GROUP + 1)
    # Key tiles wholly at or below the first row's position need no mask.
    n_full = (first_pos + 1) // BLOCK_N * BLOCK_N

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, n0, kv_end, q_pos,
                                      d, d_ok, qk_scale, SLOT_STRIDE, HEAD_DIM, D_PAD, BLOCK_N, PAGE,
                                      False, IEEE)
    for n0 in range(n_full, kv_end, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, k_base, v_base, bt_row, n0, kv_end, q_pos,
                                      d, d_ok, qk_scale, SLOT_STRIDE, HEAD_DIM, D_PAD, BLOCK_N, PAGE,
                                      True, IEEE)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_seq + q_offs,
             o.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def _check_cache_and_q(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor, batch: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [tokens, heads, head_dim], got {noise.describe(q)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {noise.describe(k_cache)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {noise.describe(v_cache)} must have the shape of k_cache {noise.describe(k_cache)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paged attention supports {SUPPORTED_DTYPES}, got q {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must have q's dtype {q.dtype}")
    heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim of q {noise.describe(q)} is {head_dim} but k_cache {noise.describe(k_cache)} "
                         f"has {k_cache.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q heads {heads} must be a multiple of the cache's kv heads {kv_heads}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two, got {block_size}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"k_cache and v_cache must be contiguous, got strides {k_cache.stride()} "
                         f"and {v_cache.stride()} for shape {tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks] int32, "
                         f"got {noise.describe(block_tables)}")
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be [batch={batch}] int32, got {noise.describe(context_lens)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q on {q.device}")


def _check_lengths(q_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                   block_size: int, num_blocks: int) -> tuple[int, int]:
    """Check lengths and the used block ids (one device sync).

    Returns the longest context and the most new tokens of a sequence."""
    batch, max_blocks = block_tables.shape
    if batch == 0:
        return 0, 0
    ctx = context_lens.long()
    blocks_used = (ctx + block_size - 1) // block_size
    used = torch.arange(max_blocks, device=ctx.device)[None, :] < blocks_used[:, None]
    ids = block_tables.long()
    bad_ids = used & ((ids < 0) | (ids >= num_blocks))
    short = ctx < q_lens.long()
    stats = torch.stack([ctx.min(), ctx.max(), q_lens.min().long(), q_lens.max().long(), bad_ids.sum(),
                         short.sum()]).tolist()
    ctx_min, ctx_max, q_min, q_max, n_bad, n_short = stats
    capacity = max_blocks * block_size
    if ctx_min < 0:
        raise ValueError(f"context_lens must be >= 0, got min {ctx_min}")
    if ctx_max > capacity:
        raise ValueError(f"context_lens max {ctx_max} exceeds the block tables' capacity "
                         f"{max_blocks} blocks x block_size {block_size} = {capacity} tokens")
    if q_min < 0:
        raise ValueError(f"cu_seqlens_q must be non-decreasing, got a sequence of {q_min} new tokens")
    if n_short:
        b = int(short.nonzero()[0, 0])
        raise ValueError(f"{n_short} sequence(s) have fewer cached tokens than new ones: sequence {b} has "
                         f"context_len {int(ctx[b])} < {int(q_lens[b])} new tokens (the new tokens are "
                         f"the last of the context)")
    if n_bad:
        b, j = (int(v) for v in bad_ids.nonzero()[0])
        raise ValueError(f"{n_bad} used block_tables entries are outside [0, num_blocks={num_blocks}): "
                         f"block_tables[{b}, {j}] = {int(ids[b, j])} (context_len {int(ctx[b])})")
    return ctx_max, q_max


def _aligned16(*tensors: torch.Tensor) -> bool:
    """Every tensor starts on 16 bytes and a head_dim row is a multiple of 16 bytes."""
    return all(t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None,
                           config: DecodeConfig | None = None, check: bool = True) -> torch.Tensor:
    """One query token per sequence over its whole cached context (q: [B, H, D] -> [B, H, D]).

    ``context_lens[b]`` counts the cached tokens of sequence b, its new token included
    (0: a padding row, whose output is 0). ``num_splits``: parts the context is cut
    into (split-K); None picks them from the batch, KV heads and the longest context
    (``pick_num_splits``).

    ``check=False`` (with ``num_splits`` given) skips the checks of the lengths and
    block ids, which read the device: the call then never synchronizes and can be
    captured in a CUDA graph (psnrl/engine/cuda_graphs.py validates on the host instead).
    """
    batch = q.shape[0] if q.dim() == 3 else -1
    _check_cache_and_q(q, k_cache, v_cache, block_tables, context_lens, batch)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if not check and num_splits is None:
        raise ValueError("check=False needs num_splits: picking them reads the longest context")
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    max_ctx = 0
    if check:
        ones = torch.ones(batch, dtype=torch.int32, device=q.device)
        max_ctx, _ = _check_lengths(ones, context_lens, block_tables, block_size, num_blocks)
    if batch == 0 or heads == 0:
        return torch.empty_like(q)
    if not noise.runs_triton(q):
        from psnrl.kernels.attention_reference import paged_attention_reference
        cu = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        return paged_attention_reference(q, k_cache, v_cache, cu, context_lens, block_tables, scale)
    q = q.contiguous()
    cfg = config or pick_decode_config(q.dtype, head_dim)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else None
        num_splits = pick_num_splits(batch, kv_heads, max_ctx, sms)
    group = heads // kv_heads
    d_pad = _pow2_at_least_16(head_dim)
    out = torch.empty_like(q)
    split = num_splits > 1
    if split:
        part_m = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_o = out  # unused
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_o,
        float(scale) * LOG2E, num_splits, block_tables.stride(0),
        NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_H=_pow2_at_least_16(group),
        BLOCK_N=cfg.block_n, PAGE=block_size, SPLIT=split, IEEE=q.dtype == torch.float32,
        ALIGNED=_aligned16(q, k_cache, v_cache, out, part_o),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        _decode_reduce_kernel[(batch, heads)](
            part_m, part_l, part_o, out, num_splits,
            NUM_HEADS=heads, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
            S_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


def _check_cu_seqlens(cu_seqlens_q: torch.Tensor, q: torch.Tensor, batch: int) -> None:
    if cu_seqlens_q.shape != (batch + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q must be [batch + 1 = {batch + 1}] int32, "
                         f"got {noise.describe(cu_seqlens_q)}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device} but q on {q.device}")
    first, last = cu_seqlens_q[[0, -1]].tolist()
    if first != 0 or last != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must run from 0 to q's {q.shape[0]} tokens, got {first} .. {last}")


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float,
                      config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    q: [T, H, D]; sequence b's new tokens are rows [cu_seqlens_q[b], cu_seqlens_q[b+1])
    and the last of its ``context_lens[b]`` cached tokens (plain prefill when they are
    all of them; chunked or prefix-cached prefill otherwise). Returns [T, H, D].
    """
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    _check_cache_and_q(q, k_cache, v_cache, block_tables, context_lens, batch)
    _check_cu_seqlens(cu_seqlens_q, q, batch)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    _, max_q = _check_lengths(q_lens, context_lens, block_tables, block_size, num_blocks)
    if batch == 0 or q.shape[0] == 0 or heads == 0:
        return torch.empty_like(q)
    if not noise.runs_triton(q):
        from psnrl.kernels.attention_reference import paged_attention_reference
        return paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                         block_tables, scale)
    q = q.contiguous()
    cfg = config or pick_prefill_config(q.dtype, head_dim)
    group = heads // kv_heads
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_q * group, cfg.block_m), batch, kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, float(scale) * LOG2E,
        block_tables.stride(0),
        NUM_HEADS=heads, GROUP=group, HEAD_DIM=head_dim, D_PAD=_pow2_at_least_16(head_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE=block_size, IEEE=q.dtype == torch.float32,
        ALIGNED=_aligned16(q, k_cache, v_cache, out),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ---------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------

_FLASH_ATTN: list = []


def _flash_attn():
    """flash-attn 2's paged entry points when importable and new enough to take ``block_table``
    in both (2.6+). Not installed where this was written: this path is untested."""
    if not _FLASH_ATTN:
        fns = None
        try:
            import inspect

            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
            if all("block_table" in inspect.signature(f).parameters
                   for f in (flash_attn_varlen_func, flash_attn_with_kvcache)):
                fns = (flash_attn_varlen_func, flash_attn_with_kvcache)
        except Exception:  # ImportError, or a build that fails to load
            pass
        _FLASH_ATTN.append(fns)
    return _FLASH_ATTN[0]


def _flash_attn_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    # flash-attn 2 documents page_block_size as a multiple of 256, fp16/bf16, head_dim <= 256.
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k_cache.shape[1] % 256 == 0
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, decode: bool | None = None,
                    use_flash_attn: bool = True) -> torch.Tensor:
    """Attention of a step's new tokens over the paged cache (the signature of the reference).

    ``decode``: every sequence has exactly one new token (True: checked; None: read from
    ``cu_seqlens_q``). Decode runs the split-K kernel, otherwise the varlen prefill
    kernel; on a CPU without the Triton interpreter, the torch reference. With
    ``use_flash_attn`` and flash-attn importable on CUDA, its paged kernels run instead
    where they apply (fp16/bf16, block_size a multiple of 256).
    """
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    _check_cache_and_q(q, k_cache, v_cache, block_tables, context_lens, batch)
    _check_cu_seqlens(cu_seqlens_q, q, batch)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    all_one = q.shape[0] == batch and bool((q_lens == 1).all())
    if decode is None:
        decode = all_one
    elif decode and not all_one:
        raise ValueError(f"decode=True needs one new token per sequence, got {q.shape[0]} tokens for "
                         f"{batch} sequences (new tokens per sequence: {q_lens.tolist()[:8]}...)")
    if not noise.runs_triton(q):
        from psnrl.kernels.attention_reference import paged_attention_reference
        _check_lengths(q_lens, context_lens, block_tables, k_cache.shape[1], k_cache.shape[0])
        return paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                         block_tables, scale)
    fa = _flash_attn() if use_flash_attn and _flash_attn_fits(q, k_cache) else None
    if fa is not None and batch > 0:
        max_ctx, max_q = _check_lengths(q_lens, context_lens, block_tables, k_cache.shape[1],
                                        k_cache.shape[0])
        flash_attn_varlen_func, flash_attn_with_kvcache = fa
        table = block_tables.clamp(min=0)  # -1 padding: never read, but keep addresses valid
        if decode:
            return flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=context_lens,
                                           block_table=table, softmax_scale=scale, causal=True).squeeze(1)
        cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        cu_k[1:] = torch.cumsum(context_lens, 0)
        # causal=True aligns the mask bottom-right: new token i of b sees keys <= ctx - q_len + i.
        return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, cu_k, max_q, max_ctx,
                                      softmax_scale=scale, causal=True, block_table=table)
    if decode:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
