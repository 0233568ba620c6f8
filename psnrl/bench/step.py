"""Benchmark: whole training iterations by phase, plain GRPO vs PSN-GRPO vs PSN-GRPO with Var-II.

The trainer itself per mode (MODE_OVERRIDES); workload and fields: psnrl/bench/README.md (step).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from psnrl.bench import model_configs
from psnrl.bench.common import (DTYPE_NAMES, BenchFiles, BenchRun, Bound, Column, add_model_runs, add_modes, add_noise,
                                bench_cli, check_sigma, error_row as _error_row, fill_ratios, fmt_cell, free_memory,
                                markdown_table, median, nonnegative_int, pick, positive_int, random_checkpoints,
                                render_document, round_or_none, split_list, start_run)

NAME = "step"
NO_CUDA_MESSAGE = ("psnrl bench step needs a CUDA GPU; none found "
                   "(--device cpu runs a CPU smoke test, e.g. --device cpu --models tiny --dtype fp32 "
                   "--prompts 2 --group-size 2 --max-tokens 8 --iters 2)")
CPU_WITH_CUDA_MESSAGE = ("psnrl bench step --device cpu: torch sees a CUDA GPU and the trainer "
                         "always uses it; hide it for a CPU run: CUDA_VISIBLE_DEVICES= psnrl bench step "
                         "--device cpu ...")

DEFAULT_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B")
MODES = ("plain", "psn", "psn-var2")
MODE_OVERRIDES = {
    "plain": ("noise.enabled=false",),
    "psn": ("noise.enabled=true", "noise.scheduler=fixed"),
    "psn-var2": ("noise.enabled=true", "noise.scheduler=var2", "noise.embedder=hidden"),
}
# psnrl/bench/report.py's phases (its tables and its stacked chart), then the ones only this bench shows.
PHASES = ("rollout", "reward", "learner", "sync")
EXTRA_PHASES = ("sigma",)
LIMITS = {"psn": 1.05, "psn-var2": 1.10}  # step time / plain (psnrl/bench/README.md)
DTYPES = DTYPE_NAMES
TASK = "tiny-arith"
WIDEST_PROBLEM = "9+9="  # the tiny task's prompts (one-digit a+b=) all have this length

ROW_KEYS = ("model", "mode", "phases_ms", "step_ms", "peak_bytes", "over_plain")
META_KEYS = ("device", "torch", "triton", "transformers")



def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def build_row(model: str, mode: str, records: Sequence[dict], *, peak_bytes: int | None,
              kv_cache_bytes: int | None, setup: dict, allocated_before_bytes: int | None = None) -> dict:
    """The JSON row of one (model, mode) from the timed iterations' records.

    A record is ``{"step_s": wall time of step(), "metrics": what step() returned}``. Phase
    times are the loop's ``time_<phase>`` metrics (None where the loop does not report one).
    """
    phases: dict[str, float | None] = {}
    for phase in PHASES + EXTRA_PHASES:
        phases[phase] = round_or_none(_ms(median([r["metrics"].get(f"time_{phase}") for r in records])), 3)
    others = [r["step_s"] - sum(r["metrics"].get(f"time_{p}") or 0.0 for p in PHASES + EXTRA_PHASES)
              for r in records]
    phases["other"] = round_or_none(_ms(median(others)), 3)
    step_each = [r["step_s"] * 1e3 for r in records]
    lengths = [r["metrics"].get("response_length") for r in records]
    speed = [r["metrics"].get("rollout_tokens_per_s") for r in records]
    return {
        "model": model,
        "mode": mode,
        "phases_ms": phases,
        "step_ms": round_or_none(median(step_each), 3),
        "peak_bytes": peak_bytes,
        "over_plain": None,
        "target": LIMITS.get(mode),
        "step_ms_each": [round(ms, 3) for ms in step_each],
        "kv_cache_bytes": kv_cache_bytes,
        "allocated_before_bytes": allocated_before_bytes,
        "response_length": round_or_none(median(lengths), 2),
        "rollout_tokens_per_s": round_or_none(median(speed), 1),
        "sigma": records[-1]["metrics"].get("sigma") if records else None,
        "iters": len(records),
        **setup,
    }


def error_row(model: str, mode: str, error: BaseException, setup: dict) -> dict:
    return _error_row(ROW_KEYS, error, model=model, mode=mode, target=LIMITS.get(mode), **setup)


def add_ratios(rows: Sequence[dict]) -> list[dict]:
    """Fill over_plain (step time / plain's of the same model; None for plain itself) and met
    (against the mode's target)."""
    out = fill_ratios(rows, lambda r: r["model"], lambda r: r["mode"] == "plain", [("over_plain", "step_ms", 4)])
    for row in out:
        if row["mode"] == "plain":
            row["over_plain"] = None
        target = LIMITS.get(row["mode"])
        row["met"] = None if row["over_plain"] is None or target is None else bool(row["over_plain"] <= target)
    return out



def _verdict(r: dict) -> str | None:
    target = r.get("target")
    if target is None:
        return None
    return f"<= {target:.2f} " + ("met" if r.get("met") else "missed" if r.get("met") is False else "?")


def _phase(name: str) -> Column:
    return Column(lambda r: (r.get("phases_ms") or {}).get(name), "other" if name == "other" else name, "{:,.1f}")


PEAK = Column("peak_bytes", "peak GiB", "gib")
COLUMNS = (
    Column(lambda r: str(r.get("mode")) + (" (error)" if r.get("error") else ""), "mode", left=True),
    Column("step_ms", "step ms", "{:,.1f}"),
    *[_phase(p) for p in ("rollout", "sigma", "reward", "learner", "sync", "other")],
    PEAK, Column("kv_cache_bytes", "KV GiB", "gib"),
    Column("response_length", "resp. tokens", "{:.1f}"), Column("rollout_tokens_per_s", "rollout tok/s", "{:,.0f}"),
    Column("over_plain", "x plain", "{:.3f}"), Column(_verdict, "target"),
)


TARGETS = tuple(Bound(f"step time {label}/plain <= {LIMITS[mode]:.2f}", "over_plain", LIMITS[mode],
                      lambda r, mode=mode: r.get("mode") == mode and not r.get("error"),
                      lambda r: str(r.get("model"))) for mode, label in (("psn", "PSN"), ("psn-var2", "Var-II")))


def render_tables(rows: Sequence[dict], level: str = "##") -> list[str]:
    """Per model its heading, its setup and its table."""
    parts = []
    for model in dict.fromkeys(r.get("model") for r in rows):
        mine = [r for r in rows if r.get("model") == model]
        first = mine[0]
        setup = (f"{first.get('prompts')} prompts x {first.get('group_size')} samples (+ 2 probes per prompt for "
                 f"Var-II), prompt {first.get('prompt_tokens')} tokens, up to {first.get('max_tokens')} generated; "
                 f"micro-batches of {first.get('micro_batch_tokens')} tokens.")
        parts += [f"{level} {model}", "", *([setup, ""] if first.get("prompts") else []),
                  markdown_table(COLUMNS, mine), ""]
    return parts


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    return render_document(
        NAME, meta, rows, lambda r: f"{r['model']} {r['mode']}",
        setting=f"dtype {meta.get('dtype', '?')}; noise: sigma {meta.get('sigma')} on {meta.get('targets')}",
        paragraphs=[f"Method: {meta.get('method', '')}",
                    "Times are ms per training iteration (medians over the timed iterations); `x plain` is step "
                    "time / plain GRPO's. Targets: PSN <= 1.05x plain, Var-II <= 1.10x plain."],
        body=render_tables(rows))


FILES = BenchFiles(NAME, META_KEYS, render_markdown, add_ratios)



def prompt_tokens() -> int:
    """Tokens of the tiny task's prompts in the plain template under the character tokenizer."""
    from psnrl.trainer.datasets import Problem, format_prompt
    from psnrl.trainer.tiny import build_tokenizer

    text = format_prompt(Problem(id=WIDEST_PROBLEM, problem=WIDEST_PROBLEM, answer="18"), "plain")
    return len(build_tokenizer().encode(text, add_special_tokens=False))


def checkpoint_dir(model: str, dtype: str, seed: int, cache: str | None, device: str,
                   tmp_root: Path) -> Path:
    """A random checkpoint of ``model`` with the character tokenizer of psnrl/trainer/tiny.py."""
    from psnrl.trainer.tiny import build_tokenizer

    return model_configs.cached_random_checkpoint(model, dtype, seed, cache, device, tmp_root,
                                                  tokenizer=build_tokenizer())


def config_overrides(args: argparse.Namespace, path: Path, mode: str, log_dir: Path) -> list[str]:
    """The ``section.key=value`` overrides of one run (then ``--set`` ones, which win)."""
    longest = args.prompt_tokens + args.max_tokens
    return [
        f"model.path={path}", f"model.dtype={DTYPES[args.dtype]}",
        f"data.train={TASK}", "data.template=plain", f"data.max_prompt_tokens={args.prompt_tokens}",
        f"rollout.prompts_per_iter={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_tokens={args.max_tokens}", f"rollout.max_model_len={longest}",
        f"rollout.gpu_memory_utilization={args.gpu_memory_utilization}",
        f"noise.sigma={args.sigma}", f"noise.targets={args.targets}",
        *MODE_OVERRIDES[mode],
        f"train.iterations={args.warmup + args.iters}", "train.sft_warmup_steps=0",
        f"train.mini_batch_prompts={args.mini_batch_prompts}",
        f"train.micro_batch_tokens={max(args.micro_batch_tokens, longest)}",
        f"train.seed={args.seed}",
        "eval.every=0", "checkpoint.every=0", "log.tensorboard=false", "log.plot=false",
        f"log.dir={log_dir}",
        *args.set,
    ]


def setup_fields(args: argparse.Namespace) -> dict:
    return {"prompts": args.prompts, "group_size": args.group_size,
            "rollouts": args.prompts * args.group_size, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "micro_batch_tokens": args.micro_batch_tokens,
            "mini_batch_prompts": args.mini_batch_prompts, "warmup": args.warmup}


def run_mode(args: argparse.Namespace, path: Path, mode: str, log_dir: Path,
             sync: Callable[[], None]) -> tuple[list[dict], dict]:
    """Train warmup + iters iterations of one mode; the timed iterations' records and the
    memory figures (CUDA peak over them, the KV cache's bytes, what was allocated before)."""
    from psnrl.trainer.config import load_config
    from psnrl.trainer.loop import PSNTrainer

    # Nonzero here means an earlier run left memory behind (it would shrink the KV cache).
    before = torch.cuda.memory_allocated() if args.device == "cuda" else None
    trainer = PSNTrainer(load_config(None, config_overrides(args, path, mode, log_dir)))
    try:
        if trainer.llm.device.type != args.device:
            raise RuntimeError(f"the trainer runs on {trainer.llm.device}, not {args.device}")
        kv_bytes = trainer.llm.num_kv_blocks * trainer.llm._kv_bytes_per_block()
        records: list[dict] = []
        step = trainer.step

        def timed_step() -> dict:  # run() calls this in place of step(): times every iteration
            if trainer.iteration == args.warmup and args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            metrics = step()
            sync()
            records.append({"step_s": time.perf_counter() - t, "metrics": metrics})
            return metrics

        trainer.step = timed_step
        trainer.run()
        peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
        return records[args.warmup:], {"peak_bytes": peak, "kv_cache_bytes": kv_bytes,
                                       "allocated_before_bytes": before}
    finally:
        trainer.close()
        free_memory(args.device)


def run_model(run: BenchRun, a: argparse.Namespace, model: str, path: Path, work: Path,
              sync: Callable[[], None]) -> None:
    """Every mode of one model, a row each."""
    for mode in a.modes:
        run.log(f"{model} {mode}: {a.warmup} warmup + {a.iters} timed iterations")

        def measure(mode=mode) -> dict:
            records, memory = run_mode(a, path, mode, work / model / mode, sync)
            return build_row(model, mode, records, setup=setup_fields(a), **memory)
        run.attempt(measure, lambda exc, mode=mode: error_row(model, mode, exc, setup_fields(a)),
                    f"{model} {mode}", _detail)
        free_memory(a.device)  # after the failed case's traceback, which held the trainer, is gone


def _detail(row: dict) -> str:
    ph = row.get("phases_ms") or {}
    times = ", ".join(f"{p} {fmt_cell(ph.get(p), ',.1f')}" for p in ("rollout", "sigma", "reward", "learner", "sync"))
    return f"{fmt_cell(row['step_ms'], ',.1f')} ms/step ({times}), peak {PEAK.cell(row)} GiB"



def _options(parser: argparse.ArgumentParser) -> None:
    add_model_runs(parser, DEFAULT_MODELS)
    add_modes(parser, MODES)
    parser.add_argument("--prompts", type=positive_int, default=16,
                        help="prompts per iteration, rollout.prompts_per_iter (default %(default)s)")
    parser.add_argument("--group-size", type=positive_int, default=8,
                        help="samples per prompt, rollout.group_size (default %(default)s)")
    parser.add_argument("--max-tokens", type=positive_int, default=256,
                        help="generated tokens per sample, rollout.max_tokens (default %(default)s)")
    parser.add_argument("--mini-batch-prompts", type=positive_int, default=None,
                        help="prompts per optimizer step, train.mini_batch_prompts (default: --prompts, "
                             "one optimizer step per iteration)")
    parser.add_argument("--micro-batch-tokens", type=positive_int, default=4096,
                        help="tokens per learner micro-batch, train.micro_batch_tokens (default %(default)s)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                        help="the engine's share of the GPU, KV cache included; the learner lives in "
                             "the rest (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    add_noise(parser)  # noise.sigma (the fixed sigma, Var-II's initial one) and noise.targets
    parser.add_argument("--warmup", type=nonnegative_int, default=1,
                        help="untimed iterations first (default %(default)s)")
    parser.add_argument("--iters", type=positive_int, default=3,
                        help="timed iterations; medians are reported (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights and train.seed")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another config override for every run (repeatable), e.g. --set algo.kl_coef=0")


def _check(args: argparse.Namespace) -> None:
    args.models = list(dict.fromkeys(model_configs.resolve(m) for m in split_list(args.models)))
    args.modes = pick(args.modes, MODES, "mode")
    if not args.models or not args.modes:
        raise ValueError("give at least one model and one mode")
    if args.group_size < 2:
        raise ValueError("--group-size must be >= 2 (group advantages compare the samples of a prompt)")
    if args.mini_batch_prompts is None:
        args.mini_batch_prompts = args.prompts
    if args.prompts % args.mini_batch_prompts:
        raise ValueError(f"--prompts {args.prompts} must be a multiple of --mini-batch-prompts "
                         f"{args.mini_batch_prompts}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    check_sigma(args.sigma)
    from psnrl.engine.noise_spec import NoiseSpec
    NoiseSpec(0, args.sigma, args.targets)  # validates the targets
    args.prompt_tokens = prompt_tokens()
    for model in args.models:
        limit = model_configs.CONFIGS[model]["max_position_embeddings"]
        if args.prompt_tokens + args.max_tokens > limit:
            raise ValueError(f"prompt {args.prompt_tokens} + --max-tokens {args.max_tokens} tokens "
                             f"exceeds {model}'s max_position_embeddings={limit}")
    from psnrl.trainer.config import ConfigError, load_config
    try:  # every override checked before any work ("tiny" stands in for the checkpoint)
        for mode in args.modes:
            load_config(None, config_overrides(args, Path("tiny"), mode,
                                               Path(tempfile.gettempdir()) / "psnrl-step-check"))
    except ConfigError as exc:
        raise ValueError(f"config: {exc}") from None


build_parser, parse_args = bench_cli(
    "step", "Whole PSN-GRPO training iterations split by phase (rollout, reward, learner, sync, Var-II probes) and "
            "peak GPU memory: plain GRPO vs PSN-GRPO vs PSN-GRPO with Var-II, on random-weight Qwen2.5 checkpoints; "
            "writes step-<device>.json and .md.", _options, _check, merge=True)


def method_description(args: argparse.Namespace) -> str:
    return (f"PSNTrainer (psnrl/trainer/loop.py) on the tiny arithmetic task: {args.prompts} prompts x "
            f"{args.group_size} samples per iteration, up to {args.max_tokens} tokens each (random "
            f"weights: ~all run to the limit), one optimizer step per {args.mini_batch_prompts} "
            f"prompts, micro-batches of {args.micro_batch_tokens} tokens, the config's defaults "
            f"otherwise (AdamW, TIS cap 10, k3 KL 1e-4 to a frozen reference copy); {args.warmup} "
            f"untimed warmup iteration(s), then {args.iters} timed; step = wall time of step() with "
            f"the device synchronized before and after; phases = the loop's own time_* metrics "
            f"(host clocks; the rollout ends in device-to-host copies, Var-II's scoring in .item()); "
            f"peak = torch.cuda.max_memory_allocated over the timed iterations, the engine's "
            f"preallocated KV cache included.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and torch.cuda.is_available():
        print(CPU_WITH_CUDA_MESSAGE, file=sys.stderr)
        return 2
    planned = {(m, mode) for m in args.models for mode in args.modes}
    run = start_run(FILES, args, NO_CUDA_MESSAGE, previous=lambda device: FILES.previous_rows(
                        args.out_dir, device, lambda r: (r.get("model"), r.get("mode")) not in planned),
                    dtype=args.dtype, sigma=args.sigma, targets=args.targets,
                    method=method_description(args), modes={mode: list(MODE_OVERRIDES[mode]) for mode in MODES},
                    extra_overrides=list(args.set), gpu_memory_utilization=args.gpu_memory_utilization,
                    warmup=args.warmup, iters=args.iters, seed=args.seed)
    if run is None:
        return 2

    def failed(model: str, exc: BaseException) -> None:
        for mode in args.modes:
            run.record(error_row(model, mode, exc, setup_fields(args)), f"{model} {mode}")
    with tempfile.TemporaryDirectory(prefix="psnrl-step-") as tmp:
        for model, path in random_checkpoints(run, args, args.models, "psnrl-step-ckpt-", failed, checkpoint_dir):
            run_model(run, args, model, path, Path(tmp), run.sync)
    return run.close("\n".join(render_tables(add_ratios(run.rows))))

if __name__ == "__main__":
    raise SystemExit(main())
