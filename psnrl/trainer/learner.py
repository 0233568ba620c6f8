"""The learner: GRPO/TIS updates of the clean policy, in one process or FSDP2 under torchrun.

Per optimizer step, the rows (this rank's share) are cut into micro-batches of at most
``micro_batch_tokens`` tokens. Each micro-batch runs ONE dual-stream forward
(psnrl/trainer/logprobs.py) that gives the clean log-probs with grad and, from the same read
of the weights, the perturbed policy's log-probs for TIS. The loss is normalized by the
global token/sequence count, so the update equals one big batch on one process.

Under ``torch.distributed`` every decoder layer is ``fully_shard``-ed (FSDP2). Collectives
run per forward, so every rank runs the same number of micro-batches: a rank with fewer
rows runs zero-weight padding micro-batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from psnrl.engine.model import CausalLM
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.kernels.profiling import nvtx_range
from psnrl.trainer.distributed import all_reduce, world_size
from psnrl.trainer.logprobs import TokenLogprobs, dual_stream_logprobs, response_logprobs
from psnrl.trainer.losses import LossConfig, loss_normalizer, policy_loss

_PAD_SEQ = ([0, 0], 1)  # (tokens, prompt length) of a padding micro-batch: one response token


@dataclass
class Rollouts:
    """This rank's rows of one iteration: prompt + response tokens and what the loss needs."""

    seqs: list[list[int]]
    prompt_lens: list[int]
    advantages: list[float]
    noise: list[NoiseSpec | None]  # the perturbed policy each row was sampled from (None: clean)
    sampler_logprobs: list[torch.Tensor]  # the engine's log-probs of the sampled tokens

    def __len__(self) -> int:
        return len(self.seqs)


def shard_model(model: CausalLM, param_dtype: torch.dtype | None = None) -> CausalLM:
    """FSDP2: each decoder layer its own unit, then the root (embeddings, norm, lm_head).

    ``param_dtype`` (e.g. bf16) is the compute dtype of the gathered parameters; gradients
    are reduced in fp32 and the sharded master weights keep their own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward: free them."""
    if hasattr(model, "reshard"):
        model.reshard()


