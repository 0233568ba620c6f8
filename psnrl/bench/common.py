"""Helpers shared by the benchmarks: result file names, atomic writes, argument parsing, rounding,
table cells.

Every bench writes ``psnrl/bench/results/<name>-<device slug>.json`` and ``.md`` with
``write_result_files``; the JSON is written with ``allow_nan=False`` so a broken
measurement cannot produce a file other tools fail to parse.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_slug(name: str) -> str:
    """A filename-safe slug of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def results_document(meta: dict, rows: Sequence[dict], meta_keys: Sequence[str]) -> dict:
    """``{meta_keys in order, other meta, "rows": [...]}``; ValueError if a required key is missing."""
    missing = [key for key in meta_keys if key not in meta]
    if missing:
        raise ValueError(f"results metadata lacks {missing}")
    doc = {key: meta[key] for key in meta_keys}
    doc.update({key: value for key, value in meta.items() if key not in meta_keys})
    doc["rows"] = [dict(row) for row in rows]
    return doc


def write_result_files(out_dir: str | os.PathLike, name: str, device: str, doc: dict,
                       markdown: str) -> tuple[Path, Path]:
    """Write ``<name>-<device slug>.json`` and ``.md`` into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_slug(device)}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def split_list(values: Sequence[str]) -> list[str]:
    """Command-line lists given with spaces, commas or both: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def fmt_cell(value, spec: str) -> str:
    """A markdown table cell: ``value`` formatted with ``spec``, or an em dash when it is missing."""
    return "—" if value is None else format(value, spec)


def device_and_sync(device: str) -> tuple[str, Callable[[], None]]:
    """The name of ``device`` ("cuda" or "cpu") and a function that waits for its queued work."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(), torch.cuda.synchronize
    return "cpu", lambda: None


def free_memory(device: str) -> None:
    """Drop unreferenced objects and, on CUDA, return cached blocks (between measurements)."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
