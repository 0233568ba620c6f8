"""psnrl/bench/step.py: rows, ratios, markdown, the random checkpoint's tokenizer, and a CPU smoke run of
the whole bench (the tiny model through PSNTrainer, every mode); the real run on a GPU."""
import json

import pytest
import torch

from psnrl.bench import report
from psnrl.bench import step as bench

HAS_CUDA = torch.cuda.is_available()
SMOKE = ["--models", "tiny", "--dtype", "fp32", "--prompts", "2", "--group-size", "2",
         "--max-tokens", "4", "--warmup", "1", "--iters", "2"]


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # As in test_train_loop: the loop's kernels are tested on their own, the CPU torch paths are fast.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _record(step_s, **times):
    return {"step_s": step_s, "metrics": {**{f"time_{k}": v for k, v in times.items()},
                                          "response_length": 256.0, "rollout_tokens_per_s": 1000.0,
                                          "sigma": 0.004}}


SETUP = {"prompts": 16, "group_size": 8, "rollouts": 128, "prompt_tokens": 145, "max_tokens": 256,
         "micro_batch_tokens": 4096, "mini_batch_prompts": 16, "warmup": 1}


def test_rows_take_medians_and_the_rest_of_the_step_is_other():
    records = [_record(1.0, rollout=0.6, sigma=0.0, reward=0.01, learner=0.3, sync=0.001),
               _record(1.2, rollout=0.7, sigma=0.0, reward=0.01, learner=0.4, sync=0.001),
               _record(1.1, rollout=0.65, sigma=0.0, reward=0.01, learner=0.35, sync=0.001)]
    row = bench.build_row("Qwen2.5-0.5B", "psn", records, peak_bytes=5 << 30, kv_cache_bytes=1 << 30, setup=SETUP)
    assert row["step_ms"] == pytest.approx(1100.0)
    assert row["phases_ms"]["rollout"] == pytest.approx(650.0)
    assert row["phases_ms"]["learner"] == pytest.approx(350.0)
    assert row["phases_ms"]["other"] == pytest.approx(89.0)
    assert row["step_ms_each"] == [1000.0, 1200.0, 1100.0]
    assert row["peak_bytes"] == 5 << 30 and row["target"] == 1.05 and row["iters"] == 3
    # a phase the loop does not report is None, not 0
    older = bench.build_row("m", "plain", [{"step_s": 1.0, "metrics": {"time_rollout": 0.5}}],
                            peak_bytes=None, kv_cache_bytes=None, setup=SETUP)
    assert older["phases_ms"]["sync"] is None and older["phases_ms"]["other"] == pytest.approx(500.0)


def test_ratios_to_plain_and_targets():
    plain = bench.build_row("m", "plain", [_record(1.0, rollout=0.5)], peak_bytes=1, kv_cache_bytes=1, setup=SETUP)
    psn = bench.build_row("m", "psn", [_record(1.04, rollout=0.5)], peak_bytes=1, kv_cache_bytes=1, setup=SETUP)
    var2 = bench.build_row("m", "psn-var2", [_record(1.2, rollout=0.5)], peak_bytes=1, kv_cache_bytes=1,
                           setup=SETUP)
    other = bench.build_row("n", "psn", [_record(1.0, rollout=0.5)], peak_bytes=1, kv_cache_bytes=1, setup=SETUP)
    broken = bench.error_row("n", "plain", RuntimeError("CUDA out of memory"), SETUP)
    rows = bench.add_ratios([plain, psn, var2, other, broken])
    assert [r["over_plain"] for r in rows] == [None, pytest.approx(1.04), pytest.approx(1.2), None, None]
    assert [r["met"] for r in rows] == [None, True, False, None, None]
    assert rows[4]["error"] == "RuntimeError: CUDA out of memory" and rows[4]["step_ms"] is None


def test_markdown_and_report_read_the_rows(tmp_path):
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x", "transformers": "4.x",
            "dtype": "bf16", "sigma": 0.004, "targets": "mlp", "method": "m"}
    rows = [bench.build_row("Qwen2.5-1.5B", mode, [_record(s, rollout=0.6, sigma=0.05 if mode == "psn-var2" else 0.0,
                                                            reward=0.01, learner=0.3, sync=0.0)],
                            peak_bytes=20 << 30, kv_cache_bytes=8 << 30, setup=SETUP)
            for mode, s in (("plain", 1.0), ("psn", 1.03), ("psn-var2", 1.15))]
    rows.append(bench.error_row("Qwen2.5-0.5B", "psn", RuntimeError("boom"), SETUP))
    json_path, md_path = bench.FILES.write(tmp_path, meta, rows)
    assert json_path.name == "step-nvidia-h100-80gb-hbm3.json"
    doc = json.loads(json_path.read_text())
    assert list(doc)[:4] == list(bench.META_KEYS) and len(doc["rows"]) == 4
    for row in doc["rows"]:
        assert set(bench.ROW_KEYS) <= set(row)
    assert set(report.PHASES) <= set(doc["rows"][0]["phases_ms"])
    text = md_path.read_text()
    assert text.startswith("# step on NVIDIA H100 80GB HBM3")
    assert "| psn | 1,030.0 | 600.0 | 0.0 | 10.0 | 300.0 | 0.0 | 120.0 | 20.00 | 8.00 | 256.0 | 1,000 | 1.030 | <= 1.05 met |" in text  # noqa: E501
    assert "| psn-var2 | 1,150.0 | 600.0 | 50.0 |" in text and "1.150 | <= 1.10 missed |" in text
    assert "- Qwen2.5-0.5B psn: RuntimeError: boom" in text
    # psnrl/bench/report.py: its table, its targets
    current = report.load_results(tmp_path, "nvidia-h100-80gb-hbm3")
    table = report.bench_table("step", current["step"])  # the bench's own table, under the model
    assert "### Qwen2.5-1.5B" in table
    assert ("| psn | 1,030.0 | 600.0 | 0.0 | 10.0 | 300.0 | 0.0 | 120.0 | 20.00 | 8.00 | 256.0 | 1,000 "
            "| 1.030 |") in table
    targets = {(t.target, t.ok) for t in report.check_targets(current)}
    assert targets == {("step time PSN/plain <= 1.05", True), ("step time Var-II/plain <= 1.10", False)}


