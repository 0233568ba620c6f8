"""psnrl/bench/report.py and psnrl/bench/all.py on the CPU: tables, targets, regressions, charts, missing files."""
import json
import shutil
import subprocess
import types
from pathlib import Path

import pytest

from psnrl.bench import all as bench_all
from psnrl.bench import report

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
SLUG = "nvidia-h100-80gb-hbm3"
PNG = b"\x89PNG\r\n\x1a\n"


def load(where: str) -> dict:
    return report.load_results(FIXTURES / where, SLUG)


def summary(tmp_path, **kw):
    kw.setdefault("baseline_dir", FIXTURES / "baseline")
    path, regressions = report.write_summary(FIXTURES / "current", SLUG, out_dir=tmp_path, **kw)
    return path.read_text(), regressions


def test_markdown_tables_hold_the_figures(tmp_path):
    text, _ = summary(tmp_path)
    assert text.startswith("# Benchmark summary: NVIDIA H100 80GB HBM3")
    # Each section is the bench's own tables (psnrl/bench/<bench>.py render_tables).
    # noisy GEMM: times and the noisy/cuBLAS ratio, extra bytes; a missing field prints as a dash
    assert ("| Qwen2.5-1.5B/gate_up | 256 | 17920 | 1536 | 30.0 | 29.4 | 34.5 | 34.5 | — | 135.0 | 1.150 | 1.000 "
            "| — | 0 |") in text
    assert ("| Qwen2.5-1.5B/down | 4096 | 1536 | 8960 | 260.0 | 254.8 | 351.0 | — | — | 1170.0 | 1.350 | — | — "
            "| 0 |") in text
    # decode, per model and lengths, the modes side by side: tokens/s, ms/step, ours over HF, noisy over
    # clean, GB/s (a row without gbps: a dash), the roofline
    assert "### Qwen2.5-1.5B, prompt 128, output 256" in text
    assert "| 32 | 3,900 | 3,800 | 900 | 8.10 | 8.30 | 35.00 | 4.33 | 4.22 | 0.974 | 520.0 | — | 120.0 |" in text
    assert "| 1 | 105 | 104 | 9.40 | 9.50 | 0.991 | 1,625.0 | 1,608.0 | 48.5% | 48.0% |" in text
    # learner: peak MiB (20.20 GiB) and the ratios to plain; the mismatch figures
    assert "| Qwen2.5-1.5B | 8192 | off | psn | 20,684.8 | 930.0 | 1.010 | 1.094 |" in text  # an old file: off
    assert "loss_rel_diff = 1.2e-06" in text
    # step: the phases (rollout, sigma, reward, learner, sync, other), peak GiB, over plain
    assert ("### Qwen2.5-1.5B\n\n| mode |" in text and
            "| psn-var2 | 11,500.0 | 8,300.0 | — | 300.0 | 2,800.0 | 100.0 | — | 30.50 | — | — | — | 1.150 |" in text)


def test_targets_met_and_missed(tmp_path):
    text, _ = summary(tmp_path)
    assert "- **met** (noisy_gemm): noisy/cuBLAS <= 1.50 at M <= 256 (4 checked)" in text
    assert "- **missed** (noisy_gemm): noisy/cuBLAS <= 1.30 at M >= 4096: 2 of 2 " \
           "(Qwen2.5-1.5B/gate_up M=4096: 1.400; Qwen2.5-1.5B/down M=4096: 1.350)" in text
    assert "- **met** (learner): peak memory PSN/plain <= 1.02 (1 checked)" in text
    assert "- **met** (learner): step time PSN/plain <= 1.15 (1 checked)" in text
    assert "- **met** (step): step time PSN/plain <= 1.05 (1 checked)" in text
    assert "- **missed** (step): step time Var-II/plain <= 1.10: 1 of 1 (Qwen2.5-1.5B: 1.150)" in text
    # decode: noise within 10% of clean, ours vs HF at batch 256, the 7B batch-1 roofline (at least)
    assert "- **missed** (decode): noisy/clean tok/s >= 0.90: 1 of 4 (Qwen2.5-1.5B fixed batch 256: 0.792)" in text
    assert "- **missed** (decode): batch 256: ours/HF tok/s >= 20: 1 of 2 (Qwen2.5-1.5B noisy: 19.000)" in text
    assert ("- **missed** (decode): batch-1 Qwen2.5-7B decode >= 70% of peak HBM bandwidth: 2 of 2 "
            "(Qwen2.5-7B clean: 0.485; Qwen2.5-7B noisy: 0.480)") in text
    assert report.Target("decode", "t", "w", 0.9, 0.9, at_least=True).ok
    assert not report.Target("decode", "t", "w", None, 0.9, at_least=True).ok


