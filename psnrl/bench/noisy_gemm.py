"""Benchmark: the fused noisy linear against cuBLAS on the MLP shapes of Qwen2.5.

Columns: psnrl/bench/README.md (noisy GEMM) and COLUMNS_NOTE. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from psnrl.bench import model_configs
from psnrl.bench.common import (TORCH_DTYPES, BenchFiles, Bound, Column, EventTimer, bench_cli, check_sigma,
                                cuda_extra_bytes, error_row as _error_row, gpu_timing_method, markdown_table, pick,
                                positive_int, positive_ints, ratio, render_document, round_or_none, split_list,
                                start_run)

NAME = "noisy_gemm"
NO_CUDA_MESSAGE = "psnrl bench noisy-gemm needs a CUDA GPU; none found"

# Qwen2.5 MLP sizes, from psnrl/bench/model_configs.py: model -> (hidden, intermediate).
MODELS: dict[str, tuple[int, int]] = {
    name: (model_configs.CONFIGS[name]["hidden_size"], model_configs.CONFIGS[name]["intermediate_size"])
    for name in model_configs.QWEN25
}
SHAPES = ("gate_up", "down")
M_VALUES = (1, 8, 32, 128, 256, 1024, 4096, 16384)
DTYPES = TORCH_DTYPES

DEFAULT_SIGMA = 0.004
DEFAULT_WARMUP = 10
DEFAULT_ITERS = 100
NOISE_SEED = 0x5EED_0001_2345_6789

DECODE_MAX_M, DECODE_RATIO = 256, 1.50    # noisy/cuBLAS at every M <= 256 (on the way to 1.10)
LEARNER_MIN_M, LEARNER_RATIO = 4096, 1.30  # noisy/cuBLAS at every M >= 4096
MIXED_RATIO = 1.05                         # mixed no slower than noisy, 5% for timing noise
CLEAN_RATIO = 1.05                         # the clean path is cuBLAS
SCRATCH_MIN_M = 1024                       # from here on, at most one weight-sized scratch buffer

ROW_KEYS = ("shape", "M", "N", "K", "cublas_us", "clean_us", "noisy_us", "mixed_us", "fused_us",
            "materialized_us", "noisy_over_cublas", "mixed_over_noisy", "clean_over_cublas", "extra_bytes",
            "weight_bytes", "materialized_extra_bytes", "noisy_gbps", "noisy_tflops", "glu_unfused_us", "glu_fused_us",
            "glu_fused_over_unfused")
META_KEYS = ("device", "torch", "triton", "dtype", "sigma", "method")
TIMED = ("cublas", "clean", "noisy", "mixed", "fused", "materialized")
GLU_TIMED = ("glu_unfused", "glu_fused")  # gate_up only

MIXED_NOTE = ("mixed = half the rows clean, half on one noisy stream, interleaved (even rows noisy, "
              "odd rows clean, so every row block holds both streams); at M = 1 the single row is "
              "noisy, so mixed equals the noisy case there.")
COLUMNS_NOTE = (
    "Columns: cuBLAS = torch.matmul clean; clean / noisy / mixed = noisy_linear (its dispatcher: cuBLAS for "
    "all-clean calls, the fused kernel up to FUSED_MAX_ROWS rows, a materialized perturbed weight above) with all "
    "rows clean / all rows on one noisy stream / mixed; fused = the fused kernel at every M; materialized = W + "
    "sigma*E written into a scratch buffer (noise.fill_perturbed) and torch.matmul, timed together. {mixed} {extra} "
    "GB/s counts weight + activation + output bytes; TFLOP/s is 2*M*N*K; both for the noisy kernel. SiLU·up "
    "(gate_up rows): the gated activation of one noisy stream, unfused = gate and up by two noisy_linear calls then "
    "F.silu(gate) * up, fused = noisy_gate_up (one kernel, no gate/up outputs in memory).")
EXTRA_NOTE = ("extra bytes = peak CUDA memory allocated during one call minus what the call still "
              "holds afterwards (its output), from torch.cuda.reset_peak_memory_stats / "
              "max_memory_allocated.")
COLUMNS_NOTE = COLUMNS_NOTE.format(mixed=MIXED_NOTE, extra=EXTRA_NOTE)



@dataclass(frozen=True)
class Case:
    model: str
    shape: str  # "gate_up" or "down"
    m: int
    n: int
    k: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.shape}"

    @property
    def param_name(self) -> str:
        proj = "gate_up_proj" if self.shape == "gate_up" else "down_proj"
        return f"model.layers.0.mlp.{proj}.weight"


def shape_nk(shape: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """(N, K) of one MLP matmul: gate_up maps hidden -> 2 x intermediate, down maps back."""
    if shape == "gate_up":
        return 2 * intermediate, hidden
    if shape == "down":
        return hidden, intermediate
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def resolve_model(name: str) -> str:
    """A Qwen2.5 model by its full name ("Qwen2.5-7B") or its size ("7B", "7b")."""
    model = model_configs.resolve(name) if str(name).strip().lower() != "tiny" else None
    if model not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)} "
                         f"(or just the size, e.g. 7B)")
    return model


def build_cases(models: Iterable[str] = tuple(MODELS), shapes: Iterable[str] = SHAPES,
                ms: Iterable[int] = M_VALUES) -> list[Case]:
    """Every (model, shape, M) in that order: models, then shapes, then M."""
    shapes = list(shapes)
    ms = list(ms)
    cases = []
    for model in models:
        model = resolve_model(model)
        hidden, intermediate = MODELS[model]
        for shape in shapes:
            n, k = shape_nk(shape, hidden, intermediate)
            for m in ms:
                if m < 1:
                    raise ValueError(f"M must be >= 1, got {m}")
                cases.append(Case(model, shape, int(m), n, k))
    return cases



def mixed_row_streams(m: int, device: torch.device | str) -> torch.Tensor:
    """Stream ids for the mixed case: even rows noisy (1), odd rows clean (0); M = 1 is noisy."""
    return ((torch.arange(m, device=device) + 1) % 2).to(torch.int32)


def make_fns(case: Case, dtype: torch.dtype, sigma: float, device: torch.device | str,
             seed: int = NOISE_SEED) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed callables of a case. StreamRows are built here, outside any timed region."""
    from psnrl.kernels import noise
    from psnrl.kernels.noise_rows import NoiseStream, StreamRows
    from psnrl.kernels.noisy_linear import noisy_gate_up, noisy_linear, pick_tiles

    gen = torch.Generator(device=device).manual_seed(case.m * 1_000_003 + case.n * 101 + case.k)
    weight = torch.randn(case.n, case.k, generator=gen, device=device, dtype=dtype).mul_(0.02)
    x = torch.randn(case.m, case.k, generator=gen, device=device, dtype=dtype)
    key = noise.param_key(case.param_name)
    stream = NoiseStream(seed, sigma)
    clean_rows = StreamRows.clean(case.m, device)
    noisy_rows = StreamRows(torch.ones(case.m, dtype=torch.int32, device=device), [stream])
    mixed_rows = StreamRows(mixed_row_streams(case.m, device), [stream])
    wt = weight.t()

    fused_tiles = pick_tiles(case.m, case.n, case.k, dtype)

    def materialized() -> torch.Tensor:
        w_noisy = noise.fill_perturbed(torch.empty_like(weight), weight, seed, key, sigma)
        return torch.matmul(x, w_noisy.t())

    fns = {
        "cublas": lambda: torch.matmul(x, wt),
        "clean": lambda: noisy_linear(x, weight, rows=clean_rows, param_key=key),
        "noisy": lambda: noisy_linear(x, weight, rows=noisy_rows, param_key=key),
        "mixed": lambda: noisy_linear(x, weight, rows=mixed_rows, param_key=key),
        "fused": lambda: noisy_linear(x, weight, rows=noisy_rows, param_key=key, tiles=fused_tiles),
        "materialized": materialized,
    }
    if case.shape == "gate_up":
        gate, up = weight.chunk(2)
        up_key = noise.param_key(case.param_name.replace("gate_up", "up"))
        fns["glu_unfused"] = lambda: torch.nn.functional.silu(
            noisy_linear(x, gate, rows=noisy_rows, param_key=key)) * noisy_linear(
            x, up, rows=noisy_rows, param_key=up_key)
        fns["glu_fused"] = lambda: noisy_gate_up(x, gate, up, rows=noisy_rows, gate_key=key, up_key=up_key)
    return fns