def test_checkpoint_has_a_char_tokenizer_and_unknown_ids_decode_to_nothing(tmp_path):
    from transformers import AutoTokenizer

    path = bench.checkpoint_dir("tiny", "fp32", 0, None, "cpu", tmp_path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert len(tok) < vocab
    ids = tok.encode("7+5=", add_special_tokens=False)
    assert tok.decode(ids + [len(tok), vocab - 1, 151935], skip_special_tokens=True) == "7+5="
    # reused from a cache folder when complete
    cached = bench.checkpoint_dir("tiny", "fp32", 0, str(tmp_path / "cache"), "cpu", tmp_path)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert bench.checkpoint_dir("tiny", "fp32", 0, str(tmp_path / "cache"), "cpu", tmp_path) == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_overrides_build_a_valid_config(tmp_path):
    from psnrl.trainer.config import load_config

    args = bench.parse_args(SMOKE + ["--device", "cpu", "--set", "algo.kl_coef=0"])
    assert args.prompt_tokens == bench.prompt_tokens() > 100 and args.mini_batch_prompts == 2
    path = bench.checkpoint_dir("tiny", "fp32", 0, None, "cpu", tmp_path)
    cfgs = {m: load_config(None, bench.config_overrides(args, path, m, tmp_path / m)) for m in bench.MODES}
    assert not cfgs["plain"].noise.enabled
    assert cfgs["psn"].noise.enabled and cfgs["psn"].noise.scheduler == "fixed"
    assert cfgs["psn-var2"].noise.scheduler == "var2" and cfgs["psn-var2"].noise.embedder == "hidden"
    c = cfgs["psn"]
    assert (c.model.path, c.data.train, c.rollout.max_tokens, c.train.iterations, c.train.sft_warmup_steps,
            c.eval.every, c.checkpoint.every, c.log.tensorboard, c.log.plot, c.algo.kl_coef) == \
        (str(path), "tiny-arith", 4, 3, 0, 0, 0, False, False, 0.0)
    assert c.rollout.max_model_len == args.prompt_tokens + 4


@pytest.mark.parametrize("bad", [["--modes", "fast"], ["--prompts", "3", "--mini-batch-prompts", "2"],
                                 ["--group-size", "1"], ["--set", "noise.bogus=1"], ["--sigma", "0"]])
def test_bad_arguments_are_rejected(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--models", "tiny"] + bad)
    assert e.value.code == 2


def test_registered_as_a_bench():
    from psnrl.trainer.cli import BENCHES

    assert BENCHES["step"] == "psnrl.bench.step"


@pytest.mark.skipif(HAS_CUDA, reason="the no-CUDA message needs a machine without CUDA")
def test_without_cuda_it_says_so(tmp_path, capsys):
    assert bench.main(["--models", "tiny", "--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_CUDA, reason="needs torch to see a CUDA GPU")
def test_cpu_run_with_cuda_visible_says_to_hide_it(tmp_path, capsys):
    assert bench.main(SMOKE + ["--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    assert "CUDA_VISIBLE_DEVICES=" in capsys.readouterr().err


def _check_smoke(out_dir, device_slug):
    doc = json.loads((out_dir / f"step-{device_slug}.json").read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert list(rows) == list(bench.MODES) and not any(r.get("error") for r in rows.values())
    for mode, r in rows.items():
        assert r["model"] == "tiny" and r["iters"] == 2 and len(r["step_ms_each"]) == 2
        ph = r["phases_ms"]
        for phase in ("rollout", "reward", "learner", "sync", "sigma"):
            assert isinstance(ph[phase], float) and ph[phase] >= 0, (mode, phase)
        assert ph["rollout"] > 0 and ph["learner"] > 0
        assert r["step_ms"] >= ph["rollout"] + ph["learner"]
        assert 0 < r["response_length"] <= 4 and r["kv_cache_bytes"] > 0
    assert rows["psn-var2"]["phases_ms"]["sigma"] > 0  # the probes are scored
    assert rows["plain"]["over_plain"] is None and rows["psn"]["over_plain"] > 0
    text = (out_dir / f"step-{device_slug}.md").read_text()
    assert "## tiny" in text and "| psn-var2 |" in text
    return rows


@pytest.mark.skipif(HAS_CUDA, reason="with CUDA visible the trainer runs on the GPU; the gpu test covers it")
def test_cpu_smoke_runs_every_mode_end_to_end(tmp_path):
    assert bench.main(SMOKE + ["--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    rows = _check_smoke(tmp_path, "cpu")
    assert all(r["peak_bytes"] is None for r in rows.values())


@pytest.mark.gpu
def test_gpu_run_of_the_tiny_model(tmp_path):
    from psnrl.bench.common import device_slug

    # A KV cache of a fixed size (room for the rollouts many times over): memory-sized caches of
    # tests running in parallel on one GPU would compete.
    assert bench.main(SMOKE + ["--device", "cuda", "--out-dir", str(tmp_path),
                               "--set", "rollout.num_kv_blocks=64"]) == 0
    rows = _check_smoke(tmp_path, device_slug(torch.cuda.get_device_name()))
    assert all(r["peak_bytes"] > r["kv_cache_bytes"] for r in rows.values())
