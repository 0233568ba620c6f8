"""The PSN-GRPO loop on the tiny task: runs, checkpoints atomically, resumes exactly."""
import json
import os
import signal

import pytest
import torch

from event_files import event_files, scalars, shown
from psnrl.trainer.checkpoint import checkpoints, save_checkpoint
from psnrl.trainer.cli import main
from psnrl.trainer.config import load_config
from psnrl.trainer.loop import PSNTrainer

@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # The loop's kernels are tested on their own; here the CPU torch paths keep it fast.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


FAST = ["rollout.prompts_per_iter=8", "rollout.group_size=4", "train.mini_batch_prompts=4",
        "train.sft_warmup_steps=5", "eval.every=2", "eval.n_samples=2", "eval.ks=[1, 2]",
        "checkpoint.every=2"]


def trainer(tmp_path, name, *extra, **options):
    return PSNTrainer(load_config(None, FAST + [f"log.dir={tmp_path / name}", *extra]), **options)


def test_a_short_run_logs_metrics_and_evaluates(tmp_path):
    t = trainer(tmp_path, "run", "train.iterations=3")
    history = t.run()
    assert [h["iteration"] for h in history] == [1, 2, 3]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for key in ("reward_mean", "solve_rate", "pass@4", "response_length", "sigma", "kl_noisy_clean",
                "tis_weight_mean", "entropy", "time_rollout", "time_reward", "time_learner",
                "rollout_tokens_per_s"):
        assert key in rows[0], key
    # TIS's denominator comes from the learner's dual-stream pass; in fp32 it is the sampler's.
    assert all(r["sampler_logprob_gap"] < 1e-4 for r in rows)
    assert {"problems", "pass@1", "pass@2", "operation_diversity"} <= set(rows[1]["eval"]["sets"]["tiny-arith"])
    assert set(rows[1]["eval"]["average"]) == {"pass@1", "pass@2"}
    assert [p.name for p in checkpoints(tmp_path / "run" / "checkpoints")] == [
        "iter-000002.safetensors", "iter-000003.safetensors"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    # TensorBoard event files (tensorboardX) and the reward/sigma PNG (matplotlib), by default.
    assert len(event_files(tmp_path / "run" / "tensorboard")) == 2  # a new file after each checkpoint
    tb = scalars(tmp_path / "run" / "tensorboard")
    assert tb["reward_mean"] == {r["iteration"]: pytest.approx(r["reward_mean"]) for r in rows}
    assert set(tb["eval/tiny-arith/pass_1"]) == {0, 2, 3}  # before RL, every 2 iterations, the last
    assert (tmp_path / "run" / "reward_sigma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_and_plot_can_be_turned_off(tmp_path):
    trainer(tmp_path, "off", "train.iterations=1", "eval.every=0", "log.tensorboard=false", "log.plot=false").run()
    assert not (tmp_path / "off" / "tensorboard").exists() and not (tmp_path / "off" / "reward_sigma.png").exists()


def test_plain_grpo_is_the_same_loop_without_noise(tmp_path):
    history = trainer(tmp_path, "plain", "train.iterations=1", "noise.enabled=false").run()
    assert "kl_noisy_clean" not in history[0] and "tis_weight_mean" not in history[0]


def test_tis_denominator_from_learner_or_sampler_agree_in_fp32(tmp_path):
    # One optimizer step per iteration: the old and perturbed log-probs come from the step's own
    # dual-stream forward (learner) or from the engine (sampler); in fp32 they agree.
    one_step = ["train.iterations=1", "train.mini_batch_prompts=8", "eval.every=0"]
    learner = trainer(tmp_path, "learner", *one_step)
    learner.run()
    sampler = trainer(tmp_path, "sampler", *one_step, "algo.noisy_logprobs=sampler")
    sampler.run()
    for (name, p), q in zip(learner.model.state_dict().items(), sampler.model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_var2_probes_drive_sigma(tmp_path):
    t = trainer(tmp_path, "v2", "train.iterations=3", "noise.scheduler=var2", "noise.embedder=hidden",
                "eval.every=0")
    history = t.run()
    assert all(-1.0001 <= h["probe_similarity"] <= 1.0001 and h["probe_self_certainty"] > 0 for h in history)
    assert t.sigma.steps == 3
    sigmas = [h["sigma"] for h in history] + [t.sigma.sigma]
    for a, b in zip(sigmas, sigmas[1:]):  # each update moves sigma by exactly beta (within the range)
        assert b == pytest.approx(a * 1.01) or b == pytest.approx(a / 1.01)


def test_resume_continues_exactly(tmp_path):
    straight = trainer(tmp_path, "a", "train.iterations=5")
    straight.run()
    first = trainer(tmp_path, "b", "train.iterations=2")
    first.run()
    # Iteration 5 goes to the file opened after checkpoint 4, which must not purge 3 and 4 again.
    resumed = trainer(tmp_path, "b", "train.iterations=5", resume=True)
    resumed.run()
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed.sigma.state_dict() == straight.sigma.state_dict()
    assert shown(tmp_path / "b") == shown(tmp_path / "a")


def test_ctrl_c_stops_at_the_next_iteration_boundary_and_saves_it(tmp_path, monkeypatch):
    t = trainer(tmp_path, "c", "train.iterations=5", "checkpoint.every=0")
    real_step, calls = t.step, []
    handler = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a job started in the background

    def step():
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C in the middle of iteration 2: the iteration still completes
            os.kill(os.getpid(), signal.SIGINT)
        return real_step()

    monkeypatch.setattr(t, "step", step)
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert len(calls) == 2 and t.saved_iteration == 2
    assert [p.name for p in checkpoints(tmp_path / "c" / "checkpoints")] == ["iter-000002.safetensors"]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, monkeypatch):
    t = trainer(tmp_path, "d", "train.iterations=5", "checkpoint.every=0")
    real_step, calls = t.step, []

    def step():
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step()

    monkeypatch.setattr(t, "step", step)
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert t.saved_iteration is None and not checkpoints(tmp_path / "d" / "checkpoints")


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path):
    for i in range(1, 5):
        save_checkpoint(tmp_path, i, {"i": i}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["iter-000003.safetensors", "iter-000004.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    assert main(["train", "rollout.grop_size=4", f"log.dir={tmp_path}"]) == 1
    assert main(["train", "--resume", f"log.dir={tmp_path / 'empty'}", *FAST]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "did you mean rollout.group_size" in err[0] and "no checkpoint" in err[1]
    assert list(tmp_path.iterdir()) == []  # nothing written
