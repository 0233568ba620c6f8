"""Benchmark: rollout decode throughput of the engine (clean, noisy, mixed) against HF generate.

For each model (random weights in the real Qwen2.5 shapes, bench/model_configs.py) and
batch size, in one run on one device, every request gets a prompt of random token ids
and generates exactly ``--output-len`` tokens (the engine with ``ignore_eos=True``,
transformers with ``min_new_tokens = max_new_tokens``), sampled at temperature 1
(top_p 1, no top_k; ``--greedy`` for argmax). Modes:

  clean   the engine, every request on the clean policy
  noisy   the engine, every request with NoiseSpec(noise_seed, sigma, targets) (one spec)
  mixed   the engine, even requests noisy and odd ones clean (batch 1: the request is noisy)
  hf      transformers' AutoModelForCausalLM.generate on the same checkpoint (sdpa attention,
          its default dynamic KV cache)

Each row reports output tokens/s (all generated tokens / wall time of the whole call,
prefill included), the median time of a pure decode step (every scheduled sequence
adds one token), and the roofline column: the bytes one decode step must read (the
weights, lm_head included, and the K/V of the mean decode context, prompt_len +
output_len / 2) divided by the step time, against the device's peak memory bandwidth
(PEAK_GBPS, ``--peak-gbps`` overrides). Ratios are of tokens/s: ``over_hf`` = ours / HF
(> 1: faster than HF), ``over_clean`` = noisy or mixed / clean (< 1: slower than clean),
``over_noisy`` = mixed / noisy.

Writes ``bench/results/decode-<device>.json`` and a markdown summary beside it. Run it with
``psnrl bench decode [options]`` or ``python -m bench.decode``; it needs a CUDA GPU, except
with ``--device cpu`` (a smoke run: ``--device cpu --models tiny --batches 1 2 --prompt-len
8 --output-len 8 --dtype fp32``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from bench import model_configs
from bench.common import (RESULTS_DIR, device_slug, fmt_cell, positive_int, ratio, results_document,
                          round_or_none, split_list, write_result_files)

NAME = "decode"
DEFAULT_OUT_DIR = RESULTS_DIR
NO_CUDA_MESSAGE = ("psnrl bench decode needs a CUDA GPU; none found "
                   "(--device cpu runs a CPU smoke test, e.g. --device cpu --models tiny)")

DEFAULT_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B")
BATCHES = (1, 8, 32, 128, 256)
PROMPT_LEN = 128
OUTPUT_LEN = 256
MODES = ("clean", "noisy", "mixed", "hf")
ENGINE_MODES = ("clean", "noisy", "mixed")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_SIGMA = 0.004
DEFAULT_TARGETS = "mlp"
NOISE_SEED = 0x5EED_0002
HF_WARMUP_TOKENS = 16

# Peak DRAM bandwidth in GB/s by device-name substring, first match wins (case-insensitive),
# so the more specific names come first. Vendor datasheet figures.
PEAK_GBPS: tuple[tuple[str, float], ...] = (
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
)

ROW_KEYS = ("model", "batch", "prompt_len", "output_len", "mode", "tokens_per_s", "step_ms", "gbps",
            "over_hf", "over_clean")
META_KEYS = ("device", "torch", "triton", "transformers")

RATIO_NOTE = ("Ratios are of tokens/s: ours/HF > 1 means faster than transformers; noisy/clean "
              "and mixed/clean < 1 mean slower than the clean engine; mixed/noisy is mixed over "
              "all-noisy.")
ROOFLINE_NOTE = ("GB/s = bytes one decode step must read (all weights, lm_head included, the "
                 "input embedding only for the batch's rows; plus K and V of the mean decode "
                 "context, prompt_len + output_len / 2, for every sequence) / median decode-step "
                 "time; the same bytes for every mode, so noise generated in the kernels adds none.")


# ---------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------

def peak_gbps(device_name: str) -> float | None:
    """The device's peak memory bandwidth (GB/s) from PEAK_GBPS, or None if unknown."""
    name = device_name.lower()
    for key, gbps in PEAK_GBPS:
        if key.lower() in name:
            return gbps
    return None


