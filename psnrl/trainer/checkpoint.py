"""Training checkpoints without pickle: one safetensors file per iteration boundary.

A state is a tree of dicts, lists, tuples, numbers, strings and tensors. The tensors (model,
optimizer moments, RNG state) go into the safetensors body; the rest of the tree is JSON in the
file's metadata, with ``{"__tensor__": name}`` where a tensor was. Loading parses a JSON header
and raw tensor bytes only, so a crafted checkpoint cannot run code (``torch.load`` of a pickle
can). Writes are atomic: a temporary file, fsync, rename, so a crash leaves the previous
checkpoints intact.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SUFFIX = ".safetensors"
_NAME = re.compile(r"^iter-(\d+)\.safetensors$")
_OLD_NAME = re.compile(r"^iter-(\d+)\.pt$")  # torch.save (pickle) checkpoints of earlier versions
_META_KEY = "psnrl_state"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (missing, pickled, damaged)."""


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"iter-{iteration:06d}{SUFFIX}"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # safetensors refuses shared storage (e.g. tied embeddings)
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[path] = t
        return {_TENSOR: path}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, f"{path}/{i}k", tensors, seen), _encode(v, f"{path}/{i}", tensors, seen)]
                         for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__} (at {path or 'the root'})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_checkpoint(directory: str | Path, iteration: int, state: dict, keep: int) -> Path:
    """Write ``state`` as iter-<iteration>.safetensors; keep the newest ``keep`` (0: all) up to it.

    Rotation counts only checkpoints of iterations up to this one, so a file of a later iteration
    (which a run folder never holds: see the trainer's run-folder check) is never what makes room.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, iteration)
    tmp = directory / f".{final.name}.tmp"
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors, set())
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(tree), "format": "pt"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    if keep > 0:
        for old in [p for p in checkpoints(directory) if checkpoint_iteration(p) <= iteration][:-keep]:
            old.unlink()
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


def checkpoint_iteration(path: str | Path) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not named iter-<iteration>{SUFFIX}")
    return int(m.group(1))


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def old_checkpoints(directory: str | Path) -> list[Path]:
    """Pickled ``iter-*.pt`` checkpoints of earlier psnrl versions (never loaded)."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if _OLD_NAME.match(p.name)) if directory.is_dir() else []


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save's zip, or a raw pickle


def load_checkpoint(path: str | Path) -> dict:
    """The state saved by :func:`save_checkpoint`; anything else (a pickle above all) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".pt" or _looks_pickled(path):
        raise CheckpointError(f"{path} is a pickled checkpoint (torch.save): psnrl refuses to load pickles, "
                              f"which can run arbitrary code; it reads only its own {SUFFIX} checkpoints")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a psnrl checkpoint (no {_META_KEY!r} metadata)")
    try:
        return _decode(json.loads(meta[_META_KEY]), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({e!r})") from None

