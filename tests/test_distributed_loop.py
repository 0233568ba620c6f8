"""The training loop under torchrun: 2 processes (gloo), FSDP2 learner, an engine per rank."""
import json
import os
import subprocess
import sys
from pathlib import Path


from psnrl.trainer.checkpoint import load_checkpoint

FAST = ["rollout.prompts_per_iter=8", "rollout.group_size=4", "train.mini_batch_prompts=4",
        "train.sft_warmup_steps=3", "eval.n_samples=2", "eval.ks=[1, 2]", "algo.kl_coef=1e-3",
        "train.activation_checkpointing=true"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "psnrl.trainer.cli", "train", *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).parent.parent)


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    first = torchrun(*FAST, f"log.dir={run}", "train.iterations=2", "checkpoint.every=1", "eval.every=2")
    assert first.returncode == 0, first.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # rank 0 alone writes
    for r in rows:
        # Each engine samples from the weights the sharded learner holds: after every sync the
        # learner's perturbed log-probs of the engine's tokens are the engine's own (fp32).
        assert r["sampler_logprob_gap"] < 1e-4
        assert r["time_sync"] >= 0 and "kl_k3_mean" in r and "kl_noisy_clean" in r
    assert "eval" in rows[1] and rows[1]["eval"]["sets"]["tiny-arith"]["problems"] == 128
    state = load_checkpoint(run / "checkpoints" / "iter-000002.safetensors")
    assert state["iteration"] == 2 and "model.layers.0.mlp.up_proj.weight" in state["model"]
    assert state["optimizer"]["state"] and state["ref_model"] is not None
    resumed = torchrun(*FAST, f"log.dir={run}", "train.iterations=3", "checkpoint.every=1", "eval.every=0",
                       "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]


def test_batch_sizes_must_split_over_the_processes(tmp_path):
    bad = torchrun(*FAST, f"log.dir={tmp_path / 'bad'}", "rollout.prompts_per_iter=7", "train.mini_batch_prompts=7",
                   "train.iterations=1")
    assert bad.returncode != 0
    assert "rollout.prompts_per_iter=7 must be a multiple of the number of processes (2)" in bad.stderr
