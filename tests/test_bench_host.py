"""psnrl/bench/host.py: the engine's host time per decode step with a stub forward (CPU)."""
import json

from psnrl.bench import host as bench
from psnrl.trainer.cli import BENCHES


def test_registered_as_a_bench():
    assert BENCHES["host"] == "psnrl.bench.host"


def test_a_short_run_times_decode_steps_and_counts_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["--batches", "1,3", "--steps", "6", "--vocab", "300", "--prompt-len", "40", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "host-cpu.json").read_text())
    rows = doc["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r) and r["vocab"] == 300
        assert r["steps"] >= 5 and 0 < r["host_ms"] <= r["host_ms_p90"]
        assert r["ops_per_step"] == r["engine_ops"] + 2  # + the decode and sampler graphs' replays
        # Outside the graphs a GPU step launches the engine's ops and the two replays: at most 10.
        assert 0 < r["ops_per_step"] <= bench.TARGET_OPS
        assert 0 < r["sampler_ms"] < r["host_ms_p90"] and r["engine_ms"] > 0 and r["forward_ms"] > 0
    assert rows[0]["target_ms"] == 0.3 and rows[1]["target_ms"] is None
    text = (tmp_path / "host-cpu.md").read_text()
    assert "| 1 | 300 |" in text and "40-token prompts" in text


def test_the_op_counter_counts_ops_that_do_work_not_views():
    import torch

    with bench.OpCounter() as counter:
        x = torch.ones(3, 2)
        (x[1:] + 1).t().reshape(-1).sum()
    assert counter.count == 4  # ones, add, the reshape's copy of a transposed view, sum
