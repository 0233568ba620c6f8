"""NVTX ranges for Nsight Systems: ``with nvtx_range("rollout"): ...`` or ``@nvtx_range("sample")``.

Off unless ``PSNRL_NVTX=1`` is set or ``enable_nvtx()`` is called, so a disabled range
costs one attribute check. When on, ranges go through the ``nvtx`` package if it is
installed (with a psnrl domain), else ``torch.cuda.nvtx``. Range names are fixed
(RANGES) so that profiles of different runs line up.
"""
from __future__ import annotations

import contextlib
import os

RANGES = ("rollout", "scheduler", "prefill", "decode_step", "sample", "noisy_linear", "attention",
          "lm_head_logprob", "learner/forward", "learner/backward", "optimizer", "weight_sync", "reward",
          "sigma_scheduler")


class _State:
    enabled = False
    push = None
    pop = None


def enable_nvtx(on: bool = True) -> None:
    """Turn NVTX ranges on or off; raises RuntimeError when no NVTX backend exists."""
    if not on:
        _State.enabled = False
        return
    try:
        import nvtx

        domain = nvtx.get_domain("psnrl")
        _State.push = lambda name: domain.push_range(domain.get_event_attributes(message=name))
        _State.pop = domain.pop_range
    except ImportError:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("NVTX ranges need the nvtx package (pip install nvtx) or a CUDA build of torch")
        _State.push, _State.pop = torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    _State.enabled = True


def nvtx_enabled() -> bool:
    return _State.enabled


class nvtx_range(contextlib.ContextDecorator):
    """A named NVTX range (a no-op while NVTX is off)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        if name not in RANGES:
            raise ValueError(f"unknown NVTX range {name!r}; psnrl's ranges are {RANGES}")
        self.name = name

    def __enter__(self):
        if _State.enabled:
            _State.push(self.name)
        return self

    def __exit__(self, *exc) -> bool:
        if _State.enabled:
            _State.pop()
        return False


if os.environ.get("PSNRL_NVTX") == "1":
    enable_nvtx()
