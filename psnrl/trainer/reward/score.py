"""The public scoring functions: :func:`verify`, :func:`math_reward`, :func:`score_batch`."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from .compare import _fast_verdict
from .config import DEFAULT_CONFIG, RewardConfig
from .extract import extract_answer
from .pool import _run_jobs


def _config(config: Optional[RewardConfig], timeout_s: Optional[float]) -> RewardConfig:
    cfg = config or DEFAULT_CONFIG
    if timeout_s is not None and timeout_s != cfg.timeout_s:
        cfg = replace(cfg, timeout_s=float(timeout_s))
    return cfg


def verify(pred: str, ref: str, timeout_s: Optional[float] = None,
           config: Optional[RewardConfig] = None) -> bool:
    """Whether the extracted answer ``pred`` equals the reference ``ref``. Never raises.

    Exact (canonical strings) first, then numeric, then (only if still undecided) symbolic in a
    worker process limited to ``timeout_s`` seconds (None: ``config.timeout_s``, 1.0 by
    default; a worker's one-time start-up is not counted).
    """
    try:
        cfg = _config(config, timeout_s)
        verdict, job = _fast_verdict(pred, ref, cfg)
        if verdict is not None:
            return verdict
        return bool(_run_jobs([job], cfg, cfg.timeout_s)[0])
    except Exception:
        return False


def math_reward(completion: str, ref_answer: str, *, timeout_s: Optional[float] = None,
                config: Optional[RewardConfig] = None) -> float:
    """1.0 when the completion's final answer equals ``ref_answer``, else 0.0. Never raises."""
    try:
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        cfg = _config(config, timeout_s)
        return 1.0 if verify(pred, ref_answer, cfg.timeout_s, cfg) else 0.0
    except Exception:
        return 0.0


def score_batch(completions: Sequence[str], refs: Sequence[str], *,
                timeout_s: Optional[float] = None,
                config: Optional[RewardConfig] = None) -> list:
    """Rewards (1.0 / 0.0) for many completions; ``len(completions) == len(refs)``.

    Extraction, exact and numeric checks run in this process (identical (answer, reference)
    pairs are decided once, e.g. the G samples of a group agreeing); the pairs they leave
    undecided go to the worker pool together, in parallel, each under its own time limit.
    Content never raises; mismatched lengths raise ValueError (a caller bug).
    """
    if len(completions) != len(refs):
        raise ValueError(f"{len(completions)} completions but {len(refs)} references")
    cfg = _config(config, timeout_s)
    out = [0.0] * len(completions)
    decided = {}
    jobs, job_keys = [], []
    waiting = {}
    for i, (comp, ref) in enumerate(zip(completions, refs)):
        try:
            pred = extract_answer(comp)
            if pred is None or not isinstance(ref, str):
                continue
            key = (pred, ref)
            if key in decided:
                out[i] = decided[key]
                continue
            if key in waiting:
                waiting[key].append(i)
                continue
            verdict, job = _fast_verdict(pred, ref, cfg)
            if verdict is None:
                waiting[key] = [i]
                jobs.append(job)
                job_keys.append(key)
            else:
                decided[key] = out[i] = 1.0 if verdict else 0.0
        except Exception:
            out[i] = 0.0
    if jobs:
        try:
            results = _run_jobs(jobs, cfg, cfg.timeout_s)
        except Exception:
            results = [False] * len(jobs)
        for key, ok in zip(job_keys, results):
            for i in waiting[key]:
                out[i] = 1.0 if ok else 0.0
    return out
