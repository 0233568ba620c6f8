"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples per problem of which c are correct, the unbiased estimator of pass@k is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

(the product form follows from C(n-c, k)/C(n, k) = prod_{j=0}^{c-1} (n-k-j)/(n-j)). It is
computed in log space, ``-expm1(sum log1p(-k / i))``, which never forms the huge binomials
(C(300, 150) ~ 1e89) and keeps full relative precision for small and large values alike.
Edge cases are exact: c = 0 gives 0.0 and n - c < k gives 1.0.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np

__all__ = ["pass_at_k", "pass_at_k_array", "pass_at_k_curve", "default_ks", "MAX_DEFAULT_K"]

MAX_DEFAULT_K = 256  # k up to 256, as the paper reports (it samples n = 300)


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if c < 0:
        raise ValueError(f"c must be >= 0, got c={c}")
    if c > n:
        raise ValueError(f"c must be <= n, got c={c} > n={n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k must be <= n, got k={k} > n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c of them correct, 1 <= k <= n."""
    n, c, k = _as_int(n, "n"), _as_int(c, "c"), _as_int(k, "k")
    _check(n, c, k)
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    log_fail = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_fail)


def pass_at_k_array(n, c, k: int) -> np.ndarray:
    """Vectorized pass@k for one k over many problems: n and c broadcast (arrays or scalars).

    Uses a prefix sum S[m] = sum_{i=k+1}^{m} log1p(-k / i), so each problem costs O(1) after an
    O(max n) table: log C(n-c, k)/C(n, k) = S[n - c] - S[n] whenever n - c >= k. Agrees with
    :func:`pass_at_k` to ~1e-13 for n up to a few thousand.
    """
    k = _as_int(k, "k")
    n_arr = np.asarray(n)
    c_arr = np.asarray(c)
    for name, arr in (("n", n_arr), ("c", c_arr)):
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    n_arr, c_arr = np.broadcast_arrays(n_arr.astype(np.int64), c_arr.astype(np.int64))
    if n_arr.size == 0:
        return np.zeros(n_arr.shape, dtype=np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    bad = (n_arr < 1) | (c_arr < 0) | (c_arr > n_arr) | (k > n_arr)
    if bad.any():
        j = np.flatnonzero(bad.ravel())[0]
        _check(int(n_arr.ravel()[j]), int(c_arr.ravel()[j]), k)  # raises with the message
    max_n = int(n_arr.max())
    terms = np.zeros(max_n + 1, dtype=np.float64)
    i = np.arange(k + 1, max_n + 1, dtype=np.float64)
    terms[k + 1 :] = np.log1p(-k / i)
    prefix = np.cumsum(terms)  # prefix[m] = sum_{i=k+1}^{m} log1p(-k/i); 0 for m <= k
    m = n_arr - c_arr
    all_hit = m < k
    log_fail = prefix[n_arr] - prefix[np.where(all_hit, k, m)]
    out = -np.expm1(log_fail)
    out = np.where(all_hit, 1.0, out)
    out = np.where(c_arr == 0, 0.0, out)
    return out.astype(np.float64)


def default_ks(n: int, max_k: int = MAX_DEFAULT_K) -> list[int]:
    """Powers of two 1, 2, 4, ... up to min(n, max_k)."""
    n = _as_int(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    top = min(n, max_k)
    ks, k = [], 1
    while k <= top:
        ks.append(k)
        k *= 2
    return ks


def pass_at_k_curve(
    correct_counts: Sequence[int],
    n: int | Sequence[int],
    ks: Sequence[int] | None = None,
) -> dict[int, float]:
    """Mean pass@k over problems, for each k.

    ``correct_counts[p]`` is the number of correct samples for problem p; ``n`` is the number of
    samples per problem (one int for all, or one per problem). ``ks`` defaults to the powers of two
    up to the smallest n (at most 256). Every k must satisfy 1 <= k <= n for every problem.
    """
    c_arr = np.asarray(correct_counts)
    if c_arr.ndim != 1:
        raise ValueError(f"correct_counts must be 1-D, got shape {c_arr.shape}")
    if c_arr.size == 0:
        raise ValueError("correct_counts is empty")
    n_arr = np.asarray(n)
    if n_arr.ndim == 0:
        n_arr = np.full(c_arr.shape, n_arr)
    elif n_arr.shape != c_arr.shape:
        raise ValueError(f"n has {n_arr.size} entries but correct_counts has {c_arr.size}")
    for name, arr in (("correct_counts", c_arr), ("n", n_arr)):
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if ks is None:
        ks = default_ks(int(n_arr.min()))
    else:
        ks = [_as_int(k, "k") for k in ks]
        if not ks:
            raise ValueError("ks is empty")
    return {k: float(pass_at_k_array(n_arr, c_arr, k).mean()) for k in ks}
