"""The naive PSN baseline of the learner bench: a materialized perturbed copy of the targeted
weights (W + sigma E by the noise contract of psnrl/kernels/noise.py)."""
from __future__ import annotations

import copy

import torch


@torch.no_grad()
def perturbed_weight(weight: torch.Tensor, seed: int, key: int, sigma: float) -> torch.Tensor:
    """W + sigma E (psnrl/kernels/noise.py's contract), added in fp32 and rounded to W's dtype,
    as the fused kernel forms its noisy tiles. Triton fill on a GPU, the torch twin on a CPU."""
    from psnrl.kernels import noise as N

    if N.runs_triton(weight):
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        N.fill_noise(out, seed, key, sigma)
    else:
        from psnrl.kernels import noise_reference as R
        out = R.noise(tuple(weight.shape), seed, key, sigma, device=weight.device)
    out.add_(weight)
    return out.to(weight.dtype)


@torch.no_grad()
def perturbed_copy(model, spec) -> tuple[torch.nn.Module, int]:
    """A second model whose targeted StreamLinear weights are W + sigma E; every other
    parameter and buffer is shared with ``model`` (a tied lm_head gets its own copy only when
    targeted, the embedding stays clean). Returns it and the bytes of the new weights."""
    from psnrl.engine.layers import StreamLinear

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    noisy = copy.deepcopy(model, memo)
    copied = 0
    for name, module in model.named_modules():
        if isinstance(module, StreamLinear) and module.group in spec.groups and spec.sigma > 0:
            w = perturbed_weight(module.weight, spec.seed, module.key, spec.sigma)
            noisy.get_submodule(name).weight = torch.nn.Parameter(w, requires_grad=False)
            copied += w.numel() * w.element_size()
    return noisy.eval(), copied
