"""PSN-GRPO policy loss: clipped surrogate x truncated importance weight, plus k3 KL.

Rollouts o ~ pi_theta~ come from the perturbed sampler theta~ = theta + eps; the clean
policy theta is trained. PSN paper (arXiv 2602.02555), Eq. 1, 3 and 4, per response token t:

    r_t   = pi_theta(o_t) / pi_old(o_t)                          ratio of Eq. 1
    l_t   = min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)
    w_t   = sg[min(pi_old(o_t) / pi_theta~(o_t), C)]             TIS weight, Eq. 4
    k3_t  = pi_ref(o_t) / pi_theta(o_t) - log(pi_ref(o_t) / pi_theta(o_t)) - 1
    J     = E_{o ~ pi_theta~} [ (1/|o|) sum_t w_t l_t ]           Eq. 3
    loss  = -(1/|o|) sum_t w_t l_t + kl_coef (1/|o|) sum_t k3_t   (batch mean over sequences)

pi_old is the *clean* policy at rollout time (old_logp; equal to logp.detach() for a single
update) and sg stops the gradient. Eq. 4 writes pi_theta in the numerator; we use pi_old:
the clip ratio already carries pi_theta / pi_old, so w_t r_t = pi_theta / pi_theta~ is the
full importance ratio, whereas a (detached) pi_theta in w would count the policy change twice
once theta has moved (later mini-batches of a rollout batch). At the first update the two
readings are the same number. This is also verl's TIS (the paper's framework, Appendix B):
min(exp(old_log_prob - rollout_log_probs), C). tis_cap=None is plain GRPO (w_t = 1). The KL
term (coefficient 1e-4, Appendix B; GRPO's k3 estimator) is not in Eq. 3 and is not
importance-weighted, as in verl; it is on only when ref_logp is given.

Aggregation (``LossConfig.aggregation``), L_bt the per-token loss above, m_bt the mask:
    seq_mean_token_mean      (1/B') sum_b (sum_t m L / sum_t m)   Eq. 3, the default
    token_mean               sum_bt m L / sum_bt m                 every token weighs the same
    seq_mean_token_sum_norm  (1/B') sum_b (sum_t m L / max_len)    Dr. GRPO: a constant normalizer
B' counts the rows with at least one response token; an all-padding row adds nothing.

Gradient accumulation and data parallelism. ``policy_loss`` returns ``loss_sum`` and a
``normalizer`` (tokens for token_mean, sequences otherwise); the batch loss is
sum(loss_sum) / sum(normalizer) over every micro-batch of every rank. The normalizer depends
only on masks, so get the global one before any forward:

    total = sum(loss_normalizer(cfg, mb.mask) for mb in my_micro_batches)
    torch.distributed.all_reduce(total)                       # across ranks, if any
    for mb in my_micro_batches:
        out = policy_loss(cfg, logp=..., old_logp=..., advantages=..., mask=mb.mask, ...)
        (out.loss_sum * world_size / total.clamp(min=1)).backward()

(world_size undoes DDP/FSDP's gradient averaging over ranks; 1 without them.) A per
micro-batch ``out.loss`` averaged over micro-batches would instead weight each micro-batch
equally, whatever its token or sequence count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


@dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters; defaults are the paper's (Appendix B).

    max_len is the constant normalizer of ``seq_mean_token_sum_norm`` (e.g. the maximum
    rollout length) and is required by, and only by, that mode.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float | None = 10.0
    kl_coef: float = 1e-4
    aggregation: str = "seq_mean_token_mean"
    max_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "kl_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # also rejects NaN
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap >= 1):
            raise ValueError(f"tis_cap must be >= 1 (or None to turn TIS off), got {self.tis_cap}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; "
                             f"got {self.aggregation!r}")
        if self.aggregation == "seq_mean_token_sum_norm":
            if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError("max_len must be an int >= 1 with aggregation "
                                 f"'seq_mean_token_sum_norm', got {self.max_len!r}")
        elif self.max_len is not None:
            raise ValueError(f"max_len is only used by aggregation 'seq_mean_token_sum_norm', "
                             f"got max_len={self.max_len!r} with {self.aggregation!r}")


@dataclass(frozen=True)
class LossOutput:
    """loss = loss_sum / normalizer; metrics are detached token means over this micro-batch.

    normalizer is an int64 count (exact at any scale, all-reducible across ranks).
    """

    loss_sum: Tensor
    normalizer: Tensor
    metrics: dict[str, Tensor]

    @property
    def loss(self) -> Tensor:
        """The micro-batch loss on its own; 0 (with grad) when it has no response tokens."""
        return self.loss_sum / self.normalizer.clamp(min=1)


def _check(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def loss_normalizer(cfg: LossConfig, mask: Tensor) -> Tensor:
    """The divisor of ``loss_sum`` for this mask (int64): token count for token_mean, else the
    number of rows with at least one response token."""
    tokens = mask != 0
    if cfg.aggregation == "token_mean":
        return tokens.sum()
    return tokens.any(dim=-1).sum()


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).detach()


def policy_loss(cfg: LossConfig, *, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                mask: Tensor, noisy_logp: Tensor | None = None,
                ref_logp: Tensor | None = None) -> LossOutput:
    """PSN-GRPO loss of one micro-batch (module docstring has the equations).

    logp       [B, T] log pi_theta of the sampled tokens (with grad)
    old_logp   [B, T] clean policy at rollout time (ratio denominator; detached here)
    advantages [B] per sequence or [B, T] per token
    mask       [B, T] 1 for response tokens, 0 for prompt/padding (bool or 0/1 numbers)
    noisy_logp [B, T] the sampler's perturbed-policy log-probs; required iff cfg.tis_cap is set
    ref_logp   [B, T] reference policy; None turns the KL term off
    Padding positions must hold finite numbers (e.g. 0): every input is checked for NaN/inf.
    """
    if not isinstance(logp, Tensor) or logp.dim() != 2:
        raise ValueError("logp must be a [B, T] tensor, got "
                         f"{tuple(logp.shape) if isinstance(logp, Tensor) else type(logp).__name__}")
    shape = tuple(logp.shape)
    _check("logp", logp, shape)
    _check("old_logp", old_logp, shape)
    _check("mask", mask, shape)
    if isinstance(advantages, Tensor) and advantages.dim() == 1:
        _check("advantages", advantages, shape[:1])
        advantages = advantages.unsqueeze(-1)
    else:
        _check("advantages", advantages, shape)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1")
    if (cfg.tis_cap is None) != (noisy_logp is None):
        raise ValueError("noisy_logp is required when TIS is on (tis_cap set) and must be None "
                         f"when it is off; got tis_cap={cfg.tis_cap}, "
                         f"noisy_logp={'None' if noisy_logp is None else 'a tensor'}")
    if noisy_logp is not None:
        _check("noisy_logp", noisy_logp, shape)
    if ref_logp is not None:
        _check("ref_logp", ref_logp, shape)

    dtype = torch.promote_types(logp.dtype, torch.float32)  # exp() of bf16 log-probs is too coarse
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    advantages = advantages.detach().to(dtype)
    mask = mask.to(dtype)

    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    metrics = {"clip_frac": _masked_mean((clipped < unclipped).to(dtype), mask),
               "ratio_mean": _masked_mean(ratio, mask)}
    if noisy_logp is not None:
        raw_weight = torch.exp(old_logp - noisy_logp.detach().to(dtype))
        weight = raw_weight.clamp(max=cfg.tis_cap)
        surrogate = weight * surrogate
        metrics["tis_weight_mean"] = _masked_mean(weight, mask)
        metrics["tis_clip_frac"] = _masked_mean((raw_weight > cfg.tis_cap).to(dtype), mask)
    token_loss = -surrogate
    if ref_logp is not None:
        log_ref_ratio = ref_logp.detach().to(dtype) - logp
        k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        token_loss = token_loss + cfg.kl_coef * k3
        metrics["kl_k3_mean"] = _masked_mean(k3, mask)

    per_seq = (token_loss * mask).sum(dim=-1)
    if cfg.aggregation == "seq_mean_token_mean":
        loss_sum = (per_seq / mask.sum(dim=-1).clamp(min=1)).sum()
    elif cfg.aggregation == "token_mean":
        loss_sum = per_seq.sum()
    else:  # seq_mean_token_sum_norm
        loss_sum = per_seq.sum() / cfg.max_len
    return LossOutput(loss_sum=loss_sum, normalizer=loss_normalizer(cfg, mask), metrics=metrics)
