"""Group advantage estimators: rewards [num_groups, G] -> advantages [num_groups, G].

Each row holds the rewards of the G samples drawn for one prompt. Estimators:

- ``grpo``      (DeepSeekMath): A_i = (r_i - mean r) / (std r + eps), std with Bessel's
  correction as in verl.
- ``dr_grpo``   (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = r_i - mean r;
  the std division is dropped because it reweights prompts by difficulty.
- ``pass_at_k`` (Chen et al. 2025, "Pass@k training", analytic derivation): binary rewards only.
- ``pkpo``      (Walder & Karkhanis 2025, "Pass@K Policy Optimization", their k-1 baseline
  variant s^(loo-1)): unbiased max@k gradient for real rewards.
- ``maxpo``     (Takashiro et al. 2026, arXiv 2606.06080): the same max@k signal with a
  leave-two-out baseline that keeps it unbiased and makes each group's advantages sum to 0.

Scale convention for the max@k estimators (``pkpo``, ``maxpo``): the loss averages over the
group, so the policy-gradient estimate of one group is g = (1/G) sum_i A_i grad log pi(o_i);
A is scaled so that E[g] = grad max@k(theta) exactly, where
max@k(theta) = E[max(r(o_1), ..., r(o_k))], o_j iid ~ pi_theta. For binary rewards max@k is
pass@k. ``pass_at_k`` is Chen et al.'s form verbatim, which is *not* unbiased (see its docstring).

Degenerate groups give zeros, never NaN: a group whose rewards are all equal carries no
relative signal, and a group of one (G = 1) has nothing to compare with. Combinatorics are
products of ratios C(a, r) / C(b, r) = prod_j (a - j) / (b - j) (no factorial is formed), in
float64; rewards are shifted by their group minimum first (every estimator is
shift-invariant), so equal rewards give exact zeros and large offsets cost no precision.
The max@k estimators cost O(G k) time per group.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _check_rewards(rewards: Tensor) -> None:
    if not isinstance(rewards, Tensor) or rewards.dim() != 2:
        raise ValueError("rewards must be a [num_groups, G] tensor, got "
                         f"{tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor (e.g. rewards.float()), got {rewards.dtype}")
    if rewards.shape[-1] < 1:
        raise ValueError("rewards needs at least one sample per group (G >= 1), got G = 0")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contains NaN or inf")


def _check_k(k: int, group_size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= group_size:
        raise ValueError(f"k must satisfy 1 <= k <= G = {group_size}, got k = {k}")


def _shifted(rewards: Tensor) -> Tensor:
    """Rewards in float64 minus their group minimum: exact zeros for equal rewards."""
    x = rewards.to(torch.float64)
    return x - x.min(dim=-1, keepdim=True).values


def _comb_ratio(a: Tensor, b: int, r: int) -> Tensor:
    """C(a, r) / C(b, r) elementwise over integer-valued float64 ``a``, for b >= r.

    A product of r factors (a - j) / (b - j), each rounded once, so no factorial (and no
    overflow) for any G. C(a, r) is 0 when a < r or r < 0.
    """
    if r < 0:
        return torch.zeros_like(a)
    j = torch.arange(r, dtype=a.dtype, device=a.device)
    ratio = ((a.unsqueeze(-1) - j) / (b - j)).prod(dim=-1)
    return torch.where(a >= r, ratio, torch.zeros_like(ratio))


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """out_i = sum_{m < i} x_m along the last dim."""
    return torch.nn.functional.pad(torch.cumsum(x, dim=-1)[..., :-1], (1, 0))


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: A_i = (r_i - mean r) / (std r + eps) per group; zeros for G = 1 (std undefined)."""
    _check_rewards(rewards)
    if rewards.shape[-1] == 1:
        return torch.zeros_like(rewards)
    x = _shifted(rewards)
    centered = x - x.mean(dim=-1, keepdim=True)
    return (centered / (x.std(dim=-1, keepdim=True) + eps)).to(rewards.dtype)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean r, no std division (it would upweight too-easy/too-hard prompts)."""
    _check_rewards(rewards)
    x = _shifted(rewards)
    return (x - x.mean(dim=-1, keepdim=True)).to(rewards.dtype)


def pass_at_k_advantages(rewards: Tensor, k: int, eps: float = 1e-6) -> Tensor:
    """Chen et al. (2025), Pass@k training, analytic advantage for binary rewards.

    Every k-subset of the N = G samples is a virtual group rewarded with its max (pass@k);
    a sample's advantage is the mean, over the subsets containing it, of the normalized
    subset reward. With c correct samples:

        R   = 1 - C(N - c, k) / C(N, k)                    (mean subset reward, unbiased pass@k)
        sig = sqrt(R (1 - R))                              (std of the subset reward)
        A_correct   = (1 - R) / (sig + eps)
        A_incorrect = (1 - R - C(N - c - 1, k - 1) / C(N - 1, k - 1)) / (sig + eps)

    (C(N-c-1, k-1)/C(N-1, k-1) is the share of an incorrect sample's subsets with no correct
    sample.) Not an unbiased gradient of pass@k: the baseline R contains the sample itself,
    which shrinks E[g] to (1/k - 1/N) grad pass@k, and sig is random per group.
    """
    _check_rewards(rewards)
    n = rewards.shape[-1]
    _check_k(k, n)
    if not ((rewards == 0) | (rewards == 1)).all():
        raise ValueError("pass_at_k needs binary (0/1) rewards; use 'pkpo' or 'maxpo' for real rewards")
    wrong = n - rewards.to(torch.float64).sum(dim=-1)
    mean_reward = 1 - _comb_ratio(wrong, n, k)
    sigma = torch.sqrt(mean_reward * (1 - mean_reward))
    adv_correct = (1 - mean_reward) / (sigma + eps)
    adv_wrong = (1 - mean_reward - _comb_ratio(wrong - 1, n - 1, k - 1)) / (sigma + eps)
    adv = torch.where(rewards == 1, adv_correct.unsqueeze(-1), adv_wrong.unsqueeze(-1))
    return adv.to(rewards.dtype)


def _expected_improvement(x: Tensor, k: int) -> Tensor:
    """EI of each sample over k - 1 others, for x sorted ascending along the last dim.

    e_i = E_T[max(x_i, max T) - max T], T a uniform (k-1)-subset of the other G - 1 samples
    (max of the empty set := 0, so e_i = x_i at k = 1). Only subsets whose members all rank
    below i contribute, and max T = x_m with probability C(m-1, k-2) / C(G-1, k-1), so

        e_i = [C(i-1, k-1) x_i - sum_{m<i} C(m-1, k-2) x_m] / C(G-1, k-1)      (ranks 1..G)

    Ties are harmless: a tied x_m < x_i in rank contributes x_i - x_m = 0.
    """
    n = x.shape[-1]
    rank = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    above_all = _comb_ratio(rank - 1, n - 1, k - 1)                       # C(i-1,k-1)/C(G-1,k-1)
    max_at = _comb_ratio(rank - 1, n - 1, k - 2) * ((k - 1) / (n - k + 1))  # C(m-1,k-2)/C(G-1,k-1)
    return above_all * x - _exclusive_cumsum(max_at * x)


def pkpo_advantages(rewards: Tensor, k: int) -> Tensor:
    """PKPO (Walder & Karkhanis 2025) with the k-1 baseline, s^(loo-1).

    s_i = (1 / C(G, k)) sum_{|I| = k, i in I} [max_{j in I} r_j - max_{j in I \\ i} r_j]
    is an unbiased gradient weight of max@k: E[sum_i s_i grad log pi(o_i)] = grad max@k,
    because max_{I \\ i} does not depend on o_i. In terms of the expected improvement e_i
    (see ``_expected_improvement``) s_i = (k / G) e_i, so under the group-mean convention
    A_i = G s_i = k e_i. The advantages are >= 0 and do not sum to 0 (MaxPO's point).

    At k = 1 the k-1 baseline is an empty set; we use the leave-one-out mean (RLOO),
    A_i = r_i - mean_{j != i} r_j, still unbiased, and what MaxPO reduces to at k = 1.
    """
    _check_rewards(rewards)
    n = rewards.shape[-1]
    _check_k(k, n)
    if n == 1:
        return torch.zeros_like(rewards)
    x = _shifted(rewards)
    if k == 1:
        return (x - (x.sum(dim=-1, keepdim=True) - x) / (n - 1)).to(rewards.dtype)
    x_sorted, order = x.sort(dim=-1)
    adv_sorted = k * _expected_improvement(x_sorted, k)
    return torch.empty_like(x).scatter_(-1, order, adv_sorted).to(rewards.dtype)


def _leave_two_out_baseline(x: Tensor, k: int) -> Tensor:
    """b_i = (1 / (G-1)) sum_{j != i} e_j^(-i), for x sorted ascending, 1 <= k <= G - 1.

    e_j^(-i) is sample j's expected improvement over k - 1 of the G - 2 samples other than
    i and j. Summed over j, EI counts each k-subset S of U = [G] \\ {i} once per C(|U|-1, k-1)
    with value top1(S) - top2(S) (only the top sample of S improves on the rest), so

        b_i = sum_{S subset U, |S| = k} (top1(S) - top2(S)) / ((G-1) C(G-2, k-1)),

    and with U sorted, top1(S) = y_r for C(r-1, k-1) subsets and top2(S) = y_r for
    C(r-1, k-2)(|U| - r) subsets. Removing rank i shifts the ranks above it by one, so

        b_i = sum_{m<i} alpha_m x_m + sum_{m>i} beta_m x_m,
        alpha_m = [C(m-1, k-1) - (G-1-m) C(m-1, k-2)] / ((G-1) C(G-2, k-1)),
        beta_m  = [C(m-2, k-1) - (G-m)   C(m-2, k-2)] / ((G-1) C(G-2, k-1)).
    """
    n = x.shape[-1]
    rank = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    second = (k - 1) / (n - k)  # C(G-2, k-2) / C(G-2, k-1)
    alpha = (_comb_ratio(rank - 1, n - 2, k - 1)
             - (n - 1 - rank) * _comb_ratio(rank - 1, n - 2, k - 2) * second) / (n - 1)
    beta = (_comb_ratio(rank - 2, n - 2, k - 1)
            - (n - rank) * _comb_ratio(rank - 2, n - 2, k - 2) * second) / (n - 1)
    below = _exclusive_cumsum(alpha * x)
    above = _exclusive_cumsum((beta * x).flip(-1)).flip(-1)
    return below + above


def maxpo_advantages(rewards: Tensor, k: int) -> Tensor:
    """MaxPO (Takashiro et al. 2026): expected improvement minus a leave-two-out baseline.

        A_i = k (e_i - b_i),   b_i = (1 / (G-1)) sum_{j != i} e_j^(-i)

    e_i is PKPO's s^(loo-1) signal (``pkpo_advantages`` = k e_i), unbiased for grad max@k
    under the group-mean convention. b_i uses only the samples other than i, so it is a
    valid baseline (E[b_i grad log pi(o_i)] = 0) and A stays unbiased. Centering:
    sum_i e_i = (G/k) U and sum_i b_i = (1/k) sum_i U_{-i} = (G/k) U, where U is the mean of
    top1 - top2 over all k-subsets (U_{-i}: over those avoiding i; averaging the
    leave-one-out means over i gives back U). So sum_i A_i = 0 exactly. At k = 1 this is
    RLOO, A_i = r_i - mean_{j != i} r_j.

    Requires k <= G - 1 (b_i draws k - 1 comparison samples from the G - 2 others; at k = G
    no baseline of the others centers the group, checked by hand for G <= 4); G = 1 gives zeros.
    The derivation is ours: the paper's text available to us states the construction
    (leave-two-out baseline, exact centering, unbiased, O(G^2)) but not its formulas.
    """
    _check_rewards(rewards)
    n = rewards.shape[-1]
    _check_k(k, n)
    if n == 1:
        return torch.zeros_like(rewards)
    if k == n:
        raise ValueError(f"maxpo needs k <= G - 1 = {n - 1} (its leave-two-out baseline compares "
                         f"with k - 1 of the other G - 2 samples), got k = {k}")
    x_sorted, order = _shifted(rewards).sort(dim=-1)
    adv_sorted = k * (_expected_improvement(x_sorted, k) - _leave_two_out_baseline(x_sorted, k))
    return torch.empty_like(x_sorted).scatter_(-1, order, adv_sorted).to(rewards.dtype)


ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "pass_at_k": pass_at_k_advantages,
    "pkpo": pkpo_advantages,
    "maxpo": maxpo_advantages,
}
_TAKES_K = frozenset({"pass_at_k", "pkpo", "maxpo"})


def compute_advantages(name: str, rewards: Tensor, k: int | None = None) -> Tensor:
    """Advantages [num_groups, G] of estimator ``name``; k is required exactly by the @k ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    if name in _TAKES_K:
        if k is None:
            raise ValueError(f"advantage estimator {name!r} needs k (1 <= k <= G)")
        return ESTIMATORS[name](rewards, k)
    if k is not None:
        raise ValueError(f"advantage estimator {name!r} takes no k, got k = {k}")
    return ESTIMATORS[name](rewards)
