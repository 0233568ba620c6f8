"""psnrl.trainer.advantages: brute-force definitions, centering, degenerate groups, and Monte Carlo
unbiasedness on a softmax bandit whose max@k gradient is known in closed form."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from psnrl.trainer.advantages import ESTIMATORS, compute_advantages

F64 = torch.float64


# ---------------------------------------------------------------- brute-force definitions

def subsets(items, size):
    return list(itertools.combinations(items, size))


def expected_improvement_bf(x, i, others, k):
    """mean over (k-1)-subsets T of `others` of max(x_i, max T) - max T (max of {} := 0)."""
    if k == 1:
        return x[i]
    gains = [max(x[i], *(x[t] for t in T)) - max(x[t] for t in T) for T in subsets(others, k - 1)]
    return sum(gains) / len(gains)


def pkpo_bf(x, k):
    """G * PKPO's s^(loo-1): (1/C(G,k)) sum_{I ni i} [max_I - max_{I minus i}]; RLOO at k = 1."""
    n = len(x)
    if k == 1:
        return [x[i] - (sum(x) - x[i]) / (n - 1) for i in range(n)]
    out = []
    for i in range(n):
        total = sum(max(x[j] for j in I) - max(x[j] for j in I if j != i)
                    for I in subsets(range(n), k) if i in I)
        out.append(n * total / math.comb(n, k))
    return out


def maxpo_bf(x, k):
    """k (e_i - mean_{j != i} e_j^(-i)), every EI by enumeration."""
    n = len(x)
    out = []
    for i in range(n):
        e = expected_improvement_bf(x, i, [j for j in range(n) if j != i], k)
        b = sum(expected_improvement_bf(x, j, [m for m in range(n) if m not in (i, j)], k)
                for j in range(n) if j != i) / (n - 1)
        out.append(k * (e - b))
    return out


def pass_at_k_bf(x, k, eps=1e-6):
    """Chen et al.: every k-subset is a group rewarded max; a sample averages its groups."""
    n = len(x)
    groups = subsets(range(n), k)
    mean = sum(max(x[j] for j in I) for I in groups) / len(groups)
    std = math.sqrt(mean * (1 - mean))
    out = []
    for i in range(n):
        mine = [max(x[j] for j in I) for I in groups if i in I]
        out.append((sum(mine) / len(mine) - mean) / (std + eps))
    return out


def rows(fn, rewards, k):
    return torch.tensor([fn(r.tolist(), k) for r in rewards], dtype=F64)


def random_rewards(num_groups, group_size, seed, binary=False):
    g = torch.Generator().manual_seed(seed)
    if binary:
        return (torch.rand(num_groups, group_size, generator=g) < 0.4).to(F64)
    # rounded to one decimal so groups contain ties
    return torch.round(torch.randn(num_groups, group_size, generator=g, dtype=F64), decimals=1)


GK = [(g, k) for g in (2, 3, 4, 5, 7) for k in range(1, g + 1)]


# ------------------------------------------------------------------------ exact checks

def test_grpo_and_dr_grpo_match_loop():
    rewards = random_rewards(6, 5, seed=1)
    grpo = compute_advantages("grpo", rewards)
    dr = compute_advantages("dr_grpo", rewards)
    for r, a_grpo, a_dr in zip(rewards.tolist(), grpo, dr):
        mean = sum(r) / len(r)
        std = math.sqrt(sum((v - mean) ** 2 for v in r) / (len(r) - 1))
        torch.testing.assert_close(a_grpo, torch.tensor([(v - mean) / (std + 1e-6) for v in r], dtype=F64))
        torch.testing.assert_close(a_dr, torch.tensor([v - mean for v in r], dtype=F64))


@pytest.mark.parametrize("group_size,k", GK)
def test_pass_at_k_matches_subset_enumeration(group_size, k):
    rewards = random_rewards(8, group_size, seed=group_size * 10 + k, binary=True)
    rewards[0] = 1.0  # all correct
    rewards[1] = 0.0  # all wrong
    torch.testing.assert_close(compute_advantages("pass_at_k", rewards, k), rows(pass_at_k_bf, rewards, k))


@pytest.mark.parametrize("group_size,k", GK)
def test_pkpo_matches_eq33_enumeration(group_size, k):
    rewards = random_rewards(6, group_size, seed=group_size * 10 + k)
    torch.testing.assert_close(compute_advantages("pkpo", rewards, k), rows(pkpo_bf, rewards, k))


