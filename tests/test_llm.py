"""The engine end to end on a tiny random checkpoint (CPU, fp32), against transformers."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from tiny_checkpoints import save_tiny_qwen2

from psnrl.engine.llm import LLM, noise_cache_salt
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.engine.sampling import SamplingParams
from psnrl.kernels import noise_reference as R
from psnrl.kernels.noise import param_key

PROMPTS = [[5, 17, 33, 2, 9, 100, 7, 8, 9, 10, 11], [42], [300, 301, 302, 303, 11], [7] * 9,
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    return save_tiny_qwen2(path, vocab=512, hidden=64, inter=96, max_pos=64), path


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make(path, **kw):
    return LLM(path, **{"dtype": "float32", "block_size": 4, **kw})


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 8},  # chunked prefill: prompts span several steps
    {"num_kv_blocks": 16},  # 64 tokens for five sequences: preemption and recompute
    {"max_num_seqs": 2},
], ids=["plain", "chunked-prefill", "preemption", "two-seqs"])
def test_greedy_equals_hf_under_any_batching(checkpoint, options):
    hf, path = checkpoint
    llm = make(path, **options)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
        assert out.outputs[0].finish_reason == "length"
    if "num_kv_blocks" in options:
        assert llm.scheduler.num_preemptions > 0
    assert llm.blocks.num_free_blocks() == llm.num_kv_blocks
    llm.blocks.check_invariants()


def test_a_preempted_sequence_gives_its_sampling_slot_back(checkpoint):
    """Slots (and the decode graphs' table rows, which follow them) stay with running sequences:
    a preempted one takes a slot again when it next samples, and draws the same tokens."""
    _, path = checkpoint
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    expected = make(path).generate(PROMPTS, params, use_tqdm=False)
    llm = make(path, num_kv_blocks=16)
    outs = llm.add_requests(PROMPTS, params)
    waited = 0
    while llm.has_unfinished_requests():
        llm.step()
        sampled = [seq for seq in llm.scheduler.waiting if seq.num_tokens > seq.prompt_len]
        assert all(seq.slot == -1 for seq in sampled)
        waited += len(sampled)
    assert waited > 0 and llm.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]


def test_logprobs_are_those_of_the_sampled_tokens(checkpoint):
    hf, path = checkpoint
    llm = make(path)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=6, seed=3), use_tqdm=False)[0]
    c = out.outputs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0] + c.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(PROMPTS[0])
    expected = [lp[n - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_n_samples_share_the_prompt_and_are_reproducible(checkpoint):
    _, path = checkpoint
    llm = make(path)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=123, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    b = make(path).generate(PROMPTS[:2], params, use_tqdm=False)
    for ra, rb in zip(a, b):
        assert [c.index for c in ra.outputs] == [0, 1, 2, 3]
        assert [c.token_ids for c in ra.outputs] == [c.token_ids for c in rb.outputs]
        assert len({tuple(c.token_ids) for c in ra.outputs}) > 1
    # Sample j alone (seeded like the request) equals sample j of the batch.
    single = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in single.outputs] == [c.token_ids for c in a[0].outputs]
    assert llm.blocks.num_free_blocks() == llm.num_kv_blocks


def test_noisy_and_clean_requests_share_a_batch(checkpoint):
    hf, path = checkpoint
    spec = NoiseSpec(seed=99, sigma=0.05, targets="mlp")
    noisy_hf = Qwen2ForCausalLM(hf.config).eval()
    noisy_hf.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for name, p in noisy_hf.named_parameters():
            if ".mlp." in name:
                p += R.noise(tuple(p.shape), spec.seed, param_key(name), spec.sigma)
    llm = make(path)
    noise = [spec, None, spec, None, None]
    outs = llm.generate(PROMPTS, GREEDY, noise=noise, use_tqdm=False)
    for prompt, out, n in zip(PROMPTS, outs, noise):
        assert out.noise == n
        assert out.outputs[0].token_ids == hf_greedy(noisy_hf if n else hf, prompt, 12)
    assert outs[0].outputs[0].token_ids != hf_greedy(hf, PROMPTS[0], 12)


def test_noisy_requests_never_reuse_kv_of_another_policy(checkpoint):
    # The prefix cache used to key blocks on token ids only: a noisy request whose
    # prompt matched a clean one's decoded on the clean policy's prompt KV.
    _, path = checkpoint
    prompt = PROMPTS[4]  # 20 tokens: 4 cacheable blocks of 4
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    # Noise on q/k/v/o changes the KV (and is the cheapest to run in the Triton interpreter).
    spec = NoiseSpec(seed=7, sigma=0.5, targets="attn")
    other = NoiseSpec(seed=8, sigma=0.5, targets="attn")

    def run(llm, noise):
        outs = llm.generate([prompt] * len(noise), params, noise=noise, use_tqdm=False)
        return [o.outputs[0] for o in outs]

    def same(a, b):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)

    alone = {n: run(make(path), [n])[0] for n in (None, spec, other)}
    assert len({tuple(c.token_ids) for c in alone.values()}) == 3
    # One call: clean first (admitted in the same step), then two noisy policies.
    llm = make(path)
    for out, n in zip(run(llm, [None, spec, other, spec]), [None, spec, other, spec]):
        same(out, alone[n])
    # Clean in one call, noisy in a later one: the cached clean blocks are not hit.
    llm = make(path)
    same(run(llm, [None])[0], alone[None])
    hits = llm.blocks.stats()["prefix_cache_hits"]
    same(run(llm, [spec])[0], alone[spec])
    assert llm.blocks.stats()["prefix_cache_hits"] == hits
    # ... while each policy still hits its own cached prompt.
    same(run(llm, [spec])[0], alone[spec])
    assert llm.blocks.stats()["prefix_cache_hits"] == hits + 16
    same(run(llm, [None])[0], alone[None])
    assert llm.blocks.stats()["prefix_cache_hits"] == hits + 32
    # sigma 0 is the clean policy: it shares the clean blocks.
    same(run(llm, [NoiseSpec(seed=7, sigma=0.0, targets="attn")])[0], alone[None])
    assert llm.blocks.stats()["prefix_cache_hits"] == hits + 48
    # Noise on the lm_head alone leaves K/V clean: it shares the clean blocks, and its
    # tokens are those it gets without any cached prefix.
    head_only = NoiseSpec(seed=7, sigma=0.5, targets="lm_head")
    head_alone = run(make(path), [head_only])[0]
    same(run(llm, [head_only])[0], head_alone)
    assert llm.blocks.stats()["prefix_cache_hits"] == hits + 64
    llm.blocks.check_invariants()


def test_noise_cache_salt_is_a_stable_digest_of_the_spec():
    spec = NoiseSpec(seed=7, sigma=0.5, targets="all")
    salt = noise_cache_salt(spec)
    assert salt == 16051026203305404914  # the same in every process (not hash())
    assert salt == noise_cache_salt(NoiseSpec(seed=7, sigma=0.5, targets=("mlp", "attn", "lm_head")))
    # lm_head noise never reaches K/V: the same KV as without it.
    assert salt == noise_cache_salt(NoiseSpec(seed=7, sigma=0.5, targets=("mlp", "attn")))
    others = [NoiseSpec(seed=8, sigma=0.5, targets="all"), NoiseSpec(seed=7, sigma=0.25, targets="all"),
              NoiseSpec(seed=7, sigma=0.5, targets="mlp"), NoiseSpec(seed=7, sigma=0.5, targets="attn")]
    salts = [noise_cache_salt(s) for s in others]
    assert len(set(salts + [salt])) == 5 and all(0 <= x < 2**64 for x in salts)
    assert noise_cache_salt(None) is None and noise_cache_salt(NoiseSpec(seed=7, sigma=0.0)) is None
    assert noise_cache_salt(NoiseSpec(seed=7, sigma=0.5, targets="lm_head")) is None


def test_bad_requests_finish_with_an_error_and_the_others_run(checkpoint):
    hf, path = checkpoint
    llm = make(path, max_model_len=32)
    outs = llm.generate([[1] * 40, [], [9999], PROMPTS[1]], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].finish_reason.startswith("error: prompt of 40 tokens")
    assert outs[1].outputs[0].finish_reason == "error: empty prompt"
    assert outs[2].outputs[0].finish_reason.startswith("error: prompt token ids")
    assert outs[3].outputs[0].token_ids == hf_greedy(hf, PROMPTS[1], 12)


def test_stop_tokens_and_max_model_len(checkpoint):
    _, path = checkpoint
    llm = make(path, max_model_len=16)
    first = llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[first[2]])
    out = llm.generate([PROMPTS[1]], stop, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop"
    long = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(PROMPTS[0]) + len(long.token_ids) == 16 and long.finish_reason == "length"


def test_update_weights_in_place(checkpoint):
    hf, path = checkpoint
    llm = make(path)
    before = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    torch.manual_seed(5)
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items() if k.endswith("weight")}
    other = Qwen2ForCausalLM(hf.config).eval()
    other.load_state_dict({**state, **new})
    llm.update_weights((k, v) for k, v in new.items() if k in dict(llm.model.named_parameters()))
    after = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert after == hf_greedy(other, PROMPTS[0], 12) and after != before
    with pytest.raises(ValueError, match="no parameter named"):
        llm.update_weights([("model.nope.weight", torch.zeros(1))])


def test_engine_options_are_checked(checkpoint):
    _, path = checkpoint
    with pytest.raises(ValueError, match="unknown LLM options"):
        LLM(path, max_len=5)
    with pytest.raises(ValueError, match="less than one sequence of max_model_len=64"):
        make(path, num_kv_blocks=3)
    with pytest.raises(ValueError, match="block_size"):
        make(path, block_size=6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make(path, max_model_len=1000)
    with pytest.raises(ValueError, match="no tokenizer"):
        make(path).generate("hello", GREEDY)


def test_text_prompts_and_stop_strings(tmp_path):
    from psnrl.trainer.tiny import build_checkpoint
    llm = make(build_checkpoint(tmp_path / "tiny"))
    free = llm.generate(["1+2="], SamplingParams(max_tokens=8, seed=4, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert free.prompt == "1+2=" and free.prompt_token_ids == llm.tokenizer.encode("1+2=", add_special_tokens=False)
    assert text == llm.tokenizer.decode(free.outputs[0].token_ids, skip_special_tokens=True)
    stop_char = next(ch for ch in text[1:] if ch.strip())  # a character the free run produces
    stopped = llm.generate(["1+2="], SamplingParams(max_tokens=8, seed=4, ignore_eos=True, stop=[stop_char]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:text.index(stop_char)]


def test_step_by_step_equals_generate_and_requests_can_join_mid_run(checkpoint):
    """The public step API: add_requests, step() until has_unfinished_requests() is False.
    Requests added while others decode (continuous batching from the caller's side) get the
    tokens they would get alone; each RequestOutput is complete when it reports finished."""
    _, path = checkpoint
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)
    spec = NoiseSpec(seed=7, sigma=0.05)
    alone = [make(path).generate([p], sampled, noise=spec if i % 2 else None, use_tqdm=False)[0]
             for i, p in enumerate(PROMPTS)]
    llm = make(path)
    first = llm.add_requests(PROMPTS[:2], sampled, noise=[None, spec])
    kinds, finished = [], []
    while llm.has_unfinished_requests():
        out = llm.step()
        kinds.append((out.num_seqs, out.decode))
        finished += out.finished
        if len(kinds) == 3:  # two requests are decoding: three more join
            later = llm.add_requests(PROMPTS[2:], sampled, noise=[None, spec, None])
    assert kinds[0] == (2, False) and kinds[1] == (4, True)  # prefill, then both forks decode
    assert any(not decode for _, decode in kinds[3:])  # the newcomers' prefill, mixed into the run
    outs = first + later
    assert all(o.finished for o in outs) and sorted(o.request_id for o in finished) == sorted(
        o.request_id for o in outs)
    for out, want in zip(outs, alone):
        assert [c.index for c in out.outputs] == [0, 1]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in want.outputs]
    assert llm.blocks.num_free_blocks() == llm.num_kv_blocks


def test_reset_prefix_cache_forgets_cached_prompts(checkpoint):
    _, path = checkpoint
    for reset, computed in ((False, 3), (True, len(PROMPTS[0]))):  # 11 tokens: 2 full blocks of 4 cached
        llm = make(path)
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        if reset:
            llm.reset_prefix_cache()
        llm.add_requests(PROMPTS[:1], GREEDY)
        assert llm.scheduler.schedule().num_new[0] == computed


def test_time_steps_splits_a_step_into_forward_and_sampler(checkpoint):
    _, path = checkpoint
    llm = make(path, time_steps=True)
    llm.add_requests(PROMPTS[:2], GREEDY)
    outs = []
    while llm.has_unfinished_requests():
        outs.append(llm.step())
    assert all(o.forward_ms > 0 and o.sample_ms > 0 for o in outs if o.num_seqs)
    plain = make(path)
    plain.add_requests(PROMPTS[:1], GREEDY)
    out = plain.step()
    assert out.forward_ms is None and out.sample_ms is None  # off by default: no events recorded


def test_the_fused_sampler_takes_the_engines_inputs_and_draws_the_same_tokens(checkpoint, monkeypatch):
    """The engine feeds psnrl/kernels/sampler.py (run here by Triton's interpreter) what it feeds
    the torch sampler: the same tokens, log-probs within 1e-5, for greedy, sampled and truncated rows,
    and rows whose stop tokens are barred."""
    from psnrl.kernels import sampler as kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = kernel.sample_rows
    monkeypatch.setattr(kernel, "sample_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, path = checkpoint
    params = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, max_tokens=4, ignore_eos=True, seed=5),
              SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=4, ignore_eos=True, seed=6,
                             min_tokens=3, stop_token_ids=[1, 2, 3])]
    runs = []
    for fused in (False, True):
        llm = make(path)
        llm.sampler.fused = fused
        runs.append(llm.generate(PROMPTS[:3], params, noise=[None, NoiseSpec(seed=3, sigma=0.05), None],
                                 use_tqdm=False))
    assert len(calls) == 4  # every step of the fused run, none of the torch run
    for torch_out, fused_out in zip(*runs):
        for a, b in zip(torch_out.outputs, fused_out.outputs):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)