def decode_bytes_per_step(model, batch: int, context: float, dtype: torch.dtype | str) -> int:
    """Bytes one decode step of ``batch`` sequences with ``context`` cached tokens must read."""
    cfg = model_configs.get_config(model)
    elem = torch.empty(0, dtype=model_configs.as_dtype(dtype)).element_size()
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    params = model_configs.param_count(cfg)
    if not cfg.get("tie_word_embeddings", False):
        params -= vocab * hidden  # the input embedding is gathered, not read whole
    weights = (params + batch * hidden) * elem
    kv = batch * context * model_configs.kv_bytes_per_token(cfg, dtype)
    return int(weights + kv)


def mean_decode_context(prompt_len: int, output_len: int) -> float:
    """Mean cached tokens (new one included) over the decode steps: prompt_len + output_len / 2."""
    return prompt_len + output_len / 2


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

@dataclass
class Timing:
    total_s: float          # wall time of the whole generate call
    decode_ms: list[float]  # each pure decode step
    prefill_s: float        # steps that computed prompt tokens (HF: up to its first token)
    output_tokens: int


def _engine_requests(batch: int, mode: str, sigma: float, targets: str, noise_seed: int):
    from engine.noise_spec import NoiseSpec

    if mode == "clean":
        return [None] * batch
    spec = NoiseSpec(noise_seed, sigma, targets)
    if mode == "noisy":
        return [spec] * batch
    if mode == "mixed":
        return [spec if i % 2 == 0 else None for i in range(batch)]
    raise ValueError(f"not an engine mode: {mode!r}")


@contextmanager
def _step_clock(llm, sync: Callable[[], None]) -> Iterator[list[tuple[float, bool]]]:
    """Record (seconds, is pure decode) for every engine step while the block runs.

    Each step ends by copying its sampled tokens to the host, so timing it on the host
    clock measures the device work too; ``sync`` makes sure of it.
    """
    steps: list[tuple[float, bool]] = []
    kinds: list[bool] = []
    run, step = llm.runner.run, llm._step

    def timed_run(seqs, tables, specs):
        kinds.append(all(entry.num_new == 1 for entry in seqs))
        return run(seqs, tables, specs)

    def timed_step(specs):
        before = len(kinds)
        t0 = time.perf_counter()
        finished = step(specs)
        sync()
        if len(kinds) > before:
            steps.append((time.perf_counter() - t0, kinds[-1]))
        return finished

    llm.runner.run, llm._step = timed_run, timed_step
    try:
        yield steps
    finally:
        del llm.runner.run, llm._step  # back to the class's methods


def time_engine(llm, prompts: list[list[int]], output_len: int, noise: list, *, greedy: bool,
                seed: int, sync: Callable[[], None]) -> Timing:
    """One ``llm.generate`` of every prompt to exactly ``output_len`` tokens, timed per step."""
    from engine.sampling import SamplingParams

    params = [SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=-1,
                             max_tokens=output_len, ignore_eos=True, seed=seed + i)
              for i in range(len(prompts))]
    llm.blocks.clear_prefix_cache()  # every run computes its prompts
    with _step_clock(llm, sync) as steps:
        sync()
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, noise=noise, use_tqdm=False)
        sync()
        total = time.perf_counter() - t0
    produced = 0
    for out in outputs:
        for completion in out.outputs:
            if len(completion.token_ids) != output_len or completion.finish_reason != "length":
                raise RuntimeError(f"request {out.request_id} stopped after {len(completion.token_ids)} "
                                   f"of {output_len} tokens ({completion.finish_reason})")
            produced += len(completion.token_ids)
    return Timing(total, [1e3 * s for s, decode in steps if decode],
                  sum(s for s, decode in steps if not decode), produced)


