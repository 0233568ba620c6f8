"""The embedded default: a tiny Qwen2-shaped model and a synthetic arithmetic task.

Everything is built locally from a seed (no downloads): a character tokenizer, a
random model of a few hundred thousand parameters, and problems like ``37+58=`` whose
answer is ``95``. A short supervised warm-up makes the first rewards non-zero, so
that PSN-GRPO has something to improve on a CPU within minutes.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from psnrl.trainer.datasets import Problem

TINY_SET = "tiny-arith"  # data.train / eval.sets name of the synthetic task
PAD, EOS = "<pad>", "<eos>"
CHARS = list("0123456789+-*= ")
VOCAB = [PAD, EOS] + CHARS


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 64


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def build_checkpoint(path: str | Path, seed: int = 0, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a random tiny Qwen2 checkpoint with its tokenizer to ``path``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(VOCAB), hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                      num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                      max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
                      eos_token_id=VOCAB.index(EOS), pad_token_id=VOCAB.index(PAD), bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    GenerationConfig(eos_token_id=VOCAB.index(EOS), pad_token_id=VOCAB.index(PAD)).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


class ArithmeticTask:
    """Seeded two-operand problems: ``a+b=`` with a and b of up to ``digits`` digits."""

    def __init__(self, seed: int = 0, digits: int = 1):
        self.rng = random.Random(seed)
        self.digits = digits

    def problem(self) -> Problem:
        a = self.rng.randrange(10 ** self.digits)
        b = self.rng.randrange(10 ** self.digits)
        return Problem(id=f"{a}+{b}", problem=f"{a}+{b}=", answer=str(a + b))

    def problems(self, n: int) -> list[Problem]:
        return [self.problem() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"rng": json.dumps(self.rng.getstate())}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = json.loads(state["rng"])
        self.rng.setstate((version, tuple(internal), gauss))


def exact_answer_reward(text: str, answer: str) -> float:
    """1 when the completion (up to EOS, stripped) is the answer, else 0."""
    return float(text.strip() == answer)
