"""Counter-based Gaussian noise: the noise contract of psnrl.

One element of the noise of a parameter is addressed by ``(seed, param_key, i)``:
``seed`` is the 64-bit noise seed of a stream (an iteration, a prompt, ...),
``param_key`` a stable 32-bit id of the parameter's qualified name, and ``i``
the flat index of the element in the *unsharded* weight
(``row * in_features + col``). The value is a pure function of the address, so
any tiling, block size, device or shard regenerates the same numbers.

Generator (chosen for the GPU's instruction budget, see psnrl/kernels/README.md):
  * elements are paired: ``p = i >> 1``; one 32-bit hash of ``p`` makes the two
    normals of the pair (even ``i`` takes the first, odd ``i`` the second);
  * hash: the ``lowbias32`` integer finalizer of a keyed affine map of ``p``,
    with two 32-bit keys derived from (seed, param_key);
  * normals: Box-Muller on the hash, ``u1 = ((h & 0xFFFF) + 1/2) / 2^16`` from the low
    half, ``theta = 2 pi (1 + (h >> 9) / 2^23)`` from the high 23 bits (its top 16 are
    the high half; the 7 below, shared with u1, only shift the angle grid within a step),
    ``r = sqrt(-2 ln 2 sigma^2 log2(u1))``, normals ``r cos theta`` and ``r sin theta``.
    On the GPU log2, sqrt, sin and cos are single MUFU instructions (``*.approx``);
    the interpreter and the torch reference use exact fp32 math. Tails are cut at
    ``sqrt(2 * 17 * ln 2) = 4.855`` sigma;
  * the perturbed weight is ``fma(r, cos|sin theta, w)`` in fp32 rounded once to W's
    dtype, by one device function (``perturb_tile``) that every kernel calls, so the
    engine's fused matmul and the learner's materialized weight are bit-identical.

The reference agrees with the interpreter to ~1e-7 and with the GPU to ~5e-5 in units
of sigma (MUFU.LG2's absolute error, magnified where u1 is near 1 and the radius
small): far below bf16's resolution of a weight, and invisible to every statistic.

This module holds the contract's host helpers and the Triton device functions;
``psnrl/kernels/noise_reference.py`` is the torch twin with the same arithmetic.
"""
from __future__ import annotations

import math
import os
import zlib

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
# Largest flat index the contract addresses (indices are 32-bit).
MAX_ELEMENTS = 1 << 32

# Integer mixing constants (murmur3 fmix32 for keys, lowbias32 for counters).
FMIX_M1 = tl.constexpr(0x85EBCA6B)
FMIX_M2 = tl.constexpr(0xC2B2AE35)
LOWBIAS_M1 = tl.constexpr(0x21F0AAAD)
LOWBIAS_M2 = tl.constexpr(0x735A2D97)
KEY_SALT1 = tl.constexpr(0x9E3779B9)
KEY_SALT2 = tl.constexpr(0x7F4A7C15)

# r^2 = -2 ln(u1) = NEG_2LN2 * log2(u1): the radius costs one MUFU.LG2 and one MUFU.SQRT.
NEG_2LN2 = tl.constexpr(-1.3862943611198906)
TWO_PI = tl.constexpr(6.2831854820251465)  # fp32(2 pi)
# Under TRITON_INTERPRET=1 (set before this import) the kernels run as numpy code, which
# cannot run inline PTX: the exact float32 log2/sin/cos stand in for the MUFU approximations.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def param_key(name: str) -> int:
    """Stable 32-bit id of a parameter's qualified name (CRC-32 of its UTF-8 bytes).

    Unlike Python's ``hash``, it is the same in every process and on every machine.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"param_key needs a non-empty parameter name, got {name!r}")
    return zlib.crc32(name.encode("utf-8")) & MASK32


def split_seed(seed: int) -> tuple[int, int]:
    """Check a 64-bit noise seed and return its (low, high) 32-bit words."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"noise seed must be an int in [0, 2**64), got {seed!r}")
    return seed & MASK32, seed >> 32


def check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"noise sigma must be finite and >= 0, got {sigma!r}")
    return sigma


def radius_scale(sigma: float) -> float:
    """NEG_2LN2 * sigma^2 rounded in fp32 as the kernels round it (sigma read as fp32)."""
    s = torch.tensor(sigma, dtype=torch.float32, device="cpu")
    return float(s * s * NEG_2LN2.value)


