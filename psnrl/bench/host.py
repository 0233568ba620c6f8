"""Benchmark: the engine's host work per decode step, with the model forward stubbed out.

The model's forward is replaced by a stub that returns fixed logits (``--vocab`` columns:
151,936 on CUDA as Qwen2.5 has, 2,048 on a CPU by default), so what is left is the engine
around it: scheduling and block bookkeeping, building the step's inputs, sampling, stop checks
and the per-sequence Python. For each batch (default 1, 64, 256 sequences sampled at temperature
1, each decoding exactly ``--steps`` tokens after a 16-token prompt) it reports the median wall
time of one pure decode step (device work included: each step ends in a device-to-host copy)
and the torch ops it launched, counted by a ``TorchDispatchMode`` (on a GPU, each is a kernel
launch outside any CUDA graph, or a copy), each split into the sampler's part and the rest (the
engine's own host work). On a CPU the sampler's ops are real compute over [B, V] logits that a
GPU does in its own kernels; the engine's part is the host cost that stays. Targets (this
engine's roadmap): <= 0.3 ms per step at batch 1 and <= 1.5 ms at batch 256 on a 2-core CPU,
at most 10 ops per step.

Writes ``psnrl/bench/results/host-<device>.json`` and ``.md``. ``psnrl bench host [options]``
runs anywhere (``--device cuda`` on a GPU machine).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from psnrl.bench import model_configs
from psnrl.bench.common import (BenchFiles, BenchRun, Column, add_out_dir, cuda_missing, device_and_sync, error_row,
                                errors_section, markdown_table, positive_int, positive_ints, run_meta)

NAME = "host"
NO_CUDA_MESSAGE = "psnrl bench host --device cuda: no CUDA GPU found (the default --device cpu runs anywhere)"
BATCHES = (1, 64, 256)
PROMPT_LEN = 16
VOCAB = {"cuda": 151936, "cpu": 2048}
TARGET_MS = {1: 0.3, 256: 1.5}
TARGET_OPS = 10
ROW_KEYS = ("batch", "vocab", "host_ms", "host_ms_p90", "sampler_ms", "engine_ms", "ops_per_step", "sampler_ops",
            "steps", "target_ms")
META_KEYS = ("device", "torch", "triton", "transformers")


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched while it is active (each a kernel launch or copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def stub_forward(llm, vocab: int, batch: int) -> None:
    """The engine's forward, replaced: fixed random logits for the step's sampling rows."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen).to(llm.device)

    def run(seqs, tables, specs):
        return logits[:sum(1 for entry in seqs if entry.samples)]
    llm.runner.run = run


