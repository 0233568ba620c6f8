"""The model shapes the benchmarks run: real Hugging Face configs (Qwen2.5 0.5B, 1.5B, 7B, and
"tiny"), and random checkpoints of them without tokenizer; API: psnrl/bench/README.md.
"""
from __future__ import annotations

import copy
import json
import math
import os
import zlib
from pathlib import Path
from typing import Mapping

import torch


def _config(shared: Mapping, **fields) -> dict:
    """A config.json dict: ``shared`` and ``fields``, the keys sorted as the published files have them."""
    return copy.deepcopy(dict(sorted({**shared, **fields}.items())))


# What the config.json files of the three Qwen2.5 base models share.
_QWEN25_SHARED = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                  "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02, "model_type": "qwen2",
                  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
                  "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False}
QWEN25_0_5B = _config(_QWEN25_SHARED, hidden_size=896, intermediate_size=4864, max_position_embeddings=32768,
                      max_window_layers=24, num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2,
                      sliding_window=32768, tie_word_embeddings=True, vocab_size=151936)
QWEN25_1_5B = _config(_QWEN25_SHARED, hidden_size=1536, intermediate_size=8960, max_position_embeddings=131072,
                      max_window_layers=28, num_attention_heads=12, num_hidden_layers=28, num_key_value_heads=2,
                      sliding_window=131072, tie_word_embeddings=True, vocab_size=151936)
QWEN25_7B = _config(_QWEN25_SHARED, hidden_size=3584, intermediate_size=18944, max_position_embeddings=131072,
                    max_window_layers=28, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
                    sliding_window=131072, tie_word_embeddings=False, vocab_size=152064)
# Qwen2-shaped, about 0.1M parameters: for CPU smoke tests of whole pipelines.
TINY = _config({k: v for k, v in _QWEN25_SHARED.items() if k not in ("transformers_version", "use_mrope")},
               bos_token_id=0, eos_token_id=1, hidden_size=64, intermediate_size=128, max_position_embeddings=1024,
               max_window_layers=2, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
               sliding_window=1024, tie_word_embeddings=True, vocab_size=512)

QWEN25 = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B")
CONFIGS: dict[str, dict] = {
    "Qwen2.5-0.5B": QWEN25_0_5B,
    "Qwen2.5-1.5B": QWEN25_1_5B,
    "Qwen2.5-7B": QWEN25_7B,
    "tiny": TINY,
}

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_ALIASES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                  "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
                  "bfloat16": torch.bfloat16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve(name: str) -> str:
    """The CONFIGS key for a full name ("Qwen2.5-7B"), a size ("7B", "7b") or "tiny"."""
    key = str(name).strip().lower()
    for model in CONFIGS:
        if key in (model.lower(), model.lower().removeprefix("qwen2.5-")):
            return model
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(CONFIGS)} "
                     f"(or just the size, e.g. 7B)")


def get_config(model: str | Mapping) -> dict:
    """A deep copy of a model's config.json dict (a dict argument is copied as is)."""
    if isinstance(model, Mapping):
        return copy.deepcopy(dict(model))
    return copy.deepcopy(CONFIGS[resolve(model)])


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16 from torch.bfloat16, "bf16" or "bfloat16" (also fp16 and fp32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; expected one of {list(_DTYPE_NAMES)}")
        return dtype
    try:
        return _DTYPE_ALIASES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_ALIASES)}") from None


def _arch(cfg: Mapping) -> str:
    archs = cfg.get("architectures") or []
    for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        if arch in archs:
            return arch
    raise ValueError(f"architectures {archs} not supported (Qwen2ForCausalLM, LlamaForCausalLM)")


