"""psnrl/bench/tiny_ab.py: the README's A/B table over seeds, on a run cut short."""
import json

import pytest

from psnrl.bench import tiny_ab as bench
from psnrl.trainer.cli import BENCHES


def test_registered_as_a_bench():
    assert BENCHES["tiny-ab"] == "psnrl.bench.tiny_ab"


def test_two_seeds_both_arms_and_the_pre_rl_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rc = bench.main(["--seeds", "0", "1", "--window", "2", "--eval-samples", "4", "--out-dir", str(tmp_path),
                     "--set", "train.iterations=3", "--set", "rollout.prompts_per_iter=8",
                     "--set", "train.mini_batch_prompts=8", "--set", "train.sft_warmup_steps=3"])
    assert rc == 0
    doc = json.loads((tmp_path / "tiny_ab-cpu.json").read_text())
    rows = doc["rows"]
    assert [(r["arm"], r["seed"]) for r in rows] == [("psn", 0), ("plain", 0), ("psn", 1), ("plain", 1)]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r)
        assert all(0 <= r[f] <= 1 for f in bench.FIGURES)
    # Both arms of a seed start from the same policy, so they share the pre-RL evaluation.
    assert rows[0]["pre_pass@1"] == rows[1]["pre_pass@1"] and rows[0]["pre_pass@4"] == rows[1]["pre_pass@4"]
    md = (tmp_path / "tiny_ab-cpu.md").read_text()
    assert doc["torch"] in md and doc["transformers"] in md
    assert "| PSN-GRPO (sigma 0.004, mlp) | " in md and " ± " in md and "| plain GRPO | " in md


def test_too_few_eval_samples_for_pass_at_4_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--eval-samples", "2"])
    assert "--eval-samples must be >= 4" in capsys.readouterr().err
