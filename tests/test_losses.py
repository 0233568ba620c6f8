"""psnrl.trainer.losses against a naive per-token loop, plus edge cases and input checks."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from psnrl.trainer.losses import AGGREGATIONS, LossConfig, loss_normalizer, policy_loss

B, T = 4, 6
LENGTHS = (6, 3, 0, 5)  # row 2 has no response token


def make_batch(seed: int = 0, per_token_adv: bool = False, dtype=torch.float64) -> dict:
    """Ratios spread across both clip edges, some TIS weights above 10, ragged masks."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = True
    logp = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    old_logp = logp + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)
    noisy_logp = old_logp + torch.randn(B, T, generator=g, dtype=dtype)
    noisy_logp[0, 1] = old_logp[0, 1] - 4.0  # weight e^4 > 10: truncated
    noisy_logp[3, 2] = old_logp[3, 2] - 3.0
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = (torch.randn(B, T, generator=g, dtype=dtype) if per_token_adv
           else torch.tensor([1.0, -0.7, 0.5, -1.3], dtype=dtype))
    return dict(logp=logp.requires_grad_(True), old_logp=old_logp, noisy_logp=noisy_logp,
                ref_logp=ref_logp, advantages=adv, mask=mask)


def naive_loss(cfg: LossConfig, logp, old_logp, advantages, mask, noisy_logp=None, ref_logp=None):
    """Token by token, straight from the equations in the module docstring."""
    seq_sums, seq_lens = [], []
    for b in range(logp.shape[0]):
        total, n = logp.new_zeros(()), 0
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            a = float(advantages[b] if advantages.dim() == 1 else advantages[b, t])
            ratio = torch.exp(logp[b, t] - float(old_logp[b, t]))
            clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
            term = torch.minimum(ratio * a, clipped * a)
            if cfg.tis_cap is not None:
                term = term * min(math.exp(float(old_logp[b, t]) - float(noisy_logp[b, t])), cfg.tis_cap)
            token = -term
            if ref_logp is not None:
                d = float(ref_logp[b, t]) - logp[b, t]
                token = token + cfg.kl_coef * (torch.exp(d) - d - 1)
            total, n = total + token, n + 1
        seq_sums.append(total)
        seq_lens.append(n)
    rows = [(s, n) for s, n in zip(seq_sums, seq_lens) if n > 0]
    if not rows:
        return logp.sum() * 0
    if cfg.aggregation == "token_mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    if cfg.aggregation == "seq_mean_token_mean":
        return sum(s / n for s, n in rows) / len(rows)
    return sum(s / cfg.max_len for s, _ in rows) / len(rows)


def config(aggregation: str, **kw) -> LossConfig:
    max_len = 8 if aggregation == "seq_mean_token_sum_norm" else None
    return LossConfig(aggregation=aggregation, max_len=max_len, **kw)


CASES = list(itertools.product(AGGREGATIONS, (10.0, None), (True, False), ((0.2, 0.2), (0.1, 0.3)),
                               (False, True)))


@pytest.mark.parametrize("aggregation,tis_cap,kl,clips,per_token_adv", CASES)
def test_matches_naive_loop_value_and_gradient(aggregation, tis_cap, kl, clips, per_token_adv):
    cfg = config(aggregation, clip_low=clips[0], clip_high=clips[1], tis_cap=tis_cap,
                 kl_coef=0.05 if kl else 0.0)
    batch = make_batch(per_token_adv=per_token_adv)
    if tis_cap is None:
        batch["noisy_logp"] = None
    if not kl:
        batch["ref_logp"] = None
    out = policy_loss(cfg, **batch)
    (grad,) = torch.autograd.grad(out.loss, batch["logp"])
    expected = naive_loss(cfg, **batch)
    (expected_grad,) = torch.autograd.grad(expected, batch["logp"])
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert out.metrics["clip_frac"] > 0  # the batch really exercises the clip


