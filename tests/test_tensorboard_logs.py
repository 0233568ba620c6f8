"""TensorBoard logs through tensorboardX: readable event files, a resumed stream continued with a
purge step, and a run without tensorboardX that says logging is off and carries on."""
import json
import math
import os
import re
import sys
import time

import pytest

from event_files import event_files, events, scalars
from psnrl.trainer.config import load_config
from psnrl.trainer.loop import PSNTrainer
from psnrl.trainer.run_logs import TENSORBOARD_OFF, event_writer


def test_events_read_back(tmp_path):
    w = event_writer(tmp_path / "tb")
    for tag, value in {"reward_mean": 0.25, "eval/tiny-arith/pass@1": 0.5, "nan": math.nan}.items():
        w.add_scalar(tag, value, 1)
    w.add_scalar("sigma", 0.004, 2)
    w.close()
    (path,) = event_files(tmp_path / "tb")
    assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\..+\.\d{{19}}\.{os.getpid()}", path.name), path.name
    assert events(path)[0].file_version == "brain.Event:2"
    shown = scalars(tmp_path / "tb")
    assert shown.keys() == {"reward_mean", "eval/tiny-arith/pass_1", "nan", "sigma"}  # tags are [-/\w.]
    assert shown["reward_mean"] == {1: 0.25} and shown["eval/tiny-arith/pass_1"] == {1: 0.5}
    assert shown["sigma"] == {2: pytest.approx(0.004)} and math.isnan(shown["nan"][1])


def write(log_dir, steps, scale, purge_step=None):
    w = event_writer(log_dir, purge_step)
    for step in steps:
        w.add_scalar("reward_mean", step * scale, step)
    w.close()


def test_files_of_the_same_second_are_read_in_the_order_they_were_written(tmp_path, monkeypatch):
    """A run killed and resumed within one second: the resumed process (here with a smaller pid)
    must still come after the killed one, or its purge would apply before the events it hides."""
    monkeypatch.setattr(os, "getpid", lambda: 4000)
    write(tmp_path, range(1, 6), 0.1)
    monkeypatch.setattr(os, "getpid", lambda: 300)
    write(tmp_path, range(3, 5), 1.0, purge_step=3)
    first, second = event_files(tmp_path)
    assert first.name.endswith(".4000") and second.name.endswith(".300")
    assert scalars(tmp_path)["reward_mean"] == {1: pytest.approx(0.1), 2: pytest.approx(0.2), 3: 3.0, 4: 4.0}


def test_a_writer_reopened_after_a_checkpoint_in_the_same_second_writes_a_new_file(tmp_path, monkeypatch):
    """The loop closes its writer at each checkpoint and the next event reopens it. A run resumed
    at the warm-up's checkpoint (iteration 0) reaches checkpoint 2 within a second: the reopened
    file must not take the name of the resumed one, or it overwrites its purge and steps 1 and 2."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.5)  # every file of the same second
    write(tmp_path, [0], 0.1)  # the run stopped during the warm-up: the pre-RL evaluation at step 0
    w = event_writer(tmp_path, purge_step=1)  # the resumed run, as PSNTrainer continues it
    for step in (1, 2):
        w.add_scalar("reward_mean", step, step)
    w.close()  # checkpoint 2
    w.purge_step = None
    for step in (3, 4):
        w.add_scalar("reward_mean", step, step)
    w.close()
    assert len(event_files(tmp_path)) == 3
    assert scalars(tmp_path)["reward_mean"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}


def test_a_resumed_stream_hides_the_steps_after_the_checkpoint(tmp_path):
    write(tmp_path, range(1, 6), 0.1)  # a run that crashed after step 5, its checkpoint at step 2
    write(tmp_path, range(3, 7), 1.0, purge_step=3)  # the resumed run redoes steps 3..6
    assert len(event_files(tmp_path)) == 2
    got = scalars(tmp_path)["reward_mean"]
    assert got == {1: pytest.approx(0.1), 2: pytest.approx(0.2), 3: 3.0, 4: 4.0, 5: 5.0, 6: 6.0}


def test_tensorboard_shows_the_resumed_stream_the_same_way(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    write(tmp_path, range(1, 6), 0.1)
    write(tmp_path, range(3, 5), 1.0, purge_step=3)
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, round(e.value, 6)) for e in acc.Scalars("reward_mean")]
    assert got == [(1, 0.1), (2, 0.2), (3, 3.0), (4, 4.0)]
    assert scalars(tmp_path)["reward_mean"] == {s: pytest.approx(v) for s, v in got}  # the helper agrees


def test_without_tensorboardx_the_run_says_logging_is_off_and_carries_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
    cfg = load_config(None, ["rollout.prompts_per_iter=8", "rollout.group_size=4", "train.mini_batch_prompts=4",
                             "train.sft_warmup_steps=0", "train.iterations=1", "eval.every=0",
                             "checkpoint.every=0", "log.plot=false", f"log.dir={tmp_path / 'run'}"])
    PSNTrainer(cfg).run()
    err = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert err == [f"psnrl train: {TENSORBOARD_OFF}; log.tensorboard=false hides this"]
    assert "pip install 'psnrl[tensorboard]'" in err[0]
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["iteration"] == 1