def head_dim(model: str | Mapping) -> int:
    cfg = get_config(model)
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def param_shapes(model: str | Mapping) -> dict[str, tuple[int, ...]]:
    """Every parameter of the checkpoint by its Hugging Face name, in checkpoint order.

    Qwen2 has q/k/v biases and no o_proj bias; Llama follows attention_bias / mlp_bias.
    ``lm_head.weight`` is listed only when the embeddings are not tied.
    """
    cfg = get_config(model)
    arch = _arch(cfg)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    d = head_dim(cfg)
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False))
    o_bias = arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj, out in (("q_proj", heads * d), ("k_proj", kv_heads * d), ("v_proj", kv_heads * d)):
            shapes[f"{p}.self_attn.{proj}.weight"] = (out, hidden)
            if qkv_bias:
                shapes[f"{p}.self_attn.{proj}.bias"] = (out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, heads * d)
        if o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (hidden,)
        for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            shapes[f"{p}.mlp.{proj}.weight"] = shape
            if mlp_bias:
                shapes[f"{p}.mlp.{proj}.bias"] = (shape[0],)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    return shapes


def param_count(model: str | Mapping) -> int:
    """Parameters of the model, a tied lm_head counted once (Qwen2.5-0.5B: 494,032,768)."""
    return sum(math.prod(shape) for shape in param_shapes(model).values())


def kv_bytes_per_token(model: str | Mapping, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of K and V that one token holds in the cache, all layers together."""
    cfg = get_config(model)
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    elem = torch.empty(0, dtype=as_dtype(dtype)).element_size()
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim(cfg) * elem


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


def _random_tensor(name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype, seed: int,
                   device: torch.device | str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
    return t.to(dtype).cpu()


def write_random_checkpoint(model: str | Mapping, directory: str | os.PathLike,
                            dtype: torch.dtype | str = torch.bfloat16, seed: int = 0, *,
                            std: float | None = None, device: torch.device | str = "cpu",
                            max_shard_bytes: int = 4 << 30) -> Path:
    """Write a checkpoint of ``model``'s shapes with random weights into ``directory``; return it.

    Writes ``config.json`` (the model's config with ``torch_dtype`` set to ``dtype``),
    ``generation_config.json`` (its bos/eos ids) and the weights as safetensors: one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. No tokenizer.

    Weights and biases are N(0, std^2) with std = the config's initializer_range
    (0.02), norms are 1. Each tensor is drawn from its own generator seeded by
    (seed, name) on ``device`` ("cuda" is much faster for 7B), so a tensor's values
    depend only on seed, name, dtype and device. Weight files already in the
    directory are replaced.
    """
    cfg = get_config(model)
    dtype = as_dtype(dtype)
    std = float(cfg.get("initializer_range", 0.02) if std is None else std)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        if old.is_file():
            old.unlink()
    cfg["torch_dtype"] = _DTYPE_NAMES[dtype]
    cfg.pop("dtype", None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    (directory / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    from safetensors.torch import save_file

    shapes = param_shapes(cfg)
    elem = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * elem
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, names in zip(files, shards):
        tensors = {name: _random_tensor(name, shapes[name], std, dtype, seed, device) for name in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        del tensors
    if len(files) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * elem
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def cached_random_checkpoint(model: str, dtype: str, seed: int, cache: str | None, device: str,
                             tmp_root: Path, tokenizer=None) -> Path:
    """A random checkpoint of ``model`` (with ``tokenizer`` saved beside it, if given): reused
    from the ``cache`` folder when a complete one is there, else written (under ``tmp_root``
    without a cache)."""
    cfg = get_config(model)
    tag = {"config": cfg, "dtype": dtype, "seed": seed}
    name = f"{model}-{dtype}-seed{seed}"
    if tokenizer is not None:
        tag["tokenizer"] = tokenizer.get_vocab()
        name += "-tok"
    if cache:
        path = Path(cache) / name
        marker = path / ".psnrl-random-checkpoint.json"
        if marker.is_file() and json.loads(marker.read_text()) == tag:
            return path
    else:
        path = tmp_root / model
    write_random_checkpoint(cfg, path, dtype=dtype, seed=seed, device=device)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if cache:
        (path / ".psnrl-random-checkpoint.json").write_text(json.dumps(tag))
    return path
