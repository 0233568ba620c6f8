"""Model configuration read from a Hugging Face checkpoint's config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"
    # llama3 frequency scaling
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ArchitectureConfig:
    """A checkpoint's architecture (its config.json), as the engine's model reads it; the
    trainer's ``model`` config section (trainer/config.py ModelConfig) only names the checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    dtype: torch.dtype
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before the rotary embedding

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ArchitectureConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"{source}: architectures {archs} are not supported; psnrl runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if raw.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported (use_sliding_window=true)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise ValueError(f"{source}: dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(raw, source),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Qwen3 and Llama say so in attention_bias.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            dtype=_DTYPES[dtype_name],
            qk_norm=arch == "Qwen3ForCausalLM",
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ArchitectureConfig":
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no config.json in {path}: point to a local Hugging Face checkpoint directory "
                f"(config.json, *.safetensors, tokenizer files); psnrl never downloads weights")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from e
        return cls.from_hf(raw, str(file))


def _rope_from_hf(raw: dict, source: str) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; psnrl supports "
                         f"{SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    src = params if "factor" in params else scaling
    return RopeConfig(theta=float(theta), type="llama3", factor=float(src["factor"]),
                      low_freq_factor=float(src.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(src.get("high_freq_factor", 4.0)),
                      original_max_position=int(src.get("original_max_position_embeddings", 8192)))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, in fp32 as Hugging Face computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.type == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
    return inv_freq
