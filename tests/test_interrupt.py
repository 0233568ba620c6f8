"""Exact resume from any interruption: Ctrl-C (SIGINT from another process) or SIGKILL at named
points of a short run, then --resume, ends with the weights, optimizer state, RNG and metrics of
an uninterrupted run (timings aside)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from event_files import shown
from psnrl.trainer.checkpoint import checkpoints, latest_checkpoint, load_checkpoint
from psnrl.trainer.cli import main

RUN = ["rollout.prompts_per_iter=8", "rollout.group_size=4", "train.mini_batch_prompts=4",
       "train.sft_warmup_steps=2", "eval.every=4", "eval.n_samples=2", "eval.ks=[1, 2]",
       "checkpoint.every=2", "train.iterations=4", "log.plot=false"]
CHILD = Path(__file__).with_name("interrupt_child.py")


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels are tested on their own


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as env:  # set for this run only: later modules test the kernels
        env.setenv("TRITON_INTERPRET", "0")
        assert main(["train", f"log.dir={run}", *RUN]) == 0
    return run


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without what depends on the machine's speed."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "rollout_tokens_per_s"}
            for r in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = load_checkpoint(latest_checkpoint(run / "checkpoints")), \
        load_checkpoint(latest_checkpoint(reference / "checkpoints"))
    assert got["iteration"] == want["iteration"] == 4
    for part in ("model", "ref_model"):
        for name, t in want[part].items():
            assert torch.equal(got[part][name], t), (part, name)
    for name, moments in want["optimizer"]["state"].items():
        for key, t in moments.items():
            assert torch.equal(got["optimizer"]["state"][name][key], t), (name, key)
    # (torch's set_state_dict hands betas back as a list; the values are what counts)
    assert json.dumps(got["optimizer"]["param_groups"]) == json.dumps(want["optimizer"]["param_groups"])
    assert torch.equal(got["torch_rng"], want["torch_rng"])
    assert (got["sigma"], got["data"]) == (want["sigma"], want["data"])
    assert metrics(run) == metrics(reference)
    assert shown(run) == shown(reference)  # TensorBoard shows the resumed run's files as the reference run's
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        from safetensors.torch import load_file
        assert torch.equal(load_file(run / "final" / "model.safetensors")[name], want["model"][name])


def interrupted(tmp_path: Path, mode: str, point: str, nth: int) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(CHILD.parent.parent)}
    child = subprocess.Popen([sys.executable, str(CHILD), mode, point, str(nth), str(run), *RUN],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if mode == "sigint":
        ready = Path(f"{run}.ready")
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), child.communicate()[1][-3000:]
        child.send_signal(signal.SIGINT)  # Ctrl-C, from another process, while the run is at `point`
        time.sleep(0.2)
        Path(f"{run}.go").touch()
    out, err = child.communicate(timeout=180)
    return run, subprocess.CompletedProcess(child.args, child.returncode, out, err)


def resume(run: Path) -> None:
    assert main(["train", "--resume", f"log.dir={run}", *RUN]) == 0


@pytest.mark.parametrize("point, nth, saved", [
    ("rollout", 3, 2),  # generate calls: the pre-RL evaluation, iteration 1, iteration 2
    pytest.param("warmup", 1, 0, marks=pytest.mark.slow),
    pytest.param("learner", 3, 3, marks=pytest.mark.slow),
    pytest.param("checkpoint", 1, 2, marks=pytest.mark.slow),
])
def test_ctrl_c_saves_the_iteration_in_progress_at_its_end_and_resumes_exactly(tmp_path, reference, point,
                                                                                 nth, saved):
    run, proc = interrupted(tmp_path, "sigint", point, nth)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert f"the checkpoint of iteration {saved} is in" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(run / "checkpoints").name == f"iter-{saved:06d}.safetensors"
    assert len(metrics(run)) == saved  # metrics end where the checkpoint is
    resume(run)
    assert_same_run(run, reference)


@pytest.mark.parametrize("point, nth", [
    ("metrics", 3),  # iteration 3's row is written, its checkpoint never will be
    pytest.param("checkpoint-tmp", 2, marks=pytest.mark.slow),  # killed inside the write of iteration 4's
    pytest.param("eval", 2, marks=pytest.mark.slow),  # the evaluation of iteration 4 (1: before RL)
])
def test_sigkill_at_any_point_resumes_exactly(tmp_path, reference, point, nth):
    run, proc = interrupted(tmp_path, "kill", point, nth)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints(run / "checkpoints")] == ["iter-000002.safetensors"]
    resume(run)
    assert not list((run / "checkpoints").glob(".*.tmp")) or point == "checkpoint-tmp"
    assert_same_run(run, reference)
