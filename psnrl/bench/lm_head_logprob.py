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
from typing import Callable, Sequence

import torch

from psnrl.bench.common import (TORCH_DTYPES, BenchFiles, Column, EventTimer, bench_cli, cuda_peak_bytes, error_row,
                                error_text, gpu_timing_method, markdown_table, positive_int, ratio, render_document,
                                round_or_none, start_run)

NAME = "lm_head_logprob"
NO_CUDA_MESSAGE = "psnrl bench lm-head needs a CUDA GPU; none found"

TOKENS = (2048, 8192, 16384)
VOCAB = 151936  # Qwen2.5
HIDDEN = (896, 1536)  # Qwen2.5-0.5B, -1.5B
DTYPES = TORCH_DTYPES
ENTROPY_WEIGHT = 0.01
METHODS = ("ours", "naive")

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
            peaks[name] = cuda_peak_bytes(step)
            times[name] = timer(step) / 1e3
        except Exception as exc:  # OOM of the naive path at large T is a result, not a failure
            errors[name] = error_text(exc, 300)
        torch.cuda.empty_cache()
    diffs = {}
    if len(outs) == 2:
        for i, key in enumerate(("logprob", "entropy")):
            diffs[key] = (outs["ours"][i] - outs["naive"][i]).abs().max().item()
    elem = hidden.element_size()
    return build_row(t, v, h, times, peaks, diffs, grad_bytes=(t + v) * h * elem, errors=errors)


def build_row(t: int, v: int, h: int, times_ms: dict, peaks: dict, diffs: dict, *,
              grad_bytes: int = 0, errors: dict | None = None) -> dict:
    """The JSON row of a case; a method missing from ``times_ms``/``peaks`` shows as None."""
    row: dict = {"T": t, "V": v, "H": h}
    for name in METHODS:
        row[f"{name}_ms"] = round_or_none(times_ms.get(name), 3)
        row[f"{name}_peak_bytes"] = peaks.get(name)
    row["grad_bytes"] = grad_bytes
    row["ours_over_naive_time"] = round_or_none(ratio(row["ours_ms"], row["naive_ms"]), 3)
    row["naive_over_ours_memory"] = round_or_none(ratio(row["naive_peak_bytes"], row["ours_peak_bytes"]), 2)
    row["max_diff_logprob"] = diffs.get("logprob")
    row["max_diff_entropy"] = diffs.get("entropy")
    if errors:
        row["errors"] = dict(errors)
    return row


COLUMNS = (
    Column("T", "T"), Column("V", "V"), Column("H", "H"),
    Column("ours_ms", "ours ms", "{:.2f}"), Column("naive_ms", "naive ms", "{:.2f}"),
    Column("ours_peak_bytes", "ours peak MiB", "mib"), Column("naive_peak_bytes", "naive peak MiB", "mib"),
    Column("grad_bytes", "of which grads MiB", "mib"),
    Column("ours_over_naive_time", "ours/naive time", "{:.3f}"),
    Column("naive_over_ours_memory", "naive/ours memory", "{:.1f}"),
    Column("max_diff_logprob", "max Δ logprob", "{:.2e}"), Column("max_diff_entropy", "max Δ entropy", "{:.2e}"),
)


METHOD_NOTE = (f"Each call: forward + backward of sum(logprob) + {ENTROPY_WEIGHT} sum(entropy) wrt hidden and "
               "weight. ours = psnrl.kernels.lm_head_logprob; naive = full logits, fp32 log_softmax, gather, "
               "entropy, autograd. Peak = max_memory_allocated during one call minus memory_allocated before it, "
               "the returned gradients included.")


def _case(r: dict) -> str:
    return f"T={r['T']} H={r['H']}"


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    # A failed case, and each method that failed in a case that ran (OOM of the naive path).
    failed = [{"where": _case(r), "error": r["error"]} for r in rows if r.get("error")]
    failed += [{"where": f"{_case(r)} {name}", "error": msg} for r in rows for name, msg in r.get("errors", {}).items()]
    return render_document(NAME, meta, failed, lambda r: r["where"], setting=f"dtype {meta['dtype']}",
                           paragraphs=[f"Timing: {meta['method']}.", METHOD_NOTE],
                           body=[markdown_table(COLUMNS, rows), ""])


FILES = BenchFiles(NAME, META_KEYS, render_markdown)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=list(TOKENS))
    parser.add_argument("--vocab", type=positive_int, default=VOCAB)
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--iters", type=positive_int, default=5,
                        help="timed calls; the median is reported (default %(default)s)")


build_parser, parse_args = bench_cli(
    "lm-head", "Peak memory and time of forward + backward of the fused lm_head log-prob against the "
               "materializing torch path; write lm_head_logprob-<device>.json and .md.", _options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(FILES, args, NO_CUDA_MESSAGE, "cuda")
    if run is None:
        return 2
    timer = EventTimer(args.warmup, args.iters)
    run.meta.update(dtype=args.dtype, method=gpu_timing_method(args.warmup, args.iters, False, timer.spin))
    for h in args.hidden:
        for t in args.tokens:
            run.attempt(lambda: run_case(t, args.vocab, h, DTYPES[args.dtype], timer),
                        lambda exc: error_row(ROW_KEYS, exc, T=t, V=args.vocab, H=h), f"T={t} H={h}",
                        lambda row: markdown_table(COLUMNS, [row]).splitlines()[-1])
    rc = run.close(markdown_table(COLUMNS, run.rows))
    return rc or int(any("ours" in r.get("errors", {}) for r in run.rows))


if __name__ == "__main__":
    raise SystemExit(main())
