"""Torch twin of psnrl/kernels/noise.py: the same integer arithmetic and fp32 polynomials.

Integers are held in int64 tensors and kept to 32 bits with a mask (every product
is of a value below 2^31 and one below 2^32, so int64 never overflows). It runs on any
device and is the oracle of the Triton generator and of the statistical tests.
"""
from __future__ import annotations

import torch

from psnrl.kernels import noise as N

M32 = N.MASK32


def _c(v) -> float | int:
    return v.value if hasattr(v, "value") else v


def fmix32(x: torch.Tensor | int) -> torch.Tensor | int:
    x ^= x >> 16
    x = (x * _c(N.FMIX_M1)) & M32
    x ^= x >> 13
    x = (x * _c(N.FMIX_M2)) & M32
    x ^= x >> 16
    return x


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _c(N.LOWBIAS_M1)) & M32
    x = x ^ (x >> 15)
    x = (x * _c(N.LOWBIAS_M2)) & M32
    return x ^ (x >> 15)


def stream_keys(seed: int, key: int) -> tuple[int, int]:
    """Python-int twin of the kernels' ``stream_keys``."""
    lo, hi = N.split_seed(seed)
    k1 = fmix32(lo ^ fmix32(key ^ _c(N.KEY_SALT1)))
    k2 = fmix32(hi ^ fmix32((k1 + _c(N.KEY_SALT2)) & M32))
    return k1, k2


def pair_hash(p: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    return lowbias32((p * (k1 | 1) + k2) & M32)


def _horner(x: torch.Tensor, coeffs) -> torch.Tensor:
    acc = torch.full_like(x, float(_c(coeffs[0])))
    for coef in coeffs[1:]:
        acc = acc * x + float(_c(coef))
    return acc


def normal_pair(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 standard normals from 32 hash bits (int64 tensor in [0, 2^32))."""
    f32 = torch.float32
    u1 = ((h >> 16).to(f32) + 0.5) * (1.0 / 65536.0)
    bits = u1.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 126
    m = ((bits & 0x7FFFFF) | 0x3F000000).to(torch.int32).view(f32)
    low = m < float(_c(N.SQRT_HALF))
    m = torch.where(low, m + m, m)
    e = torch.where(low, e - 1, e)
    f = m - 1.0
    poly = _horner(f, (N.LN_P6, N.LN_P5, N.LN_P4, N.LN_P3, N.LN_P2, N.LN_P1, N.LN_P0))
    ln_u1 = e.to(f32) * float(_c(N.LN2)) + f * poly
    radius = torch.sqrt(-ln_u1)
    a = h & 0xFFFF
    q = a >> 14
    t = ((a & 0x3FFF).to(f32) + 0.5) * (1.0 / 16384.0) - 0.5
    t2 = t * t
    s = _horner(t2, (N.SIN_P2, N.SIN_P1, N.SIN_P0)) * t
    c = _horner(t2, (N.COS_P3, N.COS_P2, N.COS_P1, N.COS_P0))
    ca = (c - s) * radius
    sa = (c + s) * radius
    swap = (q & 1) == 1
    x0 = torch.where(swap, sa, ca)
    x1 = torch.where(swap, ca, sa)
    z0 = torch.where((q == 1) | (q == 2), -x0, x0)
    z1 = torch.where(q >= 2, -x1, x1)
    return z0, z1


def flat_index(rows: int, cols: int, row_offset: int, col_offset: int, in_features: int,
               device: torch.device | str | None) -> torch.Tensor:
    r = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)
    c = torch.arange(col_offset, col_offset + cols, dtype=torch.int64, device=device)
    return r[:, None] * in_features + c[None, :]


def noise_bits(shape: tuple[int, int], seed: int, key: int, *, row_offset: int = 0,
               col_offset: int = 0, in_features: int | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The 32 uniform bits (as int64 in [0, 2^32)) behind each element of a [rows, cols] shard."""
    rows, cols = shape
    in_features = cols if in_features is None else in_features
    N.check_shard(rows, cols, row_offset, col_offset, in_features)
    k1, k2 = stream_keys(seed, N.check_param_key(key))
    i = flat_index(rows, cols, row_offset, col_offset, in_features, device)
    return pair_hash(i >> 1, k1, k2)


def noise(shape: tuple[int, int], seed: int, key: int, sigma: float = 1.0, *, row_offset: int = 0,
          col_offset: int = 0, in_features: int | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sigma * z`` for a [rows, cols] shard at (row_offset, col_offset) of a weight."""
    rows, cols = shape
    in_features = cols if in_features is None else in_features
    sigma = N.check_sigma(sigma)
    h = noise_bits(shape, seed, key, row_offset=row_offset, col_offset=col_offset,
                   in_features=in_features, device=device)
    z0, z1 = normal_pair(h)
    i = flat_index(rows, cols, row_offset, col_offset, in_features, device)
    return (torch.where((i & 1) == 0, z0, z1) * sigma).to(dtype)


def standard_normals(count: int, seed: int, key: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The first ``count`` normals of a (seed, key) stream as a flat vector (for statistics)."""
    return noise((1, count), seed, key, device=device).reshape(-1)
