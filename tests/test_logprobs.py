"""Response log-probs of the training forward against transformers and the engine's sampler."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from psnrl.engine.llm import LLM
from psnrl.engine.loader import load_model
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import SamplingParams
from psnrl.engine.layers import StreamLinear
from psnrl.trainer.logprobs import dual_stream_logprobs, response_logprobs

SEQS = [[5, 17, 33, 2, 9, 100, 7], [42, 3], [300, 301, 302, 303, 11, 12, 13, 14]]
PROMPT_LENS = [3, 1, 6]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return hf, path


def hf_response_logprobs(hf, seq, n_prompt):
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
    return torch.stack([lp[t - 1, seq[t]] for t in range(n_prompt, len(seq))])


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_logprobs_and_entropy_match_hf(checkpoint, chunk):
    hf, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    out = response_logprobs(model, SEQS, PROMPT_LENS, chunk_tokens=chunk)
    assert out.lengths == [4, 1, 2]
    for got, seq, n in zip(out.split(), SEQS, PROMPT_LENS):
        torch.testing.assert_close(got, hf_response_logprobs(hf, seq, n), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([SEQS[0]])).logits[0].float(), -1)
    ent = -(lp.exp() * lp).sum(-1)[2:6]
    torch.testing.assert_close(out.entropy[:4], ent, atol=1e-5, rtol=1e-5)


def test_gradient_equals_hf(checkpoint):
    hf, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    out = response_logprobs(model, SEQS, PROMPT_LENS, chunk_tokens=2)
    out.logprobs.sum().backward()
    hf.zero_grad()
    sum(hf_response_logprobs_grad(hf, s, n) for s, n in zip(SEQS, PROMPT_LENS)).backward()
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        ours = dict(model.named_parameters())[name].grad
        theirs = dict(hf.named_parameters())[name].grad
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def hf_response_logprobs_grad(hf, seq, n_prompt):
    lp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
    return sum(lp[t - 1, seq[t]] for t in range(n_prompt, len(seq)))


def test_noisy_logprobs_equal_the_engine_sampler_logprobs(checkpoint):
    # The learner reproduces the sampler's perturbed policy exactly (temperature 1, no truncation).
    _, path = checkpoint
    spec = NoiseSpec(seed=7, sigma=0.05)
    llm = LLM(path, dtype="float32", block_size=4)
    prompts = [s[:n] for s, n in zip(SEQS, PROMPT_LENS)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, seed=1, ignore_eos=True),
                        noise=[spec, None, spec], use_tqdm=False)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    noise = [spec, None, spec]
    with torch.no_grad():
        out = response_logprobs(llm.model, seqs, PROMPT_LENS, noise=noise)
    for got, o in zip(out.split(), outs):
        torch.testing.assert_close(got, torch.tensor(o.outputs[0].logprobs), atol=1e-4, rtol=1e-4)
    clean = response_logprobs(llm.model, seqs, PROMPT_LENS)
    assert (clean.split()[0] - out.split()[0]).abs().max() > 1e-4  # the noise is really there


def test_bad_prompt_length_is_rejected(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="prompt length 0"):
        response_logprobs(model, [[1, 2]], [0])


# -- dual-stream log-probs (the learner's pass) --------------------------------------------

SPEC = NoiseSpec(seed=11, sigma=0.05, targets="all")


def perturbed_copy(model, spec):
    """The same model with W + sigma * E materialized in the targeted layers (the oracle)."""
    import copy

    from psnrl.kernels import noise_reference as R
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for module in noisy.modules():
            if isinstance(module, StreamLinear) and module.group in spec.groups:
                module.weight += R.noise(tuple(module.weight.shape), spec.seed, module.key, spec.sigma)
    return noisy


def test_dual_stream_equals_two_separate_forwards(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie: noise it alone
    dual = dual_stream_logprobs(model, SEQS, PROMPT_LENS, SPEC, chunk_tokens=3)
    clean = response_logprobs(model, SEQS, PROMPT_LENS)
    with torch.no_grad():
        noisy = response_logprobs(perturbed_copy(model, SPEC), SEQS, PROMPT_LENS)
    for a, b in ((dual.clean, clean), (dual.noisy, noisy)):
        assert a.lengths == b.lengths
        for name in ("logprobs", "entropy", "self_certainty"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    assert (dual.clean.logprobs - dual.noisy.logprobs).abs().max() > 1e-3  # the noise is really there
    assert dual.clean.logprobs.requires_grad and not dual.noisy.logprobs.requires_grad
    # Gradients: those of the clean forward alone.
    dual.clean.logprobs.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    clean.logprobs.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_dual_stream_without_grad_is_the_same_pass(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    specs = [NoiseSpec(seed=s, sigma=0.05) for s in (1, 2, 1)]  # a seed per sequence
    with_grad = dual_stream_logprobs(model, SEQS, PROMPT_LENS, specs)
    with torch.no_grad():
        without = dual_stream_logprobs(model, SEQS, PROMPT_LENS, specs)
        separate = response_logprobs(model, SEQS, PROMPT_LENS, noise=specs)
    torch.testing.assert_close(without.clean.logprobs, with_grad.clean.logprobs.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(without.noisy.logprobs, with_grad.noisy.logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(without.noisy.logprobs, separate.logprobs, atol=1e-5, rtol=1e-5)
    assert not without.clean.logprobs.requires_grad


def test_dual_stream_noisy_logprobs_equal_the_engine_sampler(checkpoint):
    _, path = checkpoint
    spec = NoiseSpec(seed=3, sigma=0.05)
    llm = LLM(path, dtype="float32", block_size=4)
    prompts = [s[:n] for s, n in zip(SEQS, PROMPT_LENS)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, seed=2, ignore_eos=True), noise=spec,
                        use_tqdm=False)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    with torch.no_grad():
        dual = dual_stream_logprobs(llm.model, seqs, PROMPT_LENS, spec)
    for got, o in zip(dual.noisy.split(), outs):
        torch.testing.assert_close(got, torch.tensor(o.outputs[0].logprobs), atol=1e-4, rtol=1e-4)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_dual_stream_saves_no_more_for_backward_than_the_clean_forward(checkpoint):
    # Memory parity: the noisy stream's activations are never kept for backward.
    _, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    seqs = [list(range(1, 60)), list(range(100, 140))]
    clean = saved_bytes(lambda: response_logprobs(model, seqs, [5, 7]))
    dual = saved_bytes(lambda: dual_stream_logprobs(model, seqs, [5, 7], SPEC))
    naive_two_streams = saved_bytes(lambda: response_logprobs(model, seqs + seqs, [5, 7, 5, 7],
                                                               noise=[None, None, SPEC, SPEC]))
    assert dual <= clean * 1.01, (dual, clean)
    assert naive_two_streams > clean * 1.5  # the test can tell


def test_dual_stream_rejects_missing_noise(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="one NoiseSpec or one per sequence"):
        dual_stream_logprobs(model, SEQS, PROMPT_LENS, [SPEC, None, SPEC])
    with pytest.raises(ValueError, match="one NoiseSpec or one per sequence"):
        dual_stream_logprobs(model, SEQS, PROMPT_LENS, [SPEC])


def test_activation_checkpointing_same_gradients_less_saved(checkpoint):
    _, path = checkpoint
    model = load_model(path, dtype=torch.float32)
    seqs = [list(range(1, 60)), list(range(100, 140))]

    def grads_and_saved():
        model.zero_grad()
        box = {}
        saved = saved_bytes(lambda: box.update(out=dual_stream_logprobs(model, seqs, [5, 7], SPEC)))
        box["out"].clean.logprobs.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    full, full_saved = grads_and_saved()
    model.activation_checkpointing = True
    recomputed, recomputed_saved = grads_and_saved()
    for name in full:
        torch.testing.assert_close(recomputed[name], full[name], atol=1e-6, rtol=1e-5, msg=name)
    assert recomputed_saved < full_saved / 2, (recomputed_saved, full_saved)
