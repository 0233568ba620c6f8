"""pass@k: exact against brute force, stable at n = 300, unbiased (exactly and by Monte Carlo)."""

import math
from fractions import Fraction

import numpy as np
import pytest

from psnrl.trainer.passk import default_ks, pass_at_k, pass_at_k_array, pass_at_k_curve


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_matches_exact_for_all_small_cases():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = exact_pass_at_k(n, c, k)
                got = pass_at_k(n, c, k)
                assert isinstance(got, float)
                assert abs(got - float(want)) <= 1e-14 * max(1.0, float(want)), (n, c, k)
                if want == 0 or want == 1:  # edge cases are exact
                    assert got == float(want), (n, c, k)


def test_brute_force_subsets():
    # The definition itself: the fraction of k-subsets of the n samples holding a correct one.
    from itertools import combinations

    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(samples, k))
                frac = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(frac), abs=1e-14)


def test_edge_cases():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(300, 0, 256) == 0.0
    assert pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c = 7 < k
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1, abs=1e-16)
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(np.int64(10), np.int32(2), np.int64(3)) == pytest.approx(float(exact_pass_at_k(10, 2, 3)))


@pytest.mark.parametrize(
    "n,c,k",
    [(5, 0, 6), (5, 0, 0), (5, 0, -1), (5, 6, 1), (5, -1, 1), (-1, 0, 1), (0, 0, 1), (0, 0, 0)],
)
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_non_integer_arguments():
    with pytest.raises(TypeError):
        pass_at_k(10, 2.0, 3)
    with pytest.raises(TypeError):
        pass_at_k(10, True, 3)


def test_large_n_finite_monotone_and_accurate():
    n = 300
    cs = np.arange(n + 1)
    grid = np.stack([pass_at_k_array(n, cs, k) for k in range(1, 257)])  # [k, c]
    assert np.isfinite(grid).all()
    assert (grid >= 0).all() and (grid <= 1).all()
    assert (np.diff(grid, axis=0) >= -1e-15).all(), "not monotone in k"
    assert (np.diff(grid, axis=1) >= -1e-15).all(), "not monotone in c"
    assert (grid[:, 0] == 0).all()
    assert (grid[:, -1] == 1).all()
    # The scalar and vectorized forms agree, and both match exact rational arithmetic.
    for k in (1, 2, 16, 100, 255, 256):
        for c in (0, 1, 2, 3, 10, 44, 45, 150, 299, 300):
            want = float(exact_pass_at_k(n, c, k))
            got = pass_at_k(n, c, k)
            assert math.isfinite(got) and 0.0 <= got <= 1.0
            assert got == pytest.approx(want, rel=1e-12, abs=1e-300), (c, k)
            assert grid[k - 1, c] == pytest.approx(want, rel=1e-11, abs=1e-300), (c, k)


def test_tiny_values_keep_relative_precision():
    # 1 - C(n-1, 1)/C(n, 1) = 1/n: log space keeps full relative precision.
    n = 10**6
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n, rel=1e-12)


def test_vectorized_matches_scalar_with_mixed_n():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 64, size=500)
    c = rng.integers(0, n + 1)
    for k in (1, 3, 8):
        ok = n >= k
        got = pass_at_k_array(n[ok], c[ok], k)
        want = np.array([pass_at_k(int(a), int(b), k) for a, b in zip(n[ok], c[ok])])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="k must be <= n"):
        pass_at_k_array(n, c, 64)
    with pytest.raises(TypeError):
        pass_at_k_array([3.0], [1], 1)
    assert pass_at_k_array(np.array([], dtype=int), np.array([], dtype=int), 1).shape == (0,)


def test_curve_default_ks_and_mean():
    n = 300
    counts = [0, 1, 5, 150, 300]
    curve = pass_at_k_curve(counts, n)
    assert list(curve) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    for k, v in curve.items():
        assert v == pytest.approx(sum(pass_at_k(n, c, k) for c in counts) / len(counts), rel=1e-12)
    assert curve[1] == pytest.approx(sum(counts) / (len(counts) * n), rel=1e-12)  # pass@1 = mean accuracy
    assert list(pass_at_k_curve([1, 2], 10)) == [1, 2, 4, 8]
    assert default_ks(1) == [1]
    assert default_ks(1000) == [2**i for i in range(9)]


def test_curve_per_problem_n_and_errors():
    curve = pass_at_k_curve([1, 3], [4, 8], ks=[1, 4])
    assert curve[1] == pytest.approx((1 / 4 + 3 / 8) / 2)
    assert curve[4] == pytest.approx((1.0 + float(exact_pass_at_k(8, 3, 4))) / 2)
    assert list(pass_at_k_curve([1, 3], [4, 8])) == [1, 2, 4]  # up to the smallest n
    with pytest.raises(ValueError, match="empty"):
        pass_at_k_curve([], 10)
    with pytest.raises(ValueError, match="entries"):
        pass_at_k_curve([1, 2, 3], [4, 8])
    with pytest.raises(ValueError, match="k must be <= n"):
        pass_at_k_curve([1, 3], [4, 8], ks=[8])
    with pytest.raises(ValueError, match="c must be <= n"):
        pass_at_k_curve([5], 4)


def test_unbiased_exactly():
    # If each sample is correct with probability p, c ~ Binomial(n, p) and E[pass@k] = 1 - (1-p)^k.
    n = 40
    for p in (0.01, 0.2, 0.5, 0.9):
        pmf = [math.comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)]
        for k in (1, 2, 5, 17, 40):
            mean = sum(w * pass_at_k(n, c, k) for c, w in enumerate(pmf))
            assert mean == pytest.approx(1 - (1 - p) ** k, abs=1e-12)


def test_unbiased_monte_carlo():
    rng = np.random.default_rng(1234)
    trials = 20_000
    # (1) For fixed samples, pass@k is the probability that k drawn without replacement hold a correct one.
    n, c, k = 20, 3, 5
    samples = np.zeros(n, dtype=bool)
    samples[:c] = True
    draws = rng.permuted(np.tile(np.arange(n), (trials, 1)), axis=1)[:, :k]
    hit = samples[draws].any(axis=1).mean()
    want = pass_at_k(n, c, k)
    # Bernoulli mean: standard error sqrt(p(1-p)/T); allow 5 standard errors.
    assert abs(hit - want) <= 5 * math.sqrt(want * (1 - want) / trials)
    # (2) Over c ~ Binomial(n, p), the estimator averages to 1 - (1-p)^k. It lies in [0, 1], so its
    # standard deviation is <= 1/2 and the mean of T draws is within 5 * 0.5 / sqrt(T) w.h.p.
    p, k = 0.1, 8
    cs = rng.binomial(n, p, size=trials)
    est = pass_at_k_array(np.full(trials, n), cs, k).mean()
    assert abs(est - (1 - (1 - p) ** k)) <= 5 * 0.5 / math.sqrt(trials)
