"""Torch twin of psnrl/kernels/noise.py: the same integer arithmetic and fp32 Box-Muller.

Integers are held in int64 tensors and kept to 32 bits with a mask (every product
is of a value below 2^31 and one below 2^32, so int64 never overflows). It runs on any
device and is the oracle of the Triton generator and of the statistical tests.
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch

from psnrl.kernels import noise as N

M32 = N.MASK32


IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)


def _c(v: Any) -> Any:
    """The Python value of a ``tl.constexpr`` constant of noise.py."""
    return v.value if hasattr(v, "value") else v


def fmix32(x: IntOrTensor) -> IntOrTensor:
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


def pair_hash(p: torch.Tensor, k1: int | torch.Tensor, k2: int | torch.Tensor) -> torch.Tensor:
    return lowbias32((p * (k1 | 1) + k2) & M32)


def polar_pair(h: torch.Tensor, sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, cos theta, sin theta) of 32 hash bits (int64 tensor in [0, 2^32)), r scaled by sigma."""
    f32 = torch.float32
    u1 = ((h & 0xFFFF).to(f32) + 0.5) * (1.0 / 65536.0)  # exact
    r = torch.sqrt(N.radius_scale(sigma) * torch.log2(u1))
    theta = (1.0 + (h >> 9).to(f32) * 2.0 ** -23) * float(_c(N.TWO_PI))  # 1 + ... exact in fp32
    return r, torch.cos(theta), torch.sin(theta)


def normal_pair(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 standard normals from 32 hash bits (int64 tensor in [0, 2^32))."""
    r, c, s = polar_pair(h)
    return r * c, r * s


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


def _polar(shape: tuple[int, int], seed: int, key: int, sigma: float, row_offset: int, col_offset: int,
           in_features: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, cos or sin theta) per element of a shard: its pair's radius and its half's angle term."""
    rows, cols = shape
    in_features = cols if in_features is None else in_features
    sigma = N.check_sigma(sigma)
    h = noise_bits(shape, seed, key, row_offset=row_offset, col_offset=col_offset,
                   in_features=in_features, device=device)
    r, c, s = polar_pair(h, sigma)
    i = flat_index(rows, cols, row_offset, col_offset, in_features, device)
    return r, torch.where((i & 1) == 0, c, s)


def noise(shape: tuple[int, int], seed: int, key: int, sigma: float = 1.0, *, row_offset: int = 0,
          col_offset: int = 0, in_features: int | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sigma * z`` for a [rows, cols] shard at (row_offset, col_offset) of a weight."""
    r, t = _polar(shape, seed, key, sigma, row_offset, col_offset, in_features, device)
    return (r * t).to(dtype)


def perturbed(weight: torch.Tensor, seed: int, key: int, sigma: float, *, row_offset: int = 0,
              col_offset: int = 0, in_features: int | None = None) -> torch.Tensor:
    """W + sigma E of a [rows, cols] shard as the kernels make it: fma(r, cos|sin, w) in fp32
    (the product is exact in fp64), rounded once, then cast to W's dtype."""
    rows, cols = weight.shape
    r, t = _polar((rows, cols), seed, key, sigma, row_offset, col_offset, in_features, weight.device)
    return (r.double() * t.double() + weight.double()).float().to(weight.dtype)


def standard_normals(count: int, seed: int, key: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The first ``count`` normals of a (seed, key) stream as a flat vector (for statistics)."""
    return noise((1, count), seed, key, device=device).reshape(-1)
