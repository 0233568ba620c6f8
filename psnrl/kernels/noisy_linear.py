"""Multi-stream noisy linear: y = x (W + sigma_s E_s)^T (+ b), E never stored.

Every row of ``x`` names a noise stream: 0 is clean (sees W), s >= 1 has its own
(seed_s, sigma_s) and sees W + sigma_s * E_s, where E_s is the counter-based noise
of psnrl/kernels/noise.py for this weight's ``param_key``. Each program loads a W tile
once and serves every stream present in its block of rows with it: the noise of
a stream is regenerated in registers, added to the tile in fp32, and the sum goes
to the tensor cores in the input dtype.

Autograd: clean rows get the gradients of ``F.linear`` (wrt x, W, b); noisy rows
are constants (zero gradient), and only the clean rows of x are saved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from psnrl.kernels import noise
from psnrl.kernels.noise_rows import NoiseRows, NoiseStream, StreamRows
from psnrl.kernels.splitk_workspace import splitk_workspace

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


# SMs of the GPU the tiling is planned for when none is present (an H100 SXM).
DEFAULT_SMS = 132
# Up to this many rows the fused kernel runs weight-stationary: one row tile holds the
# whole batch, so each program reads its slab of W once and makes each noise element
# once per stream for all rows. Above it (learner and prefill shapes, bound by the
# tensor cores) the noisy rows take the materializing path, which the first H200 run
# measured at 1.01-1.26x cuBLAS at M >= 4096 against 6-8x for the fused kernel.
FUSED_MAX_ROWS = 256


def pick_tiles(m: int, n: int, k: int, dtype: torch.dtype, sms: int | None = None,
               glu: bool = False) -> TileConfig:
    """Tile shape of the fused kernel by problem size.

    Up to FUSED_MAX_ROWS rows, BM covers every row (one row tile: the weight and its
    noise are read and made once per call) and the grid is spread over the N tiles
    and, where they are too few to fill the GPU, over K (split-K, at most so many
    splits that the fp32 partial sums stay under a quarter of the weight's bytes).
    BN x BK stays small enough that the noise tile lives in registers without spilling
    (``psnrl bench kernel-sass`` checks sm_90). fp32 (tests, references) uses small
    tiles: its exact dot has no tensor-core path. ``glu`` (gate and up in one program,
    two accumulators) halves BN; BM, which the CUDA-graph tile tables depend on, stays.
    """
    if sms is None:
        sms = torch.cuda.get_device_properties(0).multi_processor_count \
            if torch.cuda.is_available() else DEFAULT_SMS
    if m > FUSED_MAX_ROWS:  # only CUDA-graph buckets above it and explicit requests get here
        return TileConfig(128, 64 if glu else 128, 32, 8, 3)
    bm = max(16, triton.next_power_of_2(m))
    if dtype == torch.float32:
        bn, bk, warps, stages = 32, 32, 4, 2
    elif bm <= 64:
        bn, bk, warps, stages = 64, 64, 4, 4
    else:
        bn, bk, warps, stages = 64, 64, 8, 3
    if glu:
        bn //= 2
    if bm > 64 and triton.cdiv(n, bn) < sms and bn > 16:
        bn //= 2  # few output columns (a down_proj): more programs before splitting K
    programs = triton.cdiv(n, bn)
    split = max(1, min(triton.cdiv(k, bk) // 4, (2 * sms) // programs, k // (8 * m)))
    return TileConfig(bm, bn, bk, warps, stages, split)


@triton.jit
def _epilogue(acc, acc_up, b_ptr, rn, n_ok, out_ty: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr):
    """The fp32 sums -> the stored value: + bias, or SiLU(gate) * up rounded as F.silu(gate) * up
    rounds gate, up and SiLU(gate) in the output dtype (so the engine's activations match the
    learner's, which runs gate and up apart)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GLU:
        gate = acc.to(out_ty).to(tl.float32)
        up = acc_up.to(out_ty).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32)
        acc = act * up
    return acc.to(out_ty)


@triton.jit
def _slot_noise(slot_ptr, seed_ptr, sigma_ptr, key, key_up):
    """A work tile's stream slot: (stream id or -1, sigma, NEG_2LN2 sigma^2, W's noise keys,
    the up weight's noise keys)."""
    s = tl.load(slot_ptr)
    sigma = tl.load(sigma_ptr + tl.maximum(s, 0))
    lo = tl.load(seed_ptr + 2 * tl.maximum(s, 0)).to(tl.uint32, bitcast=True)
    hi = tl.load(seed_ptr + 2 * tl.maximum(s, 0) + 1).to(tl.uint32, bitcast=True)
    k1, k2 = noise.stream_keys(lo, hi, key)
    ku1, ku2 = noise.stream_keys(lo, hi, key_up)
    return s, sigma, sigma * sigma * noise.NEG_2LN2, k1, k2, ku1, ku2


@triton.jit
def _slot_step(acc, acc_up, x, w, u, row_stream, s, sigma, scale2, k1, k2, ku1, ku2, rows, col0, in_features,
               SLOTS: tl.constexpr, GLU: tl.constexpr, IEEE: tl.constexpr, PAIRED: tl.constexpr,
               BK: tl.constexpr):
    """One K step of one stream slot: perturb the W (and up) tile with the slot's noise, then
    the tensor-core dot on the slot's rows."""
    w_s = w
    u_s = u
    if sigma > 0:
        w_s = noise.perturb_tile(w, k1, k2, rows, col0, in_features, scale2, BK, PAIRED)
        if GLU:
            u_s = noise.perturb_tile(u, ku1, ku2, rows, col0, in_features, scale2, BK, PAIRED)
    x_s = x
    if SLOTS > 1:
        x_s = tl.where((row_stream == s)[:, None], x, 0.0)
    if IEEE:
        acc += tl.dot(x_s, tl.trans(w_s), input_precision="ieee")
        if GLU:
            acc_up += tl.dot(x_s, tl.trans(u_s), input_precision="ieee")
    else:
        acc += tl.dot(x_s, tl.trans(w_s))
        if GLU:
            acc_up += tl.dot(x_s, tl.trans(u_s))
    return acc, acc_up


@triton.jit(do_not_specialize=["pkey", "pkey_up", "row_offset", "col_offset"])
def _noisy_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, row_stream_ptr, tile_range_ptr, tile_slot_ptr, seed_ptr, sigma_ptr,
    pkey, N, K, stride_xm, stride_wn, stride_ym, stride_ysplit, k_per_split,
    row_offset, col_offset, in_features, up_ptr, pkey_up,
    HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr, IEEE: tl.constexpr, SLOTS: tl.constexpr,
    PARTIAL: tl.constexpr, GLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # Program (t, n, k): the rows of work tile t against W's rows [n * BN, (n + 1) * BN)
    # and K range k. Each K step loads x and the W tile once and, per stream slot of the
    # tile, perturbs the W tile in registers and runs the tensor-core dot on that slot's
    # rows. GLU: w is the gate weight and up_ptr the up weight (same shape and strides,
    # own noise key); the program keeps both accumulators and stores SiLU(gate) * up, or
    # under PARTIAL both fp32 partial sums (gate in columns [0, N), up in [N, 2N)).
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row_start = tl.load(tile_range_ptr + 2 * pid_t)
    row_end = tl.load(tile_range_ptr + 2 * pid_t + 1)
    rm = row_start + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < row_end
    n_ok = rn < N
    row_stream = rm  # read only with several slots
    if SLOTS > 1:
        row_stream = tl.load(row_stream_ptr + rm, mask=m_ok, other=-1)
    key = pkey.to(tl.uint32, bitcast=True)
    key_up = pkey_up.to(tl.uint32, bitcast=True)
    rows = (row_offset + rn).to(tl.uint32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    # An unused tile of a fixed-size table (CUDA-graph decode) has no rows: it skips the
    # K loop (no weight reads) and stores nothing. (A branch to an early return instead
    # costs the large-M variant register spills.)
    k_end = tl.where(row_end > row_start, k_end, k_begin)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k_begin + rk)[None, :]
    w_offsets = rn[:, None].to(tl.int64) * stride_wn + (k_begin + rk)[None, :]
    w_ptrs = w_ptr + w_offsets
    u_ptrs = up_ptr + w_offsets
    # Each slot's stream, sigma and noise keys, once per program (loop invariant).
    tl.static_assert(SLOTS <= 4)
    s0, sg0, c0, a0, b0, au0, bu0 = _slot_noise(tile_slot_ptr + pid_t * SLOTS, seed_ptr, sigma_ptr, key, key_up)
    if SLOTS > 1:
        s1, sg1, c1, a1, b1, au1, bu1 = _slot_noise(tile_slot_ptr + pid_t * SLOTS + 1, seed_ptr, sigma_ptr, key,
                                                    key_up)
    if SLOTS > 2:
        s2, sg2, c2, a2, b2, au2, bu2 = _slot_noise(tile_slot_ptr + pid_t * SLOTS + 2, seed_ptr, sigma_ptr, key,
                                                    key_up)
    if SLOTS > 3:
        s3, sg3, c3, a3, b3, au3, bu3 = _slot_noise(tile_slot_ptr + pid_t * SLOTS + 3, seed_ptr, sigma_ptr, key,
                                                    key_up)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BK):
        k_ok = (k0 + rk) < k_end
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        u = w
        if GLU:
            u = tl.load(u_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        col0 = (col_offset + k0).to(tl.uint32)
        acc, acc_up = _slot_step(acc, acc_up, x, w, u, row_stream, s0, sg0, c0, a0, b0, au0, bu0, rows, col0,
                                 in_features, SLOTS, GLU, IEEE, PAIRED, BK)
        if SLOTS > 1:
            acc, acc_up = _slot_step(acc, acc_up, x, w, u, row_stream, s1, sg1, c1, a1, b1, au1, bu1, rows, col0,
                                     in_features, SLOTS, GLU, IEEE, PAIRED, BK)
        if SLOTS > 2:
            acc, acc_up = _slot_step(acc, acc_up, x, w, u, row_stream, s2, sg2, c2, a2, b2, au2, bu2, rows, col0,
                                     in_features, SLOTS, GLU, IEEE, PAIRED, BK)
        if SLOTS > 3:
            acc, acc_up = _slot_step(acc, acc_up, x, w, u, row_stream, s3, sg3, c3, a3, b3, au3, bu3, rows, col0,
                                     in_features, SLOTS, GLU, IEEE, PAIRED, BK)
        x_ptrs += BK
        w_ptrs += BK
        if GLU:
            u_ptrs += BK
    mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        y_ptrs = y_ptr + pid_k * stride_ysplit + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc, mask=mask)
        if GLU:
            tl.store(y_ptrs + N, acc_up, mask=mask)
    else:
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptrs, _epilogue(acc, acc_up, b_ptr, rn, n_ok, y_ptr.dtype.element_ty, HAS_BIAS, GLU),
                 mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, y_ptr, M, N, SPLIT, stride_split, stride_pm, stride_ym,
                          HAS_BIAS: tl.constexpr, GLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """y = epilogue(sum over splits of the fp32 partials), the splits added in a fixed order."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    mask = (rm < M)[:, None] & n_ok[None, :]
    ptrs = part_ptr + rm[:, None].to(tl.int64) * stride_pm + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ptrs + s * stride_split, mask=mask, other=0.0)
        if GLU:
            acc_up += tl.load(ptrs + s * stride_split + N, mask=mask, other=0.0)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, _epilogue(acc, acc_up, b_ptr, rn, n_ok, y_ptr.dtype.element_ty, HAS_BIAS, GLU), mask=mask)


def _fused(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: NoiseRows, pkey: int,
           row_offset: int, col_offset: int, in_features: int, tiles: TileConfig | None,
           up: torch.Tensor | None, up_key: int) -> torch.Tensor:
    """The fused kernel on checked, row-major 2-D inputs: one launch (plus the split-K reduce)."""
    m, k = x2d.shape
    n = weight.shape[0]
    glu = up is not None
    cfg = tiles or pick_tiles(m, n, k, x2d.dtype, glu=glu)
    tile_ranges, tile_slots = rows.work_tiles(cfg.block_m)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    partial = split > 1
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    width = 2 * n if glu else n
    out = splitk_workspace(split * m * width, x2d.device).view(split, m, width) if partial else y
    grid = (tile_ranges.shape[0], triton.cdiv(n, cfg.block_n), split)
    _noisy_linear_kernel[grid](
        x2d, weight, bias if bias is not None else weight, out, rows.ids, tile_ranges, tile_slots,
        rows.seeds, rows.sigmas, noise.as_int32(pkey), n, k, x2d.stride(0), weight.stride(0),
        out.stride(-2), out.stride(0) if partial else 0, k_per_split, row_offset, col_offset, in_features,
        up if glu else weight, noise.as_int32(up_key),
        HAS_BIAS=bias is not None, PAIRED=in_features % 2 == 0 and col_offset % 2 == 0,
        IEEE=x2d.dtype == torch.float32, SLOTS=tile_slots.shape[1], PARTIAL=partial, GLU=glu,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if partial:
        bm, bn = 16, 128
        _splitk_reduce_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            out, bias if bias is not None else y, y, m, n, split, out.stride(0), out.stride(1), y.stride(0),
            HAS_BIAS=bias is not None, GLU=glu, BM=bm, BN=bn, num_warps=4)
    return y


def _clean(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           up: torch.Tensor | None) -> torch.Tensor:
    """Every row clean: cuBLAS (the unfused GLU rounds like the fused epilogue)."""
    if up is None:
        return torch.nn.functional.linear(x2d, weight, bias)
    return torch.nn.functional.silu(torch.nn.functional.linear(x2d, weight)) * \
        torch.nn.functional.linear(x2d, up)


def _materialized(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: StreamRows,
                  pkey: int, row_offset: int, col_offset: int, in_features: int,
                  up: torch.Tensor | None, up_key: int) -> torch.Tensor:
    """Large batches: cuBLAS per policy. A noisy stream's W + sigma E is written into one
    weight-sized scratch buffer (``noise.fill_perturbed``, the fused kernel's own perturbation,
    so bit-identical weights), which the next weight or stream of the call reuses."""
    m, n = x2d.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    scratch: torch.Tensor | None = None

    def perturbed(w: torch.Tensor, st: NoiseStream, key: int) -> torch.Tensor:
        nonlocal scratch
        scratch = noise.fill_perturbed(scratch if scratch is not None else torch.empty_like(weight), w, st.seed,
                                       key, st.sigma, row_offset=row_offset, col_offset=col_offset,
                                       in_features=in_features)
        return scratch

    for stream, index in rows.row_groups():
        xs = x2d[index]
        st = rows.streams[stream - 1] if stream else None
        ws = perturbed(weight, st, pkey) if st is not None else weight
        if up is not None:
            gate = torch.nn.functional.linear(xs, ws)  # before the scratch holds the up weight
            us = perturbed(up, st, up_key) if st is not None else up
            ys = torch.nn.functional.silu(gate) * torch.nn.functional.linear(xs, us)
        elif isinstance(index, slice):
            out = y[index]
            if bias is None:
                torch.mm(xs, ws.t(), out=out)
            else:
                torch.addmm(bias, xs, ws.t(), out=out)
            continue
        else:
            ys = torch.nn.functional.linear(xs, ws, bias)
        y[index] = ys
    return y


def noisy_linear_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         rows, pkey: int, row_offset: int, col_offset: int,
                         in_features: int, tiles: TileConfig | None = None,
                         up: torch.Tensor | None = None, up_key: int = 0) -> torch.Tensor:
    """The one dispatcher of noisy matmuls, on checked, row-major 2-D inputs with at least one
    noisy row (the wrappers send all-clean calls to cuBLAS first); no autograd.

    Up to FUSED_MAX_ROWS rows, or explicit ``tiles``, or rows of a CUDA graph (device
    tables, no host streams): the fused kernel, weight-stationary, which reads W once for
    clean and noisy rows. Larger batches: cuBLAS per policy on a transient perturbed copy of
    one weight at a time. With ``up`` (a gated MLP's up weight, ``weight`` being its gate,
    no bias): SiLU(gate) * up.
    """
    m, n = x2d.shape[0], weight.shape[0]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if m > FUSED_MAX_ROWS and tiles is None and isinstance(rows, StreamRows):
        return _materialized(x2d, weight, bias, rows, pkey, row_offset, col_offset, in_features, up, up_key)
    return _fused(x2d, weight, bias, rows, pkey, row_offset, col_offset, in_features, tiles, up, up_key)


class _NoisyLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, rows, pkey, row_offset, col_offset, in_features, tiles):
        y = noisy_linear_forward(x2d, weight, bias, rows, pkey, row_offset, col_offset,
                                 in_features, tiles)
        if any(ctx.needs_input_grad[:3]):  # noisy_linear sends all-clean calls to F.linear
            index = rows.clean_mask.nonzero().squeeze(1)
            ctx.save_for_backward(x2d.index_select(0, index), weight)
            ctx.clean_index = index
            ctx.num_rows = x2d.shape[0]
            ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_clean, weight = ctx.saved_tensors
        index = ctx.clean_index
        g = grad_y.index_select(0, index)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gx = g @ weight
            grad_x = gx.new_zeros(ctx.num_rows, weight.shape[1]).index_copy_(0, index, gx)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x_clean
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rows: StreamRows | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {noise.describe(weight)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {noise.describe(x)} does not match weight {noise.describe(weight)}: "
                         f"last dim of x must be in_features={weight.shape[1]}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"noisy_linear supports {SUPPORTED_DTYPES}, got x {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"x {noise.describe(x)} and weight {noise.describe(weight)} must share dtype and device")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype
                             or bias.device != x.device):
        raise ValueError(f"bias {noise.describe(bias)} must be [{weight.shape[0]}] {x.dtype} on {x.device}")
    if rows is not None:
        if rows.shape != tuple(x.shape[:-1]):
            raise ValueError(f"row_streams shape {rows.shape} must equal the row shape of x "
                             f"{tuple(x.shape[:-1])}")
        if rows.ids.device != x.device:
            raise ValueError(f"row_streams on {rows.ids.device} but x on {x.device}")


def noisy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 rows: StreamRows | None = None, param_key: int = 0, row_offset: int = 0,
                 col_offset: int = 0, in_features: int | None = None,
                 tiles: TileConfig | None = None) -> torch.Tensor:
    """y = x (W + sigma_s E_s)^T + b with each row's stream from ``rows`` (None: all clean).

    Runs the Triton kernel on CUDA tensors (and under ``TRITON_INTERPRET=1``);
    on a CPU otherwise, the torch reference with the same semantics.

    ``weight`` may be a shard [out, in] at (row_offset, col_offset) of an unsharded
    weight whose rows have ``in_features`` elements (default: weight.shape[1]); the
    noise is that of the unsharded weight. ``param_key`` is ``noise.param_key(name)``.
    """
    _check_inputs(x, weight, bias, rows)
    k = weight.shape[1]
    in_features = k if in_features is None else in_features
    noise.check_shard(weight.shape[0], k, row_offset, col_offset, in_features)
    noise.check_param_key(param_key)
    if rows is None or rows.all_clean:
        return torch.nn.functional.linear(x, weight, bias)  # cuBLAS, with its own autograd
    if not noise.runs_triton(x):
        # CPU without the Triton interpreter: the torch path (same values and gradients).
        from psnrl.kernels.noisy_linear_reference import noisy_linear_reference
        return noisy_linear_reference(x, weight, bias, rows=rows, param_key=param_key,
                                      row_offset=row_offset, col_offset=col_offset,
                                      in_features=in_features).to(x.dtype)
    x2d = x.reshape(-1, k)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, weight, bias)):
        y = _NoisyLinearFn.apply(x2d, weight, bias, rows, param_key, row_offset, col_offset,
                                 in_features, tiles)
    else:
        # No graph to record (no_grad / inference_mode, e.g. generation): the launch alone,
        # without the autograd Function, which would look for clean rows on the device.
        y = noisy_linear_forward(x2d, weight, bias, rows, param_key, row_offset, col_offset,
                                 in_features, tiles)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def noisy_gate_up(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, *,
                  rows: StreamRows | None = None, gate_key: int = 0, up_key: int = 0,
                  row_offset: int = 0, col_offset: int = 0, in_features: int | None = None,
                  tiles: TileConfig | None = None) -> torch.Tensor:
    """A gated MLP's activation SiLU(x Wg~^T) * (x Wu~^T), W~ = W + sigma_s E_s per row's stream.

    Up to FUSED_MAX_ROWS rows one kernel reads x and both weights once and writes only the
    activation: the [rows, 2 x intermediate] gate/up outputs never reach memory (larger
    batches take ``noisy_linear_forward``'s other paths). Rounded like
    ``F.silu(gate) * up`` on the two ``noisy_linear`` outputs. No autograd (generation and
    the learner's no-grad noisy stream). Arguments as ``noisy_linear``; both weights have
    the same shape and sharding, each its own ``param_key``.
    """
    _check_inputs(x, gate_weight, None, rows)
    if up_weight.shape != gate_weight.shape or up_weight.dtype != gate_weight.dtype \
            or up_weight.device != gate_weight.device:
        raise ValueError(f"up weight {noise.describe(up_weight)} must match gate weight {noise.describe(gate_weight)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_weight, up_weight)):
        raise ValueError("noisy_gate_up has no backward: call it under torch.no_grad() or "
                         "torch.inference_mode(), or use noisy_linear for gate and up")
    k = gate_weight.shape[1]
    in_features = k if in_features is None else in_features
    noise.check_shard(gate_weight.shape[0], k, row_offset, col_offset, in_features)
    noise.check_param_key(gate_key)
    noise.check_param_key(up_key)
    if not noise.runs_triton(x):
        from psnrl.kernels.noisy_linear_reference import noisy_gate_up_reference
        return noisy_gate_up_reference(x, gate_weight, up_weight, rows=rows, gate_key=gate_key,
                                       up_key=up_key, row_offset=row_offset, col_offset=col_offset,
                                       in_features=in_features, dtype=x.dtype)
    if rows is None or rows.all_clean:
        return _clean(x, gate_weight, None, up_weight)
    x2d = x.reshape(-1, k)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    gate_weight, up_weight = gate_weight.contiguous(), up_weight.contiguous()
    y = noisy_linear_forward(x2d, gate_weight, None, rows, gate_key, row_offset, col_offset,
                             in_features, tiles, up=up_weight, up_key=up_key)
    return y.reshape(*x.shape[:-1], gate_weight.shape[0])


class _DualLinearFn(torch.autograd.Function):
    """Clean rows (autograd) and noisy rows (constants) of one linear in one kernel call."""

    @staticmethod
    def forward(ctx, x_clean, x_noisy, weight, bias, rows, pkey):
        x = torch.cat([x_clean, x_noisy])
        if rows is None:
            y = torch.nn.functional.linear(x, weight, bias)
        else:
            y = noisy_linear(x, weight, bias, rows=rows, param_key=pkey)
        n = x_clean.shape[0]
        # The clean half is copied out so that autograd, which keeps it for the next op's
        # backward, does not also keep the noisy half alive through a shared storage.
        y_clean, y_noisy = y[:n].clone(), y[n:]
        ctx.mark_non_differentiable(y_noisy)
        ctx.save_for_backward(x_clean, weight)
        ctx.has_bias = bias is not None
        return y_clean, y_noisy

    @staticmethod
    def backward(ctx, grad_clean, _grad_noisy):
        x_clean, weight = ctx.saved_tensors
        g = grad_clean.reshape(-1, weight.shape[0])
        grad_x = (g @ weight).reshape(x_clean.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ x_clean.reshape(-1, weight.shape[1]) if ctx.needs_input_grad[2] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, grad_w, grad_b, None, None


def dual_linear(x_clean: torch.Tensor, x_noisy: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None, *, rows: StreamRows | None = None,
                param_key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's two row groups through one linear: (x_clean W^T + b, x_noisy (W + sigma E)^T + b).

    One kernel call (one read of W) serves both groups. The clean output has the
    gradients of ``F.linear``; the noisy output is a constant and nothing of the noisy
    group is saved for backward. ``rows`` describes the concatenated batch
    [clean rows | noisy rows] (built once per forward; None: all clean in this layer).
    """
    if x_clean.dim() != 2 or x_noisy.dim() != 2 or x_clean.shape[1] != x_noisy.shape[1]:
        raise ValueError(f"x_clean {noise.describe(x_clean)} and x_noisy {noise.describe(x_noisy)} must be "
                         f"2-D with the same number of features")
    if rows is not None and rows.shape != (x_clean.shape[0] + x_noisy.shape[0],):
        raise ValueError(f"rows describe {rows.shape} rows but the two groups have "
                         f"{x_clean.shape[0]} + {x_noisy.shape[0]}")
    return _DualLinearFn.apply(x_clean, x_noisy.detach(), weight, bias, rows, param_key)
