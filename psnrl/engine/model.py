"""Decoder-only transformer for Qwen2/Qwen2.5, Qwen3 (dense) and Llama checkpoints.

Tokens of a step are flattened ([tokens]); attention reads and writes a paged KV
cache (psnrl/engine/attention.py). Every linear layer is a StreamLinear, so each token
row can run the clean or a perturbed policy (BatchNoise) in the same forward.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from psnrl.engine.attention import AttentionMetadata, paged_attention
from psnrl.engine.config import ArchitectureConfig
from psnrl.engine.layers import Hidden, RMSNorm, RotaryEmbedding, Streams, StreamLinear, per_stream
from psnrl.engine.noise_spec import BatchNoise
from psnrl.kernels.noisy_linear import noisy_gate_up


class Attention(nn.Module):
    def __init__(self, cfg: ArchitectureConfig, layer: int):
        super().__init__()
        p = f"model.layers.{layer}.self_attn"
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = StreamLinear(h, cfg.num_heads * d, bias, f"{p}.q_proj.weight", "attn")
        self.k_proj = StreamLinear(h, cfg.num_kv_heads * d, bias, f"{p}.k_proj.weight", "attn")
        self.v_proj = StreamLinear(h, cfg.num_kv_heads * d, bias, f"{p}.v_proj.weight", "attn")
        # Qwen2's o_proj has no bias; Llama's follows attention_bias.
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        self.o_proj = StreamLinear(cfg.num_heads * d, cfg.hidden_size, o_bias, f"{p}.o_proj.weight", "attn")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = d ** -0.5

    def forward(self, h: Hidden, positions: torch.Tensor, rope: RotaryEmbedding,
                kv: tuple[torch.Tensor, torch.Tensor] | None, meta: AttentionMetadata,
                noise: BatchNoise | None) -> Hidden:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            n = q.shape[0]
            q = q.view(n, self.num_heads, self.head_dim)
            k = k.view(n, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope(positions, q, k)
            o = paged_attention(q, k, v.view(n, self.num_kv_heads, self.head_dim), kv, meta, self.scale)
            return o.reshape(n, -1)

        o = per_stream(attend, self.q_proj(h, noise), self.k_proj(h, noise), self.v_proj(h, noise))
        return self.o_proj(o, noise)


class MLP(nn.Module):
    def __init__(self, cfg: ArchitectureConfig, layer: int):
        super().__init__()
        p = f"model.layers.{layer}.mlp"
        hs, im, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = StreamLinear(hs, im, b, f"{p}.gate_proj.weight", "mlp")
        self.up_proj = StreamLinear(hs, im, b, f"{p}.up_proj.weight", "mlp")
        self.down_proj = StreamLinear(im, hs, b, f"{p}.down_proj.weight", "mlp")

    def forward(self, h: Hidden, noise: BatchNoise | None) -> Hidden:
        rows = noise.rows("mlp") if noise is not None else None
        if rows is not None and isinstance(h, torch.Tensor) and not torch.is_grad_enabled() \
                and self.gate_proj.bias is None:
            # Generation with noisy MLP rows: gate, up and SiLU(gate) * up in one kernel that
            # reads both weights once and writes only the activation (psnrl/kernels/README.md).
            act: Hidden = noisy_gate_up(h, self.gate_proj.weight, self.up_proj.weight, rows=rows,
                                gate_key=self.gate_proj.key, up_key=self.up_proj.key)
        else:
            act = per_stream(_silu_mul, self.gate_proj(h, noise), self.up_proj(h, noise))
        return self.down_proj(act, noise)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchitectureConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, h, positions, rope, kv, meta, noise):
        h = per_stream(torch.add, h, self.self_attn(per_stream(self.input_layernorm, h), positions, rope,
                                                    kv, meta, noise))
        return per_stream(torch.add, h, self.mlp(per_stream(self.post_attention_layernorm, h), noise))


class DecoderStack(nn.Module):
    """Embedding, decoder layers, final norm: the checkpoint's ``model.*`` parameters."""

    def __init__(self, cfg: ArchitectureConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The model; parameter names match the Hugging Face checkpoint's."""

    def __init__(self, cfg: ArchitectureConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = StreamLinear(cfg.hidden_size, cfg.vocab_size, False, "lm_head.weight", "lm_head")
        self._tie_weights()
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)
        # Training: keep only each decoder layer's input for backward and recompute the rest.
        self.activation_checkpointing = False

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = cast(nn.Parameter, self.model.embed_tokens.weight)

    @classmethod
    def empty(cls, cfg: ArchitectureConfig, device: torch.device | str, dtype: torch.dtype) -> "CausalLM":
        """A model with uninitialized weights on ``device``, never materialized elsewhere."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device).to(dtype)
        model._tie_weights()  # to_empty gives tied parameters separate storage
        model.rope = RotaryEmbedding(cfg.head_dim, cfg.rope, cfg.max_position_embeddings).to(device)
        return model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                noise: BatchNoise | None = None, dual: bool = False) -> Hidden:
        """Hidden states [tokens, hidden] of a step's flattened tokens.

        With ``kv_caches`` (generation) the tokens extend their cached sequences; without
        (training) each sequence of ``meta.cu_seqlens_q`` is attended to on its own.
        ``dual`` (training only): the learner's dual-stream forward; returns Streams of the
        tokens under the clean policy (autograd) and under ``noise``, which then describes
        the rows [clean copy | noisy copy] (twice the tokens), sharing each weight read.
        """
        if dual and kv_caches is not None:
            raise ValueError("the dual-stream forward is for training: it takes no KV cache")
        emb = self.model.embed_tokens(input_ids)
        h: Hidden = Streams(emb, emb.detach()) if dual else emb
        caches = kv_caches if kv_caches is not None else [None] * len(self.model.layers)
        recompute = self.activation_checkpointing and kv_caches is None and torch.is_grad_enabled()
        for layer, kv in zip(self.model.layers, caches):
            if recompute:
                h = checkpoint(layer, h, positions, self.rope, kv, meta, noise, use_reentrant=False)
            else:
                h = layer(h, positions, self.rope, kv, meta, noise)
        return per_stream(self.model.norm, h)

    def logits(self, hidden: torch.Tensor, noise: BatchNoise | None = None) -> torch.Tensor:
        """Logits (fp32) of the given hidden rows; ``noise`` must describe those rows."""
        return self.lm_head(hidden, noise).float()

    def allocate_kv_cache(self, num_blocks: int, block_size: int,
                          device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config
        device = device or self.model.embed_tokens.weight.device
        dtype = dtype or self.model.embed_tokens.weight.dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(cfg.num_layers)]
