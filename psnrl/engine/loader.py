"""Load a Hugging Face checkpoint directory (config.json + safetensors) into CausalLM."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from psnrl.engine.config import ArchitectureConfig
from psnrl.engine.model import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Checkpoint tensors that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards named by the index."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} with its "
                            f"shards (psnrl loads safetensors checkpoints only)")


def load_model(path: str | Path, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> CausalLM:
    """Build the model for ``path`` and load its weights, without an intermediate CPU copy of the model."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory: give a local Hugging Face "
                                f"checkpoint (config.json, *.safetensors, tokenizer files)")
    cfg = ArchitectureConfig.from_dir(path)
    files = checkpoint_files(path)
    dtype = dtype or cfg.dtype
    model = CausalLM.empty(cfg, device, dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name not in params:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, the config "
                                     f"implies {tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(tensor)
                loaded.add(name)
    if unexpected:
        raise ValueError(f"{path}: checkpoint tensors this {cfg.architecture} does not have: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return model.eval()
