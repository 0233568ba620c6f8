"""Tests of the symbolic worker pool and the batch scorer (psnrl/trainer/reward/pool.py, score.py):
the worker's entry point, time limits, recovery, and batches."""
from __future__ import annotations

import os
import pickle
import random
import re
import struct
import subprocess
import sys
import time
from dataclasses import astuple

import pytest

from psnrl.trainer.reward import (DEFAULT_CONFIG, RewardConfig, math_reward, score_batch, shutdown_workers,
                                  verify, warmup)
from psnrl.trainer.reward import pool as P
from psnrl.trainer.reward.compare import _fast_verdict
from psnrl.trainer.reward.score import _config


@pytest.fixture(scope="module", autouse=True)
def _workers():
    warmup()   # start the symbolic workers while the first tests run
    yield


# ----------------------------------------------------------------------------------------------
# symbolic worker pool

def test_symbolic_path_is_used_and_bounded():
    # float evaluation leaves sin(pi) vs 0 undecided; the worker decides it
    verdict, job = _fast_verdict(r"\sin(\pi)", "0", DEFAULT_CONFIG)
    assert verdict is None and job is not None
    assert verify(r"\sin(\pi)", "0") is True
    assert verify(r"\sin(\pi)", "1") is False


def test_worker_timeout_kills_and_recovers():
    # a job stuck where SIGALRM cannot reach it: the parent scores 0 at the limit and replaces it
    stuck = pickle.dumps((0.2, "sleep", 30.0, True))
    t0 = time.perf_counter()
    assert P._POOL.run([stuck], 0.2, 1) == [False]
    assert time.perf_counter() - t0 < 5.0
    # an interruptible overrun: the worker interrupts itself and survives
    slow = pickle.dumps((0.2, "sleep", 30.0, False))
    assert P._POOL.run([slow, slow], 0.2, 2) == [False, False]
    # the pool still works afterwards
    assert verify(r"\cos\frac{\pi}{2}", "0") is True


def test_config_timeout_is_respected():
    cfg = RewardConfig(timeout_s=3.0)
    assert _config(cfg, None).timeout_s == 3.0
    assert _config(cfg, 0.5).timeout_s == 0.5
    assert _config(None, None).timeout_s == 1.0


def test_symbolic_disabled_scores_undecided_zero():
    cfg = RewardConfig(symbolic=False)
    assert verify(r"\sin(\pi)", "0", config=cfg) is False
    assert verify("1/2", "0.5", config=cfg) is True


# ----------------------------------------------------------------------------------------------
# batches

def test_score_batch_matches_single_calls_and_is_fast():
    rng = random.Random(0)
    refs = [r"\frac{1}{2}", "10", r"(3,\frac{\pi}{2})", r"2\sqrt{3}", "x=5", r"\sin(\pi)"]
    good = ["0.5", r"10\%", r"\left(3, \pi/2\right)", r"\sqrt{12}", "5", "0"]
    bad = ["0.25", "11", "(3, 1.57)", r"\sqrt{13}", "6", "1"]
    comps, want, rs = [], [], []
    for _ in range(3000):
        j = rng.randrange(len(refs))
        ok = rng.random() < 0.5
        comps.append(f"... so the answer is $\\boxed{{{(good if ok else bad)[j]}}}$.")
        rs.append(refs[j])
        want.append(1.0 if ok else 0.0)
    t0 = time.perf_counter()
    got = score_batch(comps, rs)
    elapsed = time.perf_counter() - t0
    assert got == want
    assert elapsed < 10.0, elapsed
    assert [math_reward(c, r) for c, r in zip(comps[:50], rs[:50])] == want[:50]


def test_score_batch_length_mismatch():
    with pytest.raises(ValueError):
        score_batch(["a"], [])


def test_worker_entry_point_loads_only_the_package_modules():
    # the child runs _WORKER_BOOT on the package folder: it must find pool._worker_main after the
    # move to a package, and import neither psnrl nor psnrl.trainer (their __init__ may grow heavy)
    cfg = DEFAULT_CONFIG
    _, job = _fast_verdict(r"\sin(\pi)", "0", cfg)
    payload = pickle.dumps((1.0,) + tuple(job) + (astuple(cfg),), protocol=4)
    folder = os.path.dirname(os.path.abspath(P.__file__))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", P._WORKER_BOOT, folder],
                          input=struct.pack("<I", len(payload)) + payload, capture_output=True,
                          timeout=60)
    assert proc.stdout == b"R\n1\n", proc.stderr[-2000:]
    imported = re.findall(r"\|\s+(\S+)\s*$", proc.stderr.decode(), re.MULTILINE)
    assert "_psnrl_reward_worker.compare" in imported   # (pool itself is not logged: import_module)
    assert not [m for m in imported if m == "psnrl" or m.startswith("psnrl.")]


def test_pool_restarts_after_shutdown_and_handles_empty_batches():
    assert P._POOL.run([], 0.5, 2) == []
    shutdown_workers()
    assert P._POOL.workers == []
    assert verify(r"\cos\frac{\pi}{2}", "0") is True     # workers come back on demand
    jobs = [_fast_verdict(p, "0", DEFAULT_CONFIG)[1] for p in (r"\sin(\pi)", r"\infty - \infty")]
    assert P._run_jobs(jobs, DEFAULT_CONFIG, 1.0) == [True, False]


def test_score_batch_decides_repeated_pairs_once_and_skips_non_strings():
    comps = [r"\boxed{\sin(\pi)}"] * 8 + [r"\boxed{1}", None, r"\boxed{2}"]
    refs = ["0"] * 8 + [None, "1", "2"]
    assert score_batch(comps, refs) == [1.0] * 8 + [0.0, 0.0, 1.0]


def test_a_ctrl_c_in_the_terminal_does_not_reach_the_workers():
    """Workers run in their own session: SIGINT to the trainer's process group (what a terminal
    sends on Ctrl-C) leaves them scoring, so an iteration finishing after Ctrl-C keeps its rewards."""
    import signal

    worker = P._Worker()
    try:
        assert os.getsid(worker.proc.pid) != os.getsid(0)
        # A signal sent to its own group does reach it (SIGTERM: a run started with SIGINT ignored,
        # as a background job is, passes that on to its workers).
        os.killpg(os.getpgid(worker.proc.pid), signal.SIGTERM)
        time.sleep(0.2)
        assert worker.proc.poll() is not None
    finally:
        worker.proc.kill()
        worker.proc.wait()
    assert math_reward(r"\boxed{\frac{1}{2}}", "0.5") == 1.0  # the pool itself still works
