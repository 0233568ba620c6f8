"""The learner: global loss normalization over micro-batches and ranks, FSDP2 (2 processes,
gloo) equal to one process, perturbed log-probs under sharding, weight sync to the engine."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from psnrl.engine.loader import load_model
from learner_case import ROWS_PER_STEP, loss_config, model_inputs, rows_of
from psnrl.trainer.learner import Learner, sync_weights
from psnrl.trainer.logprobs import dual_stream_logprobs, response_logprobs

HERE = Path(__file__).parent


def compared(named_params):
    """Parameters to compare after an Adam step. A key bias has zero true gradient (softmax
    ignores a shift shared by all keys); Adam scales its rounding noise up to lr-sized steps."""
    return [(n, p) for n, p in named_params if not n.endswith("k_proj.bias")]


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels are tested on their own


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("learner-ckpt")
    hf.save_pretrained(path)
    return path


def one_process_update(ckpt, micro_batch_tokens=24, noisy_logprobs="learner", grads=None):
    """The reference: all 8 rows in one process. ``grads`` collects each step's gradients."""
    model = load_model(ckpt, dtype=torch.float32)
    learner = Learner(model, loss_config(), lr=1e-2, micro_batch_tokens=micro_batch_tokens,
                      noisy_logprobs=noisy_logprobs)
    if grads is not None:
        step = learner.optimizer.step

        def recording_step():
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            step()
        learner.optimizer.step = recording_step
    stats = learner.update(rows_of(list(range(8))), ROWS_PER_STEP)
    return model, stats


def test_micro_batch_size_does_not_change_the_update(ckpt):
    small_grads, big_grads = [], []
    _, s1 = one_process_update(ckpt, micro_batch_tokens=1, grads=small_grads)  # a sequence per micro-batch
    _, s2 = one_process_update(ckpt, micro_batch_tokens=10_000, grads=big_grads)
    assert len(small_grads) == len(big_grads) == 2
    for a, b in zip(small_grads, big_grads):  # gradients after clipping, at each optimizer step
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-7, rtol=1e-4, msg=name)
    assert s1["kl_noisy_clean"] == pytest.approx(s2["kl_noisy_clean"], abs=1e-6)
    assert s1["tis_weight_mean"] == pytest.approx(s2["tis_weight_mean"], abs=1e-6)


def test_tis_denominator_source(ckpt):
    _, learner_stats = one_process_update(ckpt)
    _, sampler_stats = one_process_update(ckpt, noisy_logprobs="sampler")
    seqs, plens, spec = model_inputs()
    with torch.no_grad():
        noisy = dual_stream_logprobs(load_model(ckpt, dtype=torch.float32), seqs, plens, spec).noisy.split()
    sampler = rows_of(list(range(8))).sampler_logprobs
    gap = torch.cat([(s - n).abs() for s, n in zip(sampler, noisy)]).mean().item()
    assert learner_stats["sampler_logprob_gap"] == pytest.approx(gap, rel=1e-5)
    assert "sampler_logprob_gap" not in sampler_stats
    assert learner_stats["tis_weight_mean"] != pytest.approx(sampler_stats["tis_weight_mean"], abs=1e-3)


def test_bad_arguments_and_mixed_rows(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    with pytest.raises(ValueError, match="noisy_logprobs"):
        Learner(model, loss_config(), lr=1e-3, micro_batch_tokens=8, noisy_logprobs="engine")
    learner = Learner(model, loss_config(), lr=1e-3, micro_batch_tokens=8)
    rows = rows_of([0, 1])
    rows.noise[1] = None
    with pytest.raises(ValueError, match="mix clean and perturbed"):
        learner.update(rows, 2)
    other = load_model(ckpt, dtype=torch.float32)
    other.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="only in engine"):
        sync_weights(model, other)


def test_fsdp_two_processes_equal_one(ckpt, tmp_path):
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "dist" / "fsdp_worker.py"), str(ckpt), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    model, stats = one_process_update(ckpt)
    # The noise each shard's forward uses is the unsharded weight's.
    seqs, plens, spec = model_inputs()
    with torch.no_grad():
        noisy = dual_stream_logprobs(load_model(ckpt, dtype=torch.float32), seqs, plens, spec).noisy.logprobs
    torch.testing.assert_close(got["noisy"], noisy, atol=1e-6, rtol=1e-6)
    # One step on two ranks equals the step on one process.
    for name, p in compared(model.named_parameters()):
        # 1% of an lr step: Adam turns rounding noise in near-zero gradients into visible steps.
        torch.testing.assert_close(got["weights"][name], p.detach(), atol=1e-4, rtol=1e-5, msg=name)
    for key in ("kl_noisy_clean", "tis_weight_mean", "entropy", "grad_norm"):
        assert got["stats"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key
    # After the sync, the engine's copy computes what the learner computes.
    torch.testing.assert_close(got["engine_lp"], got["learner_lp"], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(got["learner_lp"], response_logprobs(model, seqs, plens).logprobs,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("noisy_logprobs", ["learner", "sampler"])
def test_update_on_cuda_matches_cpu(ckpt, noisy_logprobs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(ckpt, dtype=torch.float32, device=device)
        learner = Learner(model, loss_config(), lr=1e-2, micro_batch_tokens=24, noisy_logprobs=noisy_logprobs)
        results[device] = learner.update(rows_of(list(range(8))), ROWS_PER_STEP)
    for key in ("kl_noisy_clean", "tis_weight_mean", "entropy"):
        assert results["cuda"][key] == pytest.approx(results["cpu"][key], rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("noisy_logprobs", ["learner", "sampler"])
@pytest.mark.parametrize("rows_per_step", [8, ROWS_PER_STEP], ids=["one-step", "two-steps"])
def test_update_creates_no_tensor_on_the_default_device(ckpt, noisy_logprobs, rows_per_step):
    """Every tensor of the learner step names its device: with the default device set to
    `meta`, a tensor made without one lands there and the first op that meets the model's
    (CPU) tensors or reads it on the host fails, as it would meet CUDA tensors on a GPU
    (the class of bug that crashed the learner bench's psn mode). The step must run and give
    the same update as without the meta default."""
    def update(default_meta: bool):
        torch.manual_seed(0)
        model = load_model(ckpt, dtype=torch.float32)
        learner = Learner(model, loss_config(), lr=1e-2, micro_batch_tokens=24, noisy_logprobs=noisy_logprobs)
        rows = rows_of(list(range(8)))
        if default_meta:
            with torch.device("meta"):
                stats = learner.update(rows, rows_per_step)
        else:
            stats = learner.update(rows, rows_per_step)
        return model, stats

    model, stats = update(True)
    want_model, want_stats = update(False)
    assert stats == pytest.approx(want_stats, rel=1e-6, nan_ok=True)
    for (name, p), (_, q) in zip(model.named_parameters(), want_model.named_parameters()):
        assert p.device.type == "cpu" and torch.equal(p, q), name
