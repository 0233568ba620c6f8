"""Benchmark: the engine's host work per decode step, with the model stubbed out (runs anywhere).

What runs and what is counted: psnrl/bench/README.md (host).
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
from psnrl.bench.common import (BenchFiles, Column, bench_cli, error_row, markdown_table, positive_int, positive_ints,
                                render_document, start_run)

NAME = "host"
NO_CUDA_MESSAGE = "psnrl bench host --device cuda: no CUDA GPU found (the default --device cpu runs anywhere)"
BATCHES = (1, 64, 256)
PROMPT_LEN = 512  # as the decode bench's prompts: a sequence holds 33+ blocks
VOCAB = {"cuda": 151936, "cpu": 2048}
TARGET_MS = {1: 0.3, 256: 1.5}
TARGET_OPS = 10
ROW_KEYS = ("batch", "vocab", "host_ms", "host_ms_p90", "forward_ms", "sampler_ms", "engine_ms", "ops_per_step",
            "engine_ops", "steps", "target_ms")
META_KEYS = ("device", "torch", "triton", "transformers")


def does_work(func) -> bool:
    """An op that launches a kernel or a copy on a GPU; views (slices, selects, reshapes,
    detaches) only make tensor metadata."""
    return not (func.is_view or torch.Tag.inplace_view in func.tags or func is torch.ops.aten._unsafe_view.default)


class OpCounter(TorchDispatchMode):
    """Counts the torch ops that do work (``does_work``) while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += does_work(func)
        return func(*args, **(kwargs or {}))


def stub_model(llm, vocab: int) -> None:
    """Replace the model's forward and logits by a stub: a fixed hidden state and fixed random logits.

    Everything around the model stays: the runner's inputs and the decode graphs (on CUDA they
    capture the stub; on a CPU the same decode-graph host path runs uncaptured), so the host work
    measured is the one a GPU step pays.
    """
    from psnrl.engine.cuda_graphs import DecodeGraphs

    model = llm.model
    rows = max(llm.config.max_num_seqs, 256)  # the largest decode-graph bucket
    gen = torch.Generator().manual_seed(0)
    hidden = torch.zeros(llm.config.max_num_batched_tokens, 1, device=llm.device)
    logits = torch.randn(rows, vocab, generator=gen).to(llm.device)
    model.forward = lambda input_ids, *args, **kwargs: hidden[:input_ids.shape[0]]
    model.logits = lambda h, noise=None: logits[:h.shape[0]]
    if llm.runner.graphs is None:
        llm.runner.use_graphs(DecodeGraphs(model, llm.runner.kv_caches, llm.blocks,
                                           llm.config.max_num_seqs, llm.max_model_len, capture=False,
                                           verbose=False))


