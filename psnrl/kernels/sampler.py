"""Fused token sampler: the engine's torch sampler (psnrl/engine/sampling.py) in one Triton
kernel, one program per row, streaming the vocabulary in blocks with no [B, V] temporary.

Per row (``sample_rows``): bad rows (any NaN or +inf, or no finite logit) get token -1,
log-prob NaN and the bad flag; greedy rows (temperature 0) the first argmax and the raw
log-prob; sampled rows ``z = (x - max) / T``, top-k and top-p as a value threshold, then
the exponential race ``argmax_v(z_v - log E_v)`` over the kept tokens with ``E_v`` from
the counter hash of (seed, step, v). Stop tokens of rows with ``mask_stops`` set are
-inf logits before anything else (as ``mask_stop_tokens`` makes them).

Passes over the row (each reads its V logits):

1. max, the bad-row flags, the first argmax and the online logsumexp of the raw logits.
   Greedy and bad rows are done.
2. (top-k rows) the k-th largest z, searched over the order key
   ``d = bits(z) & 0x7FFFFFFF``: z <= 0, so z1 >= z2 iff d1 <= d2, -0.0 and +0.0 share
   d = 0, -inf is 0x7F800000. 8 passes, each counting ``d < c`` for 15 candidates c
   (4 bits of the 31-bit key per pass).
3. (top-p rows) the largest D with ``mass(d < D) < p`` (the mass of the tokens strictly
   above D, over the top-k survivors, renormalized): 8 passes the same way. The tokens
   kept by torch's sorted rule "rank i is kept iff the mass of ranks < i is < p" are
   exactly ``d <= D``, ties with the boundary included; p >= 1 skips the search.
4. the race over ``d <= D`` (D clamped to finite z) and the logsumexp of the kept z.

So: bad and greedy rows 1 pass, untruncated sampled rows 2, top-k or top-p 10, both 18.
z is recomputed in every pass as torch rounds it (``x - max`` then an IEEE division by
T; the kernel is compiled without fma contraction, so each operation rounds as torch's
separate kernels round it), which is why the race cannot share pass 1: its keys need
the final max to be the same fp32 numbers as torch's.

Agreement with the torch sampler: z and the top-k set are bit-exact. Tokens are identical
whenever both compute the same Gumbel noise, i.e. whenever their fp32 ``log``/``log1p``
agree: on the GPU the kernel calls libdevice's, the CUDA math library's functions that
torch calls (Triton links their flush-to-zero flavour, the same on the normal numbers
that are all these functions see here); the interpreter computes them in fp64 rounded to fp32 (correctly rounded)
while torch's CPU ``log`` is within an ulp, so there the noise can differ by an ulp and
a token can differ only where the two best keys are that close. Exact key ties go to
the first index, as torch's argmax. The top-p decision compares an fp32 mass sum with
p, as torch's cumsum does in another order: the kept set can differ only where the mass
above a candidate is within fp32 rounding (~1e-6 relative) of p. Log-probs agree to
~1e-6 (sums in another order, ``tl.exp``/``tl.log`` approximations on the GPU).
"""
from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from psnrl.kernels.noise import INTERPRET, pair_hash, require_kernel_device, stream_keys

LogprobsMode = Literal["sampled", "raw"]

# Salt of the step key (``step ^ STEP_SALT``): must equal psnrl.engine.sampling.STEP_SALT,
# whose streams the kernel reproduces (tests check it).
STEP_SALT = tl.constexpr(0x5A3C96E1)
# Order key of the most negative finite z: ``d <= FINITE_D`` keeps every finite z, never -inf.
FINITE_D = tl.constexpr(0x7F7FFFFF)
# Vocabulary entries per block (the GPU's choice; a whole small vocabulary is one block).
DEFAULT_BLOCK = 2048


@triton.jit
def _log(x):
    """fp32 log: libdevice's on the GPU (torch CUDA's logf); fp64 rounded to fp32 in the interpreter."""
    if INTERPRET:
        return tl.log(x.to(tl.float64)).to(tl.float32)
    else:
        return libdevice.log(x)


