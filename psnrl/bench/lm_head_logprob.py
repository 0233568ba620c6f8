"""Benchmark: fused lm_head log-prob against the materializing torch path, forward + backward.

For each (T tokens, V vocabulary, H hidden) it runs, on one GPU, loss = sum(logprob) +
0.01 sum(entropy) and its gradients wrt hidden and weight, through

  ours   psnrl.kernels.lm_head_logprob.lm_head_logprob (no [T x V] logits)
  naive  logits = h @ W^T in full, upcast to fp32, log_softmax, gather, entropy (autograd)

and records the median time and the peak CUDA memory allocated during one call
above what was allocated before it (the returned gradients included: ``grad_bytes``
of it, the same for both), plus the largest difference between the two paths' outputs.
Writes ``psnrl/bench/results/lm_head_logprob-<device>.json`` and a markdown table beside it.

Run it with ``psnrl bench lm-head [options]`` or ``python -m psnrl.bench.lm_head_logprob``;
it needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from psnrl.bench.noisy_gemm import EventTimer, _atomic_write_text, device_slug, method_description

NAME = "lm_head_logprob"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
NO_CUDA_MESSAGE = "psnrl bench lm-head needs a CUDA GPU; none found"

TOKENS = (2048, 8192, 16384)
VOCAB = 151936  # Qwen2.5
HIDDEN = (896, 1536)  # Qwen2.5-0.5B, -1.5B
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENTROPY_WEIGHT = 0.01
METHODS = ("ours", "naive")

DEFAULT_WARMUP = 2
DEFAULT_ITERS = 5

ROW_KEYS = ("T", "V", "H", "ours_ms", "naive_ms", "ours_peak_bytes", "naive_peak_bytes", "grad_bytes",
            "ours_over_naive_time", "naive_over_ours_memory", "max_diff_logprob", "max_diff_entropy")
META_KEYS = ("device", "torch", "triton", "dtype", "method")


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def ours(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    from psnrl.kernels.lm_head_logprob import lm_head_logprob
    logprob, entropy, _ = lm_head_logprob(hidden, weight, targets)
    return logprob, entropy


FORWARDS = {"ours": ours, "naive": naive}


def train_step(forward: Callable, hidden: torch.Tensor, weight: torch.Tensor,
               targets: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """One forward + backward; returns the gradients wrt hidden and weight."""
    def step():
        logprob, entropy = forward(hidden, weight, targets)
        loss = logprob.sum() + ENTROPY_WEIGHT * entropy.sum()
        return torch.autograd.grad(loss, (hidden, weight))
    return step


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return int(torch.cuda.max_memory_allocated() - base)


def run_case(t: int, v: int, h: int, dtype: torch.dtype, timer: Callable[[Callable[[], object]], float]
             ) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(t + h)
    hidden = torch.randn(t, h, generator=gen, device="cuda", dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device="cuda", dtype=dtype) * h ** -0.5).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=gen, device="cuda")
    times, peaks, outs, errors = {}, {}, {}, {}
    for name in METHODS:
        try:
            with torch.no_grad():
                outs[name] = FORWARDS[name](hidden, weight, targets)
            step = train_step(FORWARDS[name], hidden, weight, targets)
            peaks[name] = peak_bytes(step)
            times[name] = timer(step) / 1e3
        except Exception as exc:  # OOM of the naive path at large T is a result, not a failure
            errors[name] = f"{type(exc).__name__}: {exc}".strip()[:300]
        torch.cuda.empty_cache()
    diffs = {}
    if len(outs) == 2:
        for i, key in enumerate(("logprob", "entropy")):
            diffs[key] = (outs["ours"][i] - outs["naive"][i]).abs().max().item()
    elem = hidden.element_size()
    return build_row(t, v, h, times, peaks, diffs, grad_bytes=(t + v) * h * elem, errors=errors)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def build_row(t: int, v: int, h: int, times_ms: dict, peaks: dict, diffs: dict, *,
              grad_bytes: int = 0, errors: dict | None = None) -> dict:
    """The JSON row of a case; a method missing from ``times_ms``/``peaks`` shows as None."""
    row = {"T": t, "V": v, "H": h}
    for name in METHODS:
        row[f"{name}_ms"] = _round(times_ms.get(name), 3)
        row[f"{name}_peak_bytes"] = peaks.get(name)
    row["grad_bytes"] = grad_bytes
    ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    row["ours_over_naive_time"] = _round(ratio(row["ours_ms"], row["naive_ms"]), 3)
    row["naive_over_ours_memory"] = _round(ratio(row["naive_peak_bytes"], row["ours_peak_bytes"]), 2)
    row["max_diff_logprob"] = diffs.get("logprob")
    row["max_diff_entropy"] = diffs.get("entropy")
    if errors:
        row["errors"] = dict(errors)
    return row


_COLUMNS = (
    ("T", "T", "{}"), ("V", "V", "{}"), ("H", "H", "{}"),
    ("ours_ms", "ours ms", "{:.2f}"), ("naive_ms", "naive ms", "{:.2f}"),
    ("ours_peak_bytes", "ours peak MiB", "mib"), ("naive_peak_bytes", "naive peak MiB", "mib"),
    ("grad_bytes", "of which grads MiB", "mib"),
    ("ours_over_naive_time", "ours/naive time", "{:.3f}"),
    ("naive_over_ours_memory", "naive/ours memory", "{:.1f}"),
    ("max_diff_logprob", "max Δ logprob", "{:.2e}"), ("max_diff_entropy", "max Δ entropy", "{:.2e}"),
)


def render_table(rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in _COLUMNS) + " |",
             "|" + "|".join("---:" for _ in _COLUMNS) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in _COLUMNS:
            value = row.get(key)
            cells.append("—" if value is None else f"{value / 2**20:,.0f}" if fmt == "mib"
                         else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    errors = [f"- T={r['T']} H={r['H']} {name}: {msg}"
              for r in rows for name, msg in r.get("errors", {}).items()]
    parts = [f"# lm_head_logprob on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, dtype {meta['dtype']}.", "",
             f"Timing: {meta['method']}.", "",
             f"Each call: forward + backward of sum(logprob) + {ENTROPY_WEIGHT} sum(entropy) wrt "
             "hidden and weight. ours = psnrl.kernels.lm_head_logprob; naive = full logits, fp32 "
             "log_softmax, gather, entropy, autograd. Peak = max_memory_allocated during one call "
             "minus memory_allocated before it, the returned gradients included.", "",
             render_table(rows), ""]
    if errors:
        parts += ["## Errors", "", *errors, ""]
    return "\n".join(parts)


def write_results(out_dir: str | os.PathLike, meta: dict, rows: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``lm_head_logprob-<device>.json`` and ``.md`` into ``out_dir`` atomically."""
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"results metadata lacks {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{NAME}-{device_slug(meta['device'])}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    doc = {**meta, "rows": [dict(r) for r in rows]}
    _atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    _atomic_write_text(md_path, render_markdown(meta, rows))
    return json_path, md_path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psnrl bench lm-head",
        description="Peak memory and time of forward + backward of the fused lm_head log-prob "
                    "against the materializing torch path; write lm_head_logprob-<device>.json and .md.")
    parser.add_argument("--tokens", type=_positive_int, nargs="+", default=list(TOKENS))
    parser.add_argument("--vocab", type=_positive_int, default=VOCAB)
    parser.add_argument("--hidden", type=_positive_int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=_positive_int, default=DEFAULT_WARMUP)
    parser.add_argument("--iters", type=_positive_int, default=DEFAULT_ITERS,
                        help="timed calls; the median is reported (default %(default)s)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2

    import triton

    timer = EventTimer(args.warmup, args.iters)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": args.dtype,
            "method": method_description(args.warmup, args.iters, False, timer.spin)}
    rows: list[dict] = []
    for h in args.hidden:
        for t in args.tokens:
            rows.append(run_case(t, args.vocab, h, DTYPES[args.dtype], timer))
            print(render_table(rows[-1:]).splitlines()[-1], flush=True)
            json_path, md_path = write_results(args.out_dir, meta, rows)
    print(render_table(rows))
    print(f"\nwrote {json_path}\nwrote {md_path}")
    return 1 if any("ours" in r.get("errors", {}) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