class TimedSampler:
    """The engine's sampler, timing each call (device synchronized) and counting its ops."""

    def __init__(self, inner, sync):
        self.inner, self.sync = inner, sync
        self.seconds = 0.0
        self.ops = 0
        self.counting = False  # counting ops slows every op down: only on the untimed step

    def __call__(self, *args, **kwargs):
        counter = OpCounter()
        t0 = time.perf_counter()
        with counter if self.counting else contextlib.nullcontext():
            out = self.inner(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.ops += counter.count
        return out

    def sample_seeds(self, params):
        return self.inner.sample_seeds(params)


def measure(llm, batch: int, steps: int, sync) -> list[dict]:
    """Per pure decode step: wall seconds, the sampler's share of them, and (on one mid-run step,
    not timed) the ops of the whole step and of its sampler."""
    from psnrl.engine.sampling import SamplingParams

    sampler = llm.sampler = TimedSampler(llm.sampler, sync)
    records: list[dict] = []
    ops = None
    prompts = [[(7 * i + j) % 200 + 1 for j in range(PROMPT_LEN)] for i in range(batch)]
    llm.add_requests(prompts, SamplingParams(temperature=1.0, max_tokens=steps + 1, ignore_eos=True, seed=0))
    while llm.has_unfinished_requests():
        count = len(records) == steps // 2 and ops is None  # one mid-run step counts its ops (untimed)
        counter = OpCounter()
        sampler.seconds, sampler.ops, sampler.counting = 0.0, 0, count
        t0 = time.perf_counter()
        with counter if count else contextlib.nullcontext():
            out = llm.step()
        sync()
        seconds = time.perf_counter() - t0
        if out.decode and count:
            ops = {"ops": counter.count, "sampler_ops": sampler.ops}
        elif out.decode:
            records.append({"seconds": seconds, "sampler_seconds": sampler.seconds})
    return records + ([ops] if ops else [])


COLUMNS = (
    Column("batch", "batch"), Column("vocab", "vocab", "{:,}"), Column("host_ms", "host ms/step", "{:.3f}"),
    Column("host_ms_p90", "p90 ms", "{:.3f}"), Column("sampler_ms", "sampler ms", "{:.3f}"),
    Column("engine_ms", "engine ms", "{:.3f}"), Column("ops_per_step", "ops/step"),
    Column("sampler_ops", "sampler ops"),
    Column("target_ms", "target ms", "<= {:.1f}"), Column("steps", "steps"),
)


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    parts = [f"# host on {meta['device']}", "", f"torch {meta['torch']}, transformers {meta['transformers']}.", "",
             f"Method: {meta['method']}", "", markdown_table(COLUMNS, rows), ""]
    return "\n".join(parts + errors_section(rows, lambda r: f"batch {r['batch']}"))


FILES = BenchFiles(NAME, META_KEYS, render_markdown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psnrl bench host",
        description="Host time and ops per decode step of the engine with a stub forward (runs on a CPU); "
                    "writes host-<device>.json and .md.")
    parser.add_argument("--batches", nargs="+", default=[str(b) for b in BATCHES], metavar="B",
                        help=f"batch sizes (default {' '.join(map(str, BATCHES))})")
    parser.add_argument("--steps", type=positive_int, default=64, help="decode steps timed per batch (default 64)")
    parser.add_argument("--vocab", type=positive_int, default=None,
                        help="columns of the stub's logits (default 151936 on cuda, 2048 on cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    add_out_dir(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        batches = sorted(positive_ints(args.batches, "--batches"))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if cuda_missing(args.device, NO_CUDA_MESSAGE):
        return 2
    from psnrl.engine.llm import LLM

    vocab = args.vocab or VOCAB[args.device]
    device_name, sync = device_and_sync(args.device)
    meta = run_meta(device_name, method=(
        f"a 2-layer Qwen2 whose forward is a stub returning fixed [rows, {vocab}] logits; batches of "
        f"sequences with {PROMPT_LEN}-token prompts sampled at temperature 1, each decoding exactly "
        f"{args.steps} tokens; host ms = median (and p90) wall time of the pure decode steps, device "
        f"synchronized; sampler ms = the sampler's share of it (timed around the engine's sampler, device "
        f"synchronized), engine ms = the rest (scheduling, inputs, stop checks, the per-sequence Python); "
        f"ops = torch ops dispatched in one decode step, and by its sampler (TorchDispatchMode)."))
    run = BenchRun(FILES, meta, args.out_dir)
    with tempfile.TemporaryDirectory(prefix="psnrl-host-") as tmp:
        cfg = {**model_configs.get_config("tiny"), "vocab_size": vocab}
        path = model_configs.write_random_checkpoint(cfg, Path(tmp) / "ckpt", dtype=torch.float32)
        for batch in batches:
            try:
                blocks = batch * (-(-(PROMPT_LEN + args.steps + 2) // 16) + 1) + 8
                llm = LLM(path, dtype="float32", device=args.device, block_size=16, num_kv_blocks=blocks,
                          max_num_seqs=max(batch, 1), max_model_len=PROMPT_LEN + args.steps + 2)
                stub_forward(llm, vocab, batch)
                records = measure(llm, batch, args.steps, sync)
                llm.close()
                ops = records.pop() if records and "ops" in records[-1] else {"ops": None, "sampler_ops": None}
                ms = sorted(1e3 * r["seconds"] for r in records)
                engine = [1e3 * (r["seconds"] - r["sampler_seconds"]) for r in records]
                row = {"batch": batch, "vocab": vocab, "host_ms": round(statistics.median(ms), 4),
                       "host_ms_p90": round(ms[int(0.9 * (len(ms) - 1))], 4),
                       "sampler_ms": round(statistics.median(1e3 * r["sampler_seconds"] for r in records), 4),
                       "engine_ms": round(statistics.median(engine), 4),
                       "ops_per_step": ops["ops"], "sampler_ops": ops["sampler_ops"],
                       "steps": len(ms), "target_ms": TARGET_MS.get(batch)}
            except Exception as exc:  # a failed batch is a row; the others still run
                row = error_row(ROW_KEYS, exc, batch=batch, vocab=vocab)
            run.record(row, f"batch {batch}", None if row.get("error") else
                       f"{row['host_ms']:.3f} ms/step, {row['ops_per_step']} ops/step")
    return run.close()


if __name__ == "__main__":
    raise SystemExit(main())
