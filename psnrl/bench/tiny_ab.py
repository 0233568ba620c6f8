"""The README's A/B table: PSN-GRPO and plain GRPO on the embedded tiny task, over several seeds, on
the CPU.

For each seed it evaluates the policy RL starts from (the SFT warm-up of ``psnrl train``, then
held-out pass@k), then trains each arm for the default number of iterations and evaluates it
again. A row per (arm, seed): the mean training reward of the first and of the last
``--window`` iterations, and held-out pass@k before RL and at the end. The markdown gives the
mean and the spread (sample standard deviation) over the seeds, with the torch and
transformers versions, since runs on other CPUs or library versions take other floating-point
paths and differ run by run (not on average).

    psnrl bench tiny-ab                      # 3 seeds x 2 arms, ~8 minutes on 2 cores
    psnrl bench tiny-ab --seeds 0 1 --set train.iterations=50

Writes ``psnrl/bench/results/tiny_ab-cpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

from psnrl.bench.common import BenchFiles, BenchRun, bench_cli, error_row, positive_int, render_document, run_meta

NAME = "tiny_ab"
ARMS = {"psn": ["noise.enabled=true"], "plain": ["noise.enabled=false"]}
ARM_TITLES = {"psn": "PSN-GRPO (sigma 0.004, mlp)", "plain": "plain GRPO"}
KS = (1, 4)
ROW_KEYS = ("arm", "seed", "first_reward", "last_reward", *[f"pre_pass@{k}" for k in KS],
            *[f"pass@{k}" for k in KS], "seconds")
META_KEYS = ("device", "torch", "triton", "transformers")
FIGURES = ("first_reward", "last_reward", *[f"pre_pass@{k}" for k in KS], *[f"pass@{k}" for k in KS])


def overrides(args: argparse.Namespace, seed: int, log_dir: Path) -> list[str]:
    return [f"train.seed={seed}", f"log.dir={log_dir}", "log.tensorboard=false", "log.plot=false",
            "checkpoint.every=0", f"eval.n_samples={args.eval_samples}", f"eval.ks=[{', '.join(map(str, KS))}]",
            *args.set]


def run_seed(args: argparse.Namespace, seed: int, tmp: Path) -> list[dict]:
    """The rows of one seed: the pre-RL evaluation once, then each arm trained and evaluated."""
    from psnrl.trainer.config import load_config
    from psnrl.trainer.loop import PSNTrainer

    with PSNTrainer(load_config(None, overrides(args, seed, tmp / f"pre-{seed}"))) as trainer:
        trainer.sft_warmup()  # as run() starts: the policy RL starts from
        pre = trainer.evaluate()["average"]
    rows = []
    for arm, arm_overrides in ARMS.items():
        start = time.perf_counter()
        cfg = load_config(None, overrides(args, seed, tmp / f"{arm}-{seed}") + arm_overrides + ["eval.every=0"])
        with PSNTrainer(cfg) as trainer:
            history = trainer.run()
            final = trainer.evaluate()["average"]
        rewards = [m["reward_mean"] for m in history]
        rows.append({"arm": arm, "seed": seed,
                     "first_reward": statistics.mean(rewards[:args.window]),
                     "last_reward": statistics.mean(rewards[-args.window:]),
                     **{f"pre_pass@{k}": pre[f"pass@{k}"] for k in KS},
                     **{f"pass@{k}": final[f"pass@{k}"] for k in KS},
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    ok = [r for r in rows if not r.get("error")]
    head = ["run", f"reward, first {meta['window']} it.", f"last {meta['window']} it.",
            *[f"pass@{k} before RL" for k in KS], *[f"pass@{k} after" for k in KS]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm in ARMS:
        mine = [r for r in ok if r["arm"] == arm]
        if mine:
            lines.append(f"| {ARM_TITLES[arm]} | " + " | ".join(_mean_sd([r[f] for r in mine]) for f in FIGURES) + " |")
    lines += ["", "Per seed:", "", "| run | seed | " + " | ".join(FIGURES) + " | seconds |",
              "|---|---:|" + "---:|" * (len(FIGURES) + 1)]
    lines += [f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r[f]:.3f}" for f in FIGURES) + f" | {r['seconds']:.0f} |"
              for r in ok]
    return render_document("tiny A/B", meta, rows, lambda r: f"seed {r['seed']}", paragraphs=[meta["method"]],
                           setting=f"seeds {sorted({r['seed'] for r in ok})}; mean ± standard deviation over the "
                                   "seeds", body=[*lines, ""])


FILES = BenchFiles(NAME, META_KEYS, render_markdown)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default 0 1 2)")
    parser.add_argument("--window", type=positive_int, default=30,
                        help="iterations averaged at the start and at the end (default %(default)s)")
    parser.add_argument("--eval-samples", type=positive_int, default=16,
                        help="samples per held-out problem, eval.n_samples (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another config override for every run (repeatable)")


def _check(args: argparse.Namespace) -> None:
    if args.eval_samples < max(KS):
        raise ValueError(f"--eval-samples must be >= {max(KS)} (pass@{max(KS)} is reported), got {args.eval_samples}")


build_parser, parse_args = bench_cli(
    "tiny-ab", "PSN-GRPO vs plain GRPO on the embedded tiny task over several seeds (CPU): reward at the start "
               "and the end of training, held-out pass@k before RL and after; writes tiny_ab-cpu.json and .md.",
    _options, _check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "0")  # the CPU torch paths, as psnrl train takes them
    changed = f" with {' '.join(args.set)}" if args.set else ""
    run = BenchRun(FILES, run_meta("cpu", window=args.window, seeds=args.seeds, method=(
        f"Defaults of psnrl train (the embedded tiny task){changed}; held-out pass@k over the tiny eval set with "
        f"{args.eval_samples} samples per problem; the reward windows are the first and last {args.window} "
        f"training iterations.")), args.out_dir)
    with tempfile.TemporaryDirectory(prefix="psnrl-tiny-ab-") as tmp:
        for seed in args.seeds:
            try:
                rows = run_seed(args, seed, Path(tmp))
            except Exception as exc:  # a failed seed is a row, the others still run
                rows = [error_row(ROW_KEYS, exc, seed=seed)]
            for row in rows:
                run.record(row, f"seed {seed} {row['arm'] or ''}".strip(),
                           None if row.get("error") else
                           f"reward {row['first_reward']:.3f} -> {row['last_reward']:.3f}, pass@1 "
                           f"{row['pre_pass@1']:.3f} -> {row['pass@1']:.3f}")
    return run.close()


if __name__ == "__main__":
    raise SystemExit(main())