def sanity_check(fns: dict[str, Callable[[], torch.Tensor]], sigma: float) -> None:
    """Catch a broken setup before timing it: the noisy path must add noise, the clean one not."""
    y_noisy = fns["noisy"]()
    y_clean = fns["clean"]()
    if not torch.isfinite(y_noisy).all():
        raise RuntimeError("noisy output is not finite")
    if sigma > 0 and torch.equal(y_noisy, y_clean):
        raise RuntimeError("noisy output equals the clean output: no noise was added")


def time_case(case: Case, *, dtype: torch.dtype, sigma: float, device: torch.device | str,
              timer: Callable[[Callable[[], object]], float],
              extra_bytes: Callable[[Callable[[], object]], int]) -> dict:
    """Time one (shape, M) and return its row dict."""
    with torch.inference_mode():
        fns = make_fns(case, dtype, sigma, device)
        sanity_check(fns, sigma)
        times = {name: timer(fns[name]) for name in TIMED + GLU_TIMED if name in fns}
        extra = extra_bytes(fns["noisy"])
        materialized_extra = extra_bytes(fns["materialized"])
    elem = torch.empty(0, dtype=dtype).element_size()
    return build_row(case, times, extra, materialized_extra, elem)


def build_row(case: Case, times_us: dict[str, float], extra_bytes: int,
              materialized_extra_bytes: int, elem_size: int) -> dict:
    """The JSON row of a case from its median times (µs) and extra bytes."""
    noisy = times_us["noisy"]
    moved = (case.n * case.k + case.m * case.k + case.m * case.n) * elem_size
    flops = 2.0 * case.m * case.n * case.k
    row = {"shape": case.name, "M": case.m, "N": case.n, "K": case.k}
    for name in TIMED:
        row[f"{name}_us"] = round(float(times_us[name]), 3)
    row["noisy_over_cublas"] = round_or_none(ratio(noisy, times_us["cublas"]), 4)
    row["mixed_over_noisy"] = round_or_none(ratio(times_us["mixed"], noisy), 4)
    row["clean_over_cublas"] = round_or_none(ratio(times_us["clean"], times_us["cublas"]), 4)
    row["extra_bytes"] = int(extra_bytes)
    row["weight_bytes"] = case.n * case.k * elem_size
    row["materialized_extra_bytes"] = int(materialized_extra_bytes)
    row["noisy_gbps"] = round_or_none(moved / (noisy * 1e-6) / 1e9 if noisy > 0 else None, 1)
    row["noisy_tflops"] = round_or_none(flops / (noisy * 1e-6) / 1e12 if noisy > 0 else None, 3)
    for name in GLU_TIMED:
        row[f"{name}_us"] = round_or_none(times_us.get(name), 3)
    row["glu_fused_over_unfused"] = round_or_none(ratio(times_us.get("glu_fused"), times_us.get("glu_unfused")), 4)
    return row


