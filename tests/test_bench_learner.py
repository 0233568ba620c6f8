"""psnrl/bench/learner.py: the CPU smoke run of every mode end to end (rows, JSON, markdown, the
saved-for-backward proxy, the engine/learner mismatch), the naive perturbed copy, no-CUDA exit."""
import json

import pytest
import torch

from psnrl.bench import learner as bench
from psnrl.bench import naive_psn, saved_tensors
from psnrl.bench import report
from psnrl.engine.noise_spec import NoiseSpec
from psnrl.trainer.cli import BENCHES


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # The kernels are tested on their own; the CPU torch paths keep the smoke run fast.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


SMOKE = ["--device", "cpu", "--models", "tiny", "--seq-lens", "16", "32", "--seqs", "3", "--prompt-len", "6",
         "--warmup", "1", "--iters", "1", "--mismatch-prompts", "2", "--mismatch-prompt-len", "6",
         "--mismatch-tokens", "12"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("learner")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        rc = bench.main(SMOKE + ["--out-dir", str(out)])
    return rc, out


def test_registered_as_a_bench():
    assert BENCHES["learner"] == "psnrl.bench.learner"


def test_cpu_smoke_run_writes_every_mode(smoke):
    rc, out = smoke
    assert rc == 0
    doc = json.loads((out / "learner-cpu.json").read_text())
    assert list(doc)[:3] == ["device", "torch", "triton"] and doc["device"] == "cpu"
    assert {"rows", "mismatch"} <= set(doc)
    rows = doc["rows"]
    assert [(r["model"], r["activation_checkpointing"], r["tokens"], r["mode"]) for r in rows] == [
        ("tiny", ckpt, t, m) for ckpt in (False, True) for t in (48, 96) for m in ("plain", "psn", "naive")]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r) and "error" not in r
        assert r["peak_bytes"] is None and r["over_plain_mem"] is None  # no CUDA peak on a CPU
        assert r["step_ms"] > 0 and r["saved_bytes"] > 0 and r["seqs"] == 3 and r["prompt_len"] == 6
    by = {(r["activation_checkpointing"], r["tokens"], r["mode"]): r for r in rows}
    for ckpt, tokens in [(c, t) for c in (False, True) for t in (48, 96)]:
        plain, psn, naive = (by[(ckpt, tokens, m)] for m in ("plain", "psn", "naive"))
        assert plain["over_plain_time"] == 1.0 and plain["over_plain_saved"] == 1.0
        # The dual stream keeps nothing of the noisy stream for backward ...
        assert psn["saved_bytes"] <= 1.02 * plain["saved_bytes"]
        assert psn["weight_copy_bytes"] == 0
        # ... the naive step holds a perturbed copy of the MLP weights on top of plain's activations.
        assert naive["saved_bytes"] > plain["saved_bytes"]
        assert naive["weight_copy_bytes"] == 2 * 3 * 64 * 128 * 4  # tiny: 2 layers x gate/up/down, fp32
        assert psn["over_plain_time"] == pytest.approx(psn["step_ms"] / plain["step_ms"], rel=1e-3)
        # The per-tensor account adds up to the saved-bytes difference.
        assert plain["extra_saved_tensors"] is None
        assert sum(e["bytes"] for e in psn["extra_saved_tensors"]) == psn["saved_bytes"] - plain["saved_bytes"]
        assert sum(e["bytes"] for e in plain["saved_tensors"].values()) == plain["saved_bytes"]
    for tokens in (48, 96):  # recomputing each layer in backward saves less
        assert by[(True, tokens, "plain")]["saved_bytes"] < by[(False, tokens, "plain")]["saved_bytes"]


def test_extra_saved_tensors_is_a_per_label_difference():
    plain = {"fp32[4x8]": {"count": 2, "bytes": 256}, "fp32[4]": {"count": 1, "bytes": 16}}
    psn = {"fp32[4x8]": {"count": 3, "bytes": 384}, "fp32[4]": {"count": 1, "bytes": 16},
           "bf16[4x2]": {"count": 1, "bytes": 16}}
    assert saved_tensors.extra_saved_tensors(psn, plain) == [{"tensor": "fp32[4x8]", "count": 1, "bytes": 128},
                                                     {"tensor": "bf16[4x2]", "count": 1, "bytes": 16}]
    assert saved_tensors.extra_saved_tensors(plain, plain) == []