@triton.jit
def _log1p(x):
    """fp32 log1p for x in [-1/2, -2**-33] (the sampler's domain). The interpreter has no
    log1p: log(u) * x / (u - 1) with u = 1 + x in fp64 (Goldberg's rewrite) stands in."""
    if INTERPRET:
        x64 = x.to(tl.float64)
        u = 1.0 + x64
        return (tl.log(u) * x64 / (u - 1.0)).to(tl.float32)
    else:
        return libdevice.log1p(x)


@triton.jit
def _gumbel(v, k1, k2):
    """g = -log E, E = -log u, u = (h + 1/2) / 2**32 with h = pair_hash(v, k1, k2): the fp32
    operations of ``sampling.exponentials`` (log1p of -(1 - u) for u >= 1/2)."""
    h = pair_hash(v, k1, k2)
    u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    w = ((0xFFFFFFFF - h).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    e = tl.where((h >> 31) == 0, -_log(u), -_log1p(-w))
    return -_log(e)


@triton.jit
def _logits(row_ptr, offs, V, stop_ids, HAS_STOPS: tl.constexpr):
    """A block of the row's logits in fp32; padding and masked stop tokens are -inf."""
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    if HAS_STOPS:
        hit = tl.max((offs[:, None] == stop_ids[None, :]).to(tl.int32), 1)
        x = tl.where(hit > 0, float("-inf"), x)
    return x


@triton.jit
def _scaled(row_ptr, offs, V, stop_ids, m, t, HAS_STOPS: tl.constexpr):
    """z = (x - max) / T rounded as torch rounds it, and its order key d (z1 >= z2 iff d1 <= d2)."""
    z = tl.fdiv(_logits(row_ptr, offs, V, stop_ids, HAS_STOPS) - m, t, ieee_rounding=True)
    return z, z.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _search(row_ptr, V, stop_ids, m, t, D, target, TOP_P: tl.constexpr, HAS_STOPS: tl.constexpr,
            BLOCK: tl.constexpr):
    """The order key of a row's threshold, 4 bits per pass (8 passes over the row).

    top-k (target = k): the smallest c with #{d <= c} >= k, i.e. the k-th largest z.
    top-p (target = p): the largest c with mass(d < c) / mass(d <= D) < p (the mass strictly
    above c, renormalized over the top-k survivors d <= D), or 0 (rank 0 is always kept).
    Both tests are monotone in c. Each pass splits the range [ans, ans + 2**span) that
    holds the answer at 15 candidates ans + j 2**step and moves ans past those that pass.
    """
    lanes = tl.arange(0, BLOCK)
    j = tl.arange(0, 16)
    ans = tl.full((), 0, tl.int32)
    for i in range(8):
        span = 31 - 4 * i
        step = tl.maximum(span - 4, 0)
        cand = ans + (j << step)
        if TOP_P:
            stat = tl.zeros((16,), tl.float32)
        else:
            stat = tl.zeros((16,), tl.int32)
        total = tl.full((), 0.0, tl.float32)
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            z, d = _scaled(row_ptr, offs, V, stop_ids, m, t, HAS_STOPS)
            below = d[:, None] < cand[None, :]
            if TOP_P:
                e = tl.where(d <= D, tl.exp(z), 0.0)
                total += tl.sum(e, 0)
                stat += tl.sum(tl.where(below, e[:, None], 0.0), 0)
            else:
                stat += tl.sum((below & (offs < V)[:, None]).to(tl.int32), 0)
        if TOP_P:
            stat = tl.fdiv(stat, total, ieee_rounding=True)
        passes = (j > 0) & (j < (1 << (span - step))) & (stat < target)
        ans += tl.sum(passes.to(tl.int32), 0) << step
    return ans


@triton.jit(do_not_specialize=["V", "stride_x", "stride_stop"])
def _sample_kernel(x_ptr, stride_x, V, seed_ptr, step_ptr, temp_ptr, top_p_ptr, top_k_ptr,
                   stop_ptr, stride_stop, S, mask_ptr, tok_ptr, lp_ptr, bad_ptr,
                   HAS_STOPS: tl.constexpr, SB: tl.constexpr, SAMPLED: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = x_ptr + row.to(tl.int64) * stride_x
    lanes = tl.arange(0, BLOCK)
    stop_ids = tl.full((SB,), -1, tl.int32)
    if HAS_STOPS:
        s_lanes = tl.arange(0, SB)
        ids = tl.load(stop_ptr + row * stride_stop + s_lanes, mask=s_lanes < S, other=-1).to(tl.int32)
        stop_ids = tl.where(tl.load(mask_ptr + row) != 0, ids, -1)

    # Pass 1: max, flags, first argmax, online logsumexp of the raw logits.
    m = tl.full((), float("-inf"), tl.float32)
    arg = tl.full((), 0, tl.int32)
    s = tl.full((), 0.0, tl.float32)
    n_bad = tl.full((), 0, tl.int32)
    n_finite = tl.full((), 0, tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        x = _logits(row_ptr, offs, V, stop_ids, HAS_STOPS)
        n_bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
        finite = (x == x) & (tl.abs(x) != float("inf"))
        n_finite += tl.sum(finite.to(tl.int32), 0)
        x = tl.where(finite, x, float("-inf"))
        blk_max, blk_arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        arg = tl.where(blk_max > m, v0 + blk_arg, arg)
        m_new = tl.maximum(m, blk_max)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        s = s * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use), 0)
        m = m_new
    bad = (n_bad > 0) | (n_finite == 0)
    log_s = tl.log(tl.where(bad, 1.0, s))  # logsumexp(x - max)

    t = tl.load(temp_ptr + row)
    tok = arg.to(tl.int64)
    lp = -log_s  # greedy: the argmax's x - max is exactly 0
    if (t != 0.0) & (bad == 0):
        D = tl.full((), FINITE_D, tl.int32)
        k = tl.load(top_k_ptr + row)
        if (k > 0) & (k < V):
            D = tl.minimum(D, _search(row_ptr, V, stop_ids, m, t, D, k, False, HAS_STOPS, BLOCK))
        p = tl.load(top_p_ptr + row)
        if p < 1.0:
            D = tl.minimum(D, _search(row_ptr, V, stop_ids, m, t, D, p, True, HAS_STOPS, BLOCK))

        # The race over the kept tokens, and their logsumexp.
        seed = tl.load(seed_ptr + row)
        k1, k2 = stream_keys((seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32),
                             tl.load(step_ptr + row).to(tl.uint32) ^ STEP_SALT)
        best = tl.full((), float("-inf"), tl.float32)
        win = tl.full((), 0, tl.int32)
        kept = tl.full((), 0.0, tl.float32)
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            z, d = _scaled(row_ptr, offs, V, stop_ids, m, t, HAS_STOPS)
            keep = d <= D
            kept += tl.sum(tl.where(keep, tl.exp(z), 0.0), 0)
            key = tl.where(keep, z + _gumbel(offs.to(tl.uint32), k1, k2), float("-inf"))
            blk_best, blk_arg = tl.max(key, 0, return_indices=True, return_indices_tie_break_left=True)
            win = tl.where(blk_best > best, v0 + blk_arg, win)
            best = tl.maximum(best, blk_best)
        tok = win.to(tl.int64)
        shifted = tl.load(row_ptr + win).to(tl.float32) - m
        if SAMPLED:
            lp = tl.fdiv(shifted, t, ieee_rounding=True) - tl.log(kept)
        else:
            lp = shifted - log_s
    tl.store(tok_ptr + row, tl.where(bad, -1, tok))
    tl.store(lp_ptr + row, tl.where(bad, float("nan"), lp))
    tl.store(bad_ptr + row, bad)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
           device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype not in dtypes or t.device != device:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))} of shape {list(shape)} on {device}, "
                         f"got {t.dtype} of shape {list(t.shape)} on {t.device}")
    if not t.is_contiguous():  # the kernel reads element i at ptr + i
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def sample_rows(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, temperature: torch.Tensor,
                top_p: torch.Tensor, top_k: torch.Tensor, *, stop_ids: torch.Tensor | None = None,
                mask_stops: torch.Tensor | None = None, logprobs_mode: LogprobsMode = "sampled",
                out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V], as ``psnrl.engine.sampling.sample`` draws it
    after ``mask_stop_tokens``; returns (tokens int64 [B], logprobs fp32 [B], bad bool [B]).

    seeds, steps: int64 [B]; temperature, top_p: fp32 [B]; top_k: int32/int64 [B] (<= 0 or
    >= V: off). stop_ids: int32/int64 [B, S], each row's stop tokens padded with -1 (ids
    outside [0, V) are ignored); mask_stops: bool [B], whose rows have them masked (-inf)
    this step (``step < min_tokens``). ``out``: the three output tensors to write (e.g. a
    CUDA graph's static buffers). No host sync and no branch on tensor values: every
    per-row decision is made in the kernel.
    """
    if logprobs_mode not in ("sampled", "raw"):
        raise ValueError(f"logprobs_mode must be 'sampled' or 'raw', got {logprobs_mode!r}")
    if logits.dim() != 2 or logits.stride(1) != 1 or \
            logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be a row-major float [B, V] tensor, got {logits.dtype} "
                         f"of shape {list(logits.shape)} strides {logits.stride()}")
    require_kernel_device(logits, "sample_rows")
    b, v = logits.shape
    if not 0 < v < 1 << 31:
        raise ValueError(f"vocabulary size must be in [1, 2**31), got {v}")
    dev = logits.device
    _check("seeds", seeds, (b,), (torch.int64,), dev)
    _check("steps", steps, (b,), (torch.int64,), dev)
    _check("temperature", temperature, (b,), (torch.float32,), dev)
    _check("top_p", top_p, (b,), (torch.float32,), dev)
    _check("top_k", top_k, (b,), (torch.int32, torch.int64), dev)
    if (stop_ids is None) != (mask_stops is None):
        raise ValueError("stop_ids and mask_stops go together")
    if stop_ids is not None and mask_stops is not None:
        if stop_ids.dim() != 2 or stop_ids.stride(1) != 1:
            raise ValueError(f"stop_ids must be a row-major [B, S] tensor, got shape {list(stop_ids.shape)}")
        _check("stop_ids", stop_ids, (b, stop_ids.shape[1]), (torch.int32, torch.int64), dev)
        _check("mask_stops", mask_stops, (b,), (torch.bool,), dev)
    if out is None:
        out = (torch.empty(b, dtype=torch.int64, device=dev), torch.empty(b, dtype=torch.float32, device=dev),
               torch.empty(b, dtype=torch.bool, device=dev))
    for name, o, dtype in zip(("tokens", "logprobs", "bad"), out, (torch.int64, torch.float32, torch.bool)):
        _check(f"out {name}", o, (b,), (dtype,), dev)
    if b == 0:
        return out
    has_stops = stop_ids is not None and stop_ids.shape[1] > 0
    width = stop_ids.shape[1] if stop_ids is not None and has_stops else 0
    stops = stop_ids if stop_ids is not None and has_stops else seeds  # unread placeholder
    mask = mask_stops if mask_stops is not None and has_stops else seeds
    block = block or min(DEFAULT_BLOCK, triton.next_power_of_2(v))
    _sample_kernel[(b,)](logits, logits.stride(0), v, seeds, steps, temperature, top_p, top_k,
                         stops, stops.stride(0), width, mask, *out,
                         HAS_STOPS=has_stops, SB=triton.next_power_of_2(max(width, 1)),
                         SAMPLED=logprobs_mode == "sampled", BLOCK=block, num_warps=8, enable_fp_fusion=False)
    return out
