"""Torch reference of psnrl/kernels/lm_head_logprob.py: full fp32 logits and log_softmax.

Materializes [T x V]; for tests and small problems. Differentiable through all
three outputs by plain autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_head_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (log p(target), entropy, KL(U || p)) per token of softmax(hidden weight^T + bias)."""
    logits = F.linear(hidden.float(), weight.float(), bias.float() if bias is not None else None)
    logp = torch.log_softmax(logits, dim=-1)
    logprob = logp.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    self_certainty = -math.log(weight.shape[0]) - logp.mean(-1)
    return logprob, entropy, self_certainty