def error_row(case: Case, error: BaseException) -> dict:
    return _error_row(ROW_KEYS, error, shape=case.name, M=case.m, N=case.n, K=case.k)



def _where(r: dict) -> str:
    return f"{r.get('shape', '?')} M={r.get('M')}"


def _rows_at(test: Callable[[int], bool]) -> Callable[[dict], bool]:
    return lambda r: isinstance(r.get("M"), (int, float)) and test(r["M"])


# The targets psnrl bench all's summary checks, then the ones only this bench's markdown does;
# a failed row counts as a miss.
TARGETS = (
    Bound(f"noisy/cuBLAS <= {DECODE_RATIO:.2f} at M <= {DECODE_MAX_M}", "noisy_over_cublas", DECODE_RATIO,
          _rows_at(lambda m: m <= DECODE_MAX_M), _where),
    Bound(f"noisy/cuBLAS <= {LEARNER_RATIO:.2f} at M >= {LEARNER_MIN_M}", "noisy_over_cublas", LEARNER_RATIO,
          _rows_at(lambda m: m >= LEARNER_MIN_M), _where),
)
ALL_TARGETS = TARGETS + (
    Bound(f"mixed no slower than noisy (mixed/noisy <= {MIXED_RATIO:.2f}, {round((MIXED_RATIO - 1) * 100)}% "
          "for timing noise)", "mixed_over_noisy", MIXED_RATIO, lambda r: True, _where),
    Bound(f"clean path/cuBLAS <= {CLEAN_RATIO:.2f}", "clean_over_cublas", CLEAN_RATIO, lambda r: True, _where),
    Bound(f"extra bytes = 0 at M <= {DECODE_MAX_M}", "extra_bytes", 0, _rows_at(lambda m: m <= DECODE_MAX_M), _where),
    Bound(f"extra bytes <= one weight at M >= {SCRATCH_MIN_M}", "extra_bytes", "weight_bytes",
          _rows_at(lambda m: m >= SCRATCH_MIN_M), _where),
)