@pytest.mark.parametrize("group_size,k", [(g, k) for g, k in GK if k < g])
def test_maxpo_matches_leave_two_out_enumeration(group_size, k):
    rewards = random_rewards(6, group_size, seed=group_size * 10 + k)
    torch.testing.assert_close(compute_advantages("maxpo", rewards, k), rows(maxpo_bf, rewards, k))


@pytest.mark.parametrize("group_size", [2, 3, 8, 16, 64, 256])
def test_maxpo_sums_to_zero_per_group(group_size):
    """Exact in exact arithmetic; float64 roundoff measured <= 3e-13 x reward range at G = 256."""
    rewards = 10 * random_rewards(32, group_size, seed=group_size) + 100  # the offset cancels
    spread = rewards.amax(dim=-1) - rewards.amin(dim=-1)
    for k in sorted({1, 2, group_size // 2, group_size - 1} & set(range(1, group_size))):
        adv = compute_advantages("maxpo", rewards, k)
        assert torch.isfinite(adv).all()
        assert (adv.sum(dim=-1).abs() <= 1e-12 * group_size * spread).all(), (group_size, k)


def test_pkpo_is_not_centered_and_maxpo_is():
    rewards = random_rewards(64, 8, seed=3)
    assert (compute_advantages("pkpo", rewards, 4) >= 0).all()
    assert (compute_advantages("pkpo", rewards, 4).sum(-1) > 1e-3).any()
    assert compute_advantages("maxpo", rewards, 4).sum(-1).abs().max() < 1e-12


def test_permutation_equivariance():
    rewards = random_rewards(5, 9, seed=4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    for name, k in (("grpo", None), ("dr_grpo", None), ("pkpo", 3), ("maxpo", 3)):
        torch.testing.assert_close(compute_advantages(name, rewards[:, perm], k),
                                   compute_advantages(name, rewards, k)[:, perm])


def test_large_group_is_stable():
    rewards = random_rewards(4, 512, seed=5)
    for name in ("pass_at_k", "pkpo", "maxpo"):
        r = (rewards > 0).to(F64) if name == "pass_at_k" else rewards
        adv = compute_advantages(name, r, 256)
        assert torch.isfinite(adv).all() and adv.abs().max() < 1e4, name


def test_dtype_and_device_are_kept():
    rewards = random_rewards(3, 6, seed=6).float()
    for name, k in (("grpo", None), ("dr_grpo", None), ("pass_at_k", 2), ("pkpo", 2), ("maxpo", 2)):
        r = (rewards > 0).float() if name == "pass_at_k" else rewards
        assert compute_advantages(name, r, k).dtype == torch.float32


# ------------------------------------------------------------------- degenerate groups

def valid_ks(name, group_size):
    if name in ("grpo", "dr_grpo"):
        return [None]
    top = group_size - 1 if name == "maxpo" and group_size > 1 else group_size
    return list(range(1, top + 1))


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("group_size", [1, 2, 3, 8])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -3.7, 1e6 + 0.1])
def test_equal_rewards_give_exact_zeros(name, group_size, value):
    if name == "pass_at_k" and value not in (0.0, 1.0):
        return
    rewards = torch.full((3, group_size), value, dtype=torch.float32)
    for k in valid_ks(name, group_size):
        adv = compute_advantages(name, rewards, k)
        assert torch.equal(adv, torch.zeros_like(adv)), (name, k)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_groups_of_one_and_two_are_finite(name):
    for group_size in (1, 2):
        rewards = random_rewards(16, group_size, seed=7, binary=(name == "pass_at_k"))
        for k in valid_ks(name, group_size):
            adv = compute_advantages(name, rewards, k)
            assert torch.isfinite(adv).all()
            if group_size == 1:
                assert torch.equal(adv, torch.zeros_like(adv)), name


# ----------------------------------------------------------------------- bad arguments

def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'") as info:
        compute_advantages("ppo", torch.zeros(2, 4))
    assert all(name in str(info.value) for name in ESTIMATORS)


@pytest.mark.parametrize("name", ["pass_at_k", "pkpo", "maxpo"])
@pytest.mark.parametrize("k", [0, -1, 5, None, 2.0])
def test_k_out_of_range(name, k):
    with pytest.raises(ValueError, match="k"):
        compute_advantages(name, torch.zeros(2, 4), k)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="takes no k"):
        compute_advantages("grpo", torch.zeros(2, 4), 2)
    with pytest.raises(ValueError, match="maxpo needs k <= G - 1"):
        compute_advantages("maxpo", torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="binary"):
        compute_advantages("pass_at_k", torch.full((2, 4), 0.5), 2)
    with pytest.raises(ValueError, match=r"\[num_groups, G\]"):
        compute_advantages("grpo", torch.zeros(4))
    with pytest.raises(ValueError, match="floating"):
        compute_advantages("grpo", torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_advantages("pkpo", torch.tensor([[0.0, float("nan")]]), 1)


# ------------------------------------------------------------ Monte Carlo unbiasedness

LOGITS = torch.tensor([0.3, -0.2, 0.5, 0.0, -0.6], dtype=F64)
REAL = torch.tensor([0.1, 0.9, -0.4, 0.6, 1.3], dtype=F64)
BINARY = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0], dtype=F64)  # max@k = pass@k
G, N_GROUPS = 8, 40_000


