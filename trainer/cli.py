"""The ``psnrl`` command line.

Each subcommand dispatches to the module that does the work; heavy imports happen
only once a subcommand is chosen, so ``psnrl --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# bench name -> module with a ``main(argv) -> int``
BENCHES = {
    "noisy-gemm": "bench.noisy_gemm",
    "kernel-sass": "bench.kernel_sass",
}


def _run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.bench])
    return module.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psnrl",
        description="RL for LLM reasoners with parameter-space noise fused into the kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="run a benchmark and write bench/results/<name>-<device>.*",
                           description="Run a benchmark; arguments after the name go to it "
                                       "(e.g. psnrl bench noisy-gemm --help).")
    bench.add_argument("bench", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(run=_run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
