"""A short training run under torch.profiler: a Chrome trace with psnrl's named ranges.

    python -m psnrl.bench.profile_step [--out-dir DIR] [--iterations N] [--config NAME] [section.key=value ...]

This is psnrl/bench/profile_step.sh's fallback where Nsight Systems is missing or does not work
(and it runs on a CPU too). The ranges of psnrl/kernels/profiling.py (rollout, prefill,
decode_step, sample, reward, learner/forward, learner/backward, optimizer, ...) are opened as
``torch.profiler.record_function`` ranges, so the trace shows the phases of a step above the
torch ops (and, on a GPU, the CUDA kernels). Only ``PSNTrainer.run`` is profiled: building the
model is not.

Writes into DIR (default psnrl/bench/results/profile/):
  step-trace-<device>.json    Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing
  step-ranges-<device>.json   total / count / mean milliseconds per range (also printed)
and the run's own files (metrics.jsonl, config.yaml) under DIR/run/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results" / "profile"
DEFAULT_ITERATIONS = 3
# A short run: no SFT warmup, evaluation or checkpoints (the user's overrides come after these).
SHORT_RUN = ("train.sft_warmup_steps=0", "eval.every=0", "checkpoint.every=0")


def device_slug() -> str:
    import torch

    from psnrl.bench.common import device_slug as slug
    return slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"


def run_overrides(out_dir: Path, iterations: int, overrides: list[str]) -> list[str]:
    return [f"train.iterations={iterations}", *SHORT_RUN, f"log.dir={out_dir / 'run'}", *overrides]


def range_totals(trace: dict) -> dict[str, dict]:
    """Per psnrl range in a Chrome trace: {"total_ms", "count", "mean_ms"} (CPU-side spans)."""
    from psnrl.kernels.profiling import RANGES

    totals: dict[str, list[float]] = defaultdict(list)
    for event in trace.get("traceEvents", []):
        name = event.get("name")
        if name in RANGES and event.get("ph") == "X" and event.get("cat") != "gpu_user_annotation":
            totals[name].append(float(event.get("dur", 0.0)) / 1e3)
    return {name: {"total_ms": round(sum(v), 3), "count": len(v), "mean_ms": round(sum(v) / len(v), 3)}
            for name, v in sorted(totals.items(), key=lambda kv: -sum(kv[1]))}


def format_totals(totals: dict[str, dict]) -> str:
    lines = [f"{'range':<18} {'total ms':>10} {'count':>6} {'mean ms':>9}"]
    for name, t in totals.items():
        lines.append(f"{name:<18} {t['total_ms']:>10.1f} {t['count']:>6d} {t['mean_ms']:>9.2f}")
    return "\n".join(lines)


def profile_run(out_dir: Path, iterations: int = DEFAULT_ITERATIONS, config: str | None = None,
                overrides: list[str] = ()) -> tuple[Path, Path, dict]:
    """Run a short training under torch.profiler; returns (trace path, ranges path, totals)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from psnrl.kernels import profiling
    from psnrl.trainer.config import load_config
    from psnrl.trainer.loop import PSNTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, run_overrides(out_dir, iterations, list(overrides)))
    trainer = PSNTrainer(cfg, overwrite=True)  # out_dir/run is this profile's scratch run
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    slug = device_slug()
    trace_path = out_dir / f"step-trace-{slug}.json"
    was_on = profiling._State.torch_ranges
    profiling.enable_torch_ranges()
    try:
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            history = trainer.run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        profiling.enable_torch_ranges(was_on)
        trainer.close()
    prof.export_chrome_trace(str(trace_path))
    totals = range_totals(json.loads(trace_path.read_text()))
    ranges_path = out_dir / f"step-ranges-{slug}.json"
    ranges_path.write_text(json.dumps({
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "iterations": len(history), "wall_s": round(wall, 3), "trace": trace_path.name,
        "ranges": totals}, indent=2) + "\n")
    return trace_path, ranges_path, totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psnrl.bench.profile_step",
                                     description="Profile a short psnrl training run with torch.profiler "
                                                 "(Chrome trace with the psnrl ranges).")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings for the run")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="where the trace goes (default: psnrl/bench/results/profile)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help="training iterations to profile (default %(default)s)")
    parser.add_argument("--config", default=None, help="YAML file or shipped config name (default: tiny)")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    from psnrl.trainer.config import ConfigError
    try:
        trace, ranges, totals = profile_run(args.out_dir, args.iterations, args.config, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"psnrl.bench.profile_step: {e}", file=sys.stderr)
        return 2
    print(format_totals(totals))
    print(f"\nwrote {trace} (open in https://ui.perfetto.dev or chrome://tracing)\nwrote {ranges}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
