"""Per-sequence sampling constants on the device, written once per sequence.

A decode step samples B rows whose temperature, top-p, top-k and seed do not change while the
sequence lives. Rebuilding them from Python lists every step costs one blocking host-to-device
copy each; instead every sequence gets a *slot*, a row of preallocated device tables written
when it first samples, and a step uploads only what changes: the rows' slots and their
generation steps, in one copy from pinned memory. The sampler gathers the constants by slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from psnrl.engine.sampling import SamplingParams


@dataclass
class RowState:
    """One step's per-row sampling inputs, on the device."""

    temperatures: torch.Tensor  # fp32 [B]
    top_p: torch.Tensor  # fp32 [B]
    top_k: torch.Tensor  # int64 [B]
    seeds: torch.Tensor  # int64 [B]
    steps: torch.Tensor  # int64 [B]: index of the token being generated
    truncates: bool  # some row has top-k or top-p (known on the host: no device read)


class SamplingSlots:
    def __init__(self, device: torch.device, vocab: int, capacity: int = 64):
        self.device = device
        self.vocab = vocab
        self.capacity = 0
        # Field-major, so one gather gives each field as a contiguous [B] row (the fused sampler
        # reads them so): ints = (seed, top_k), floats = (temperature, top_p), one column per slot.
        self.ints = torch.empty(2, 0, dtype=torch.int64, device=device)
        self.floats = torch.empty(2, 0, dtype=torch.float32, device=device)
        self._truncates: list[bool] = []
        self._free: list[int] = []
        self._unwritten: dict[int, tuple[int, SamplingParams]] = {}
        self._pinned = self._pinned_buffer(64)
        self._grow(capacity)

    def acquire(self, seed: int, params: SamplingParams) -> int:
        """A slot for a sequence; its row reaches the device with the next ``rows`` call."""
        if not self._free:
            self._grow(2 * self.capacity)
        slot = self._free.pop()
        self._unwritten[slot] = (seed, params)
        # A top-k at or above the vocabulary keeps everything: not a truncation.
        self._truncates[slot] = 0 < params.top_k < self.vocab or params.top_p < 1.0
        return slot

    def release(self, slot: int) -> None:
        self._unwritten.pop(slot, None)
        self._free.append(slot)

    def reset(self) -> None:
        """Every slot free (the engine dropped all its sequences)."""
        self._unwritten.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def rows(self, slots: list[int], steps: list[int]) -> RowState:
        """The sampling inputs of rows with these slots at these steps: one copy to the device
        (the slots and steps; three on a step with new slots), none from it."""
        self._write_new()
        n = len(slots)
        if self._pinned.numel() < 2 * n:
            self._pinned = self._pinned_buffer(max(n, self._pinned.numel()))
        # Reused every step: the previous step's copy has completed, since a step ends by
        # reading its sampled tokens back. Written through numpy: no torch op on the host side.
        host = self._pinned.numpy()
        host[:n] = slots
        host[n:2 * n] = steps
        dev = self._pinned[:2 * n].to(self.device, non_blocking=True).view(2, n)
        index = dev[0]
        ints, floats = self.ints.index_select(1, index), self.floats.index_select(1, index)
        return RowState(floats[0], floats[1], ints[1], ints[0], dev[1],
                        any(self._truncates[s] for s in slots))

    def _pinned_buffer(self, n: int) -> torch.Tensor:
        """Host staging of a step's slots then steps: 2 n int64, pinned on CUDA."""
        return torch.empty(2 * n, dtype=torch.int64, pin_memory=self.device.type == "cuda")

    def _write_new(self) -> None:
        if not self._unwritten:
            return
        idx = list(self._unwritten)
        values = list(self._unwritten.values())
        ints = torch.tensor([[seed, p.top_k] for seed, p in values], dtype=torch.int64)
        floats = torch.tensor([[p.temperature, p.top_p] for _, p in values], dtype=torch.float32)
        index = torch.tensor(idx, dtype=torch.int64).to(self.device, non_blocking=True)
        self.ints.index_copy_(1, index, ints.t().to(self.device, non_blocking=True))
        self.floats.index_copy_(1, index, floats.t().to(self.device, non_blocking=True))
        self._unwritten.clear()

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.ints = torch.cat([self.ints, self.ints.new_zeros(2, capacity - old)], dim=1)
        self.floats = torch.cat([self.floats, self.floats.new_zeros(2, capacity - old)], dim=1)
        self._truncates += [False] * (capacity - old)
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.capacity = capacity
