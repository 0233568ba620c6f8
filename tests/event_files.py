"""TensorBoard event files read back as TensorBoard shows them, with tensorboardX's Event proto
(tensorboard itself, which has a reader, is not a dependency)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event, SessionLog


def events(path: Path) -> list[Event]:
    """The records of one file: uint64 length, its CRC, the Event, the Event's CRC. A record cut
    short (a process killed while writing it) ends the file, as for TensorBoard."""
    data, pos, out = path.read_bytes(), 0, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        if pos + 16 + length > len(data):
            break
        out.append(Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 16 + length
    return out


def event_files(log_dir: Path) -> list[Path]:
    """In the order TensorBoard reads them: by name, which starts with the time."""
    return sorted(log_dir.glob("events.out.tfevents.*"))


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over all files in order: a SessionLog START at step s (a writer's
    purge_step) drops what came before it at steps >= s, and a later value of a step wins."""
    out: dict[str, dict[int, float]] = {}
    for path in event_files(log_dir):
        for event in events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {tag: {s: v for s, v in steps.items() if s < event.step} for tag, steps in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def shown(run: Path) -> str:
    """What TensorBoard shows of a run, timings aside (as JSON, where a NaN equals itself)."""
    return json.dumps({tag: steps for tag, steps in scalars(run / "tensorboard").items()
                       if not tag.startswith("time_") and tag != "rollout_tokens_per_s"}, sort_keys=True)