def check_targets(rows: Sequence[dict]) -> list[dict]:
    """One entry per target: {"target", "checked", "misses": [(row, value, limit), ...]}."""
    results = []
    for bound in ALL_TARGETS:
        mine = [r for r in rows if bound.applies(r)]
        checks = [(r, *bound.check(r)) for r in mine]
        results.append({"target": bound.title, "checked": len(mine),
                        "misses": [(r, value, limit) for r, value, limit, met in checks if not met]})
    return results


def _describe_miss(row: dict, value, limit) -> str:
    if value is None:
        return f"{_where(row)}: not measured" + (f" ({row['error']})" if row.get("error") else "")
    if isinstance(value, int):  # bytes; ratios are floats
        return f"{_where(row)}: {value} B (limit {limit} B)"
    return f"{_where(row)}: {value:.3f} (+{value - limit:.3f}, {100 * (value / limit - 1):.1f}% over)"


def _rows(count: int) -> str:
    return f"{count} row" + ("" if count == 1 else "s")


def render_targets(rows: Sequence[dict]) -> list[str]:
    lines, results = [], check_targets(rows)
    for result in results:
        misses, checked = result["misses"], result["checked"]
        if checked == 0:
            lines.append(f"- {result['target']}: no rows measured")
        elif not misses:
            lines.append(f"- {result['target']}: PASS ({_rows(checked)})")
        else:
            listed = "; ".join(_describe_miss(*miss) for miss in misses)
            lines.append(f"- {result['target']}: MISS {len(misses)} of {_rows(checked)}: {listed}")
    total = sum(len(r["misses"]) for r in results)
    return ["**Targets: all met.**" if total == 0 else f"**Targets: {total} miss{'es' if total != 1 else ''}.**",
            *lines]


