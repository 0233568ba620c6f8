"""Fused lm_head log-prob: per token the target log-prob, entropy and self-certainty of
softmax(h W^T + b), without ever holding the [tokens x vocab] logits.

Forward (Triton): a program owns a block of tokens and a range of vocabulary tiles
(the vocabulary is split across programs when there are too few token blocks to
fill the GPU). Tile by tile it computes logits with fp32 accumulation and keeps
per token, with online rescaling: the running max ``m``, ``s = sum exp(z - m)``,
``a = sum exp(z - m) (z - m)``, ``sum z`` and the target's logit. Torch combines
the partials of the vocabulary splits (O(tokens x splits)):

    lse = m + log s        E_p[z] = m + a / s        entropy = log s - a / s
    logprob = z_target - lse                         self_certainty = lse - mean z - log V

Self-certainty is KL(U || p) with U uniform over the V entries of ``weight``.

Backward (hybrid): per chunk of vocabulary (all tokens; ``chunk_bytes`` bounds the
chunk) a Triton kernel recomputes the logits and writes the gradient wrt them,
in the input dtype, for the three outputs at once:

    d logprob / dz_v        = 1[v = target] - p_v
    d entropy / dz_v        = -p_v (z_v - E_p[z])
    d self_certainty / dz_v = p_v - 1 / V

then cuBLAS turns the chunk into its term of grad_hidden (in the input dtype,
summed over chunks in fp32) and that chunk's rows of grad_weight (one matmul over
all tokens, no cross-chunk sum). A Triton kernel for grad_hidden would need a [tokens x hidden] fp32
accumulator per program (hidden is 896..3584), so the matmuls stay in cuBLAS; the
cost is one recomputation of the logits (4 GEMMs' work in all, against 3 for
the materializing path). Peak extra memory: the gradient chunk plus O(tokens x hidden).

All three outputs are differentiable (wrt hidden, weight and bias). On a CPU
outside the Triton interpreter the same chunking runs in torch (fp32 logits
per vocabulary chunk, same partials and combination).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from psnrl.kernels import noise

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bound on a [tokens x vocabulary-chunk] temporary (the backward's gradient chunk,
# the torch path's fp32 logits chunk).
DEFAULT_CHUNK_BYTES = 256 << 20
# Vocabulary chunks are multiples of this (aligned matmul operands) unless the whole
# vocabulary is smaller.
VOCAB_CHUNK_ALIGN = 128

# Rows of the partials tensor [PARTIALS, splits, tokens] (and of the torch path's).
PARTIALS = 5  # m, s, a, sum z, target logit


@dataclass(frozen=True)
class LogprobTiles:
    """Tokens x vocabulary x hidden tile of both kernels; ``splits`` = vocabulary splits of
    the forward (None: enough to give the GPU about two programs per SM)."""

    block_t: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    splits: int | None = None


# SMs of the GPU the splits are planned for when none is present (an H100 SXM).
DEFAULT_SMS = 132


def pick_tiles(tokens: int, dtype: torch.dtype) -> LogprobTiles:
    """Largest tiles whose forward epilogue fits in registers on sm_90 (compiled, not timed:
    128 x 128 x 64 spills, 128 x 128 x 32 takes 207 registers). fp32 (tests, references)
    gets small tiles: its exact dot has no tensor-core path."""
    if dtype == torch.float32:
        return LogprobTiles(16 if tokens <= 16 else 32, 32, 32, 4, 2)
    if tokens <= 64:
        return LogprobTiles(64, 64, 64, 4, 3)
    return LogprobTiles(128, 128, 32, 8, 4)


def _splits(tokens: int, vocab: int, tiles: LogprobTiles, device: torch.device) -> tuple[int, int]:
    """(vocabulary splits, vocabulary tiles per split); every split gets at least one tile."""
    vocab_tiles = triton.cdiv(vocab, tiles.block_v)
    splits = tiles.splits
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else DEFAULT_SMS
        splits = triton.cdiv(2 * sms, triton.cdiv(tokens, tiles.block_t))
    per_split = triton.cdiv(vocab_tiles, max(1, min(splits, vocab_tiles)))
    return triton.cdiv(vocab_tiles, per_split), per_split


def vocab_chunk(tokens: int, vocab: int, elem_bytes: int, chunk_bytes: int) -> int:
    """Vocabulary entries per chunk so that a [tokens x chunk] temporary fits ``chunk_bytes``."""
    chunk = chunk_bytes // (max(tokens, 1) * elem_bytes) // VOCAB_CHUNK_ALIGN * VOCAB_CHUNK_ALIGN
    return min(vocab, max(VOCAB_CHUNK_ALIGN, chunk))


@triton.jit
def _logits_tile(h_ptr, w_ptr, rt, rv, t_ok, v_ok, H, stride_h, stride_w,
                 IEEE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    """fp32 [BT, BV] tile of h W^T (masked rows and columns are 0)."""
    rh = tl.arange(0, BH)
    h_ptrs = h_ptr + rt[:, None].to(tl.int64) * stride_h + rh[None, :]
    w_ptrs = w_ptr + rv[:, None].to(tl.int64) * stride_w + rh[None, :]
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    for h0 in range(0, H, BH):
        h_ok = (h0 + rh) < H
        x = tl.load(h_ptrs, mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        h_ptrs += BH
        w_ptrs += BH
    return acc


@triton.jit
def _partials_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, T, V, H, stride_h, stride_w,
                     stride_part, tiles_per_split,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    # Token blocks vary fastest, so programs running together read the same W tiles (L2).
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    t_ok = rt < T
    tgt = tl.load(tgt_ptr + rt, mask=t_ok, other=-1)
    v_begin = pid_s * tiles_per_split * BV
    v_end = tl.minimum(V, v_begin + tiles_per_split * BV)
    m = tl.full((BT,), float("-inf"), tl.float32)
    s = tl.zeros((BT,), tl.float32)
    a = tl.zeros((BT,), tl.float32)
    sum_z = tl.zeros((BT,), tl.float32)
    z_tgt = tl.zeros((BT,), tl.float32)
    for v0 in range(v_begin, v_end, BV):
        rv = v0 + tl.arange(0, BV)
        v_ok = rv < v_end
        z = _logits_tile(h_ptr, w_ptr, rt, rv, t_ok, v_ok, H, stride_h, stride_w, IEEE, BT, BV, BH)
        if HAS_BIAS:
            z += tl.load(b_ptr + rv, mask=v_ok, other=0.0).to(tl.float32)[None, :]
        # z's own reductions first, so that z is dead before d and e are live (registers).
        sum_z += tl.sum(z, 1)  # masked columns hold 0
        z_tgt += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(tl.where(v_ok[None, :], z, float("-inf")), 1))
        # Masked columns get d = 0 and e = 0, so no inf or nan is ever formed.
        d = tl.where(v_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(v_ok[None, :], tl.exp(d), 0.0)
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        # Re-centre a on m_new: sum e^(z-m) (z-m) -> e^(m-m_new) (a + (m - m_new) s).
        a = alpha * (a + tl.where(s > 0, m - m_new, 0.0) * s) + tl.sum(e * d, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
    out = part_ptr + pid_s * T + rt
    tl.store(out, m, mask=t_ok)
    tl.store(out + stride_part, s, mask=t_ok)
    tl.store(out + 2 * stride_part, a, mask=t_ok)
    tl.store(out + 3 * stride_part, sum_z, mask=t_ok)
    tl.store(out + 4 * stride_part, z_tgt, mask=t_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, coef_ptr, g_ptr, T, Vc, H, v_offset,
                        stride_h, stride_w, stride_g,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    """G[t, v] = p (c - g_ent z) + g_lp 1[v = target] - q for one vocabulary chunk.

    coef rows (per token): lse, c = g_sc - g_lp + g_ent E_p[z], g_ent, g_lp, q = g_sc / V.
    """
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    rv = pid_v * BV + tl.arange(0, BV)
    t_ok = rt < T
    v_ok = rv < Vc
    z = _logits_tile(h_ptr, w_ptr, rt, rv, t_ok, v_ok, H, stride_h, stride_w, IEEE, BT, BV, BH)
    if HAS_BIAS:
        z += tl.load(b_ptr + rv, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(coef_ptr + rt, mask=t_ok, other=0.0)
    c = tl.load(coef_ptr + T + rt, mask=t_ok, other=0.0)
    g_ent = tl.load(coef_ptr + 2 * T + rt, mask=t_ok, other=0.0)
    g_lp = tl.load(coef_ptr + 3 * T + rt, mask=t_ok, other=0.0)
    q = tl.load(coef_ptr + 4 * T + rt, mask=t_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rt, mask=t_ok, other=-1) - v_offset
    ok = t_ok[:, None] & v_ok[None, :]
    # Masked entries (z = 0 against a real lse) could overflow exp: p = 0 there.
    p = tl.exp(tl.where(ok, z - lse[:, None], float("-inf")))
    g = p * (c[:, None] - g_ent[:, None] * z) - q[:, None]
    g += tl.where(rv[None, :] == tgt[:, None], g_lp[:, None], 0.0)
    g_ptrs = g_ptr + rt[:, None].to(tl.int64) * stride_g + rv[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=ok)


def _triton_partials(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor,
                     tiles: LogprobTiles) -> torch.Tensor:
    t, hdim = h.shape
    v = w.shape[0]
    splits, per_split = _splits(t, v, tiles, h.device)
    part = torch.empty(PARTIALS, splits, t, dtype=torch.float32, device=h.device)
    grid = (triton.cdiv(t, tiles.block_t), splits)
    _partials_kernel[grid](
        h, w, b if b is not None else w, targets, part, t, v, hdim, h.stride(0), w.stride(0),
        part.stride(0), per_split, HAS_BIAS=b is not None, IEEE=h.dtype == torch.float32,
        BT=tiles.block_t, BV=tiles.block_v, BH=tiles.block_h,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return part


def _torch_partials(h32: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """The kernel's partials with one vocabulary chunk of fp32 logits at a time as the splits."""
    v = w.shape[0]
    parts = []
    for v0 in range(0, v, chunk):
        v1 = min(v, v0 + chunk)
        z = h32 @ w[v0:v1].float().t()
        if b is not None:
            z += b[v0:v1].float()
        m = z.max(1).values
        d = z - m[:, None]
        e = d.exp()
        local = targets - v0
        inside = (local >= 0) & (local < v1 - v0)
        z_tgt = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1) * inside
        parts.append(torch.stack([m, e.sum(1), (e * d).sum(1), z.sum(1), z_tgt]))
        del z, d, e
    return torch.stack(parts, 1)


