"""Training checkpoints: written atomically (temporary file, then rename), last K kept."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^iter-(\d+)\.pt$")


def save_checkpoint(directory: str | Path, iteration: int, state: dict, keep: int) -> Path:
    """Write ``state`` as iter-<iteration>.pt; a crash mid-write leaves the previous ones intact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"iter-{iteration:06d}.pt"
    tmp = directory / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink()
    return final


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)