class StepProbe(TorchDispatchMode):
    """Splits each step into the parts a GPU runs on its own, the forward (the decode graph's
    replay) and the sampler (the sampler graph's), and the rest, the engine's host work: the
    wall seconds of each part (device synchronized at its end) and, while active as a dispatch
    mode, the ops the engine dispatched. A replay counts as one launch whatever it runs
    (uncaptured on a CPU)."""

    PARTS = ("forward", "sampler", "engine")

    def __init__(self, sync):
        super().__init__()
        self.sync = sync
        self.part = "engine"
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.ops = dict.fromkeys(self.PARTS, 0)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.ops = dict.fromkeys(self.PARTS, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.part == "engine":
            self.ops["engine"] += does_work(func)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def timing(self, part: str):
        t0, self.part = time.perf_counter(), part
        self.ops[part] += 1  # the replay's launch
        try:
            yield
        finally:
            self.sync()
            self.seconds[part] += time.perf_counter() - t0
            self.part = "engine"

    @contextlib.contextmanager
    def on_graph_replays(self):
        """Decode and sampler graphs replay under ``timing`` while this is entered."""
        from psnrl.engine.cuda_graphs import DecodeGraph
        from psnrl.engine.sample_graphs import SampleGraphs

        decode, sample, probe = DecodeGraph.replay, SampleGraphs.replay, self

        def forward(graph):
            with probe.timing("forward"):
                decode(graph)

        def sampler(graphs, key):
            with probe.timing("sampler"):
                sample(graphs, key)
        DecodeGraph.replay, SampleGraphs.replay = forward, sampler  # type: ignore[method-assign]
        try:
            yield
        finally:
            DecodeGraph.replay, SampleGraphs.replay = decode, sample  # type: ignore[method-assign]


def measure(llm, batch: int, prompt_len: int, steps: int, sync) -> tuple[list[dict], dict | None]:
    """Per pure decode step: wall seconds and the forward's and sampler's shares of them; and the
    ops of each part on one mid-run step (counting slows every op down: that step is not timed)."""
    from psnrl.engine.sampling import SamplingParams

    probe = StepProbe(sync)
    records: list[dict] = []
    ops = None
    prompts = [[(7 * i + j) % 200 + 1 for j in range(prompt_len)] for i in range(batch)]
    llm.add_requests(prompts, SamplingParams(temperature=1.0, max_tokens=steps + 1, ignore_eos=True, seed=0))
    with probe.on_graph_replays():
        while llm.has_unfinished_requests():
            count = len(records) == steps // 2 and ops is None
            probe.reset()
            t0 = time.perf_counter()
            with probe if count else contextlib.nullcontext():
                out = llm.step()
            sync()
            seconds = time.perf_counter() - t0
            if out.decode and count:
                ops = dict(probe.ops)
            elif out.decode:
                records.append({"seconds": seconds, **probe.seconds})
    return records, ops


def measure_batch(path: Path, args: argparse.Namespace, vocab: int, batch: int, sync) -> dict:
    """The row of one batch: an engine on the stub model, its decode steps timed and their ops counted."""
    from psnrl.engine.llm import LLM

    max_len = args.prompt_len + args.steps + 2
    blocks = batch * (-(-max_len // 16) + 1) + 8
    llm = LLM(path, dtype="float32", device=args.device, block_size=16, num_kv_blocks=blocks,
              max_num_seqs=max(batch, 1), max_model_len=max_len, overlap=not args.no_overlap)
    stub_model(llm, vocab)
    records, ops = measure(llm, batch, args.prompt_len, args.steps, sync)
    llm.close()
    ms = sorted(1e3 * r["seconds"] for r in records)

    def median_ms(part: str) -> float:
        return round(statistics.median(1e3 * r[part] for r in records), 4)
    engine = [1e3 * (r["seconds"] - r["forward"] - r["sampler"]) for r in records]
    return {"batch": batch, "vocab": vocab, "host_ms": round(statistics.median(ms), 4),
            "host_ms_p90": round(ms[int(0.9 * (len(ms) - 1))], 4),
            "forward_ms": median_ms("forward"), "sampler_ms": median_ms("sampler"),
            "engine_ms": round(statistics.median(engine), 4),
            "ops_per_step": sum(ops.values()) if ops else None,
            "engine_ops": ops["engine"] if ops else None,
            "steps": len(ms), "target_ms": TARGET_MS.get(batch)}


COLUMNS = (
    Column("batch", "batch"), Column("vocab", "vocab", "{:,}"), Column("host_ms", "host ms/step", "{:.3f}"),
    Column("host_ms_p90", "p90 ms", "{:.3f}"), Column("forward_ms", "forward ms", "{:.3f}"),
    Column("sampler_ms", "sampler ms", "{:.3f}"), Column("engine_ms", "engine ms", "{:.3f}"),
    Column("target_ms", "target ms", "<= {:.1f}"), Column("ops_per_step", "ops/step"),
    Column("engine_ops", "engine ops"), Column("steps", "steps"),
)


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    return render_document(NAME, meta, rows, lambda r: f"batch {r['batch']}", paragraphs=[f"Method: {meta['method']}"],
                           body=[markdown_table(COLUMNS, rows), ""])


FILES = BenchFiles(NAME, META_KEYS, render_markdown)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", nargs="+", default=[str(b) for b in BATCHES], metavar="B",
                        help=f"batch sizes (default {' '.join(map(str, BATCHES))})")
    parser.add_argument("--steps", type=positive_int, default=64, help="decode steps timed per batch (default 64)")
    parser.add_argument("--prompt-len", type=positive_int, default=PROMPT_LEN,
                        help=f"prompt tokens per sequence (default {PROMPT_LEN})")
    parser.add_argument("--vocab", type=positive_int, default=None,
                        help="columns of the stub's logits (default 151936 on cuda, 2048 on cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-overlap", action="store_true",
                        help="run the engine one step at a time (EngineConfig.overlap=False), to compare")


def _check(args: argparse.Namespace) -> None:
    args.batches = sorted(positive_ints(args.batches, "--batches"))


build_parser, parse_args = bench_cli(
    "host", "Host time and ops per decode step of the engine with a stub forward (runs on a CPU); writes "
            "host-<device>.json and .md.", _options, _check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vocab = args.vocab or VOCAB[args.device]
    run = start_run(FILES, args, NO_CUDA_MESSAGE, method=(
        f"a 2-layer Qwen2 whose forward and logits are a stub returning fixed [rows, {vocab}] logits, "
        f"decode steps through the decode-graph host path, the engine's overlap "
        f"{'off' if args.no_overlap else 'on'}; batches of sequences with {args.prompt_len}-token "
        f"prompts sampled at temperature 1, each decoding exactly {args.steps} tokens; host ms = median "
        f"(and p90) wall time of the pure decode steps, device synchronized; forward ms = the graph "
        f"replay's share (the stub), sampler ms = the sampler graph's, engine ms = the rest (scheduling, "
        f"inputs, stop checks, the per-sequence Python); ops = torch ops that do work (views excluded) "
        f"in one decode step outside the graphs, each replay counting as one: all, and the engine's."))
    if run is None:
        return 2
    with tempfile.TemporaryDirectory(prefix="psnrl-host-") as tmp:
        cfg = {**model_configs.get_config("tiny"), "vocab_size": vocab}
        path = model_configs.write_random_checkpoint(cfg, Path(tmp) / "ckpt", dtype=torch.float32)
        for batch in args.batches:
            run.attempt(lambda: measure_batch(path, args, vocab, batch, run.sync),
                        lambda exc: error_row(ROW_KEYS, exc, batch=batch, vocab=vocab), f"batch {batch}",
                        lambda row: f"engine {row['engine_ms']:.3f} ms/step, {row['engine_ops']} engine ops/step")
    return run.close()


if __name__ == "__main__":
    raise SystemExit(main())