def test_regressions_over_ten_percent_are_flagged_and_smaller_changes_not(tmp_path):
    text, regressions = summary(tmp_path)
    flagged = {(c.bench, c.row, c.metric) for c in regressions}
    assert flagged == {
        ("noisy_gemm", "Qwen2.5-1.5B/gate_up M=256", "noisy_us"),  # 29 -> 34.5 us: +19%
        ("noisy_gemm", "Qwen2.5-1.5B/gate_up M=256", "noisy_over_cublas"),
        ("decode", "Qwen2.5-1.5B batch 32 prompt 128 output 256 noisy", "tok_s"),  # 4500 -> 3800: -15.6%
    }
    assert "**3 regression(s) over 10%:**" in text
    assert "| noisy_gemm | Qwen2.5-1.5B/gate_up M=256 | noisy_us | 29 | 34.5 | +19.0% | **REGRESSION** |" in text
    assert "| tok_s | 4500 | 3800 | -15.6% | **REGRESSION** |" in text
    # under 10%: gate_up M=1 +3%, step psn +7.2% (rollout +9.0%), decode batch 1 clean -3.2%
    changes = report.compare(load("current"), load("baseline"))
    by = {(c.bench, c.row, c.metric): c for c in changes}
    for key, expected in [(("noisy_gemm", "Qwen2.5-1.5B/gate_up M=1", "noisy_us"), 0.03),
                          (("step", "Qwen2.5-1.5B psn", "step_ms"), 10400 / 9700 - 1),
                          (("step", "Qwen2.5-1.5B psn", "rollout_ms"), 7300 / 6700 - 1),
                          (("decode", "Qwen2.5-1.5B batch 1 prompt 128 output 256 clean", "tok_s"),
                           150 / 155 - 1)]:
        assert by[key].change == pytest.approx(expected)
        assert not by[key].regression
    # a row with no baseline (psn-var2) is not compared
    assert not any(c.row == "Qwen2.5-1.5B psn-var2" for c in changes)


def test_threshold_edges_and_direction():
    def change(base, cur, better):
        return report.Change("x", "r", "m", base, cur, better)

    assert not change(100.0, 109.0, report.LOWER).regression
    assert change(100.0, 111.0, report.LOWER).regression
    assert not change(100.0, 91.0, report.HIGHER).regression
    assert change(100.0, 89.0, report.HIGHER).regression
    assert change(100.0, 89.0, report.LOWER).improvement
    assert change(100.0, None, report.LOWER).regression  # measured before, an error now
    assert not change(100.0, 111.0, report.LOWER).improvement


def test_error_rows_that_used_to_work_are_regressions():
    current = {"noisy_gemm": {"rows": [{"shape": "s", "M": 1, "noisy_us": None, "error": "OutOfMemoryError"}]}}
    baseline = {"noisy_gemm": {"rows": [{"shape": "s", "M": 1, "noisy_us": 10.0, "noisy_over_cublas": 1.0}]}}
    changes = report.compare(current, baseline)
    assert {c.metric for c in changes if c.regression} == {"noisy_us", "noisy_over_cublas"}


