"""TensorBoard event files without tensorboard: records and Event protos read back independently."""
import math
import os
import re
import struct

import pytest

from psnrl.trainer.tensorboard import EventWriter, crc32c, masked_crc32c


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def records(path) -> list[bytes]:
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert unmask(length_crc) == crc32c_bitwise(header)
        body = data[pos + 12:pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert unmask(body_crc) == crc32c_bitwise(body)
        out.append(body)
        pos += 16 + length
    assert pos == len(data)
    return out


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) pairs of a protobuf message: ints, doubles/floats as raw bytes, bytes."""
    pos, out = 0, []
    while pos < len(buf):
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            assert wire == 2, wire
            n, pos = varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        out.append((number, value))
    return out


def decode_event(buf: bytes) -> dict:
    event = {"scalars": {}}
    for number, value in fields(buf):
        if number == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3:
            event["file_version"] = value.decode()
        elif number == 5:
            for n, v in fields(value):
                assert n == 1
                tag, simple = dict(fields(v))[1].decode(), struct.unpack("<f", dict(fields(v))[2])[0]
                event["scalars"][tag] = simple
    return event


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283 == crc32c_bitwise(b"123456789")
    assert crc32c(b"") == 0
    assert unmask(masked_crc32c(b"psnrl")) == crc32c(b"psnrl")


def test_events_read_back(tmp_path):
    w = EventWriter(tmp_path / "tb")
    (path,) = (tmp_path / "tb").iterdir()
    assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\..+\.{os.getpid()}\.\d+", path.name), path.name
    w.add_scalars(1, {"reward_mean": 0.25, "eval/tiny-arith/pass@1": 0.5}, wall_time=1000.5)
    events = [decode_event(r) for r in records(path)]  # written through: readable before close
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["wall_time"] > 1e9
    assert events[1] == {"wall_time": 1000.5, "step": 1, "scalars": {"reward_mean": 0.25,
                                                                     "eval/tiny-arith/pass@1": 0.5}}
    w.add_scalars(2, {"sigma": 0.004, "nan": math.nan, "big": 1e300})
    w.add_scalars(3, {})  # nothing to write
    w.flush()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add_scalars(4, {"x": 1.0})
    events = [decode_event(r) for r in records(path)]
    assert len(events) == 3 and events[2]["step"] == 2
    assert events[2]["scalars"]["sigma"] == pytest.approx(0.004)
    assert math.isnan(events[2]["scalars"]["nan"]) and events[2]["scalars"]["big"] == math.inf
    second = EventWriter(tmp_path / "tb")  # another writer never appends to the first's file
    assert second.path != path and len(list((tmp_path / "tb").iterdir())) == 2


def test_tensorboard_reads_them(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    w = EventWriter(tmp_path)
    for step in range(1, 4):
        w.add_scalars(step, {"reward_mean": step / 10, "eval/average/pass@1": step / 20})
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward_mean", "eval/average/pass@1"}
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward_mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