def _micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of sequences with at most max_tokens tokens (a longer one alone)."""
    groups, cur, size = [], [], 0
    for i, n in enumerate(lengths):
        if cur and size + n > max_tokens:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    return groups + [cur] if cur else groups


def _padded(groups: list[list[int]]) -> list[list[int] | None]:
    """``groups`` followed by None (padding) up to the largest count of any rank."""
    count = int(all_reduce(torch.tensor([len(groups)], device="cpu"), "max"))
    return groups + [None] * (count - len(groups))


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    return nn.utils.rnn.pad_sequence([r.float() for r in rows], batch_first=True)


class Learner:
    """Owns the AdamW optimizer; ``update`` runs one iteration's optimizer steps over its rows.

    ``noisy_logprobs``: "learner" takes TIS's denominator from the dual-stream pass,
    "sampler" from the engine's sampled-token log-probs. ``grad_clip``: max gradient
    norm (None: off).
    """

    def __init__(self, model: CausalLM, loss_cfg: LossConfig, *, lr: float, micro_batch_tokens: int,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 grad_clip: float | None = 1.0, noisy_logprobs: str = "learner"):
        if noisy_logprobs not in ("learner", "sampler"):
            raise ValueError(f"noisy_logprobs must be 'learner' or 'sampler', got {noisy_logprobs!r}")
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        self.model = model
        self.loss_cfg = loss_cfg
        self.grad_clip = grad_clip
        self.micro_batch_tokens = micro_batch_tokens
        self.noisy_logprobs = noisy_logprobs
        reshard(model)  # the optimizer must see the sharded parameters
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)

    # -- log-probs ---------------------------------------------------------------------------

    def _forward(self, model: CausalLM, seqs, plens, specs) -> tuple[TokenLogprobs, TokenLogprobs | None]:
        if specs is None:
            return response_logprobs(model, seqs, plens), None
        dual = dual_stream_logprobs(model, seqs, plens, specs)
        return dual.clean, dual.noisy

    def logprobs_no_grad(self, model: CausalLM, seqs: list[list[int]], plens: list[int],
                         specs: list[NoiseSpec] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-row clean (and with ``specs``, perturbed) response log-probs, micro-batch by micro-batch."""
        clean: list[torch.Tensor] = []
        noisy: list[torch.Tensor] | None = [] if specs is not None else None
        with torch.no_grad():
            for mb in _padded(_micro_batches([len(s) for s in seqs], self.micro_batch_tokens)):
                if mb is None:  # keeps FSDP's collectives in step with the other ranks
                    self._forward(model, [_PAD_SEQ[0]], [_PAD_SEQ[1]], None)
                    continue
                c, n = self._forward(model, [seqs[i] for i in mb], [plens[i] for i in mb],
                                     None if specs is None else [specs[i] for i in mb])
                clean.extend(c.split())
                if noisy is not None:
                    noisy.extend(n.split())
        reshard(model)
        return clean, noisy

    # -- the update --------------------------------------------------------------------------

    def update(self, rows: Rollouts, rows_per_step: int, ref_model: CausalLM | None = None) -> dict[str, float]:
        """Optimizer steps over ``rows`` in slices of ``rows_per_step`` (this rank's counts).

        ``ref_model``: the reference policy of the k3 KL term (None: no KL term).
        """
        noisy = any(s is not None for s in rows.noise)
        if noisy and not all(s is not None for s in rows.noise):
            raise ValueError("rows mix clean and perturbed rollouts; the loss takes one or the other")
        learner_noisy = noisy and self.noisy_logprobs == "learner"
        steps = [list(range(lo, min(lo + rows_per_step, len(rows)))) for lo in range(0, len(rows), rows_per_step)]
        steps += [[] for _ in range(len(_padded(steps)) - len(steps))]
        # Rollout-time log-probs per row: clean (the ratio's denominator) and perturbed (TIS's).
        # With one optimizer step the policy is still the rollout's, so both come from the
        # step's own forward; later steps are off-policy and need them up front.
        device = next(self.model.parameters()).device
        tis = self.loss_cfg.tis_cap is not None and noisy
        u = _Update(rows, self.loss_cfg if tis else dataclasses.replace(self.loss_cfg, tis_cap=None), learner_noisy,
                    old=[None] * len(rows),
                    noisy=([lp.to(device) for lp in rows.sampler_logprobs] if noisy and not learner_noisy
                           else [None] * len(rows)),
                    ref=self.logprobs_no_grad(ref_model, rows.seqs, rows.prompt_lens)[0] if ref_model else None)
        if len(steps) > 1:
            u.old, learned = self.logprobs_no_grad(self.model, rows.seqs, rows.prompt_lens,
                                                   rows.noise if learner_noisy else None)
            if learner_noisy:
                u.noisy = learned
        loss_cfg = u.loss_cfg
        stats: dict[str, float] = {}
        self.model.train()
        for idx in steps:
            micro = [[idx[j] for j in mb] for mb in _micro_batches([len(rows.seqs[i]) for i in idx],
                                                                   self.micro_batch_tokens)]
            masks = [_pad([torch.ones(len(rows.seqs[i]) - rows.prompt_lens[i], device="cpu") for i in ids])
                     for ids in micro]
            total = all_reduce(sum((loss_normalizer(loss_cfg, m) for m in masks),
                                   torch.zeros((), device="cpu")).float())
            self.optimizer.zero_grad()
            u.sums = {}
            padded = _padded(micro)
            for ids, mask in zip(padded, masks + [None] * (len(padded) - len(masks))):
                self._micro_step(u, ids, mask, total)
            with nvtx_range("optimizer"):
                if self.grad_clip is not None:
                    stats["grad_norm"] = clip_grad_norm(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
            stats.update(_token_means(u.sums))
        self.model.eval()
        if noisy:  # Monte Carlo KL(pi_noisy || pi_clean) on the sampled tokens (Var-I's d)
            stats["kl_noisy_clean"] = _global_mean([n.cpu() - o.cpu() for n, o in zip(u.noisy, u.old)])
        if learner_noisy:  # how far the engine's numerics are from the learner's, same policy
            # Both on the host: the engine's log-probs may live on any device (the learner bench
            # passes CUDA stand-ins), the learner's on the model's.
            stats["sampler_logprob_gap"] = _global_mean([(s.detach().cpu() - n.cpu()).abs() for s, n in
                                                         zip(rows.sampler_logprobs, u.noisy)])
        return stats

    def _micro_step(self, u: _Update, ids: list[int] | None, mask: torch.Tensor | None,
                    total: torch.Tensor) -> None:
        """Forward and backward of one micro-batch (``ids`` None: a zero-weight padding one)."""
        rows, loss_cfg = u.rows, u.loss_cfg
        with nvtx_range("learner/forward"):
            if ids is None:
                cur, _ = self._forward(self.model, [_PAD_SEQ[0]], [_PAD_SEQ[1]], None)
                lp = cur.logprobs[None]
                out = policy_loss(loss_cfg, logp=lp, old_logp=lp.detach(), advantages=lp.new_zeros(1),
                                  mask=torch.zeros_like(lp), noisy_logp=lp.detach() if loss_cfg.tis_cap else None,
                                  ref_logp=lp.detach() if u.ref is not None else None)
                tokens = 0
            else:
                on_policy = u.old[ids[0]] is None
                cur, cur_noisy = self._forward(self.model, [rows.seqs[i] for i in ids],
                                               [rows.prompt_lens[i] for i in ids],
                                               [rows.noise[i] for i in ids] if u.learner_noisy and on_policy else None)
                if on_policy:
                    for k, (i, lp) in enumerate(zip(ids, cur.split())):
                        u.old[i] = lp.detach()
                        if cur_noisy is not None:
                            u.noisy[i] = cur_noisy.split()[k]
                lp_device = cur.logprobs.device
                out = policy_loss(loss_cfg, logp=_pad(cur.split()), old_logp=_pad([u.old[i] for i in ids]),
                                  advantages=torch.tensor([rows.advantages[i] for i in ids], device=lp_device),
                                  mask=mask.to(lp_device),
                                  noisy_logp=_pad([u.noisy[i] for i in ids]) if loss_cfg.tis_cap else None,
                                  ref_logp=_pad([u.ref[i] for i in ids]) if u.ref is not None else None)
                tokens = cur.entropy.numel()
            # world_size() undoes FSDP's averaging of gradients over ranks.
            loss = out.loss_sum * world_size() / total.clamp(min=1)
        with nvtx_range("learner/backward"):
            loss.backward()
        sums = u.sums
        sums["tokens"] = sums.get("tokens", 0.0) + tokens
        sums["entropy"] = sums.get("entropy", 0.0) + (cur.entropy.sum().item() if tokens else 0.0)
        for name, v in out.metrics.items():
            sums[name] = sums.get(name, 0.0) + (v.item() * tokens if tokens else 0.0)


@dataclass
class _Update:
    """One ``Learner.update``'s working state, which its micro-steps fill in: the rollout-time
    log-probs per row (clean ``old``: the ratio's denominator; perturbed ``noisy``: TIS's; ``ref``:
    the KL term's), computed up front or by the first optimizer step's own forwards."""

    rows: Rollouts
    loss_cfg: LossConfig
    learner_noisy: bool  # the perturbed log-probs come from the learner's dual-stream forward
    old: list[torch.Tensor | None]
    noisy: list[torch.Tensor | None]
    ref: list[torch.Tensor] | None
    sums: dict[str, float] = field(default_factory=dict)  # token-weighted metric sums of one optimizer step


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients to a global L2 norm of at most ``max_norm``; returns the norm before.

    FSDP2 gradients are shards (DTensor): the squares of the local shards are summed over
    ranks, so the norm is the unsharded model's on every rank.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum() if local else torch.zeros((), device="cpu")
    norm = all_reduce(sq.cpu().double()).sqrt().item()
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in local:
            g.mul_(scale)
    return norm


def _token_means(sums: dict[str, float]) -> dict[str, float]:
    """Token-weighted means over every rank's micro-batches of one optimizer step."""
    names = sorted(k for k in sums if k != "tokens")  # the same on every rank
    totals = all_reduce(torch.tensor([sums.get("tokens", 0.0)] + [sums[k] for k in names], dtype=torch.float64,
                                      device="cpu"))
    return {k: (totals[j + 1] / totals[0]).item() for j, k in enumerate(names)} if totals[0] > 0 else {}


def _global_mean(parts: list[torch.Tensor]) -> float:
    local = torch.cat(parts) if parts else torch.zeros(0, device="cpu")
    acc = all_reduce(torch.tensor([local.double().sum().item(), float(local.numel())], dtype=torch.float64,
                                   device="cpu"))
    return (acc[0] / acc[1]).item() if acc[1] > 0 else float("nan")


@torch.no_grad()
def sync_weights(learner_model: nn.Module, engine_model: nn.Module) -> None:
    """Copy the learner's weights into the engine's model in place, one parameter at a time.

    Under FSDP2 each parameter is gathered on its own (a full copy of one weight, never
    the model) and cast to the engine's dtype on the device. Tied weights are copied once.
    Colocated in one process without FSDP, share the model instead and skip this.
    """
    reshard(learner_model)
    dst = dict(engine_model.named_parameters())
    src = dict(learner_model.named_parameters())
    if set(src) != set(dst):
        raise ValueError(f"learner and engine models differ: only in learner {sorted(set(src) - set(dst))[:5]}, "
                         f"only in engine {sorted(set(dst) - set(src))[:5]}")
    with nvtx_range("weight_sync"):
        for name, p in src.items():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            dst[name].copy_(full)