def test_pngs_are_written_and_linked(tmp_path):
    text, _ = summary(tmp_path)
    fig_dir = tmp_path / f"summary-{SLUG}"
    names = {p.name for p in fig_dir.glob("*.png")}
    assert names == {"noisy_gemm_ratio.png", "decode_qwen2-5-1-5b.png", "decode_qwen2-5-7b.png", "learner_memory.png",
                     "step_phases.png"}
    for name in names:
        assert (fig_dir / name).read_bytes()[:8] == PNG
        assert f"(summary-{SLUG}/{name})" in text


def test_lm_head_chart_and_table(tmp_path):
    doc = {"device": "NVIDIA H100 80GB HBM3", "rows": [
        {"tokens": 8192, "vocab": 151936, "hidden": 1536, "impl": "fused", "peak_bytes": 64 << 20, "ms": 4.25},
        {"tokens": 8192, "vocab": 151936, "hidden": 1536, "impl": "torch", "peak_bytes": 4980 << 20, "ms": 9.5},
        {"tokens": 8192, "vocab": 151936, "hidden": 1536, "impl": "chunked"}]}
    (tmp_path / f"lm_head_logprob-{SLUG}.json").write_text(json.dumps(doc))
    path, _ = report.write_summary(tmp_path, SLUG, git_rev=None)
    text = path.read_text()
    assert "| 8192 | 151936 | 1536 | fused | 4.25 | 64.0 |" in text
    assert "| 8192 | 151936 | 1536 | chunked | — | — |" in text
    assert (tmp_path / f"summary-{SLUG}" / "lm_head_memory.png").read_bytes()[:8] == PNG


def test_missing_and_broken_files_are_tolerated(tmp_path):
    (tmp_path / f"decode-{SLUG}.json").write_text("{not json")
    (tmp_path / f"step-{SLUG}.json").write_text(json.dumps({"rows": [{"model": "m", "mode": "plain"}]}))
    path, regressions = report.write_summary(tmp_path, SLUG, baseline_dir=tmp_path / "nowhere")
    text = path.read_text()
    assert regressions == []
    assert "Missing results" in text and f"noisy_gemm (`noisy_gemm-{SLUG}.json`)" in text
    assert f"decode-{SLUG}.json: not valid JSON" in text
    assert "No baseline" in text
    assert "### m" in text and "| plain | " + " | ".join(["—"] * 13) + " |" in text  # no step_ms: no ratio to itself
    assert "1.000" not in text
    # nothing at all
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report.write_summary(empty, SLUG)[0].read_text()
    assert "No target could be checked" in text


def test_baseline_from_the_committed_files(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    base = json.loads((FIXTURES / "baseline" / f"decode-{SLUG}.json").read_text())
    (results / f"decode-{SLUG}.json").write_text(json.dumps(base))

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "results")
    shutil.copy(FIXTURES / "current" / f"decode-{SLUG}.json", results / f"decode-{SLUG}.json")
    path, regressions = report.write_summary(results, SLUG)
    assert [c.row for c in regressions] == ["Qwen2.5-1.5B batch 32 prompt 128 output 256 noisy"]
    assert "Baseline: the files committed at HEAD" in path.read_text()


def test_result_slugs_and_device_choice(tmp_path):
    assert report.result_slugs(FIXTURES / "current") == {SLUG}
    assert bench_all.pick_slug(None, FIXTURES / "current", None) == SLUG
    assert bench_all.pick_slug("NVIDIA H200", FIXTURES / "current", None) == "nvidia-h200"
    assert bench_all.pick_slug(None, FIXTURES / "current", "NVIDIA H100 80GB HBM3") == SLUG
    with pytest.raises(LookupError, match="no result files"):
        bench_all.pick_slug(None, tmp_path, None)


