"""Building blocks of the decoder: norms, rotary embedding, and linears that carry noise streams."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from psnrl.engine.config import RopeConfig, rope_inv_freq
from psnrl.engine.noise_spec import BatchNoise
from psnrl.kernels.noise import param_key
from psnrl.kernels.noisy_linear import dual_linear, noisy_linear


class Streams(NamedTuple):
    """Hidden states of the learner's dual-stream forward: the same tokens under the clean
    policy (autograd) and under the perturbed one (constants, never saved for backward)."""

    clean: torch.Tensor
    noisy: torch.Tensor


Hidden = torch.Tensor | Streams


def per_stream(fn: Callable[..., torch.Tensor], *args) -> Hidden:
    """``fn(*args)``; for Streams arguments, once per stream, the noisy one without autograd.

    Non-Streams arguments are passed to both calls unchanged.
    """
    if not any(isinstance(a, Streams) for a in args):
        return fn(*args)
    clean = fn(*(a.clean if isinstance(a, Streams) else a for a in args))
    with torch.no_grad():
        noisy = fn(*(a.noisy if isinstance(a, Streams) else a for a in args))
    return Streams(clean, noisy)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as the reference implementations do, then scale in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position (the "rotate half" layout of Hugging Face checkpoints)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, rope: RopeConfig, max_positions: int):
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class StreamLinear(nn.Module):
    """A linear layer whose rows may each see W + sigma_s E_s (see psnrl/kernels/noisy_linear).

    ``name`` is the Hugging Face name of the weight (it addresses the noise);
    ``group`` the noise target group it belongs to ("mlp", "attn", "lm_head").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str, group: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.name = name
        self.group = group
        self.key = param_key(name)

    def forward(self, x: Hidden, noise: BatchNoise | None = None) -> Hidden:
        rows = noise.rows(self.group) if noise is not None else None
        if isinstance(x, Streams):  # ``noise`` describes the rows [clean | noisy]
            return Streams(*dual_linear(x.clean, x.noisy, self.weight, self.bias, rows=rows,
                                        param_key=self.key))
        if rows is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return noisy_linear(x, self.weight, self.bias, rows=rows, param_key=self.key)