def time_hf(model, prompts: list[list[int]], output_len: int, *, greedy: bool, seed: int,
            sync: Callable[[], None]) -> Timing:
    """One transformers ``generate`` of the batch to exactly ``output_len`` new tokens.

    A stopping criterion that never stops timestamps every generation step.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    clock = Clock()
    options = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=not greedy,
                   stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
    if not greedy:
        options.update(temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(seed)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        sync()
        total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    if new != output_len:
        raise RuntimeError(f"transformers generated {new} of {output_len} tokens")
    times = [t0] + clock.times
    steps = [1e3 * (b - a) for a, b in zip(times[1:], times[2:])]
    return Timing(total, steps, times[1] - t0 if len(times) > 1 else total, new * ids.shape[0])


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

def build_row(model: str, batch: int, prompt_len: int, output_len: int, mode: str,
              timings: Sequence[Timing], bytes_per_step: int, peak: float | None) -> dict:
    """The JSON row of one measurement (median over its repeats); ratios are added by add_ratios."""
    tokens_per_s = statistics.median(t.output_tokens / t.total_s for t in timings)
    steps = [ms for t in timings for ms in t.decode_ms]
    step_ms = statistics.median(steps) if steps else None
    gbps = bytes_per_step / (step_ms * 1e-3) / 1e9 if step_ms else None
    return {
        "model": model, "batch": batch, "prompt_len": prompt_len, "output_len": output_len,
        "mode": mode,
        "tokens_per_s": round_or_none(tokens_per_s, 2),
        "step_ms": round_or_none(step_ms, 4),
        "gbps": round_or_none(gbps, 4),
        "over_hf": None, "over_clean": None, "over_noisy": None,
        "pct_peak": round_or_none(100 * gbps / peak if gbps and peak else None, 2),
        "prefill_s": round_or_none(statistics.median(t.prefill_s for t in timings), 4),
        "total_s": round_or_none(statistics.median(t.total_s for t in timings), 4),
        "decode_steps": len(steps) // max(len(timings), 1),
        "bytes_per_step": bytes_per_step,
        "repeats": len(timings),
    }


def error_row(model: str, batch: int, prompt_len: int, output_len: int, mode: str,
              error: BaseException) -> dict:
    row = {key: None for key in ROW_KEYS}
    row.update(model=model, batch=batch, prompt_len=prompt_len, output_len=output_len, mode=mode,
               over_noisy=None, error=f"{type(error).__name__}: {error}".strip()[:500])
    return row


def add_ratios(rows: Sequence[dict]) -> list[dict]:
    """Fill over_hf, over_clean and over_noisy from the rows of the same (model, batch, lengths)."""
    def key(row):
        return row["model"], row["batch"], row["prompt_len"], row["output_len"]

    speed = {(key(r), r["mode"]): r.get("tokens_per_s") for r in rows}
    out = []
    for row in rows:
        row = dict(row)
        k, mode = key(row), row["mode"]
        tps = row.get("tokens_per_s")
        row["over_hf"] = (round_or_none(ratio(tps, speed.get((k, "hf"))), 4)
                          if mode in ENGINE_MODES else None)
        row["over_clean"] = (round_or_none(ratio(tps, speed.get((k, "clean"))), 4)
                             if mode in ("noisy", "mixed") else None)
        row["over_noisy"] = (round_or_none(ratio(tps, speed.get((k, "noisy"))), 4)
                             if mode == "mixed" else None)
        out.append(row)
    return out


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def render_model_table(rows: Sequence[dict]) -> str:
    """One line per (batch, lengths) of one model, the modes side by side."""
    cols = [("batch", None, None)]
    cols += [(f"{m} tok/s", m, "tokens_per_s") for m in MODES]
    cols += [(f"{m} ms/step", m, "step_ms") for m in MODES]
    cols += [("clean/HF", "clean", "over_hf"), ("noisy/HF", "noisy", "over_hf"),
             ("noisy/clean", "noisy", "over_clean"), ("mixed/clean", "mixed", "over_clean"),
             ("mixed/noisy", "mixed", "over_noisy"),
             ("clean GB/s", "clean", "gbps"), ("noisy GB/s", "noisy", "gbps"),
             ("noisy % peak", "noisy", "pct_peak"), ("HF GB/s", "hf", "gbps")]
    formats = {"tokens_per_s": ",.0f", "step_ms": ".2f", "over_hf": ".2f", "over_clean": ".3f",
               "over_noisy": ".3f", "gbps": ",.1f", "pct_peak": ".1f"}
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["batch"], row["prompt_len"], row["output_len"]), {})[row["mode"]] = row
    lines = ["| " + " | ".join(title for title, _, _ in cols) + " |",
             "|" + "|".join("---:" for _ in cols) + "|"]
    for (batch, _, _), by_mode in sorted(groups.items()):
        cells = [str(batch)]
        for _, mode, key in cols[1:]:
            row = by_mode.get(mode)
            cells.append("—" if row is None else fmt_cell(row.get(key), formats[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    rows = add_ratios(rows)
    peak = meta.get("peak_gbps")
    parts = [
        f"# decode on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; "
        f"dtype {meta.get('dtype', '?')}; {meta.get('sampling', '')}; noise: {meta.get('noise', '')}.",
        "",
        f"Peak memory bandwidth: {'unknown' if peak is None else f'{peak:,.0f} GB/s'}"
        f"{' (' + meta['peak_source'] + ')' if meta.get('peak_source') else ''}.",
        "",
        f"Method: {meta.get('method', '')}",
        "",
        f"{RATIO_NOTE} {ROOFLINE_NOTE}",
        "",
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        lengths = sorted({(r["prompt_len"], r["output_len"]) for r in mine})
        for prompt_len, output_len in lengths:
            parts += [f"## {model}, prompt {prompt_len}, output {output_len}", "",
                      render_model_table([r for r in mine if (r["prompt_len"], r["output_len"]) ==
                                          (prompt_len, output_len)]), ""]
    errors = [r for r in rows if r.get("error")]
    if errors:
        parts += ["## Errors", ""]
        parts += [f"- {r['model']} batch {r['batch']} {r['mode']}: {r['error']}" for r in errors]
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------

def write_results(out_dir, meta: dict, rows: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``decode-<device>.json`` and ``.md`` into ``out_dir`` atomically; return their paths."""
    rows = add_ratios(rows)
    doc = results_document(meta, rows, META_KEYS)
    return write_result_files(out_dir, NAME, meta["device"], doc, render_markdown(meta, rows))


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------

