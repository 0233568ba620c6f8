"""Tiny random Qwen2 checkpoints for the engine tests (built locally, nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def save_tiny_qwen2(path, vocab: int = 256, hidden: int = 32, inter: int = 48, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, max_pos: int = 1024, seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2 (EOS = the last token id) saved to ``path``; returns the HF model (eval mode)."""
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                                      eos_token_id=vocab - 1)).eval()
    hf.save_pretrained(path)
    return hf
