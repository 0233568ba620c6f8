"""The sampler of graph decode steps, recorded as CUDA graphs too (CUDA only).

A decode step that replays a decode graph (psnrl/engine/cuda_graphs.py) leaves its logits in
the graphs' shared output, in the step's order. Sampling them eagerly would cost the
sampler's launches and the slot gathers on the host every step, so they are recorded as
well: per (bucket, whether some row bars its stop tokens, whether some row truncates), one
graph that gathers the rows' constants from the engine's SamplingSlots, samples (the fused
kernel) and packs tokens and log-probs into a static ``[bucket, 2]`` float64 output, which
the step reads back in one copy. Its only input is one int64 buffer, the rows' slots then
their steps, written from pinned memory with one copy.

Why a graph of its own and not the tail of the decode graph: a step then pays one more
launch, but the forward graphs (the expensive captures) do not multiply by the sampler's
variants, growing the slot tables re-records only these small graphs, and
``EngineConfig.time_steps`` can still put an event between the forward and the sampler.

``capture=False`` on the owner (a CPU) runs the same buffers without capturing.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch

from psnrl.engine.cuda_graphs import bucket_for
from psnrl.engine.sampling import RowState
from psnrl.engine.sampling_slots import SamplingSlots

if TYPE_CHECKING:
    from psnrl.engine.cuda_graphs import DecodeGraphs

# (logits [B, V], the rows' inputs) -> packed samples [B, 2] float64 (sampling.pack)
Draw = Callable[[torch.Tensor, RowState], torch.Tensor]


class SampleGraphs:
    """Sampler graphs reading the logits of ``graphs`` (the decode graphs of the same model)."""

    def __init__(self, graphs: "DecodeGraphs", slots: SamplingSlots, draw: Draw):
        self.owner = graphs
        self.slots = slots
        self.draw = draw
        largest = graphs.buckets[-1]
        dev = graphs.device
        pin = dev.type == "cuda"
        # A bucket-b graph reads its rows' slots at [0, b) and their steps at [b, 2b).
        self.inputs = torch.zeros(2 * largest, dtype=torch.int64, device=dev)
        # Two host stagings, taken in turn: with the overlap, a step's copy may still be queued
        # behind the step before's forward when the next step writes its inputs.
        self.host = [torch.zeros(2 * largest, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]  # after each staging's last copy (CUDA)
        self._turn = 0
        self.out = torch.zeros(largest, 2, dtype=torch.float64, device=dev)
        self.graphs: dict[tuple[int, bool, bool], Any] = {}
        self.disabled = False  # a capture failed: the caller samples eagerly from then on
        self._generation = slots.generation  # of the slot tables the graphs read

    def run(self, slots: list[int], steps: list[int]) -> torch.Tensor | None:
        """Packed samples [rows, 2] (device) of the rows ``slots`` at ``steps``, sampled from the
        first rows of the decode graphs' output; None if sampling by graph is off."""
        if self.disabled or self.owner.disabled or self.owner.out is None:
            return None
        n = len(slots)
        b = bucket_for(n, self.owner.buckets)
        if b is None:
            return None
        self.slots.flush()
        if self.slots.generation != self._generation:  # the tables moved: record again
            self.close_graphs()
            self._generation = self.slots.generation
        key = (b, self.slots.masks_stops(slots, steps), self.slots.truncates(slots))
        self._turn ^= 1
        staging, copied = self.host[self._turn], self._copied[self._turn]
        if copied is not None:  # two steps back, whose samples were read since: no wait in practice
            copied.synchronize()
        host = staging.numpy()
        host[:n], host[n:b] = slots, 0  # padding rows: slot 0, step 0, their samples unread
        host[b:b + n], host[b + n:2 * b] = steps, 0
        cuda = self.inputs.is_cuda
        self.inputs[:2 * b].copy_(staging[:2 * b], non_blocking=cuda)
        if cuda:
            self._copied[self._turn] = event = torch.cuda.Event()
            event.record()
        if key not in self.graphs:
            graph = self._capture(key) if self.owner.capture_graphs else None
            if self.disabled:
                return None
            self.graphs[key] = graph
        self.replay(key)
        return self.out[:n]

    def replay(self, key: tuple[int, bool, bool]) -> None:
        graph = self.graphs[key]
        if graph is not None:
            graph.replay()
        else:
            self._forward(*key)

    def close_graphs(self) -> None:
        for graph in self.graphs.values():
            if graph is not None:
                graph.reset()
        self.graphs.clear()

    def _forward(self, bucket: int, masked: bool, truncates: bool) -> None:
        """The recorded computation: gather, sample, pack into the static output."""
        assert self.owner.out is not None  # run() checked it
        rows = self.slots.gather(self.inputs[:bucket], self.inputs[bucket:2 * bucket], masked=masked,
                                 truncates=truncates)
        self.out[:bucket].copy_(self.draw(self.owner.out[:bucket], rows))

    def _capture(self, key: tuple[int, bool, bool]) -> Any:
        dev = self.owner.device
        try:
            if self.owner.pool is None:
                self.owner.pool = torch.cuda.graph_pool_handle()
            torch.cuda.synchronize(dev)
            self._forward(*key)  # warm-up: compiles the kernel (sampling only reads: no side effects)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.owner.pool):
                self._forward(*key)
            torch.cuda.synchronize(dev)
            return graph
        except Exception as exc:  # an op that cannot be captured: stay correct, sample eagerly
            self.disabled = True
            warnings.warn(f"capturing the sampler CUDA graph (batch {key[0]}) failed: {exc!r}; graph decode "
                          f"steps sample eagerly from now on", RuntimeWarning, stacklevel=3)
            return None