def test_metrics_match_naive_token_means():
    cfg = LossConfig(clip_low=0.1, clip_high=0.3, tis_cap=2.0)
    batch = make_batch()
    out = policy_loss(cfg, **batch)
    m = batch["mask"]
    logp, old, noisy, ref = (batch[k].detach()[m] for k in ("logp", "old_logp", "noisy_logp", "ref_logp"))
    adv = batch["advantages"].unsqueeze(-1).expand(B, T)[m]
    ratio = torch.exp(logp - old)
    clipped = ((adv > 0) & (ratio > 1.3)) | ((adv < 0) & (ratio < 0.9))
    raw_w = torch.exp(old - noisy)
    d = ref - logp
    expected = {"clip_frac": clipped.double().mean(), "ratio_mean": ratio.mean(),
                "tis_weight_mean": raw_w.clamp(max=2.0).mean(),
                "tis_clip_frac": (raw_w > 2.0).double().mean(),
                "kl_k3_mean": (torch.exp(d) - d - 1).mean()}
    assert out.metrics.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], value, msg=name)
        assert not out.metrics[name].requires_grad
    assert 0 < out.metrics["tis_clip_frac"] < 1


def test_single_update_is_weighted_policy_gradient():
    """old_logp = logp.detach(): ratio 1, no clipping, grad = -w A / (|o| B') per token."""
    cfg = LossConfig(kl_coef=0.0)
    batch = make_batch()
    batch["old_logp"] = batch["logp"].detach()
    batch["ref_logp"] = None
    out = policy_loss(cfg, **batch)
    out.loss.backward()
    m = batch["mask"].double()
    w = torch.exp(batch["old_logp"] - batch["noisy_logp"]).clamp(max=10.0)
    lengths = m.sum(-1, keepdim=True).clamp(min=1)
    expected = -w * batch["advantages"].unsqueeze(-1) * m / lengths / 3  # 3 non-empty rows
    torch.testing.assert_close(batch["logp"].grad, expected)
    assert out.metrics["clip_frac"] == 0 and out.metrics["ratio_mean"] == 1


def test_tis_weight_is_clean_old_over_noisy():
    """w = min(pi_old / pi_noisy, C); equal to Eq. 4's pi_theta / pi_noisy at the first update."""
    cfg = LossConfig(kl_coef=0.0)
    batch = make_batch()
    batch["ref_logp"] = None
    m = batch["mask"]
    out = policy_loss(cfg, **batch)
    expected = torch.exp(batch["old_logp"] - batch["noisy_logp"]).clamp(max=10.0)[m].mean()
    torch.testing.assert_close(out.metrics["tis_weight_mean"], expected)
    moved = torch.exp(batch["logp"].detach() - batch["noisy_logp"]).clamp(max=10.0)[m].mean()
    assert not torch.isclose(out.metrics["tis_weight_mean"], moved)
    batch["old_logp"] = batch["logp"].detach()
    first = policy_loss(cfg, **batch)
    torch.testing.assert_close(first.metrics["tis_weight_mean"], moved)


def test_tis_with_matching_sampler_equals_plain_grpo():
    batch = make_batch()
    batch["noisy_logp"] = batch["old_logp"].clone()  # w = 1
    on = policy_loss(LossConfig(tis_cap=10.0), **batch)
    batch["noisy_logp"] = None
    off = policy_loss(LossConfig(tis_cap=None), **batch)
    torch.testing.assert_close(on.loss, off.loss)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_mask_gives_zero_loss_with_grad(aggregation):
    batch = make_batch()
    batch["mask"] = torch.zeros(B, T, dtype=torch.bool)
    out = policy_loss(config(aggregation), **batch)
    assert out.normalizer == 0 and out.loss == 0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(batch["logp"].grad, torch.zeros(B, T, dtype=torch.float64))
    assert all(torch.isfinite(v) and v == 0 for v in out.metrics.values())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_accumulating_micro_batches_equals_full_batch(aggregation):
    """sum_j loss_sum_j / sum_j normalizer_j: the documented recipe, micro-batches of 1 and 3 rows."""
    cfg = config(aggregation)
    batch = make_batch(per_token_adv=True)
    policy_loss(cfg, **batch).loss.backward()
    full_grad = batch["logp"].grad.clone()
    batch["logp"].grad = None
    parts = (slice(0, 1), slice(1, 4))
    total = sum(loss_normalizer(cfg, batch["mask"][p]) for p in parts)
    assert total.dtype == torch.int64 and total == (14 if aggregation == "token_mean" else 3)
    for p in parts:
        out = policy_loss(cfg, **{k: v[p] for k, v in batch.items()})
        (out.loss_sum / total.clamp(min=1)).backward()
    torch.testing.assert_close(batch["logp"].grad, full_grad)


