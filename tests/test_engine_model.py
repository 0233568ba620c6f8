"""The engine's model against Hugging Face transformers, the external oracle (CPU, fp32)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from psnrl.engine.attention import AttentionMetadata
from psnrl.engine.config import ArchitectureConfig
from psnrl.engine.loader import load_model
from psnrl.engine import model as engine_model
from psnrl.engine.noise_spec import BatchNoise, NoiseSpec
from psnrl.kernels import noise_reference as R
from psnrl.kernels.noise import param_key
from psnrl.kernels.noisy_linear import noisy_gate_up

BLOCK = 4
PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [42], [300, 301, 302, 303, 11], [8, 8, 8, 8, 8, 8, 8, 8, 8]]


def tiny_hf(arch: str, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    elif arch == "qwen3":  # head_dim 32 is not hidden / heads, as in the real Qwen3 configs
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, rope_theta=1000000.0))
        with torch.no_grad():  # non-trivial q/k norms, so a skipped one cannot pass
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.uniform_(0.5, 1.5)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}))
    with torch.no_grad():  # random biases, so a dropped bias cannot pass
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.float().eval()


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen2-tied", "qwen3-tied"])
def models(request, tmp_path_factory):
    arch = request.param.split("-")[0]
    hf = tiny_hf(arch, tie=request.param.endswith("tied"))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path, dtype=torch.float32), path


class Cache:
    """Contiguous blocks per sequence: enough of a block manager to drive the model in tests."""

    def __init__(self, model, num_seqs: int, max_len: int = 64):
        self.per_seq = max_len // BLOCK
        self.kv = model.allocate_kv_cache(num_seqs * self.per_seq, BLOCK)
        self.lens = [0] * num_seqs

    def step(self, chunks: list[list[int]]):
        ids, pos, slots, cu = [], [], [], [0]
        for b, chunk in enumerate(chunks):
            start = self.lens[b]
            for i, t in enumerate(chunk):
                p = start + i
                ids.append(t)
                pos.append(p)
                slots.append(b * self.per_seq * BLOCK + p)
            self.lens[b] += len(chunk)
            cu.append(cu[-1] + len(chunk))
        tables = torch.arange(len(chunks) * self.per_seq, dtype=torch.int32).view(len(chunks), -1)
        meta = AttentionMetadata(torch.tensor(cu, dtype=torch.int32), torch.tensor(self.lens, dtype=torch.int32),
                                 tables, torch.tensor(slots))
        return torch.tensor(ids), torch.tensor(pos), meta, torch.tensor(cu[1:]) - 1


def run_step(model, cache, chunks, noise_specs=None, specs=None):
    ids, pos, meta, last = cache.step(chunks)
    noise = None
    if specs is not None:
        row_spec = torch.repeat_interleave(torch.tensor(noise_specs), torch.tensor([len(c) for c in chunks]))
        noise = BatchNoise(row_spec, specs, "cpu")
    with torch.no_grad():
        h = model(ids, pos, meta, cache.kv, noise)
        return model.logits(h[last], noise.select(last) if noise is not None else None)


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_prefill_and_decode_logits_match_hf(models):
    hf, ours, _ = models
    cache = Cache(ours, len(PROMPTS))
    logits = run_step(ours, cache, PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for step in range(6):
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(logits[b], hf_logits(hf, seq)[-1], atol=1e-4, rtol=1e-4)
        nxt = logits.argmax(-1).tolist()
        for b, t in enumerate(nxt):
            seqs[b].append(t)
        logits = run_step(ours, cache, [[t] for t in nxt])


def test_greedy_generation_matches_hf_generate(models):
    hf, ours, _ = models
    cache = Cache(ours, len(PROMPTS), max_len=64)
    logits = run_step(ours, cache, PROMPTS)
    generated = [[] for _ in PROMPTS]
    for _ in range(32):
        nxt = logits.argmax(-1).tolist()
        for b, t in enumerate(nxt):
            generated[b].append(t)
        logits = run_step(ours, cache, [[t] for t in nxt])
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              min_new_tokens=32, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == generated[b]


def perturbed_hf(hf, seed: int, sigma: float, groups: set[str]):
    """The oracle of a noisy policy: a copy of HF's model with W + sigma * E in the targeted layers."""
    noisy = type(hf)(hf.config).eval()
    noisy.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            group = ("mlp" if ".mlp." in name else "attn" if ".self_attn." in name
                     else "lm_head" if name == "lm_head.weight" else None)
            if group in groups and name.endswith("weight") and p.dim() == 2:
                p += R.noise(tuple(p.shape), seed, param_key(name), sigma)
    return noisy


@pytest.mark.parametrize("targets", ["mlp", "attn", "all"])
def test_noisy_rows_match_hf_with_perturbed_weights_in_a_mixed_batch(models, targets, monkeypatch):
    hf, ours, _ = models
    if targets == "all" and hf.config.tie_word_embeddings:
        pytest.skip("a tied lm_head shares the embedding: perturbing it alone has no HF twin")
    fused_calls = []  # noisy MLP rows take the one-kernel gate/up/SiLU path (no grad)
    monkeypatch.setattr(engine_model, "noisy_gate_up",
                        lambda *a, **k: fused_calls.append(1) or noisy_gate_up(*a, **k))
    spec = NoiseSpec(seed=2**40 + 7, sigma=0.05, targets=targets)
    oracle = perturbed_hf(hf, spec.seed, spec.sigma, set(spec.groups))
    cache = Cache(ours, len(PROMPTS))
    which = [0, -1, 0, -1]  # prompts 0 and 2 noisy, 1 and 3 clean probes, one batch
    logits = run_step(ours, cache, PROMPTS, which, [spec])
    for b, prompt in enumerate(PROMPTS):
        ref = hf_logits(oracle if which[b] == 0 else hf, prompt)[-1]
        torch.testing.assert_close(logits[b], ref, atol=1e-4, rtol=1e-4)
    # The perturbation is real: noisy logits differ from the clean model's.
    assert (logits[0] - hf_logits(hf, PROMPTS[0])[-1]).abs().max() > 1e-3
    nxt = logits.argmax(-1).tolist()
    logits = run_step(ours, cache, [[t] for t in nxt], which, [spec])
    for b, prompt in enumerate(PROMPTS):
        ref = hf_logits(oracle if which[b] == 0 else hf, prompt + [nxt[b]])[-1]
        torch.testing.assert_close(logits[b], ref, atol=1e-4, rtol=1e-4)
    assert len(fused_calls) == (2 * hf.config.num_hidden_layers if targets != "attn" else 0)


def test_config_errors_name_the_problem(tmp_path, models):
    _, _, path = models
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**raw, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
                                                 "rope_parameters": None}))
    with pytest.raises(ValueError, match="yarn"):
        ArchitectureConfig.from_dir(bad)


def test_noise_spec_validation():
    with pytest.raises(ValueError, match="unknown noise target"):
        NoiseSpec(1, 0.1, "embeddings")
    with pytest.raises(ValueError, match="sigma"):
        NoiseSpec(1, -0.1)
    with pytest.raises(ValueError, match="seed"):
        NoiseSpec(-1, 0.1)
    assert NoiseSpec(1, 0.1, "all").groups == {"mlp", "attn", "lm_head"}
    assert NoiseSpec(1, 0.1, ("mlp", "lm_head")).groups == {"mlp", "lm_head"}