def _combine(part: torch.Tensor, vocab: int) -> tuple[torch.Tensor, ...]:
    """(logprob, entropy, self_certainty, lse, E_p[z]) from [PARTIALS, splits, T] partials."""
    m, s, a, sum_z, z_tgt = part.unbind(0)
    top = m.max(0).values
    scale = torch.exp(m - top)
    s_all = (scale * s).sum(0)
    a_all = (scale * (a + (m - top) * s)).sum(0)
    lse = top + torch.log(s_all)
    mean_p = a_all / s_all
    entropy = torch.log(s_all) - mean_p
    logprob = z_tgt.sum(0) - lse
    self_certainty = lse - sum_z.sum(0) / vocab - math.log(vocab)
    return logprob, entropy, self_certainty, lse, top + mean_p


def _triton_grad_logits(h: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None,
                        targets: torch.Tensor, v_offset: int, coef: torch.Tensor,
                        tiles: LogprobTiles) -> torch.Tensor:
    t, hdim = h.shape
    vc = w_c.shape[0]
    g = torch.empty(t, vc, dtype=h.dtype, device=h.device)
    if t == 0:
        return g
    grid = (triton.cdiv(t, tiles.block_t), triton.cdiv(vc, tiles.block_v))
    _grad_logits_kernel[grid](
        h, w_c, b_c if b_c is not None else w_c, targets, coef, g, t, vc, hdim, v_offset,
        h.stride(0), w_c.stride(0), g.stride(0), HAS_BIAS=b_c is not None,
        IEEE=h.dtype == torch.float32, BT=tiles.block_t, BV=tiles.block_v, BH=tiles.block_h,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return g


def _torch_grad_logits(h32: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor | None,
                       targets: torch.Tensor, v_offset: int, coef: torch.Tensor) -> torch.Tensor:
    z = h32 @ w_c.float().t()
    if b_c is not None:
        z += b_c.float()
    lse, c, g_ent, g_lp, q = (row[:, None] for row in coef)
    g = torch.exp(z - lse) * (c - g_ent * z) - q
    local = (targets - v_offset)[:, None]
    inside = (local >= 0) & (local < w_c.shape[0])
    g.scatter_add_(1, local.clamp(0, w_c.shape[0] - 1), g_lp * inside)
    return g


class _LmHeadLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tiles, chunk_bytes, use_triton):
        t, v = hidden.shape[0], weight.shape[0]
        if t == 0:
            part = torch.zeros(PARTIALS, 1, 0, dtype=torch.float32, device=hidden.device)
        elif use_triton:
            part = _triton_partials(hidden, weight, bias, targets, tiles)
        else:
            part = _torch_partials(hidden.float(), weight, bias, targets,
                                   vocab_chunk(t, v, 4, chunk_bytes))
        logprob, entropy, self_certainty, lse, mean_p = _combine(part, v)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_p)
        ctx.tiles, ctx.chunk_bytes, ctx.use_triton = tiles, chunk_bytes, use_triton
        return logprob, entropy, self_certainty

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent, g_sc):
        hidden, weight, bias, targets, lse, mean_p = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        t, v = hidden.shape[0], weight.shape[0]
        g_lp, g_ent, g_sc = g_lp.float(), g_ent.float(), g_sc.float()
        coef = torch.stack([lse, g_sc - g_lp + g_ent * mean_p, g_ent, g_lp, g_sc / v]).contiguous()
        # The Triton chunk comes in the input dtype (tensor-core matmuls); the torch one in fp32.
        work_dtype = hidden.dtype if ctx.use_triton else torch.float32
        h_work = hidden.to(work_dtype)
        chunk = vocab_chunk(t, v, torch.empty(0, dtype=work_dtype).element_size(), ctx.chunk_bytes)
        grad_h = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device) \
            if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(v, dtype=torch.float32, device=hidden.device) if need_b else None
        for v0 in range(0, v, chunk):
            v1 = min(v, v0 + chunk)
            b_c = bias[v0:v1] if bias is not None else None
            if ctx.use_triton:
                g = _triton_grad_logits(hidden, weight[v0:v1], b_c, targets, v0, coef, ctx.tiles)
            else:
                g = _torch_grad_logits(h_work, weight[v0:v1], b_c, targets, v0, coef)
            if need_h:
                grad_h += g @ weight[v0:v1].to(work_dtype)
            if need_w:
                grad_w[v0:v1] = g.t() @ h_work
            if need_b:
                grad_b[v0:v1] = g.sum(0, dtype=torch.float32)
            del g
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  bias: torch.Tensor | None, chunk_bytes: int) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [tokens, hidden], got "
                         f"{noise.describe(hidden) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[1]}] to match hidden {noise.describe(hidden)}, "
                         f"got {noise.describe(weight) if isinstance(weight, torch.Tensor) else weight!r}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight {noise.describe(weight)} must have vocab >= 1 and hidden >= 1")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"lm_head_logprob supports {SUPPORTED_DTYPES}, got hidden {hidden.dtype}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"hidden {noise.describe(hidden)} and weight {noise.describe(weight)} must share "
                         f"dtype and device")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                             or bias.dtype != hidden.dtype or bias.device != hidden.device):
        raise ValueError(f"bias {noise.describe(bias) if isinstance(bias, torch.Tensor) else bias!r} must be "
                         f"[{weight.shape[0]}] {hidden.dtype} on {hidden.device}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point \
            or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {type(targets).__name__} "
                         f"{getattr(targets, 'dtype', '')}")
    if targets.shape != (hidden.shape[0],) or targets.device != hidden.device:
        raise ValueError(f"targets {noise.describe(targets)} must be [{hidden.shape[0]}] on {hidden.device} "
                         f"to match hidden {noise.describe(hidden)}")
    if targets.numel():
        lo, hi = (int(x) for x in torch.aminmax(targets))
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets hold token ids in [{lo}, {hi}], outside the vocabulary "
                             f"[0, {weight.shape[0]}) of weight {noise.describe(weight)}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")


def lm_head_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, tiles: LogprobTiles | None = None,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target), entropy, self-certainty) per token of softmax(hidden weight^T + bias), fp32 [T].

    hidden [T, H], weight [V, H], bias [V] share a dtype (fp32, fp16 or bf16) and a
    device; targets [T] are integer ids in [0, V). Self-certainty is KL(U || p) =
    logsumexp(z) - mean(z) - log V. All three are differentiable wrt hidden, weight
    and bias; the logits are never materialized (see the module docstring).

    Runs the Triton kernels on CUDA tensors (and under ``TRITON_INTERPRET=1``), the
    chunked torch path on a CPU otherwise. Checking the targets' range reads two
    numbers back from the device (one synchronization per call). ``tiles``: kernel tiles (default
    ``pick_tiles``); ``chunk_bytes``: bound on a [T x vocabulary chunk] temporary.
    """
    _check_inputs(hidden, weight, targets, bias, chunk_bytes)
    use_triton = noise.runs_triton(hidden)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    targets = targets.long().contiguous()
    tiles = tiles or pick_tiles(hidden.shape[0], hidden.dtype)
    return _LmHeadLogprobFn.apply(hidden, weight, bias, targets, tiles, chunk_bytes, use_triton)