def check_param_key(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= MASK32:
        raise ValueError(f"param_key must be a 32-bit unsigned int (see noise.param_key), got {key!r}")
    return key


def as_int32(value: int) -> int:
    """A 32-bit unsigned word as the signed int32 that kernels receive."""
    return value - (1 << 32) if value >= 1 << 31 else value


def check_shard(rows: int, cols: int, row_offset: int, col_offset: int, in_features: int) -> None:
    """Validate a shard [rows, cols] at (row_offset, col_offset) of a weight with ``in_features`` columns."""
    if not 0 < in_features < 1 << 31:
        raise ValueError(f"in_features must be in [1, 2**31), got {in_features}")
    if row_offset < 0 or col_offset < 0:
        raise ValueError(f"shard offsets must be >= 0, got row_offset={row_offset}, col_offset={col_offset}")
    if col_offset + cols > in_features:
        raise ValueError(
            f"shard columns [{col_offset}, {col_offset + cols}) exceed in_features={in_features}")
    if (row_offset + rows) * in_features > MAX_ELEMENTS:
        raise ValueError(
            f"noise addresses are 32-bit: rows {row_offset + rows} x in_features {in_features} "
            f"exceeds {MAX_ELEMENTS} elements")


def describe(t: torch.Tensor) -> str:
    """A tensor as error messages name it: shape, dtype and device."""
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def runs_triton(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under its interpreter only."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def require_kernel_device(t: torch.Tensor, what: str) -> None:
    if runs_triton(t):
        return
    raise ValueError(
        f"{what} runs a Triton kernel and needs a CUDA tensor, got one on {t.device}; on a CPU "
        f"use the torch reference, or set TRITON_INTERPRET=1 before importing kernels (slow, for tests)")


def seed_table(seeds: list[int], device: torch.device | str) -> torch.Tensor:
    """[S, 2] int32 tensor of (low, high) seed words, as the kernels read them."""
    words = [[as_int32(w) for w in split_seed(s)] for s in seeds]
    return torch.tensor(words, dtype=torch.int32, device=device).reshape(len(seeds), 2)


# ---------------------------------------------------------------------------
# Triton device functions (called by the fill kernel below and by noisy_linear)
# ---------------------------------------------------------------------------

@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= FMIX_M1
    x ^= x >> 13
    x *= FMIX_M2
    x ^= x >> 16
    return x


@triton.jit
def _lowbias32(x):
    x ^= x >> 16
    x *= LOWBIAS_M1
    x ^= x >> 15
    x *= LOWBIAS_M2
    x ^= x >> 15
    return x


@triton.jit
def stream_keys(seed_lo, seed_hi, pkey):
    """Two 32-bit hash keys from the seed words and the param key (all uint32 scalars)."""
    k1 = _fmix32(seed_lo ^ _fmix32(pkey ^ KEY_SALT1))
    k2 = _fmix32(seed_hi ^ _fmix32(k1 + KEY_SALT2))
    return k1, k2


@triton.jit
def pair_hash(p, k1, k2):
    """32 uniform bits for element pair ``p`` (uint32 tensor).

    The keyed affine map (odd multiplier) is a bijection that gives every stream
    its own input progression, so two streams never see the same inputs in a
    different order; one lowbias32 round then mixes it (one IMAD + 8 ops).
    """
    return _lowbias32(p * (k1 | 1) + k2)


@triton.jit
def _mufu(x, op: tl.constexpr):
    """One MUFU instruction (lg2/sin/cos.approx.ftz.f32) on the GPU; exact fp32 math in the interpreter."""
    if INTERPRET:
        if op == "lg2":
            return tl.log2(x)
        elif op == "sin":
            return tl.sin(x)
        else:
            return tl.cos(x)
    else:
        return tl.inline_asm_elementwise(op + ".approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def polar_pair(h, scale2):
    """Box-Muller on 32 hash bits: (r, cos theta, sin theta), the pair's normals being
    r cos theta and r sin theta, with r = sqrt(scale2 * log2(u1)) (scale2 = NEG_2LN2 * sigma^2
    folds sigma into the radius).

    u1 = ((h & 0xFFFF) + 1/2) / 2^16 and theta = 2 pi (1 + (h >> 9) / 2^23) are built from
    the bits by the exponent trick (hash bits as the mantissa of a float of fixed exponent)
    instead of int-to-float conversions, which issue on the slow pipe beside MUFU, and
    without a second mask, which would cost a register constant per use.
    """
    # u1 from the low half: 2^16 + k / 2^7 as a float, then k / 2^16 + 1/2^17 by one exact fma.
    f1 = ((h & 0xFFFF) | 0x47800000).to(tl.float32, bitcast=True)
    u1 = tl.fma(f1, 1.0 / 512.0, 1.0 / 131072.0 - 128.0)
    r = tl.sqrt(scale2 * _mufu(u1, "lg2"))  # tl.sqrt: sqrt.approx, one MUFU.SQRT
    # theta from the high 23 bits, unmasked: its top 16 (h >> 16) are independent of u1; the
    # 7 below shift the angle grid by less than one step (2^-16 turn) per u1, which leaves
    # theta uniform on a 2^16 grid given any radius.
    f2 = ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    theta = f2 * TWO_PI
    return r, _mufu(theta, "cos"), _mufu(theta, "sin")


@triton.jit
def _pair_and_parity(k1, k2, rows, col0, in_features, BC: tl.constexpr, PAIRED: tl.constexpr):
    """The hash of every pair a tile touches; unpaired: per element, with its parity."""
    row_base = rows * in_features
    if PAIRED:
        # p * (k1 | 1) + k2 with p = row_base / 2 + col / 2, split into a row term (loop
        # invariant in a matmul's K loop, hoisted) and a column term: one add per pair.
        mul = k1 | 1
        row_term = (row_base >> 1) * mul + k2
        col_term = ((col0 >> 1) + tl.arange(0, BC // 2).to(tl.uint32)) * mul
        return _lowbias32(row_term[:, None] + col_term[None, :]), 0
    else:
        i = row_base[:, None] + (col0 + tl.arange(0, BC).to(tl.uint32))[None, :]
        return pair_hash(i >> 1, k1, k2), i & 1


@triton.jit
def perturb_tile(w, k1, k2, rows, col0, in_features, scale2,
                 BC: tl.constexpr, PAIRED: tl.constexpr):
    """W + sigma E of the tile rows x [col0, col0 + BC) of a weight, rounded to W's dtype.

    ``rows`` is a uint32 vector of global row ids, ``col0`` the tile's first global column
    (uint32), ``in_features`` the unsharded row length, ``scale2`` = NEG_2LN2 * sigma^2.
    Each element is fma(r, cos|sin theta, w) in fp32, one rounding, then cast: the fused
    matmul and the materializing fill both call this, so they make bit-identical weights.
    PAIRED (row length and col0 even) makes each pair once and interleaves its two
    normals; otherwise every element makes its pair and keeps its half. Both give the
    same numbers.
    """
    h, parity = _pair_and_parity(k1, k2, rows, col0, in_features, BC, PAIRED)
    r, c, s = polar_pair(h, scale2)
    if PAIRED:
        e = tl.fma(tl.interleave(r, r), tl.interleave(c, s), w.to(tl.float32))
    else:
        e = tl.fma(r, tl.where(parity == 0, c, s), w.to(tl.float32))
    return e.to(w.dtype)


@triton.jit
def noise_tile(k1, k2, rows, col0, in_features, scale2, BC: tl.constexpr, PAIRED: tl.constexpr):
    """sigma * z (fp32) of a tile, as ``perturb_tile`` makes it (arguments as there)."""
    h, parity = _pair_and_parity(k1, k2, rows, col0, in_features, BC, PAIRED)
    r, c, s = polar_pair(h, scale2)
    if PAIRED:
        return tl.interleave(r * c, r * s)
    else:
        return r * tl.where(parity == 0, c, s)


@triton.jit
def tile_hash_bits(k1, k2, rows, col0, in_features, BC: tl.constexpr):
    """The 32 uniform bits behind each element of a tile (its pair's hash), for tests."""
    i = (rows * in_features)[:, None] + (col0 + tl.arange(0, BC).to(tl.uint32))[None, :]
    return pair_hash(i >> 1, k1, k2)


# What _fill_kernel writes: sigma * z, the hash bits, or W + sigma E (from w_ptr).
FILL_NOISE, FILL_BITS, FILL_PERTURBED = 0, 1, 2


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "pkey", "row_offset", "col_offset"])
def _fill_kernel(out_ptr, w_ptr, R, C, stride_r, stride_w, seed_lo, seed_hi, pkey, scale2,
                 row_offset, col_offset, in_features,
                 MODE: tl.constexpr, PAIRED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BR + tl.arange(0, BR)
    c = pid_c * BC + tl.arange(0, BC)
    k1, k2 = stream_keys(seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True),
                         pkey.to(tl.uint32, bitcast=True))
    rows = (row_offset + r).to(tl.uint32)
    col0 = (col_offset + pid_c * BC).to(tl.uint32)
    mask = (r[:, None] < R) & (c[None, :] < C)
    ptrs = out_ptr + r[:, None].to(tl.int64) * stride_r + c[None, :]
    if MODE == 1:
        bits = tile_hash_bits(k1, k2, rows, col0, in_features, BC)
        tl.store(ptrs, bits.to(tl.int32, bitcast=True), mask=mask)
    elif MODE == 2:
        w = tl.load(w_ptr + r[:, None].to(tl.int64) * stride_w + c[None, :], mask=mask, other=0.0)
        tl.store(ptrs, perturb_tile(w, k1, k2, rows, col0, in_features, scale2, BC, PAIRED), mask=mask)
    else:
        z = noise_tile(k1, k2, rows, col0, in_features, scale2, BC, PAIRED)
        tl.store(ptrs, z.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_fill(out: torch.Tensor, seed: int, key: int, sigma: float, row_offset: int,
                 col_offset: int, in_features: int | None, mode: int,
                 block: tuple[int, int], weight: torch.Tensor | None = None) -> torch.Tensor:
    require_kernel_device(out, "fill_noise")
    if out.dim() != 2 or out.stride(1) != 1:
        raise ValueError(f"noise fill needs a 2-D row-major tensor, got shape {tuple(out.shape)} "
                         f"strides {out.stride()}")
    rows, cols = out.shape
    in_features = cols if in_features is None else in_features
    check_shard(rows, cols, row_offset, col_offset, in_features)
    lo, hi = split_seed(seed)
    br, bc = block
    paired = in_features % 2 == 0 and col_offset % 2 == 0 and bc % 2 == 0
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    w = out if weight is None else weight
    _fill_kernel[grid](out, w, rows, cols, out.stride(0), w.stride(0), as_int32(lo), as_int32(hi),
                       as_int32(check_param_key(key)), radius_scale(check_sigma(sigma)), row_offset, col_offset,
                       in_features, MODE=mode, PAIRED=paired, BR=br, BC=bc)
    return out


def fill_noise(out: torch.Tensor, seed: int, key: int, sigma: float = 1.0, *, row_offset: int = 0,
               col_offset: int = 0, in_features: int | None = None,
               block: tuple[int, int] = (32, 64)) -> torch.Tensor:
    """Fill ``out`` ([rows, cols] shard at (row_offset, col_offset)) with ``sigma * z`` (Triton)."""
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"noise fill writes float32/float16/bfloat16, got {out.dtype}")
    return _launch_fill(out, seed, key, sigma, row_offset, col_offset, in_features, FILL_NOISE, block)


def fill_noise_bits(out: torch.Tensor, seed: int, key: int, *, row_offset: int = 0,
                    col_offset: int = 0, in_features: int | None = None,
                    block: tuple[int, int] = (32, 64)) -> torch.Tensor:
    """Fill an int32 ``out`` with the 32 uniform bits behind each element (Triton)."""
    if out.dtype != torch.int32:
        raise ValueError(f"noise bits are int32, got {out.dtype}")
    return _launch_fill(out, seed, key, 1.0, row_offset, col_offset, in_features, FILL_BITS, block)


def fill_perturbed(out: torch.Tensor, weight: torch.Tensor, seed: int, key: int, sigma: float, *,
                   row_offset: int = 0, col_offset: int = 0, in_features: int | None = None,
                   block: tuple[int, int] = (32, 64)) -> torch.Tensor:
    """Write W + sigma E of ``weight`` (a [rows, cols] shard, row-major) into ``out`` (Triton).

    The same device function as the fused matmul's, so the weights are bit-identical to the
    ones it multiplies by; ``out`` is a scratch buffer of W's shape and dtype (may be W itself).
    """
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"fill_perturbed needs a row-major 2-D weight, got shape {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if out.shape != weight.shape or out.dtype != weight.dtype or out.device != weight.device:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} must match weight "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fill_perturbed takes float32/float16/bfloat16 weights, got {weight.dtype}")
    return _launch_fill(out, seed, key, sigma, row_offset, col_offset, in_features, FILL_PERTURBED,
                        block, weight)
