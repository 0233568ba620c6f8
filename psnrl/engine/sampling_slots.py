"""Per-sequence sampling constants on the device, written once per sequence.

A decode step samples B rows whose temperature, top-p, top-k, seed, min_tokens and stop
tokens do not change while the sequence lives. Rebuilding them from Python lists every step
costs one blocking host-to-device copy each; instead every sequence gets a *slot*, a row of
preallocated device tables written when it first samples, and a step uploads only what
changes: the rows' slots and their generation steps. The sampler gathers the constants by
slot (``gather``, device ops only, so a CUDA graph can record it). The engine gives a slot
back when its sequence finishes or is preempted (it takes one again when it next samples),
so slots stay with running sequences; the decode graphs keep each one's block table in the
device row of the same number.

Captured graphs read the tables at fixed addresses: growing them (more live sequences than
slots, or a request with more stop tokens than a row holds) reallocates them and bumps
``generation``, and graphs recorded against an older generation must be captured again.
"""
from __future__ import annotations

from typing import Collection

import torch

from psnrl.engine.sampling import RowState, SamplingParams, pad_stop_ids


class SamplingSlots:
    # Rows of the int table (seed, top_k, min_tokens) and of the float one (temperature, top_p).
    SEED, TOP_K, MIN_TOKENS = range(3)

    def __init__(self, device: torch.device, vocab: int, capacity: int = 64, stop_width: int = 4):
        self.device = device
        self.vocab = vocab
        self.capacity = 0
        self.generation = 0  # bumped whenever the tables are reallocated
        # Field-major, so one gather gives each field as a contiguous [B] row (the fused sampler
        # reads them so), one column per slot; stop ids row-major, -1 padded.
        self.ints = torch.empty(3, 0, dtype=torch.int64, device=device)
        self.floats = torch.empty(2, 0, dtype=torch.float32, device=device)
        self.stops = torch.empty(0, stop_width, dtype=torch.int64, device=device)
        self._truncates: list[bool] = []
        self._min_tokens: list[int] = []
        self._live_truncating = 0  # live slots with top-k or top-p: none, and a step skips the scan
        self._live_min_tokens = 0  # live slots with min_tokens > 0: likewise
        self._free: list[int] = []
        self._unwritten: dict[int, tuple[int, SamplingParams, Collection[int]]] = {}
        self._pinned = self._pinned_buffer(64)
        self._grow(capacity)

    def acquire(self, seed: int, params: SamplingParams, stop_ids: Collection[int] = ()) -> int:
        """A slot for a sequence; its row reaches the device with the next ``flush``.
        ``stop_ids``: the tokens barred until ``params.min_tokens`` tokens are generated."""
        if not self._free:
            self._grow(2 * self.capacity)
        stop_ids = stop_ids if params.min_tokens > 0 else ()
        if len(stop_ids) > self.stops.shape[1]:
            self._widen(len(stop_ids))
        slot = self._free.pop()
        self._unwritten[slot] = (seed, params, stop_ids)
        # A top-k at or above the vocabulary keeps everything: not a truncation.
        self._truncates[slot] = 0 < params.top_k < self.vocab or params.top_p < 1.0
        self._min_tokens[slot] = params.min_tokens
        self._live_truncating += self._truncates[slot]
        self._live_min_tokens += params.min_tokens > 0
        return slot

    def release(self, slot: int) -> None:
        self._unwritten.pop(slot, None)
        self._live_truncating -= self._truncates[slot]
        self._live_min_tokens -= self._min_tokens[slot] > 0
        self._truncates[slot], self._min_tokens[slot] = False, 0
        self._free.append(slot)

    def reset(self) -> None:
        """Every slot free (the engine dropped all its sequences)."""
        self._unwritten.clear()
        self._free = list(range(self.capacity - 1, -1, -1))
        self._truncates = [False] * self.capacity
        self._min_tokens = [0] * self.capacity
        self._live_truncating = self._live_min_tokens = 0

    def truncates(self, slots: list[int]) -> bool:
        """Some of these rows has top-k or top-p (the torch sampler then sorts the batch)."""
        return self._live_truncating > 0 and any(self._truncates[s] for s in slots)

    def masks_stops(self, slots: list[int], steps: list[int]) -> bool:
        """Some of these rows, at these steps, still bars its stop tokens."""
        m = self._min_tokens
        return self._live_min_tokens > 0 and any(t < m[s] for s, t in zip(slots, steps))

    def rows(self, slots: list[int], steps: list[int]) -> RowState:
        """The sampling inputs of rows with these slots at these steps: one copy to the device
        (the slots and steps; more on a step with new slots), none from it."""
        self.flush()
        n = len(slots)
        if self._pinned.numel() < 2 * n:
            self._pinned = self._pinned_buffer(max(n, self._pinned.numel()))
        # Reused every step: the previous step's copy has completed, since a step ends by
        # reading its sampled tokens back. Written through numpy: no torch op on the host side.
        host = self._pinned.numpy()
        host[:n] = slots
        host[n:2 * n] = steps
        dev = self._pinned[:2 * n].to(self.device, non_blocking=True).view(2, n)
        return self.gather(dev[0], dev[1], masked=self.masks_stops(slots, steps), truncates=self.truncates(slots))

    def gather(self, index: torch.Tensor, steps: torch.Tensor, *, masked: bool, truncates: bool) -> RowState:
        """The sampling inputs of the rows with slots ``index`` at ``steps`` (int64 [B] on the
        device): gathers only, no host work, so a CUDA graph can record it. ``masked``: gather the
        stop tokens too (``masks_stops``); ``truncates``: the torch sampler's hint (``truncates``)."""
        ints, floats = self.ints.index_select(1, index), self.floats.index_select(1, index)
        rows = RowState(floats[0], floats[1], ints[self.TOP_K], ints[self.SEED], steps, truncates)
        if masked:
            rows.stop_ids, rows.min_tokens = self.stops.index_select(0, index), ints[self.MIN_TOKENS]
        return rows

    def flush(self) -> None:
        """Write the rows of newly acquired slots to the device (before a step reads them)."""
        if not self._unwritten:
            return
        idx = list(self._unwritten)
        values = list(self._unwritten.values())
        ints = torch.tensor([[seed, p.top_k, p.min_tokens] for seed, p, _ in values], dtype=torch.int64)
        floats = torch.tensor([[p.temperature, p.top_p] for _, p, _ in values], dtype=torch.float32)
        stops = torch.full((len(idx), self.stops.shape[1]), -1, dtype=torch.int64)
        ragged = pad_stop_ids([list(s) for _, _, s in values])
        stops[:, :ragged.shape[1]] = ragged
        index = torch.tensor(idx, dtype=torch.int64).to(self.device, non_blocking=True)
        self.ints.index_copy_(1, index, ints.t().to(self.device, non_blocking=True))
        self.floats.index_copy_(1, index, floats.t().to(self.device, non_blocking=True))
        self.stops.index_copy_(0, index, stops.to(self.device, non_blocking=True))
        self._unwritten.clear()

    def _pinned_buffer(self, n: int) -> torch.Tensor:
        """Host staging of a step's slots then steps: 2 n int64, pinned on CUDA."""
        return torch.empty(2 * n, dtype=torch.int64, pin_memory=self.device.type == "cuda")

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.ints = torch.cat([self.ints, self.ints.new_zeros(3, capacity - old)], dim=1)
        self.floats = torch.cat([self.floats, self.floats.new_zeros(2, capacity - old)], dim=1)
        self.stops = torch.cat([self.stops, self.stops.new_full((capacity - old, self.stops.shape[1]), -1)])
        self._truncates += [False] * (capacity - old)
        self._min_tokens += [0] * (capacity - old)
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.capacity = capacity
        self.generation += 1

    def _widen(self, width: int) -> None:
        """Room for ``width`` stop tokens per slot (doubling, so a run reallocates rarely)."""
        new = max(width, 2 * self.stops.shape[1])
        pad = self.stops.new_full((self.capacity, new - self.stops.shape[1]), -1)
        self.stops = torch.cat([self.stops, pad], dim=1)
        self.generation += 1