COLUMNS = (
    Column("shape", "shape", left=True), Column("M", "M"), Column("N", "N"), Column("K", "K"),
    Column("cublas_us", "cuBLAS µs", "{:.1f}"), Column("clean_us", "clean µs", "{:.1f}"),
    Column("noisy_us", "noisy µs", "{:.1f}"), Column("mixed_us", "mixed µs", "{:.1f}"),
    Column("fused_us", "fused µs", "{:.1f}"), Column("materialized_us", "materialized µs", "{:.1f}"),
    Column("noisy_over_cublas", "noisy/cuBLAS", "{:.3f}"), Column("mixed_over_noisy", "mixed/noisy", "{:.3f}"),
    Column("clean_over_cublas", "clean/cuBLAS", "{:.3f}"),
    Column("extra_bytes", "extra B", "{:,}"), Column("materialized_extra_bytes", "materialized extra B", "{:,}"),
    Column("noisy_gbps", "noisy GB/s", "{:.0f}"), Column("noisy_tflops", "noisy TFLOP/s", "{:.2f}"),
    Column("glu_unfused_us", "SiLU·up unfused µs", "{:.1f}"), Column("glu_fused_us", "SiLU·up fused µs", "{:.1f}"),
    Column("glu_fused_over_unfused", "fused/unfused", "{:.3f}"),
)


def render_tables(rows: Sequence[dict], level: str = "##") -> list[str]:
    return [markdown_table(COLUMNS, rows), ""]


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    return render_document(NAME, meta, rows, _where, setting=f"dtype {meta['dtype']}, sigma {meta['sigma']}",
                           paragraphs=[f"Timing: {meta['method']}.", COLUMNS_NOTE],
                           body=[*render_tables(rows), "## Targets", "", *render_targets(rows), ""])


FILES = BenchFiles(NAME, META_KEYS, render_markdown)



def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                        help=f"models (full name or size; commas or spaces): {', '.join(MODELS)}")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="SHAPE",
                        help=f"MLP matmuls: {', '.join(SHAPES)}")
    parser.add_argument("--m", nargs="+", default=[str(m) for m in M_VALUES], metavar="M",
                        help=f"row counts (default {' '.join(map(str, M_VALUES))})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="noise std (default %(default)s)")
    parser.add_argument("--warmup", type=positive_int, default=DEFAULT_WARMUP,
                        help="untimed calls per measurement (default %(default)s)")
    parser.add_argument("--iters", type=positive_int, default=DEFAULT_ITERS,
                        help="timed calls per measurement; the median is reported (default %(default)s)")
    parser.add_argument("--flush-l2", action="store_true",
                        help="zero a 256 MiB buffer before every timed call (off by default)")


def _check(args: argparse.Namespace) -> None:
    args.models = [resolve_model(m) for m in split_list(args.models)]
    args.shapes = pick(args.shapes, SHAPES, "shape")
    args.m = positive_ints(args.m, "--m")
    check_sigma(args.sigma)


build_parser, parse_args = bench_cli(
    "noisy-gemm", "Time the fused noisy linear against cuBLAS, clean, mixed-stream and materialize-then-cuBLAS on the "
                  "Qwen2.5 MLP shapes; write noisy_gemm-<device>.json and .md.", _options, _check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(FILES, args, NO_CUDA_MESSAGE, "cuda")
    if run is None:
        return 2
    from tqdm import tqdm

    cases = build_cases(args.models, args.shapes, args.m)
    timer = EventTimer(args.warmup, args.iters, args.flush_l2)
    run.meta.update(dtype=args.dtype, sigma=args.sigma,
                    method=gpu_timing_method(args.warmup, args.iters, args.flush_l2, timer.spin),
                    warmup=args.warmup, iters=args.iters, mixed_rows=MIXED_NOTE, extra_bytes_method=EXTRA_NOTE)
    bar = tqdm(cases, desc="noisy-gemm", unit="case")
    for case in bar:
        bar.set_postfix_str(f"{case.name} M={case.m}")
        run.attempt(lambda: time_case(case, dtype=DTYPES[args.dtype], sigma=args.sigma, device="cuda", timer=timer,
                                      extra_bytes=cuda_extra_bytes),
                    lambda exc: error_row(case, exc), f"{case.name} M={case.m}")
        torch.cuda.empty_cache()
    bar.close()
    return run.close("\n".join([*render_tables(run.rows), *render_targets(run.rows)]))

if __name__ == "__main__":
    raise SystemExit(main())
