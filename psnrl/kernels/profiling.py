"""NVTX ranges for Nsight Systems: ``with nvtx_range("rollout"): ...`` or ``@nvtx_range("sample")``.

Off unless ``PSNRL_NVTX=1`` is set or ``enable_nvtx()`` is called, so a disabled range
costs one attribute check. When on, ranges go through the ``nvtx`` package if it is
installed (with a psnrl domain), else ``torch.cuda.nvtx``. ``enable_torch_ranges()``
also (or instead) opens each range as a ``torch.profiler.record_function``, so the same
names show up in torch.profiler traces (psnrl/bench/profile_step.py, where Nsight Systems is
missing). Range names are fixed (RANGES) so that profiles of different runs line up.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Literal

RANGES = ("rollout", "scheduler", "prefill", "decode_step", "sample", "noisy_linear", "attention",
          "lm_head_logprob", "learner/forward", "learner/backward", "optimizer", "weight_sync", "reward",
          "sigma_scheduler")


def _no_push(name: str) -> None:
    pass


def _no_pop() -> None:
    pass


class _State:
    enabled = False
    push: Callable[[str], Any] = _no_push
    pop: Callable[[], Any] = _no_pop
    nvtx: tuple[Callable[[str], Any], Callable[[], Any]] | None = None  # the NVTX backend's (push, pop) while on
    torch_ranges = False  # record_function ranges on
    open_records: list = []


def _install() -> None:
    """Point push/pop at the backends that are on; ``enabled`` is true when any is."""
    nv, rf = _State.nvtx, _State.torch_ranges
    if nv and rf:
        def push(name):
            nv[0](name)
            _record_push(name)

        def pop():
            _record_pop()
            nv[1]()
        _State.push, _State.pop = push, pop
    elif nv:
        _State.push, _State.pop = nv
    elif rf:
        _State.push, _State.pop = _record_push, _record_pop
    _State.enabled = bool(nv or rf)


def _record_push(name: str) -> None:
    from torch.profiler import record_function

    record = record_function(name)
    record.__enter__()
    _State.open_records.append(record)


def _record_pop() -> None:
    if _State.open_records:
        _State.open_records.pop().__exit__(None, None, None)


def enable_nvtx(on: bool = True) -> None:
    """Turn NVTX ranges on or off; raises RuntimeError when no NVTX backend exists."""
    if not on:
        _State.nvtx = None
        _install()
        return
    try:
        import nvtx

        domain = nvtx.get_domain("psnrl")
        _State.nvtx = (lambda name: domain.push_range(domain.get_event_attributes(message=name)),
                       domain.pop_range)
    except ImportError:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("NVTX ranges need the nvtx package (pip install nvtx) or a CUDA build of torch")
        _State.nvtx = (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
    _install()


def enable_torch_ranges(on: bool = True) -> None:
    """Also open every range as a torch.profiler ``record_function`` (recorded while a profiler runs)."""
    _State.torch_ranges = on
    if not on:
        _State.open_records.clear()
    _install()


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

    def __exit__(self, *exc) -> Literal[False]:
        if _State.enabled:
            _State.pop()
        return False


if os.environ.get("PSNRL_NVTX") == "1":
    enable_nvtx()
