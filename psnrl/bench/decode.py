"""Benchmark: rollout decode throughput of the engine (clean, noisy, mixed) against HF generate.

Workloads, modes and fields: psnrl/bench/README.md (decode). Needs CUDA, except ``--device cpu``.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Callable, Sequence


from psnrl.bench import model_configs
from psnrl.bench.decode_workloads import (FIXED, NANO_VLLM, NANO_VLLM_LENGTHS, NANO_VLLM_SEQS, Timing,
                                          Workload, decode_bytes_per_step, fixed_workload, mean_decode_context,
                                          nano_vllm_workload, peak_gbps, sequence_noise, time_engine, time_hf)
from psnrl.bench.common import (DTYPE_NAMES, BenchFiles, BenchRun, Bound, add_model_runs, add_modes, add_noise,
                                bench_cli, check_sigma, error_row as _error_row, fmt_cell, free_memory, noise_text,
                                nonnegative_int, pick, positive_int, positive_ints, random_checkpoints, ratio,
                                render_document, round_or_none, split_list, start_run)

NAME = "decode"
NO_CUDA_MESSAGE = ("psnrl bench decode needs a CUDA GPU; none found "
                   "(--device cpu runs a CPU smoke test, e.g. --device cpu --models tiny)")

DEFAULT_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B")
BATCHES = (1, 16, 64, 256)
PROMPT_LEN = 512
OUTPUT_LEN = 512
GROUP_SIZE = 10  # sequences per prompt in the fixed workload
PROBES = 2       # clean probes per group in mixed mode
NANO_VLLM_MODEL = "Qwen2.5-0.5B"
HF_WARMUP_TOKENS = 16
MODES = ("clean", "noisy", "mixed", "hf")
ENGINE_MODES = ("clean", "noisy", "mixed")
DTYPES = DTYPE_NAMES
NOISE_SEED = 0x5EED_0002

ROW_KEYS = ("model", "workload", "mode", "batch", "prompt_len", "output_len", "tok_s", "hf_tok_s",
            "roofline_frac", "step_ms", "gbps", "over_hf", "over_clean")
META_KEYS = ("device", "torch", "triton", "transformers")

RATIO_NOTE = ("Ratios are of tokens/s: ours/HF > 1 means faster than transformers; noisy/clean "
              "and mixed/clean < 1 mean slower than the clean engine; mixed/noisy is mixed over "
              "all-noisy.")
SPLIT_NOTE = ("clean forward / sample / host ms: a clean decode step's device time in the forward and in the "
              "sampler (CUDA events), and the rest of its wall time, when the device waits for the host.")
ROOFLINE_NOTE = ("GB/s = bytes one decode step must read (all weights, lm_head included, the "
                 "input embedding only for the batch's rows; plus K and V of the mean decode "
                 "context, prompt_len + output_len / 2, for every sequence) / median decode-step "
                 "time; the same bytes for every mode, so noise generated in the kernels adds none.")


def _row_head(model: str, work: Workload, mode: str) -> dict:
    return {"model": model, "workload": work.name, "mode": mode, "batch": work.batch,
            "prompt_len": work.prompt_len, "output_len": work.output_len}


def build_row(model: str, work: Workload, mode: str, timings: Sequence[Timing],
              bytes_per_step: int | None, peak: float | None) -> dict:
    """The JSON row of one measurement (median over its repeats); add_ratios fills the HF and
    clean comparisons. ``bytes_per_step`` None: no roofline (the batch varies in the run)."""
    tok_s = statistics.median(t.output_tokens / t.total_s for t in timings)
    steps = [ms for t in timings for ms in t.decode_ms]
    step_ms = statistics.median(steps) if steps else None
    gbps = bytes_per_step / (step_ms * 1e-3) / 1e9 if step_ms and bytes_per_step else None
    return {**_row_head(model, work, mode), "tok_s": round_or_none(tok_s, 2), "hf_tok_s": None,
            "roofline_frac": round_or_none(gbps / peak if gbps and peak else None, 4),
            "step_ms": round_or_none(step_ms, 4),
            **{key: round_or_none(_median_of(timings, key), 4) for key in ("forward_ms", "sample_ms", "host_ms")},
            "gbps": round_or_none(gbps, 4), "over_hf": None, "over_clean": None, "over_noisy": None,
            "prefill_s": round_or_none(statistics.median(t.prefill_s for t in timings), 4),
            "total_s": round_or_none(statistics.median(t.total_s for t in timings), 4),
            "decode_steps": len(steps) // max(len(timings), 1), "bytes_per_step": bytes_per_step,
            "repeats": len(timings)}


def _median_of(timings: Sequence[Timing], key: str) -> float | None:
    values = [ms for t in timings for ms in getattr(t, key)]
    return statistics.median(values) if values else None


def error_row(model: str, work: Workload, mode: str, error: BaseException) -> dict:
    return _error_row(ROW_KEYS, error, **_row_head(model, work, mode))


def _group_key(row: dict) -> tuple:
    return row["model"], row.get("workload", FIXED), row["batch"], row["prompt_len"], row["output_len"]


# (field, base mode, modes that get it): tok_s over the base mode's of the same workload
RATIOS = (("over_hf", "hf", ENGINE_MODES), ("over_clean", "clean", ("noisy", "mixed")),
          ("over_noisy", "noisy", ("mixed",)))


def add_ratios(rows: Sequence[dict]) -> list[dict]:
    """Fill hf_tok_s, over_hf, over_clean and over_noisy from the rows of the same workload."""
    speed = {(_group_key(r), r["mode"]): r.get("tok_s") for r in rows}
    out = []
    for row in rows:
        row = dict(row)
        k, mode = _group_key(row), row["mode"]
        row["hf_tok_s"] = speed.get((k, "hf"))
        for key, base, modes in RATIOS:
            row[key] = round_or_none(ratio(row.get("tok_s"), speed.get((k, base))), 4) if mode in modes else None
        out.append(row)
    return out


def render_model_table(rows: Sequence[dict]) -> str:
    """One line per (batch, lengths) of one model, the modes side by side."""
    cols = [("batch", None, None)]
    cols += [(f"{m} tok/s", m, "tok_s") for m in MODES]
    cols += [(f"{m} ms/step", m, "step_ms") for m in MODES]
    cols += [(f"clean {part} ms", "clean", f"{part}_ms") for part in ("forward", "sample", "host")]
    cols += [(f"{m}/{base}", m.lower(), key) for m, base, key in (
        ("clean", "HF", "over_hf"), ("noisy", "HF", "over_hf"), ("noisy", "clean", "over_clean"),
        ("mixed", "clean", "over_clean"), ("mixed", "noisy", "over_noisy"))]
    cols += [(f"{m} {what}", m.lower(), key) for m, what, key in (
        ("clean", "GB/s", "gbps"), ("noisy", "GB/s", "gbps"), ("clean", "roofline", "roofline_frac"),
        ("noisy", "roofline", "roofline_frac"), ("HF", "GB/s", "gbps"))]
    formats = {"tok_s": ",.0f", "step_ms": ".2f", "forward_ms": ".2f", "sample_ms": ".2f", "host_ms": ".2f",
               "over_hf": ".2f", "over_clean": ".3f", "over_noisy": ".3f", "gbps": ",.1f", "roofline_frac": ".1%"}
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row.get("batch"), row.get("prompt_len"), row.get("output_len")), {})[row.get("mode")] = row
    # Columns with nothing to show go (no HF or roofline for the nano-vllm workload).
    cols = cols[:1] + [(title, mode, key) for title, mode, key in cols[1:]
                       if any(by_mode.get(mode, {}).get(key) is not None for by_mode in groups.values())]
    lines = ["| " + " | ".join(title for title, _, _ in cols) + " |",
             "|" + "|".join("---:" for _ in cols) + "|"]
    for (batch, _, _), by_mode in sorted(groups.items(), key=str):
        cells = [str(batch)]
        for _, mode, key in cols[1:]:
            row = by_mode.get(mode)
            cells.append("—" if row is None else fmt_cell(row.get(key), formats[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sections(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Rows by (model, workload, prompt_len, output_len): one table each."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row.get("model"), row.get("workload", FIXED), row.get("prompt_len"), row.get("output_len"))
        out.setdefault(key, []).append(row)
    return out


def _section_title(model: str, workload: str, prompt_len: int, output_len: int) -> str:
    if workload == NANO_VLLM:
        return f"{model}, nano-vllm setting (mean prompt {prompt_len}, mean output {output_len})"
    return f"{model}, prompt {prompt_len}, output {output_len}"


def render_tables(rows: Sequence[dict], level: str = "##") -> list[str]:
    """A table per (model, workload, lengths), the modes side by side."""
    return [line for key, mine in _sections(rows).items()
            for line in (f"{level} {_section_title(*key)}", "", render_model_table(mine), "")]


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    peak = meta.get("peak_gbps")
    source = f" ({meta['peak_source']})" if meta.get("peak_source") else ""
    return render_document(
        NAME, meta, rows, lambda r: f"{r['model']} {r.get('workload', FIXED)} batch {r['batch']} {r['mode']}",
        setting=f"dtype {meta.get('dtype', '?')}; {meta.get('sampling', '')}; noise: {meta.get('noise', '')}",
        paragraphs=[f"Peak memory bandwidth: {'unknown' if peak is None else f'{peak:,.0f} GB/s'}{source}.",
                    f"Method: {meta.get('method', '')}", f"{RATIO_NOTE} {ROOFLINE_NOTE} {SPLIT_NOTE}"],
        body=render_tables(rows))


def _fixed(test: Callable[[dict], bool]) -> Callable[[dict], bool]:
    return lambda r: not r.get("error") and r.get("workload", FIXED) == FIXED and test(r)


NOISE_RATIO, ROOFLINE_MODEL, ROOFLINE, HF_BATCH, HF_RATIO = 0.90, "Qwen2.5-7B", 0.70, 256, 20.0
TARGETS = (
    *[Bound(f"{mode}/clean tok/s >= {NOISE_RATIO:.2f}", "over_clean", NOISE_RATIO,
            lambda r, mode=mode: not r.get("error") and r.get("mode") == mode,
            lambda r: f"{r.get('model')} {r.get('workload', FIXED)} batch {r.get('batch')}", True)
      for mode in ("noisy", "mixed")],
    Bound(f"batch-1 {ROOFLINE_MODEL} decode >= {ROOFLINE:.0%} of peak HBM bandwidth", "roofline_frac", ROOFLINE,
          _fixed(lambda r: r.get("mode") in ("clean", "noisy") and r.get("batch") == 1
                 and r.get("model") == ROOFLINE_MODEL), lambda r: f"{r.get('model')} {r.get('mode')}", True),
    Bound(f"batch {HF_BATCH}: ours/HF tok/s >= {HF_RATIO:.0f}", "over_hf", HF_RATIO,
          _fixed(lambda r: r.get("mode") in ("clean", "noisy") and r.get("batch") == HF_BATCH),
          lambda r: f"{r.get('model')} {r.get('mode')}", True),
)


FILES = BenchFiles(NAME, META_KEYS, render_markdown, add_ratios)



class Runner:
    """Runs every workload and mode of one model and appends rows; writes results after each."""

    def __init__(self, args: argparse.Namespace, run: BenchRun):
        self.args, self.run, self.sync, self.log = args, run, run.sync, run.log

    def record(self, row: dict) -> None:
        self.run.record(row, f"{row['model']} {row['workload']} batch {row['batch']} {row['mode']}",
                        None if row.get("error") else
                        f"{row['tok_s']:,.1f} tok/s, {fmt_cell(row['step_ms'], '.2f')} ms/step")

    def workloads(self, model: str) -> list[Workload]:
        a = self.args
        vocab = model_configs.get_config(model)["vocab_size"]
        works = [fixed_workload(b, a.prompt_len, a.output_len, a.group_size, vocab, a.seed)
                 for b in a.batches]
        if a.nano_vllm_model == model:
            works.append(nano_vllm_workload(vocab, a.seed, a.nano_vllm_seqs, tuple(a.nano_vllm_lengths)))
        return works

    def measure(self, model: str, work: Workload, mode: str, once: Callable[[], Timing],
                warm: Callable[[], object]) -> bool:
        """Warm up, time ``once`` per repeat and record the row (an error row on failure)."""
        a = self.args
        try:
            for _ in range(a.warmup):
                warm()
            timings = [once() for _ in range(a.repeats)]
            bytes_per_step = (decode_bytes_per_step(model, work.batch, mean_decode_context(
                work.prompt_len, work.output_len), a.torch_dtype) if work.name == FIXED else None)
            row = build_row(model, work, mode, timings, bytes_per_step, a.peak)
        except Exception as exc:  # OOM, a kernel failure: keep going
            row = error_row(model, work, mode, exc)
        self.record(row)
        return not row.get("error")

    def model(self, model: str, path: Path) -> None:
        a = self.args
        works = self.workloads(model)
        engine_modes = [m for m in a.modes if m in ENGINE_MODES]
        llm, failed = None, None
        for work in works:
            for mode in engine_modes:
                if llm is None and failed is None:
                    try:
                        llm = self.engine(path, works)
                    except Exception as exc:
                        failed = exc
                if failed is not None:
                    self.record(error_row(model, work, mode, failed))
                    continue
                noise = sequence_noise(work.batch, mode, a.spec, work.group_size, a.probes)

                def once(w=work, n=noise):
                    return time_engine(llm, w, n, greedy=a.greedy, seed=a.seed, sync=self.sync)
                if not self.measure(model, work, mode, once, once) and llm.scheduler.has_work():
                    llm.close()  # a failed generate leaves requests behind: a fresh engine next
                    llm = None
                    free_memory(a.device)
        if llm is not None:
            llm.close()
        free_memory(a.device)
        if "hf" in a.modes:
            self.run_hf(model, path, [w for w in works if w.name == FIXED])

    def run_hf(self, model: str, path: Path, works: list[Workload]) -> None:
        a = self.args
        try:
            hf = self.hf_model(path)
        except Exception as exc:
            for work in works:
                self.record(error_row(model, work, "hf", exc))
            return
        for work in works:
            def once(w=work):
                return time_hf(hf, w.prompts, w.output_len, greedy=a.greedy, seed=a.seed,
                               sync=self.sync)

            def warm(w=work):
                return time_hf(hf, w.prompts, min(w.output_len, HF_WARMUP_TOKENS), greedy=a.greedy,
                               seed=a.seed, sync=self.sync)
            self.measure(model, work, "hf", once, warm)
        hf = None
        free_memory(a.device)

    def engine(self, path: Path, works: list[Workload]):
        """An engine with KV blocks for the largest workload, all its sequences at full length."""
        from psnrl.engine.llm import LLM

        a = self.args
        max_len = max(len(p) + n for w in works for p, n in zip(w.prompts, w.output_lens))
        per_seq = math.ceil(max_len / a.block_size) + 1
        max_seqs = max(w.batch for w in works)
        blocks = max_seqs * per_seq
        blocks += math.ceil(0.02 * blocks) + 4  # above the admission watermark (1%)
        return LLM(path, dtype=DTYPES[a.dtype], device=a.device, max_model_len=max_len,
                   max_num_seqs=max_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                   block_size=a.block_size, num_kv_blocks=blocks, seed=a.seed, time_steps=True,
                   overlap=not a.no_overlap)

    def hf_model(self, path: Path):
        from transformers import AutoModelForCausalLM

        a = self.args
        model = AutoModelForCausalLM.from_pretrained(path, dtype=a.torch_dtype,
                                                     attn_implementation=a.hf_attn)
        return model.to(a.device).eval()



def _options(parser: argparse.ArgumentParser) -> None:
    add_model_runs(parser, DEFAULT_MODELS)
    parser.add_argument("--batches", nargs="+", default=[str(b) for b in BATCHES], metavar="B",
                        help=f"batch sizes (default {' '.join(map(str, BATCHES))})")
    add_modes(parser, MODES)
    parser.add_argument("--prompt-len", type=positive_int, default=PROMPT_LEN,
                        help="prompt tokens per request (default %(default)s)")
    parser.add_argument("--output-len", type=positive_int, default=OUTPUT_LEN,
                        help="generated tokens per request, never fewer (default %(default)s)")
    parser.add_argument("--group-size", type=positive_int, default=GROUP_SIZE,
                        help="fixed workload: sequences per prompt (default %(default)s)")
    parser.add_argument("--probes", type=nonnegative_int, default=PROBES,
                        help="mixed mode: clean probes in every group of --group-size sequences, "
                             "the others noisy (default %(default)s)")
    parser.add_argument("--nano-vllm-model", default=None, metavar="MODEL",
                        help=f"the model of the nano-vllm workload ({NANO_VLLM_SEQS} sequences, prompt "
                             f"and output lengths uniform in {NANO_VLLM_LENGTHS[0]}-{NANO_VLLM_LENGTHS[1]}); "
                             f"one of --models, or none (default {NANO_VLLM_MODEL} when in --models)")
    parser.add_argument("--nano-vllm-seqs", type=positive_int, default=NANO_VLLM_SEQS,
                        help="sequences of the nano-vllm workload (default %(default)s)")
    parser.add_argument("--nano-vllm-lengths", type=positive_int, nargs=2, default=list(NANO_VLLM_LENGTHS),
                        metavar=("LO", "HI"), help="its prompt and output length range, both ends "
                        "included (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--greedy", action="store_true",
                        help="argmax decoding (default: sampling at temperature 1)")
    add_noise(parser, NOISE_SEED)
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed")
    parser.add_argument("--warmup", type=nonnegative_int, default=1,
                        help="untimed runs before each measurement (engine: the full run; HF: "
                             f"{HF_WARMUP_TOKENS} tokens) (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="timed runs per measurement; medians are reported (default %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=8192,
                        help="the engine's token budget per step (default %(default)s)")
    parser.add_argument("--block-size", type=positive_int, default=16, help="KV block size (default 16)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="run the engine one step at a time (EngineConfig.overlap=False), to compare")
    parser.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation (default sdpa)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's peak memory bandwidth in GB/s (default: from PEAK_GBPS by name)")


def _nano_vllm_model(name: str | None, models: list[str]) -> str | None:
    if name is None:
        return NANO_VLLM_MODEL if NANO_VLLM_MODEL in models else None
    if name.lower() == "none":
        return None
    model = model_configs.resolve(name)
    if model not in models:
        raise ValueError(f"--nano-vllm-model {model} is not among --models ({', '.join(models)})")
    return model


def _check(args: argparse.Namespace) -> None:
    args.models = [model_configs.resolve(m) for m in split_list(args.models)]
    args.batches = sorted(positive_ints(args.batches, "--batches"))
    args.modes = pick(args.modes, MODES, "mode")
    if not args.models or not args.batches or not args.modes:
        raise ValueError("give at least one model, batch size and mode")
    check_sigma(args.sigma)
    lo, hi = args.nano_vllm_lengths
    if lo > hi:
        raise ValueError(f"--nano-vllm-lengths: {lo} > {hi}")
    if args.probes >= args.group_size:
        raise ValueError(f"--probes ({args.probes}) must be below --group-size ({args.group_size}): "
                         f"a mixed group needs a noisy sample")
    args.nano_vllm_model = _nano_vllm_model(args.nano_vllm_model, args.models)
    from psnrl.engine.noise_spec import NoiseSpec
    args.spec = NoiseSpec(args.noise_seed, args.sigma, args.targets)  # validates seed and targets
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        raise ValueError(f"--peak-gbps must be > 0, got {args.peak_gbps}")
    if not (args.block_size & (args.block_size - 1)) == 0:
        raise ValueError(f"--block-size must be a power of two, got {args.block_size}")
    for model in args.models:
        limit = model_configs.CONFIGS[model]["max_position_embeddings"]
        if args.prompt_len + args.output_len > limit:
            raise ValueError(f"prompt + output = {args.prompt_len + args.output_len} tokens exceeds "
                             f"{model}'s max_position_embeddings={limit}")
        if model == args.nano_vllm_model and 2 * args.nano_vllm_lengths[1] > limit:
            raise ValueError(f"the nano-vllm workload needs {2 * args.nano_vllm_lengths[1]} positions; "
                             f"{model}'s max_position_embeddings={limit}")
    args.torch_dtype = model_configs.as_dtype(args.dtype)


build_parser, parse_args = bench_cli(
    "decode", "Decode throughput of the rollout engine (clean, noisy, mixed) and of transformers generate on "
              "random-weight Qwen2.5 checkpoints; writes decode-<device>.json and .md.", _options, _check, merge=True)


def method_description(args: argparse.Namespace) -> str:
    lo, hi = args.nano_vllm_lengths
    return (f"fixed workload: groups of {args.group_size} sequences share one prompt of "
            f"{args.prompt_len} random tokens, each generates exactly {args.output_len} "
            f"(engine: ignore_eos; HF: min_new_tokens = max_new_tokens); mixed: {args.probes} clean "
            f"probes and {args.group_size - args.probes} noisy samples per group; nano-vllm workload "
            f"({args.nano_vllm_model or 'not run'}): {args.nano_vllm_seqs} sequences, random prompts, prompt "
            f"and output lengths uniform in {lo}-{hi}, engine only; tokens/s = all "
            f"generated tokens / wall time of one generate call (prefill included); step = median "
            f"host wall time of the pure decode steps (each ends in a device-to-host copy of the "
            f"sampled tokens, so device work is included; with the engine's overlap "
            f"{'off' if args.no_overlap else 'on'}, the time between consecutive steps' returns; HF: "
            f"between consecutive stopping-criteria calls); {args.warmup} untimed warmup run(s) and "
            f"{args.repeats} timed run(s) per row, medians reported; the engine's prefix cache is cleared "
            f"before every run.")


def previous_rows(args: argparse.Namespace, device_name: str) -> list[dict]:
    """Rows of this device's results file that this run will not measure again (``--merge``)."""
    fixed = {(m, FIXED, b, args.prompt_len, args.output_len, mode)
             for m in args.models for b in args.batches for mode in args.modes}
    nano = {(args.nano_vllm_model, NANO_VLLM, mode) for mode in args.modes if mode in ENGINE_MODES}

    def measured(row: dict) -> bool:
        workload = row.get("workload", FIXED)
        if workload == NANO_VLLM:
            return (row.get("model"), workload, row.get("mode")) in nano
        return (row.get("model"), workload, row.get("batch"), row.get("prompt_len"),
                row.get("output_len"), row.get("mode")) in fixed
    return FILES.previous_rows(args.out_dir, device_name, lambda row: not measured(row))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(FILES, args, NO_CUDA_MESSAGE, previous=lambda device: previous_rows(args, device))
    if run is None:
        return 2
    args.peak = peak = args.peak_gbps if args.peak_gbps is not None else peak_gbps(run.meta["device"])
    run.meta.update(
        dtype=args.dtype, sampling="greedy" if args.greedy else "sampling at temperature 1, top_p 1, no top_k",
        noise=noise_text(args), sigma=args.sigma, targets=args.targets, peak_gbps=peak,
        peak_source="--peak-gbps" if args.peak_gbps is not None else "PEAK_GBPS table" if peak is not None else None,
        method=method_description(args), hf_attn_implementation=args.hf_attn,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size, overlap=not args.no_overlap,
        group_size=args.group_size, probes=args.probes, nano_vllm_model=args.nano_vllm_model,
        warmup=args.warmup, repeats=args.repeats, seed=args.seed)
    runner = Runner(args, run)

    def failed(model: str, exc: BaseException) -> None:
        for work in runner.workloads(model):
            for mode in args.modes:
                if work.name == FIXED or mode in ENGINE_MODES:
                    runner.record(error_row(model, work, mode, exc))
    for model, path in random_checkpoints(run, args, args.models, "psnrl-decode-", failed):
        runner.model(model, path)
    return run.close("\n".join(render_tables(add_ratios(run.rows))))

if __name__ == "__main__":
    raise SystemExit(main())
