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
  * normals: Box-Muller on the two 16-bit halves of the hash, with ``ln`` and
    ``sin``/``cos`` as short fp32 polynomials so that the Triton code and the
    torch reference agree to a few ulp on every backend. Tails are cut at
    ``sqrt(2 * 17 * ln 2) = 4.855`` sigma.

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

# ln(1 + f) = f * P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]; Chebyshev fit,
# relative error 1.2e-6 in fp32 (far below what any statistic of the noise sees).
LN_P0 = tl.constexpr(1.0000009536743164)
LN_P1 = tl.constexpr(-0.5000114440917969)
LN_P2 = tl.constexpr(0.33314675092697144)
LN_P3 = tl.constexpr(-0.24908289313316345)
LN_P4 = tl.constexpr(0.20491759479045868)
LN_P5 = tl.constexpr(-0.1868075132369995)
LN_P6 = tl.constexpr(0.11931054294109344)
LN2 = tl.constexpr(0.6931471824645996)  # fp32-exact
SQRT_HALF = tl.constexpr(0.7071067690849304)  # fp32-exact
# sin(t * pi / 2) = t * S(t^2), cos(t * pi / 2) = C(t^2) on t in [-1/2, 1/2];
# absolute error 1.2e-6 (sin) and 1.1e-7 (cos).
SIN_P0 = tl.constexpr(1.5707941055297852)
SIN_P1 = tl.constexpr(-0.6458016633987427)
SIN_P2 = tl.constexpr(0.07795441150665283)
COS_P0 = tl.constexpr(1.0)
COS_P1 = tl.constexpr(-1.2336970567703247)
COS_P2 = tl.constexpr(0.2535986006259918)
COS_P3 = tl.constexpr(-0.020408255979418755)


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
def normal_pair(h):
    """Two standard normals (fp32) from 32 hash bits by Box-Muller."""
    # radius from the high half: u1 = (k + 1/2) / 2^16 in (0, 1)
    u1 = ((h >> 16).to(tl.float32) + 0.5) * (1.0 / 65536.0)
    bits = u1.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 126  # u1 = m * 2^e with m in [1/2, 1)
    m = ((bits & 0x7FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    low = m < SQRT_HALF
    m = tl.where(low, m + m, m)
    e = tl.where(low, e - 1, e)
    f = m - 1.0
    poly = LN_P6 * f + LN_P5
    poly = poly * f + LN_P4
    poly = poly * f + LN_P3
    poly = poly * f + LN_P2
    poly = poly * f + LN_P1
    poly = poly * f + LN_P0
    ln_u1 = e.to(tl.float32) * LN2 + f * poly
    # sqrt(-2 ln u1) / sqrt(2): the 1/sqrt(2) of the angle rotation below is folded in.
    radius = tl.sqrt(-ln_u1)
    # angle from the low half: quadrant q and offset t in (-1/2, 1/2) of pi/2,
    # theta = (q + 1/2 + t) * pi / 2.
    a = h & 0xFFFF
    q = a >> 14
    t = ((a & 0x3FFF).to(tl.float32) + 0.5) * (1.0 / 16384.0) - 0.5
    t2 = t * t
    s = SIN_P2 * t2 + SIN_P1
    s = s * t2 + SIN_P0
    s = s * t
    c = COS_P3 * t2 + COS_P2
    c = c * t2 + COS_P1
    c = c * t2 + COS_P0
    # (cos, sin) of (pi/4 + t*pi/2), times sqrt(2)
    ca = (c - s) * radius
    sa = (c + s) * radius
    swap = (q & 1) == 1
    x0 = tl.where(swap, sa, ca)
    x1 = tl.where(swap, ca, sa)
    z0 = tl.where((q == 1) | (q == 2), -x0, x0)
    z1 = tl.where(q >= 2, -x1, x1)
    return z0, z1


@triton.jit
def noise_tile(k1, k2, rows, col0, in_features, BC: tl.constexpr, PAIRED: tl.constexpr):
    """Standard normals of the tile rows x [col0, col0 + BC) of a weight.

    ``rows`` is a uint32 vector of global row ids, ``col0`` the tile's first global
    column (uint32), ``in_features`` the unsharded row length. PAIRED (row length
    and col0 even) makes each pair once and interleaves it; otherwise every element
    makes its pair and keeps its half. Both give the same numbers.
    """
    row_base = rows * in_features
    if PAIRED:
        p = (row_base >> 1)[:, None] + ((col0 >> 1) + tl.arange(0, BC // 2).to(tl.uint32))[None, :]
        z0, z1 = normal_pair(pair_hash(p, k1, k2))
        z = tl.interleave(z0, z1)
    else:
        i = row_base[:, None] + (col0 + tl.arange(0, BC).to(tl.uint32))[None, :]
        z0, z1 = normal_pair(pair_hash(i >> 1, k1, k2))
        z = tl.where((i & 1) == 0, z0, z1)
    return z


@triton.jit
def tile_hash_bits(k1, k2, rows, col0, in_features, BC: tl.constexpr):
    """The 32 uniform bits behind each element of a tile (its pair's hash), for tests."""
    i = (rows * in_features)[:, None] + (col0 + tl.arange(0, BC).to(tl.uint32))[None, :]
    return pair_hash(i >> 1, k1, k2)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "pkey", "row_offset", "col_offset"])
def _fill_kernel(out_ptr, R, C, stride_r, seed_lo, seed_hi, pkey, sigma,
                 row_offset, col_offset, in_features,
                 BITS: tl.constexpr, PAIRED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
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
    if BITS:
        bits = tile_hash_bits(k1, k2, rows, col0, in_features, BC)
        tl.store(ptrs, bits.to(tl.int32, bitcast=True), mask=mask)
    else:
        z = noise_tile(k1, k2, rows, col0, in_features, BC, PAIRED)
        tl.store(ptrs, (z * sigma).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_fill(out: torch.Tensor, seed: int, key: int, sigma: float, row_offset: int,
                 col_offset: int, in_features: int | None, bits: bool,
                 block: tuple[int, int]) -> torch.Tensor:
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
    _fill_kernel[grid](out, rows, cols, out.stride(0), as_int32(lo), as_int32(hi),
                       as_int32(check_param_key(key)), check_sigma(sigma), row_offset, col_offset,
                       in_features, BITS=bits, PAIRED=paired, BR=br, BC=bc)
    return out


def fill_noise(out: torch.Tensor, seed: int, key: int, sigma: float = 1.0, *, row_offset: int = 0,
               col_offset: int = 0, in_features: int | None = None,
               block: tuple[int, int] = (32, 64)) -> torch.Tensor:
    """Fill ``out`` ([rows, cols] shard at (row_offset, col_offset)) with ``sigma * z`` (Triton)."""
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"noise fill writes float32/float16/bfloat16, got {out.dtype}")
    return _launch_fill(out, seed, key, sigma, row_offset, col_offset, in_features, False, block)


def fill_noise_bits(out: torch.Tensor, seed: int, key: int, *, row_offset: int = 0,
                    col_offset: int = 0, in_features: int | None = None,
                    block: tuple[int, int] = (32, 64)) -> torch.Tensor:
    """Fill an int32 ``out`` with the 32 uniform bits behind each element (Triton)."""
    if out.dtype != torch.int32:
        raise ValueError(f"noise bits are int32, got {out.dtype}")
    return _launch_fill(out, seed, key, 1.0, row_offset, col_offset, in_features, True, block)
