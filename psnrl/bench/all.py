"""``psnrl bench all``: every GPU bench in sequence, then ``psnrl/bench/results/summary-<device>.md``.

Runs noisy-gemm, decode, learner, step and lm-head (each ``psnrl bench <name>``, in its own
process, so a crash or an out-of-memory in one does not take the others down). A bench that
is not registered in psnrl/trainer/cli.py's BENCHES (or whose module does not exist) is reported as
missing, one that exits non-zero as failed; neither stops the run. Then psnrl/bench/report.py builds
the summary from the result JSON files: tables, PNG charts (under summary-<device>/), the
targets, and a comparison with the results committed at HEAD for the same device (or
``--baseline DIR``) that flags regressions over 10%.

    psnrl bench all                          # run everything, then the summary
    psnrl bench all --only noisy-gemm decode
    psnrl bench all --no-run                 # the summary from the results already there
    psnrl bench all --bench-args "noisy-gemm=--m 1 256 4096" --bench-args "decode=--batches 1 32"

Exit status: 0 when every bench that exists ran and the summary was written; 1 when a bench
failed (or, with --fail-on-regression, when a regression was flagged) or there were no results.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
import time
from pathlib import Path

from psnrl.bench import report
from psnrl.bench.common import device_slug

GPU_BENCHES = ("noisy-gemm", "decode", "learner", "step", "lm-head")
# Names a bench may be registered under in psnrl/trainer/cli.py's BENCHES.
ALIASES = {"lm-head": ("lm-head", "lm-head-logprob", "lm_head_logprob")}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]  # the checkout, so `-m psnrl...` imports from it


def resolve(name: str, benches: dict[str, str]) -> tuple[str | None, str | None]:
    """(registered name, module) of a bench, or (None, None) when it is not registered."""
    for alias in ALIASES.get(name, (name,)):
        if alias in benches:
            return alias, benches[alias]
    return None, None


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def run_benches(names: list[str], benches: dict[str, str], bench_args: dict[str, list[str]],
                timeout: float | None = None, runner=subprocess.run) -> list[dict]:
    """Run each bench as ``python -m psnrl.trainer.cli bench <name> [args]``; one status dict per bench."""
    status = []
    for name in names:
        registered, module = resolve(name, benches)
        if registered is None:
            status.append({"bench": name, "status": "missing",
                           "detail": "not registered in psnrl/trainer/cli.py BENCHES"})
            print(f"== {name}: missing (not registered)", flush=True)
            continue
        if not module_exists(module):
            status.append({"bench": name, "status": "missing", "detail": f"module {module} not found"})
            print(f"== {name}: missing (no module {module})", flush=True)
            continue
        cmd = [sys.executable, "-m", "psnrl.trainer.cli", "bench", registered, *bench_args.get(name, [])]
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        try:
            done = runner(cmd, cwd=str(ROOT), timeout=timeout)
            rc = done.returncode
            detail = "" if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            rc, detail = -1, f"timed out after {timeout:.0f} s"
        except OSError as e:
            rc, detail = -1, f"{type(e).__name__}: {e}"
        status.append({"bench": name, "status": "ok" if rc == 0 else "failed", "detail": detail,
                       "seconds": round(time.perf_counter() - start, 1)})
        print(f"== {name}: {'ok' if rc == 0 else 'FAILED (' + detail + ')'}", flush=True)
    return status


def pick_slug(device: str | None, results_dir: Path, cuda_name: str | None) -> str:
    """The device whose results go in the summary: --device, the GPU here, or the only one with results."""
    if device:
        return device_slug(device)
    if cuda_name:
        return device_slug(cuda_name)
    slugs = sorted(report.result_slugs(results_dir))
    if len(slugs) == 1:
        return slugs[0]
    if not slugs:
        raise LookupError(f"no result files in {results_dir}; run the benches on a GPU first")
    raise LookupError(f"results for several devices in {results_dir} ({', '.join(slugs)}); pick one with --device")


def _bench_args(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or name not in GPU_BENCHES:
            raise argparse.ArgumentTypeError(f"--bench-args takes NAME=ARGS with NAME in {', '.join(GPU_BENCHES)}, "
                                             f"got {item!r}")
        out.setdefault(name, []).extend(shlex.split(rest))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psnrl bench all",
        description="Run every GPU bench, then write psnrl/bench/results/summary-<device>.md (tables, charts, "
                    "targets, regressions against HEAD).")
    parser.add_argument("--only", nargs="+", choices=GPU_BENCHES, default=None, metavar="NAME",
                        help=f"run only these ({', '.join(GPU_BENCHES)})")
    parser.add_argument("--skip", nargs="+", choices=GPU_BENCHES, default=[], metavar="NAME", help="do not run these")
    parser.add_argument("--no-run", action="store_true", help="only build the summary from existing results")
    parser.add_argument("--bench-args", action="append", default=[], metavar="NAME=ARGS",
                        help='arguments for one bench, e.g. "noisy-gemm=--m 1 256" (repeatable)')
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench (default: none)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the result files are read and the summary written (default: psnrl/bench/results)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="compare with the result files in this directory (default: those committed at HEAD)")
    parser.add_argument("--device", default=None, help="device name or slug of the results to summarize "
                                                       "(default: this machine's GPU)")
    parser.add_argument("--threshold", type=float, default=report.THRESHOLD,
                        help="relative change flagged as a regression (default %(default)s)")
    parser.add_argument("--no-charts", action="store_true", help="tables only, no PNG charts")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged")
    return parser


def _cuda_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv: list[str] | None = None, *, runner=subprocess.run) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        bench_args = _bench_args(args.bench_args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    names = [n for n in (args.only or GPU_BENCHES) if n not in args.skip]
    cuda_name = _cuda_name()
    status: list[dict] = []
    if not args.no_run:
        if cuda_name is None:
            print("psnrl bench all: no CUDA GPU here, so the benches are skipped; the summary is built from "
                  f"the results already in {args.results_dir}", file=sys.stderr)
            status = [{"bench": n, "status": "skipped", "detail": "no CUDA GPU"} for n in names]
        else:
            from psnrl.trainer.cli import BENCHES
            status = run_benches(names, dict(BENCHES), bench_args, args.timeout, runner)
    try:
        slug = pick_slug(args.device, args.results_dir, cuda_name)
    except LookupError as e:
        print(f"psnrl bench all: {e}", file=sys.stderr)
        return 1
    path, regressions = report.write_summary(args.results_dir, slug, baseline_dir=args.baseline,
                                             run_status=status or None, charts=not args.no_charts,
                                             threshold=args.threshold)
    print(f"wrote {path}")
    for c in regressions:
        change = "error now" if c.change is None else f"{c.change:+.1%}"
        print(f"REGRESSION {c.bench} {c.row} {c.metric}: {c.baseline:.4g} -> "
              f"{'—' if c.current is None else format(c.current, '.4g')} ({change})")
    failed = [s["bench"] for s in status if s["status"] == "failed"]
    missing = [s["bench"] for s in status if s["status"] == "missing"]
    if missing:
        print(f"missing benches: {', '.join(missing)}", file=sys.stderr)
    if failed:
        print(f"failed benches: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or (args.fail_on_regression and regressions) else 0


if __name__ == "__main__":
    raise SystemExit(main())
