"""Which rows of a batch see which noise stream: the streams, the row -> stream map the fused
kernels read (``NoiseRows``), and its packing into work tiles of at most ``MAX_SLOTS`` streams."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import triton

from psnrl.kernels import noise


@dataclass(frozen=True)
class NoiseStream:
    """One perturbed policy: noise seed (64-bit) and standard deviation."""

    seed: int
    sigma: float

    def __post_init__(self) -> None:
        noise.split_seed(self.seed)
        noise.check_sigma(self.sigma)


# Most distinct streams one block of rows serves with one W tile (a static unroll).
MAX_SLOTS = 4


class NoiseRows(Protocol):
    """What the fused kernel reads of a batch's rows: a stream id per row, the streams' seed and
    sigma tables (index 0 = clean), and the row blocks it launches over. ``StreamRows`` builds
    them from a tensor of stream ids; a decode CUDA graph keeps them in fixed device buffers it
    refills every step (psnrl/engine/cuda_graphs.py). The torch reference and the materialized
    path need the whole ``StreamRows``."""

    shape: tuple[int, ...]
    ids: torch.Tensor      # [rows] int32 stream ids
    seeds: torch.Tensor    # [streams + 1, 2] int32 (noise.seed_table)
    sigmas: torch.Tensor   # [streams + 1] fp32
    all_clean: bool

    def work_tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, 2] int32 row ranges, [T, slots] int32 stream ids padded with -1)."""
        ...


class StreamRows:
    """Which stream each row of a batch uses. Build it once per batch; every layer reuses it.

    ``row_streams``: integer tensor of stream ids, one per row (any shape; it is
    flattened the way ``x.reshape(-1, K)`` flattens rows). 0 = clean,
    s in [1, len(streams)] = ``streams[s - 1]``.
    """

    def __init__(self, row_streams: torch.Tensor, streams: Sequence[NoiseStream]):
        if not isinstance(row_streams, torch.Tensor) or row_streams.dtype.is_floating_point \
                or row_streams.dtype.is_complex or row_streams.dtype == torch.bool:
            raise ValueError(f"row_streams must be an integer tensor, got {type(row_streams).__name__} "
                             f"{getattr(row_streams, 'dtype', '')}")
        streams = list(streams)
        for s in streams:
            if not isinstance(s, NoiseStream):
                raise ValueError(f"streams must be NoiseStream objects, got {s!r}")
        self.shape = tuple(row_streams.shape)
        ids_cpu = row_streams.reshape(-1).to("cpu")
        if ids_cpu.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids_cpu))
            if lo < 0 or hi > len(streams):
                raise ValueError(f"row_streams holds stream ids in [{lo}, {hi}], but only 0 (clean) "
                                 f"and 1..{len(streams)} are defined")
        ids_cpu = ids_cpu.to(torch.int32)
        device = row_streams.device
        self.streams = streams
        self.ids = ids_cpu.to(device)
        self.seeds = noise.seed_table([0] + [s.seed for s in streams], device)
        sigmas = [0.0] + [float(s.sigma) for s in streams]
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32, device=device)
        # A stream with sigma 0 is the clean policy.
        noisy_cpu = torch.tensor(sigmas, device="cpu")[ids_cpu.long()] > 0
        self.clean_mask = (~noisy_cpu).to(device)
        self.all_clean = not bool(noisy_cpu.any())
        self._runs = _runs(ids_cpu)
        self._tiles: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: list[tuple[int, slice | torch.Tensor]] | None = None

    @classmethod
    def clean(cls, rows: int, device: torch.device | str) -> "StreamRows":
        return cls(torch.zeros(rows, dtype=torch.int32, device=device), [])

    @property
    def num_rows(self) -> int:
        return self.ids.numel()

    @property
    def slots(self) -> int:
        """Streams one block of rows serves at once: the distinct streams, at most MAX_SLOTS."""
        return max(1, min(MAX_SLOTS, len({s for _, _, s in self._runs})))

    def work_tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row blocks of at most ``block_m`` rows and ``self.slots`` streams each.

        Returns ([T, 2] int32 row ranges, [T, slots] int32 stream ids padded with -1).
        Blocks follow the runs of equal ids, so a batch laid out as [clean | noisy]
        gets one-stream blocks and interleaved decode rows share one block.
        """
        key = (block_m, self.slots)
        if key not in self._tiles:
            ranges, slots = _pack(self._runs, block_m, self.slots)
            self._tiles[key] = (torch.tensor(ranges, dtype=torch.int32, device=self.ids.device),
                                torch.tensor(slots, dtype=torch.int32, device=self.ids.device))
        return self._tiles[key]

    def row_groups(self) -> list[tuple[int, slice | torch.Tensor]]:
        """(stream, rows) per policy present: stream 0 gathers every clean row (sigma 0
        included); rows are a slice when they form one run, else a device index tensor."""
        if self._groups is None:
            clean = {0} | {i + 1 for i, st in enumerate(self.streams) if st.sigma == 0}
            runs: dict[int, list[tuple[int, int]]] = {}
            for start, end, stream in self._runs:
                runs.setdefault(0 if stream in clean else stream, []).append((start, end))
            self._groups = []
            for stream, spans in sorted(runs.items()):
                if len(spans) == 1:
                    rows: slice | torch.Tensor = slice(*spans[0])
                else:
                    rows = torch.cat([torch.arange(a, b, device="cpu") for a, b in spans]).to(self.ids.device)
                self._groups.append((stream, rows))
        return self._groups


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs (start, end, stream) of equal consecutive ids."""
    if ids.numel() == 0:
        return []
    starts = [0] + ((ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1).tolist()
    ends = starts[1:] + [ids.numel()]
    values = ids[starts].tolist()
    return list(zip(starts, ends, values))


def pack_work_tiles(ids: Sequence[int], block_m: int, slots: int) -> tuple[list[list[int]], list[list[int]]]:
    """The work tiles of ``StreamRows.work_tiles`` for host-side ids (a list), as lists:
    ([T, 2] row ranges, [T, slots] stream ids padded with -1). At most
    ``max_work_tiles(len(ids), block_m, slots)`` tiles."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(ids):
        if runs and runs[-1][2] == s:
            runs[-1] = (runs[-1][0], i + 1, s)
        else:
            runs.append((i, i + 1, s))
    return _pack(runs, block_m, slots)


def max_work_tiles(rows: int, block_m: int, slots: int) -> int:
    """Most tiles ``_pack`` makes of ``rows`` rows, whatever their ids.

    A block closes when it holds ``block_m`` rows or when a row of a new stream finds
    ``slots`` streams in it (then it holds at least ``slots`` rows): every block but
    the last holds at least min(block_m, slots) rows.
    """
    return triton.cdiv(rows, max(1, min(block_m, slots))) if rows else 0


def _pack(runs: list[tuple[int, int, int]], block_m: int, slots: int):
    """Greedy row blocks: a block closes when it holds block_m rows or would need slots + 1 streams."""
    ranges: list[list[int]] = []
    table: list[list[int]] = []
    start, present = 0, []  # type: int, list[int]
    for run_start, run_end, stream in runs:
        pos = run_start
        while pos < run_end:
            if pos - start == block_m or (stream not in present and len(present) == slots):
                ranges.append([start, pos])
                table.append(present + [-1] * (slots - len(present)))
                start, present = pos, []
            if stream not in present:
                present.append(stream)
            pos = min(run_end, start + block_m)
    if runs:
        ranges.append([start, runs[-1][1]])
        table.append(present + [-1] * (slots - len(present)))
    return ranges, table