def test_the_probe_names_each_saved_storage_once():
    model = torch.nn.Linear(8, 4)
    probe = saved_tensors.SavedTensorProbe(model)
    x = torch.randn(5, 8, requires_grad=True)
    with probe.micro_batch():
        h = model(x)  # saves x (the weight is a parameter: excluded)
        (h.relu() * h).sum().backward()  # relu saves its output; mul saves h and relu(h)
    assert probe.tensors[0] == {"fp32[5x8]": {"count": 1, "bytes": 160}, "fp32[5x4]": {"count": 2, "bytes": 160}}
    assert probe.per_micro_batch == [320]


def test_mismatch_figures(smoke):
    _, out = smoke
    m = json.loads((out / "learner-cpu.json").read_text())["mismatch"]
    assert m["model"] == "tiny" and m["tokens"] == 2 * 12 and m["sigma"] == 0.004
    for name in ("engine_vs_learner", "noisy_vs_clean", "naive_vs_learner"):
        assert m[f"{name}_mean"] <= m[f"{name}_p99"] <= m[f"{name}_max"]
    # fp32: the engine and the learner agree far below the size of the perturbation itself.
    assert m["engine_vs_learner_max"] < 1e-4
    assert m["noisy_vs_clean_mean"] > 100 * m["engine_vs_learner_mean"]
    assert m["naive_vs_learner_max"] < 1e-4
    assert m["engine_vs_learner_over_effect"] < 0.01


def test_markdown_and_report(smoke):
    _, out = smoke
    md = (out / "learner-cpu.md").read_text()
    assert md.startswith("# learner on cpu")
    assert "| tiny | 48 | off | psn | — |" in md and "| tiny | 48 | on | psn | — |" in md
    assert "## What PSN saves for backward that plain does not" in md
    assert "## Engine vs learner mismatch" in md and "PSN effect" in md
    assert "step time PSN/plain" in md
    # psnrl/bench/report.py reads the file: its table and the mismatch line.
    text = report.bench_table("learner", report.load_results(out, "cpu")["learner"])
    assert "| tiny | 48 | off | psn | — |" in text
    assert "### Engine vs learner mismatch" in text and "tiny, fp32," in text


def test_perturbed_copy_shares_all_but_the_targeted_weights(tmp_path):
    from psnrl.bench import model_configs
    from psnrl.engine.loader import load_model
    from psnrl.kernels import noise_reference as R

    model = load_model(model_configs.write_random_checkpoint("tiny", tmp_path, dtype=torch.float32))
    spec = NoiseSpec(7, 0.01, "mlp")
    noisy, copied = naive_psn.perturbed_copy(model, spec)
    mine, theirs = dict(model.named_parameters()), dict(noisy.named_parameters())
    assert set(mine) == set(theirs)
    mlp = [n for n in mine if ".mlp." in n]
    assert len(mlp) == 6 and copied == sum(mine[n].numel() * 4 for n in mlp)
    for name, p in mine.items():
        if name in mlp:
            layer = model.get_submodule(name.removesuffix(".weight"))
            expect = p + R.noise(tuple(p.shape), spec.seed, layer.key, spec.sigma)
            assert theirs[name] is not p and not theirs[name].requires_grad
            assert torch.equal(theirs[name], expect)
        else:
            assert theirs[name] is p  # shared, not copied
    assert noisy.rope.cos is model.rope.cos
    # A tied lm_head that is targeted gets its own copy; the embedding stays clean and shared.
    noisy, copied = naive_psn.perturbed_copy(model, NoiseSpec(7, 0.01, "lm_head"))
    assert noisy.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert noisy.lm_head.weight is not model.lm_head.weight
    assert not torch.equal(noisy.lm_head.weight, model.lm_head.weight)
    assert copied == model.lm_head.weight.numel() * 4


def test_no_cuda_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--models", "0.5B"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--modes", "fast"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--seq-lens", "8", "--prompt-len", "8"])
    args = bench.parse_args(["--models", "1.5b,7B"])
    assert args.models == ["Qwen2.5-1.5B", "Qwen2.5-7B"] and args.seq_lens == [512, 1024]
    assert args.seqs == 16 and args.prompt_len == 256 and args.dtype == "bf16"
    assert args.spec == NoiseSpec(bench.NOISE_SEED, 0.004, "mlp")
    assert args.checkpointing == (False, True)
    assert bench.parse_args(["--activation-checkpointing", "on"]).checkpointing == (True,)
    with pytest.raises(SystemExit):
        bench.parse_args(["--activation-checkpointing", "sometimes"])