def max_at_k_gradient(arm_rewards, k):
    """d/dlogits of E[max of k iid draws] = sum_m r_(m) (F_m^k - F_{m-1}^k), arms sorted by
    reward and F_m the policy's CDF over them (the max is r_(m) iff all k draws rank <= m and
    not all rank < m)."""
    logits = LOGITS.clone().requires_grad_(True)
    order = torch.argsort(arm_rewards)
    cdf = torch.cumsum(torch.softmax(logits, -1)[order], 0)
    below = torch.cat([cdf.new_zeros(1), cdf[:-1]])
    (grad,) = torch.autograd.grad((arm_rewards[order] * (cdf ** k - below ** k)).sum(), logits)
    return grad


def sample_groups(seed):
    probs = torch.softmax(LOGITS, -1)
    arms = torch.multinomial(probs.expand(N_GROUPS, -1), G, replacement=True,
                             generator=torch.Generator().manual_seed(seed))
    score = torch.nn.functional.one_hot(arms, len(LOGITS)).to(F64) - probs  # grad log pi(arm)
    return arms, score


def mc_gradient(adv, score):
    """Per-group estimates (1/G) sum_i A_i grad log pi(o_i): their mean and standard error."""
    per_group = (adv.unsqueeze(-1) * score).mean(dim=1)
    return per_group.mean(0), per_group.std(0) / math.sqrt(N_GROUPS)


def assert_within_5_se(mean, se, truth):
    assert (se < 0.02 * truth.abs().max()).all(), "the test would have no power"
    z = (mean - truth) / se
    assert z.abs().max() < 5, f"z-scores {z.tolist()}"


@pytest.mark.parametrize("name", ["pkpo", "maxpo"])
@pytest.mark.parametrize("arm_rewards", [REAL, BINARY], ids=["real", "binary"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_max_at_k_estimators_are_unbiased(name, arm_rewards, k):
    arms, score = sample_groups(seed=k)
    mean, se = mc_gradient(compute_advantages(name, arm_rewards[arms], k), score)
    assert_within_5_se(mean, se, max_at_k_gradient(arm_rewards, k))


def test_monte_carlo_check_rejects_a_biased_estimator():
    """Dr. GRPO's baseline includes the sample itself: E[g] = (1 - 1/G) grad pass@1 != grad pass@3."""
    arms, score = sample_groups(seed=11)
    mean, se = mc_gradient(compute_advantages("dr_grpo", REAL[arms]), score)
    assert ((mean - max_at_k_gradient(REAL, 3)) / se).abs().max() > 5
    assert_within_5_se(mean, se, (1 - 1 / G) * max_at_k_gradient(REAL, 1))


@pytest.mark.parametrize("k", [2, 4])
def test_pass_at_k_chen_is_a_shrunk_gradient_before_its_std_division(k):
    """Chen et al.'s advantage times its group std is mean_{S ni i} max S - pass@k-hat, whose
    expected gradient is (1/k - 1/G) grad pass@k: right direction, shrunk. The std division
    (random per group) then biases it, so it is not an unbiased pass@k estimator."""
    arms, score = sample_groups(seed=20 + k)
    rewards = BINARY[arms]
    wrong = G - rewards.sum(-1, keepdim=True)
    mean_reward = 1 - torch.tensor([[math.comb(int(w), k) / math.comb(G, k)] for w in wrong[:, 0]],
                                   dtype=F64)
    std = torch.sqrt(mean_reward * (1 - mean_reward))
    adv = compute_advantages("pass_at_k", rewards, k) * (std + 1e-6)
    mean, se = mc_gradient(adv, score)
    assert_within_5_se(mean, se, (1 / k - 1 / G) * max_at_k_gradient(BINARY, k))