def test_per_sequence_advantages_broadcast_over_tokens():
    batch = make_batch()
    per_seq = policy_loss(LossConfig(), **batch).loss
    batch["advantages"] = batch["advantages"].unsqueeze(-1).expand(B, T).clone()
    torch.testing.assert_close(policy_loss(LossConfig(), **batch).loss, per_seq)


def test_bf16_inputs_are_computed_in_fp32():
    batch = make_batch(dtype=torch.float32)
    ref = policy_loss(LossConfig(), **batch).loss
    low = {k: (v.detach().bfloat16().requires_grad_(k == "logp") if v.is_floating_point() else v)
           for k, v in batch.items()}
    out = policy_loss(LossConfig(), **low).loss
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(low["logp"].grad.float()).all()
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["logp", "old_logp", "noisy_logp", "ref_logp", "advantages", "mask"])
def test_shape_mismatch_names_the_tensor(name):
    batch = make_batch()
    batch[name] = batch[name].detach()[:, :-1] if name != "advantages" else batch[name][:-1]
    with pytest.raises(ValueError, match=name):
        policy_loss(LossConfig(), **batch)


@pytest.mark.parametrize("name", ["logp", "old_logp", "noisy_logp", "ref_logp", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_tensor(name, bad):
    batch = make_batch()
    value = batch[name].detach().clone()
    value.view(-1)[1] = bad
    batch[name] = value
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        policy_loss(LossConfig(), **batch)


def test_bad_mask_and_tis_inputs():
    batch = make_batch()
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        policy_loss(LossConfig(), **{**batch, "mask": batch["mask"].double() * 2})
    with pytest.raises(ValueError, match="noisy_logp is required"):
        policy_loss(LossConfig(), **{**batch, "noisy_logp": None})
    with pytest.raises(ValueError, match="noisy_logp"):
        policy_loss(LossConfig(tis_cap=None), **batch)
    with pytest.raises(ValueError, match=r"logp must be a \[B, T\] tensor"):
        policy_loss(LossConfig(), **{**batch, "logp": batch["logp"].detach()[0]})


@pytest.mark.parametrize("kwargs,field,value", [
    ({"clip_low": -0.1}, "clip_low", "-0.1"), ({"clip_high": -1.0}, "clip_high", "-1.0"),
    ({"clip_low": float("nan")}, "clip_low", "nan"), ({"tis_cap": 0.5}, "tis_cap", "0.5"),
    ({"kl_coef": -1e-4}, "kl_coef", "-0.0001"), ({"aggregation": "sum"}, "aggregation", "'sum'"),
    ({"aggregation": "seq_mean_token_sum_norm"}, "max_len", "None"),
    ({"aggregation": "seq_mean_token_sum_norm", "max_len": 0}, "max_len", "0"),
    ({"max_len": 4096}, "max_len", "4096"),
])
def test_config_validation_names_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError, match=field) as info:
        LossConfig(**kwargs)
    assert value in str(info.value)
    if field == "aggregation":
        assert all(name in str(info.value) for name in AGGREGATIONS)


def test_config_defaults_are_the_papers():
    cfg = LossConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.tis_cap, cfg.kl_coef, cfg.aggregation) == \
        (0.2, 0.2, 10.0, 1e-4, "seq_mean_token_mean")
    with pytest.raises(AttributeError):
        cfg.tis_cap = None  # frozen
