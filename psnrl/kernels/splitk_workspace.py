"""The split-K workspace of the noisy kernels: one fp32 buffer per device, and the pins that
keep a captured CUDA graph's buffers alive."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Split-K partial sums: one fp32 buffer per device, reused by every call (its memory is the
# kernel's workspace, as cuBLAS keeps one) and grown by replacing it. A CUDA graph bakes in
# the address it captured, so a capture must run inside ``workspace_pins()``: the buffers it
# used go into a list the graph's owner keeps for as long as it replays the graph.
_WORKSPACE: dict[torch.device, torch.Tensor] = {}
_PINS: list[list[torch.Tensor]] = []  # the open workspace_pins() scopes, innermost last


@contextlib.contextmanager
def workspace_pins() -> Iterator[list[torch.Tensor]]:
    """Collects the split-K workspaces that kernels launched inside the scope use while a CUDA
    graph captures; keep the yielded list alive as long as the graph may replay."""
    pins: list[torch.Tensor] = []
    _PINS.append(pins)
    try:
        yield pins
    finally:
        _PINS.remove(pins)


def release_workspace(device: torch.device | str) -> None:
    """Drop the device's split-K workspace (graphs that captured it keep their pinned copy alive);
    the next call allocates a new one."""
    _WORKSPACE.pop(torch.device(device), None)


def splitk_workspace(numel: int, device: torch.device) -> torch.Tensor:
    """At least ``numel`` fp32 elements of the device's split-K workspace."""
    buf = _WORKSPACE.get(device)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing and not _PINS:
        raise RuntimeError("a CUDA graph that captures the noisy kernel's split-K path must be captured "
                           "inside psnrl.kernels.noisy_linear.workspace_pins() and keep the pinned list alive")
    if buf is None or buf.numel() < numel:
        if capturing:
            raise RuntimeError(
                f"the noisy kernel's split-K workspace ({numel * 4} bytes) must be allocated before a "
                f"CUDA graph capture: run the same step eagerly first (a warm-up), as the engine does")
        buf = _WORKSPACE[device] = torch.empty(max(numel, 2 * buf.numel() if buf is not None else 0),
                                               dtype=torch.float32, device=device)
    if capturing and not any(b is buf for b in _PINS[-1]):
        _PINS[-1].append(buf)
    return buf[:numel]
