"""The trained policy as a Hugging Face folder (model.safetensors, config, tokenizer).

A run writes ``<log.dir>/final`` when it ends; ``psnrl export RUN_DIR [--iteration N] OUT`` writes
any of its checkpoints. Either folder loads with ``psnrl eval``, ``psnrl generate``, ``psnrl.LLM``
and ``transformers.AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from psnrl.engine.config import ArchitectureConfig
from psnrl.trainer.checkpoint import checkpoint_path, checkpoints, load_checkpoint

# Files of a model folder that hold weights: the export writes its own and copies everything else.
_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|\.index\.json$")


def export_model(weights: Mapping[str, torch.Tensor], source: str | Path, out: str | Path) -> Path:
    """``weights`` (the policy's state dict) with ``source``'s config and tokenizer files into ``out``.

    Written into a temporary folder beside ``out`` and renamed, so ``out`` is whole or absent.
    """
    source, out = Path(source), Path(out)
    tied = ArchitectureConfig.from_dir(source).tie_word_embeddings
    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()
               if not (tied and name == "lm_head.weight")}  # a tied head is the embedding
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and not _WEIGHTS.search(f.name):
            shutil.copy2(f, tmp / f.name)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def run_source_model(run_dir: Path) -> Path:
    """The model folder a run started from: its config and tokenizer files are the export's."""
    from psnrl.trainer.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    return run_dir / "init-model" if cfg.model.path == "tiny" else Path(cfg.model.path)


def export_checkpoint(run_dir: str | Path, out: str | Path, iteration: int | None = None) -> Path:
    """The policy of one checkpoint of the run in ``run_dir`` (default: the last) into ``out``."""
    from psnrl.trainer.config import load_config

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; give a new path")
    cfg = load_config(run_dir / "config.yaml")
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    found = checkpoints(ckpt_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    path = found[-1] if iteration is None else checkpoint_path(ckpt_dir, iteration)
    if path not in found:
        have = ", ".join(p.stem.removeprefix("iter-").lstrip("0") or "0" for p in found)
        raise FileNotFoundError(f"no checkpoint of iteration {iteration} in {ckpt_dir} (there are: {have})")
    return export_model(load_checkpoint(path)["model"], run_source_model(run_dir), out)


def resolve_policy(path: str | Path) -> Path:
    """A model folder as given, or a run folder's final policy (``<run>/final``)."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / "config.yaml").is_file():
        return path  # a model folder, or nothing psnrl knows: the loader names what is missing
    if (path / "final" / "config.json").is_file():
        return path / "final"
    raise FileNotFoundError(f"the run in {path} has no final policy yet (it did not finish); "
                            f"`psnrl export {path} OUT` writes its last checkpoint as a model folder")
