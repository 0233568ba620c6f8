"""TensorBoard scalar logs without tensorboard or tensorflow.

An event file is a sequence of TFRecords (uint64 length, masked CRC32C of the length, the data,
masked CRC32C of the data), each holding an ``Event`` protocol buffer, encoded here by hand:

    Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}
    Summary {repeated Value value = 1}
    Value   {string tag = 1; float simple_value = 2}

The first record carries ``file_version = "brain.Event:2"``. ``tensorboard --logdir runs`` reads
the files as written by torch.utils.tensorboard's SummaryWriter.
"""
from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64: negative numbers as their two's complement, ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int | None = None, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """An ``Event`` message (see the module docstring), serialized."""
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        out += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5)
                                            + struct.pack("<f", _f32(v))) for tag, v in scalars.items())
        out += _length_delimited(5, values)
    return out


def _f32(v: float) -> float:
    v = float(v)
    return v if not math.isfinite(v) or abs(v) <= 3.4028234663852886e38 else math.copysign(math.inf, v)


_uid = itertools.count()


class EventWriter:
    """Scalars to ``<log_dir>/events.out.tfevents.<time>.<host>.<pid>.<n>``, the file TensorBoard
    globs for. Each ``add_scalars`` appends one record and flushes it, so a crash loses nothing.
    :meth:`resume` continues an earlier writer's file (one stream per training run)."""

    def __init__(self, log_dir: str | Path, path: Path | None = None):
        self.log_dir = Path(log_dir)
        self._closed = False
        if path is not None:  # resume()
            self.path = path
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.log_dir / (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}"
                                    f".{os.getpid()}.{next(_uid)}")
        with open(self.path, "xb") as f:  # a fresh file, never another writer's
            f.write(tfrecord(encode_event(now, step=0, file_version="brain.Event:2")))

    @classmethod
    def resume(cls, path: str | Path, size: int) -> EventWriter:
        """Continue the event file ``path`` from its first ``size`` bytes (what a checkpoint saw):
        events written after that, by a run that then crashed, are cut off."""
        path = Path(path)
        if path.stat().st_size < size:
            raise ValueError(f"{path} is shorter than the {size} bytes it had at the checkpoint")
        os.truncate(path, size)
        return cls(path.parent, path)

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        """One event at ``step`` with a scalar per tag (a tag like "eval/pass@1" groups in the UI)."""
        if self._closed:
            raise ValueError(f"EventWriter({self.log_dir}) is closed")
        if not scalars:
            return
        record = tfrecord(encode_event(time.time() if wall_time is None else wall_time, step=step,
                                       scalars={str(k): float(v) for k, v in scalars.items()}))
        with open(self.path, "ab") as f:  # opened per event: nothing buffered, no handle left open
            f.write(record)

    def flush(self) -> None:
        """Nothing to do: every event is written through when added."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