def test_all_reports_missing_and_failed_benches_without_stopping(monkeypatch):
    calls = []

    def runner(cmd, cwd=None, timeout=None):
        calls.append(cmd)
        return types.SimpleNamespace(returncode=1 if cmd[4] == "noisy-gemm" else 0)

    monkeypatch.setattr(bench_all, "module_exists", lambda module: module != "psnrl.bench.gone")
    benches = {"noisy-gemm": "psnrl.bench.noisy_gemm", "decode": "psnrl.bench.decode", "step": "psnrl.bench.gone",
               "lm-head-logprob": "psnrl.bench.lm_head"}
    status = bench_all.run_benches(list(bench_all.GPU_BENCHES), benches, {"decode": ["--batches", "1"]},
                                   runner=runner)
    assert [(s["bench"], s["status"]) for s in status] == [
        ("noisy-gemm", "failed"), ("decode", "ok"), ("learner", "missing"), ("step", "missing"),
        ("lm-head", "ok")]
    assert [c[4:] for c in calls] == [["noisy-gemm"], ["decode", "--batches", "1"], ["lm-head-logprob"]]


def test_all_without_a_gpu_builds_the_summary_from_existing_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_all, "_cuda_name", lambda: None)
    results = tmp_path / "results"
    shutil.copytree(FIXTURES / "current", results)
    rc = bench_all.main(["--results-dir", str(results), "--baseline", str(FIXTURES / "baseline")])
    assert rc == 0
    out = capsys.readouterr()
    assert "no CUDA GPU here" in out.err
    assert "REGRESSION decode Qwen2.5-1.5B batch 32 prompt 128 output 256 noisy tok_s" in out.out
    text = (results / f"summary-{SLUG}.md").read_text()
    assert "| noisy-gemm | skipped |" in text
    assert bench_all.main(["--results-dir", str(results), "--baseline", str(FIXTURES / "baseline"),
                           "--no-run", "--fail-on-regression", "--no-charts"]) == 1
    assert bench_all.main(["--results-dir", str(tmp_path / "nothing"), "--no-run"]) == 1


def test_all_is_registered_in_the_cli():
    from psnrl.trainer.cli import BENCHES
    assert BENCHES["all"] == "psnrl.bench.all"


def test_lm_head_wide_rows_of_the_bench_are_read_per_impl(tmp_path):
    doc = {"device": "NVIDIA H100 80GB HBM3", "rows": [
        {"T": 8192, "V": 151936, "H": 1536, "ours_ms": 5.5, "naive_ms": 11.0, "ours_peak_bytes": 96 << 20,
         "naive_peak_bytes": 5120 << 20, "grad_bytes": 0, "ours_over_naive_time": 0.5}]}
    (tmp_path / f"lm_head_logprob-{SLUG}.json").write_text(json.dumps(doc))
    rows = report.load_results(tmp_path, SLUG)["lm_head"]["rows"]
    assert rows == [{"tokens": 8192, "vocab": 151936, "hidden": 1536, "impl": "ours", "ms": 5.5,
                     "peak_bytes": 96 << 20},
                    {"tokens": 8192, "vocab": 151936, "hidden": 1536, "impl": "naive", "ms": 11.0,
                     "peak_bytes": 5120 << 20}]
    text = report.write_summary(tmp_path, SLUG, git_rev=None)[0].read_text()
    assert "| 8192 | 151936 | 1536 | naive | 11.00 | 5,120.0 |" in text


def test_learner_targets_compare_rows_of_the_same_activation_checkpointing():
    from psnrl.bench.learner import add_ratios

    def row(ckpt, mode, peak, ms):
        return {"model": "m", "tokens": 8192, "activation_checkpointing": ckpt, "mode": mode,
                "peak_bytes": peak, "step_ms": ms, "saved_tensors": {}}
    doc = {"rows": add_ratios([row(False, "plain", 100, 10.0), row(False, "psn", 101, 11.0),
                               row(True, "plain", 50, 14.0), row(True, "psn", 60, 15.0)])}  # as the bench stores them
    found = {(t.where, t.target[:11]): t.value for t in report.check_targets({"learner": doc})}
    assert found == {("m 8192 tokens", "peak memory"): 1.01, ("m 8192 tokens", "step time P"): 1.1,
                     ("m 8192 tokens, activation checkpointing", "peak memory"): 1.2,
                     ("m 8192 tokens, activation checkpointing", "step time P"): 1.0714}
    assert "| m | 8192 | on | psn |" in report.bench_table("learner", doc)