def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed * 7919 + batch)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).tolist()


def checkpoint_dir(model: str, dtype: str, seed: int, cache: str | None, device: str,
                   tmp_root: Path) -> Path:
    """A random checkpoint of ``model``: reused from ``cache`` when complete there, else written."""
    cfg = model_configs.get_config(model)
    tag = {"config": cfg, "dtype": dtype, "seed": seed}
    if cache:
        path = Path(cache) / f"{model}-{dtype}-seed{seed}"
        marker = path / ".psnrl-random-checkpoint.json"
        if marker.is_file() and json.loads(marker.read_text()) == tag:
            return path
    else:
        path = tmp_root / model
    model_configs.write_random_checkpoint(cfg, path, dtype=dtype, seed=seed, device=device)
    if cache:
        (path / ".psnrl-random-checkpoint.json").write_text(json.dumps(tag))
    return path


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """Runs every (batch, mode) of one model and appends rows; writes results after each."""

    def __init__(self, args: argparse.Namespace, meta: dict, rows: list[dict], sync, log):
        self.args, self.meta, self.rows, self.sync, self.log = args, meta, rows, sync, log

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if row.get("error"):
            self.log(f"{row['model']} batch {row['batch']} {row['mode']}: {row['error']}")
        else:
            self.log(f"{row['model']} batch {row['batch']} {row['mode']}: "
                     f"{row['tokens_per_s']:,.1f} tok/s, {fmt_cell(row['step_ms'], '.2f')} ms/step")
        write_results(self.args.out_dir, self.meta, self.rows)

    def model(self, model: str, path: Path) -> None:
        a = self.args
        cfg = model_configs.get_config(model)
        context = mean_decode_context(a.prompt_len, a.output_len)
        engine_modes = [m for m in a.modes if m in ENGINE_MODES]
        prompts = {b: random_prompts(b, a.prompt_len, cfg["vocab_size"], a.seed) for b in a.batches}

        def measure(batch: int, mode: str, once: Callable[[], Timing],
                    warm: Callable[[], object]) -> bool:
            try:
                for _ in range(a.warmup):
                    warm()
                timings = [once() for _ in range(a.repeats)]
                row = build_row(model, batch, a.prompt_len, a.output_len, mode, timings,
                                decode_bytes_per_step(cfg, batch, context, a.torch_dtype), a.peak)
            except Exception as exc:  # OOM, a kernel failure: keep going
                row = error_row(model, batch, a.prompt_len, a.output_len, mode, exc)
            self.record(row)
            return not row.get("error")

        llm, failed = None, None
        for batch in a.batches:
            for mode in engine_modes:
                if llm is None and failed is None:
                    try:
                        llm = self.engine(path)
                    except Exception as exc:
                        failed = exc
                if failed is not None:
                    self.record(error_row(model, batch, a.prompt_len, a.output_len, mode, failed))
                    continue
                noise = _engine_requests(batch, mode, a.sigma, a.targets, a.noise_seed)

                def once(p=prompts[batch], n=noise):
                    return time_engine(llm, p, a.output_len, n, greedy=a.greedy, seed=a.seed,
                                       sync=self.sync)
                if not measure(batch, mode, once, once) and llm.scheduler.has_work():
                    llm = None  # a failed generate leaves requests behind: a fresh engine next
                    _free(a.device)
        llm = None
        _free(a.device)
        if "hf" in a.modes:
            try:
                hf = self.hf_model(path)
            except Exception as exc:
                hf = None
                for batch in a.batches:
                    self.record(error_row(model, batch, a.prompt_len, a.output_len, "hf", exc))
            if hf is not None:
                for batch in a.batches:
                    def once(p=prompts[batch], n=a.output_len):
                        return time_hf(hf, p, n, greedy=a.greedy, seed=a.seed, sync=self.sync)

                    def warm(p=prompts[batch]):
                        return time_hf(hf, p, min(a.output_len, HF_WARMUP_TOKENS), greedy=a.greedy,
                                       seed=a.seed, sync=self.sync)
                    measure(batch, "hf", once, warm)
                del hf
                _free(a.device)

    def engine(self, path: Path):
        from engine.llm import LLM

        a = self.args
        max_len = a.prompt_len + a.output_len
        per_seq = math.ceil(max_len / a.block_size) + 1
        blocks = max(a.batches) * per_seq
        blocks += math.ceil(0.02 * blocks) + 4  # above the admission watermark (1%)
        return LLM(path, dtype=DTYPES[a.dtype], device=a.device, max_model_len=max_len,
                   max_num_seqs=max(a.batches), max_num_batched_tokens=a.max_num_batched_tokens,
                   block_size=a.block_size, num_kv_blocks=blocks, seed=a.seed)

    def hf_model(self, path: Path):
        from transformers import AutoModelForCausalLM

        a = self.args
        model = AutoModelForCausalLM.from_pretrained(path, dtype=a.torch_dtype,
                                                     attn_implementation=a.hf_attn)
        return model.to(a.device).eval()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psnrl bench decode",
        description="Decode throughput of the rollout engine (clean, noisy, mixed) and of "
                    "transformers generate on random-weight Qwen2.5 checkpoints; writes "
                    "decode-<device>.json and .md.")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                        help=f"models (name or size; commas or spaces): {', '.join(model_configs.CONFIGS)} "
                             f"(default {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batches", nargs="+", default=[str(b) for b in BATCHES], metavar="B",
                        help=f"batch sizes (default {' '.join(map(str, BATCHES))})")
    parser.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE",
                        help=f"what to run: {', '.join(MODES)} (default all)")
    parser.add_argument("--prompt-len", type=positive_int, default=PROMPT_LEN,
                        help="prompt tokens per request (default %(default)s)")
    parser.add_argument("--output-len", type=positive_int, default=OUTPUT_LEN,
                        help="generated tokens per request, never fewer (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--greedy", action="store_true",
                        help="argmax decoding (default: sampling at temperature 1)")
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="noise std (default %(default)s)")
    parser.add_argument("--targets", default=DEFAULT_TARGETS,
                        help="noise targets: mlp, attn, lm_head or all (default %(default)s)")
    parser.add_argument("--noise-seed", type=int, default=NOISE_SEED)
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed")
    parser.add_argument("--warmup", type=_nonnegative_int, default=1,
                        help="untimed runs before each measurement (engine: the full run; HF: "
                             f"{HF_WARMUP_TOKENS} tokens) (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="timed runs per measurement; medians are reported (default %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=8192,
                        help="the engine's token budget per step (default %(default)s)")
    parser.add_argument("--block-size", type=positive_int, default=16, help="KV block size (default 16)")
    parser.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation (default sdpa)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's peak memory bandwidth in GB/s (default: from PEAK_GBPS by name)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run without a GPU (default cuda)")
    parser.add_argument("--ckpt-dir", default=None,
                        help="keep the random checkpoints here and reuse them (default: a temp dir)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing decode-<device>.json that this run does "
                             "not measure (to split a long run into several commands)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR),
                        help="where the results go (default: bench/results of this checkout)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.models = [model_configs.resolve(m) for m in split_list(args.models)]
        args.batches = sorted(dict.fromkeys(positive_int(b) for b in split_list(args.batches)))
        args.modes = split_list(args.modes)
        for mode in args.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        args.modes = [m for m in MODES if m in args.modes]
        if not args.models or not args.batches or not args.modes:
            raise ValueError("give at least one model, batch size and mode")
        if not math.isfinite(args.sigma) or args.sigma <= 0:
            raise ValueError(f"--sigma must be finite and > 0, got {args.sigma}")
        from engine.noise_spec import NoiseSpec
        NoiseSpec(args.noise_seed, args.sigma, args.targets)  # validates seed and targets
        if args.peak_gbps is not None and not args.peak_gbps > 0:
            raise ValueError(f"--peak-gbps must be > 0, got {args.peak_gbps}")
        if not (args.block_size & (args.block_size - 1)) == 0:
            raise ValueError(f"--block-size must be a power of two, got {args.block_size}")
        for model in args.models:
            limit = model_configs.CONFIGS[model]["max_position_embeddings"]
            if args.prompt_len + args.output_len > limit:
                raise ValueError(f"prompt + output = {args.prompt_len + args.output_len} tokens exceeds "
                                 f"{model}'s max_position_embeddings={limit}")
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    args.torch_dtype = model_configs.as_dtype(args.dtype)
    return args


def method_description(args: argparse.Namespace) -> str:
    return (f"each request: {args.prompt_len} random prompt tokens, exactly {args.output_len} "
            f"generated (engine: ignore_eos; HF: min_new_tokens = max_new_tokens); tokens/s = all "
            f"generated tokens / wall time of one generate call (prefill included); step = median "
            f"host wall time of the pure decode steps (each ends in a device-to-host copy of the "
            f"sampled tokens, so device work is included; HF: between consecutive stopping-criteria "
            f"calls); {args.warmup} untimed warmup run(s) and {args.repeats} timed run(s) per row, "
            f"medians reported; the engine's prefix cache is cleared before every run.")


def previous_rows(args: argparse.Namespace, device_name: str) -> list[dict]:
    """Rows of this device's results file that this run will not measure again."""
    path = Path(args.out_dir) / f"{NAME}-{device_slug(device_name)}.json"
    if not path.is_file():
        return []
    planned = {(m, b, args.prompt_len, args.output_len, mode)
               for m in args.models for b in args.batches for mode in args.modes}
    return [row for row in json.loads(path.read_text()).get("rows", [])
            if (row.get("model"), row.get("batch"), row.get("prompt_len"), row.get("output_len"),
                row.get("mode")) not in planned]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2

    import transformers
    import triton

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()

        def sync():
            torch.cuda.synchronize()
    else:
        device_name = "cpu"

        def sync():
            pass
    peak = args.peak_gbps if args.peak_gbps is not None else peak_gbps(device_name)
    args.peak = peak
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "sampling": "greedy" if args.greedy else "sampling at temperature 1, top_p 1, no top_k",
        "noise": f"NoiseSpec(seed={args.noise_seed}, sigma={args.sigma}, targets={args.targets!r})",
        "sigma": args.sigma,
        "targets": args.targets,
        "peak_gbps": peak,
        "peak_source": ("--peak-gbps" if args.peak_gbps is not None else
                        "PEAK_GBPS table" if peak is not None else None),
        "method": method_description(args),
        "hf_attn_implementation": args.hf_attn,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    rows = previous_rows(args, device_name) if args.merge else []

    def log(message: str) -> None:
        print(f"[decode] {message}", file=sys.stderr, flush=True)

    runner = Runner(args, meta, rows, sync, log)
    with tempfile.TemporaryDirectory(prefix="psnrl-decode-") as tmp:
        for model in args.models:
            log(f"{model}: writing random {args.dtype} weights")
            try:
                path = checkpoint_dir(model, args.dtype, args.seed, args.ckpt_dir,
                                      args.device, Path(tmp))
            except Exception as exc:
                for batch in args.batches:
                    for mode in args.modes:
                        runner.record(error_row(model, batch, args.prompt_len, args.output_len, mode, exc))
                continue
            runner.model(model, path)
            if not args.ckpt_dir:
                import shutil
                shutil.rmtree(path, ignore_errors=True)
    json_path, md_path = write_results(args.out_dir, meta, rows)
    rows = add_ratios(rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{model}\n")
        print(render_model_table([r for r in rows if r["model"] == model]))
    print(f"\nwrote {json_path}\nwrote {md_path}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
