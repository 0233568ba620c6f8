"""Benchmark: peak memory and time of a learner step, plain GRPO vs PSN-GRPO vs a naive PSN step
(materialized W + sigma E), and the engine/learner log-prob mismatch; the modes and fields are
described in psnrl/bench/README.md. Needs CUDA, except ``--device cpu --models tiny`` (a smoke run).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from psnrl.bench import model_configs
from psnrl.bench.naive_psn import perturbed_copy
from psnrl.bench.logprob_mismatch import measure_mismatch
from psnrl.bench.saved_tensors import SavedTensorProbe, extra_saved_tensors
from psnrl.bench.common import (DTYPE_NAMES, BenchFiles, BenchRun, Bound, Column, add_model_runs, add_modes, add_noise,
                                bench_cli, check_sigma, error_row as _error_row, error_text, fill_ratios, fmt_cell,
                                free_memory, markdown_table, noise_text, pick, positive_int, positive_ints,
                                random_checkpoints, render_document, round_or_none, split_list, start_run)

NAME = "learner"
NO_CUDA_MESSAGE = ("psnrl bench learner needs a CUDA GPU; none found "
                   "(--device cpu runs a CPU smoke test, e.g. --device cpu --models tiny)")

MODES = ("plain", "psn", "naive")
DEFAULT_MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B")
NOISE_SEED = 0x5EED_0003
MEMORY_TARGET, TIME_TARGET = 1.02, 1.15  # PSN / plain (psnrl/bench/README.md)

# Per-device defaults of the options left unset: the real shapes on a GPU (16 sequences of
# 512 / 1024 tokens = micro-batches of 8k / 16k tokens), a seconds-long smoke run on a CPU.
DEVICE_DEFAULTS = {
    "cuda": {"seq_lens": [512, 1024], "seqs": 16, "prompt_len": 256, "dtype": "bf16", "warmup": 2,
             "iters": 5, "mismatch_prompts": 8, "mismatch_prompt_len": 64, "mismatch_tokens": 256},
    "cpu": {"seq_lens": [24, 48], "seqs": 4, "prompt_len": 8, "dtype": "fp32", "warmup": 1,
            "iters": 2, "mismatch_prompts": 2, "mismatch_prompt_len": 8, "mismatch_tokens": 16},
}

ROW_KEYS = ("model", "tokens", "activation_checkpointing", "mode", "peak_bytes", "step_ms", "over_plain_mem",
            "over_plain_time", "saved_bytes", "over_plain_saved", "weight_copy_bytes", "held_bytes", "seqs",
            "seq_len", "prompt_len", "step_ms_all", "saved_tensors", "extra_saved_tensors")
CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}
META_KEYS = ("device", "torch", "triton")


def _probed_learner_class():
    from psnrl.trainer.learner import Learner

    class ProbedLearner(Learner):
        """The Learner, with an optional SavedTensorProbe around each micro-batch's forward + backward."""

        probe: SavedTensorProbe | None = None

        def _micro_step(self, *args, **kwargs):
            if self.probe is None:
                return super()._micro_step(*args, **kwargs)
            with self.probe.micro_batch():
                return super()._micro_step(*args, **kwargs)

    return ProbedLearner



@dataclass
class Case:
    """One learner step's rows: random prompt + response token ids and advantages."""

    seqs: list[list[int]]
    prompt_lens: list[int]
    advantages: list[float]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def make_case(vocab: int, seqs: int, seq_len: int, prompt_len: int, seed: int) -> Case:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_len)
    ids = torch.randint(0, vocab, (seqs, seq_len), generator=gen).tolist()
    adv = torch.randn(seqs, generator=gen)
    adv = (adv - adv.mean()) / adv.std().clamp(min=1e-6) if seqs > 1 else adv
    return Case(ids, [prompt_len] * seqs, adv.tolist())


def _rollouts(case: Case, spec, sampler: list[torch.Tensor]):
    from psnrl.trainer.learner import Rollouts

    return Rollouts(seqs=case.seqs, prompt_lens=case.prompt_lens, advantages=case.advantages,
                    noise=[spec] * len(case.seqs), sampler_logprobs=sampler)


def step_fn(mode: str, learner, case: Case, spec, device: str) -> Callable[[], dict]:
    """One learner step of ``mode`` (one optimizer step over all rows); returns extra figures."""
    n = len(case.seqs)
    lengths = [len(s) - p for s, p in zip(case.seqs, case.prompt_lens)]
    # Stand-ins for the engine's log-probs (psn only reads them for its sampler gap statistic).
    dummy = [torch.zeros(k, device=device) for k in lengths]

    def clean_or_psn(noise) -> Callable[[], dict]:
        def run() -> dict:
            learner.noisy_logprobs = "learner"
            learner.update(_rollouts(case, noise, dummy), n)
            return {"weight_copy_bytes": 0}
        return run

    def naive() -> dict:
        # The second model lives for the whole step, as a resident perturbed policy would.
        noisy_model, copied = perturbed_copy(learner.model, spec)
        noisy_lp, _ = learner.logprobs_no_grad(noisy_model, case.seqs, case.prompt_lens)
        learner.noisy_logprobs = "sampler"
        try:
            learner.update(_rollouts(case, spec, noisy_lp), n)
        finally:
            learner.noisy_logprobs = "learner"
        del noisy_model
        return {"weight_copy_bytes": copied}

    return {"plain": clean_or_psn(None), "psn": clean_or_psn(spec), "naive": naive}[mode]


@dataclass
class Measurement:
    step_ms: list[float]
    peak_bytes: int | None
    held_bytes: int | None
    saved_bytes: int
    weight_copy_bytes: int
    saved_tensors: dict[str, dict[str, int]]


def measure(step: Callable[[], dict], learner, device: str, warmup: int, iters: int) -> Measurement:
    """Warmup steps, one step under the saved-tensor probe, then ``iters`` timed steps."""
    cuda = device == "cuda"

    def once() -> tuple[float, int | None, int | None, dict]:
        learner.optimizer.zero_grad(set_to_none=True)  # gradients count in the step's peak
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        info = step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if not cuda:
            return seconds, None, None, info
        return seconds, int(torch.cuda.max_memory_allocated() - before), int(before), info

    for _ in range(warmup):
        once()
    learner.probe = SavedTensorProbe(learner.model)
    try:
        once()
        probe = learner.probe
        largest = max(range(len(probe.per_micro_batch)), key=probe.per_micro_batch.__getitem__, default=None)
        activations = probe.per_micro_batch[largest] if largest is not None else 0
        tensors = probe.tensors[largest] if largest is not None else {}
    finally:
        learner.probe = None
    times, peaks, held, info = [], [], None, {}
    for _ in range(iters):
        seconds, peak, held, info = once()
        times.append(1e3 * seconds)
        peaks.append(peak)
    learner.optimizer.zero_grad(set_to_none=True)
    copied = int(info.get("weight_copy_bytes", 0))
    return Measurement(times, max(peaks) if cuda else None, held, activations + copied, copied, tensors)


def build_row(model: str, case: Case, seq_len: int, checkpointing: bool, mode: str, m: Measurement) -> dict:
    return {"model": model, "tokens": case.tokens, "activation_checkpointing": checkpointing, "mode": mode,
            "peak_bytes": m.peak_bytes, "step_ms": round_or_none(statistics.median(m.step_ms), 3),
            "over_plain_mem": None, "over_plain_time": None, "saved_bytes": m.saved_bytes, "over_plain_saved": None,
            "weight_copy_bytes": m.weight_copy_bytes, "held_bytes": m.held_bytes, "seqs": len(case.seqs),
            "seq_len": seq_len, "prompt_len": case.prompt_lens[0], "step_ms_all": [round(t, 3) for t in m.step_ms],
            "saved_tensors": m.saved_tensors, "extra_saved_tensors": None}


def error_row(model: str, tokens: int, seqs: int, seq_len: int, prompt_len: int, checkpointing: bool, mode: str,
              error: BaseException) -> dict:
    return _error_row(ROW_KEYS, error, model=model, tokens=tokens, activation_checkpointing=checkpointing,
                      mode=mode, seqs=seqs, seq_len=seq_len, prompt_len=prompt_len)


def case_key(row: dict) -> tuple:
    """Rows compared with each other: same model, tokens and activation checkpointing."""
    return row["model"], row["tokens"], bool(row.get("activation_checkpointing"))


def add_ratios(rows: Sequence[dict]) -> list[dict]:
    """Fill over_plain_mem / _time / _saved and extra_saved_tensors from the plain row of the same case."""
    def is_plain(r: dict) -> bool:
        return r["mode"] == "plain"

    out = fill_ratios(rows, case_key, is_plain, [("over_plain_mem", "peak_bytes", 4),
                                                 ("over_plain_time", "step_ms", 4),
                                                 ("over_plain_saved", "saved_bytes", 4)])
    plain = {case_key(r): r for r in out if is_plain(r) and not r.get("error")}
    for row in out:
        p = plain.get(case_key(row))
        row["extra_saved_tensors"] = (extra_saved_tensors(row["saved_tensors"], p["saved_tensors"])
                                      if p and not row.get("error") and not is_plain(row) else None)
    return out



def _on_off(checkpointing) -> str:
    return "on" if checkpointing else "off"


def _case(r: dict) -> str:
    ckpt = _on_off(r.get("activation_checkpointing"))
    return f"{r.get('model')} {r.get('tokens')} tokens, activation checkpointing {ckpt}"


COLUMNS = (
    Column("model", "model", left=True), Column("tokens", "tokens", left=True),
    Column(lambda r: _on_off(r.get("activation_checkpointing")), "act. ckpt", left=True),
    Column("mode", "mode", left=True), Column("peak_bytes", "peak MiB", "mib"), Column("step_ms", "step ms", "{:,.1f}"),
    Column("over_plain_mem", "mem / plain", "{:.3f}"), Column("over_plain_time", "time / plain", "{:.3f}"),
    Column("saved_bytes", "saved MiB", "mib"), Column("over_plain_saved", "saved / plain", "{:.3f}"),
    Column("weight_copy_bytes", "weight copy MiB", "mib"),
)


def _where(r: dict) -> str:
    ckpt = ", activation checkpointing" if r.get("activation_checkpointing") else ""
    return f"{r.get('model')} {r.get('tokens')} tokens{ckpt}"


def _is_psn(r: dict) -> bool:
    return r.get("mode") == "psn" and not r.get("error")


TARGETS = (Bound(f"peak memory PSN/plain <= {MEMORY_TARGET:.2f}", "over_plain_mem", MEMORY_TARGET, _is_psn, _where),
           Bound(f"step time PSN/plain <= {TIME_TARGET:.2f}", "over_plain_time", TIME_TARGET, _is_psn, _where))


def target_lines(rows: Sequence[dict]) -> list[str]:
    lines = []
    for r in filter(_is_psn, rows):
        for bound in TARGETS:
            value, limit, met = bound.check(r)
            verdict = "not measured" if value is None else "met" if met else "MISSED"
            lines.append(f"- {_case(r)}: {bound.title.split(' <=')[0]} = {fmt_cell(value, '.3f')} "
                         f"(target <= {limit:.2f}): {verdict}")
    return lines


def render_extra_tensors(rows: Sequence[dict], limit: int = 8) -> list[str]:
    """Per PSN case: the tensors its step saves for backward that plain's does not."""
    lines = []
    for r in rows:
        if r.get("mode") != "psn" or r.get("extra_saved_tensors") is None:
            continue
        extra = r["extra_saved_tensors"]
        total = sum(e["bytes"] for e in extra)
        if not extra:
            lines.append(f"- {_case(r)}: none (the same storages as plain)")
            continue
        shown = ", ".join(f"{e['count']:+d} x {e['tensor']} ({e['bytes'] / 2**20:+,.2f} MiB)" for e in extra[:limit])
        more = f", and {len(extra) - limit} more" if len(extra) > limit else ""
        lines.append(f"- {_case(r)}: {total / 2**20:+,.2f} MiB in all: {shown}{more}")
    if not lines:
        return []
    return ["## What PSN saves for backward that plain does not", "",
            "Distinct storages saved for backward in one micro-batch, PSN minus plain, by dtype and shape "
            "(parameters excluded):", "", *lines, ""]


def render_mismatch(m: dict) -> list[str]:
    if not m:
        return []
    if "dtype" not in m and not m.get("error"):  # a file from before these fields
        return ["Mismatch: " + ", ".join(f"{k} = {fmt_cell(v, '.3g') if isinstance(v, float) else v}"
                                         for k, v in m.items()), ""]
    if m.get("error"):
        return ["## Engine vs learner mismatch", "", f"Failed: {m['error']}", ""]
    rows = [("engine vs learner, noisy: \\|log p_engine - log p_learner\\|", "engine_vs_learner"),
            ("PSN effect: \\|log p_noisy - log p_clean\\| (learner)", "noisy_vs_clean"),
            ("naive copy vs fused dual-stream: \\|log p_naive - log p_learner\\|", "naive_vs_learner")]
    lines = ["## Engine vs learner mismatch", "",
             f"{m['model']}, {m['dtype']}, NoiseSpec(sigma={m['sigma']}, targets={m['targets']!r}); "
             f"{m['prompts']} random prompts of {m['prompt_len']} tokens, {m['tokens']} sampled tokens "
             f"(temperature 1, ignore_eos). Mean engine log-prob {fmt_cell(m.get('engine_logprob_mean'), '.3f')}.", "",
             "| quantity | mean | p99 | max |", "|---|---:|---:|---:|"]
    for title, key in rows:
        lines.append(f"| {title} | " + " | ".join(fmt_cell(m.get(f"{key}_{s}"), ".3e") for s in ("mean", "p99", "max"))
                     + " |")
    lines += ["", f"Engine/learner mismatch over the PSN effect (means): "
                  f"{fmt_cell(m.get('engine_vs_learner_over_effect'), '.3g')}.", ""]
    return lines


def render_tables(rows: Sequence[dict], level: str = "##", mismatch: dict | None = None) -> list[str]:
    targets = target_lines(rows)
    sections = render_extra_tensors(rows) + render_mismatch(mismatch or {})
    return [markdown_table(COLUMNS, rows), "", *(["Targets:", "", *targets, ""] if targets else []),
            *[level + line[2:] if line.startswith("## ") else line for line in sections]]


def render_markdown(meta: dict, rows: Sequence[dict]) -> str:
    return render_document(NAME, meta, rows, _label,
                           setting=f"dtype {meta.get('dtype', '?')}; noise: {meta.get('noise', '')}",
                           paragraphs=[f"Method: {meta.get('method', '')}"],
                           body=render_tables(rows, mismatch=meta.get("mismatch")))


FILES = BenchFiles(NAME, META_KEYS, render_markdown, add_ratios)



def _label(row: dict) -> str:
    return f"{_case(row)}, {row['mode']}"


def _detail(row: dict) -> str:
    peak = "" if row["peak_bytes"] is None else f", peak {row['peak_bytes'] / 2**20:,.0f} MiB"
    return f"{row['step_ms']:,.1f} ms{peak}, saved {row['saved_bytes'] / 2**20:,.1f} MiB"


def failed_model(run: BenchRun, args: argparse.Namespace, model: str, exc: BaseException) -> None:
    """An error row for every case and mode of a model that could not be loaded or written."""
    for checkpointing in args.checkpointing:
        for n in args.seq_lens:
            for mode in args.modes:
                row = error_row(model, args.seqs * n, args.seqs, n, args.prompt_len, checkpointing, mode, exc)
                run.record(row, _label(row))


def run_model(model: str, path: Path, args: argparse.Namespace, spec, run: BenchRun) -> None:
    from psnrl.engine.loader import load_model
    from psnrl.trainer.losses import LossConfig

    cfg = model_configs.get_config(model)
    cases = [(seq_len, make_case(cfg["vocab_size"], args.seqs, seq_len, args.prompt_len, args.seed))
             for seq_len in args.seq_lens]
    try:
        net = load_model(path, dtype=args.torch_dtype, device=args.device)
        learner = _probed_learner_class()(net, LossConfig(), lr=args.lr, micro_batch_tokens=cases[0][1].tokens)
    except Exception as exc:
        failed_model(run, args, model, exc)
        free_memory(args.device)
        return
    try:
        for checkpointing in args.checkpointing:
            net.activation_checkpointing = checkpointing  # recompute each decoder layer in backward
            for seq_len, case in cases:
                learner.micro_batch_tokens = case.tokens  # the whole step is one micro-batch
                for mode in args.modes:
                    try:
                        m = measure(step_fn(mode, learner, case, spec, args.device), learner, args.device,
                                    args.warmup, args.iters)
                        row = build_row(model, case, seq_len, checkpointing, mode, m)
                    except Exception as exc:  # OOM (7B), a kernel failure: a result, keep going
                        row = error_row(model, case.tokens, args.seqs, seq_len, args.prompt_len, checkpointing,
                                        mode, exc)
                        learner.optimizer.zero_grad(set_to_none=True)
                        learner.noisy_logprobs = "learner"
                    run.record(row, _label(row), None if row.get("error") else _detail(row))
                    free_memory(args.device)
    finally:
        del learner, net
        free_memory(args.device)


def _options(parser: argparse.ArgumentParser) -> None:
    add_model_runs(parser, DEFAULT_MODELS, "; add 7B when memory allows")
    parser.add_argument("--seq-lens", nargs="+", default=None, metavar="N",
                        help="tokens per sequence, one micro-batch each (default 512 1024 on cuda, 24 48 on cpu)")
    parser.add_argument("--seqs", type=positive_int, default=None,
                        help="sequences per micro-batch (default 16 on cuda, 4 on cpu)")
    parser.add_argument("--prompt-len", type=positive_int, default=None,
                        help="prompt tokens of each sequence (default 256 on cuda, 8 on cpu)")
    add_modes(parser, MODES)
    parser.add_argument("--activation-checkpointing", choices=sorted(CHECKPOINTING), default="both",
                        help="recompute each decoder layer in backward: off, on, or both, each its own rows "
                             "(default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="weights and compute (default bf16 on cuda, fp32 on cpu)")
    add_noise(parser, NOISE_SEED)
    parser.add_argument("--seed", type=int, default=0, help="weights, tokens and sampling seed")
    parser.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per row before the probe and timed steps (default 2 on cuda, 1 on cpu)")
    parser.add_argument("--iters", type=positive_int, default=None,
                        help="timed steps per row; the median is reported (default 5 on cuda, 2 on cpu)")
    parser.add_argument("--mismatch-model", default=None,
                        help="model of the engine/learner mismatch (default: the first of --models)")
    parser.add_argument("--no-mismatch", action="store_true", help="skip the engine/learner mismatch")
    parser.add_argument("--mismatch-prompts", type=positive_int, default=None, help="default 8 (cpu 2)")
    parser.add_argument("--mismatch-prompt-len", type=positive_int, default=None, help="default 64 (cpu 8)")
    parser.add_argument("--mismatch-tokens", type=positive_int, default=None,
                        help="tokens sampled per prompt (default 256, cpu 16)")


def _check(args: argparse.Namespace) -> None:
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [model_configs.resolve(m) for m in split_list(args.models)]
    args.seq_lens = positive_ints(list(map(str, args.seq_lens)), "--seq-lens")
    args.modes = pick(args.modes, MODES, "mode")
    if not args.models or not args.seq_lens or not args.modes:
        raise ValueError("give at least one model, sequence length and mode")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if any(n <= args.prompt_len for n in args.seq_lens):
        raise ValueError(f"every --seq-lens must exceed --prompt-len={args.prompt_len} "
                         f"(a sequence needs response tokens)")
    check_sigma(args.sigma)
    from psnrl.engine.noise_spec import NoiseSpec
    args.spec = NoiseSpec(args.noise_seed, args.sigma, args.targets)  # validates seed and targets
    args.mismatch_model = model_configs.resolve(args.mismatch_model) if args.mismatch_model else args.models[0]
    for model in set(args.models) | {args.mismatch_model}:
        limit = model_configs.CONFIGS[model]["max_position_embeddings"]
        longest = max(max(args.seq_lens), args.mismatch_prompt_len + args.mismatch_tokens)
        if longest > limit:
            raise ValueError(f"{longest} tokens exceed {model}'s max_position_embeddings={limit}")
    args.torch_dtype = model_configs.as_dtype(args.dtype)
    args.checkpointing = CHECKPOINTING[args.activation_checkpointing]


build_parser, parse_args = bench_cli(
    "learner", "Peak memory and step time of a learner step (plain GRPO, PSN-GRPO with dual-stream log-probs, naive "
               "PSN with a materialized perturbed copy) on random-weight Qwen2.5 models, and the engine/learner "
               "log-prob mismatch; writes learner-<device>.json and .md.", _options, _check)


def method_description(args: argparse.Namespace) -> str:
    return (f"{args.seqs} sequences of {'/'.join(map(str, args.seq_lens))} random tokens ({args.prompt_len} prompt) "
            f"as one micro-batch and one AdamW step (lr {args.lr}, grad clip 1.0, LossConfig defaults: TIS cap "
            f"10 for psn and naive); {args.warmup} warmup step(s), one step under the saved-tensor probe, "
            f"{args.iters} timed step(s) per row, median host wall time (CUDA-synchronized); activation "
            f"checkpointing {args.activation_checkpointing} (on: each decoder layer recomputed in backward); peak = "
            f"max_memory_allocated during a step minus memory_allocated before it (weights and AdamW state "
            f"held before; gradients freed before each step); saved = bytes of distinct storages saved for "
            f"backward in one micro-batch (parameters excluded) + the perturbed weight copy (naive); "
            f"extra_saved_tensors = those storages of a mode minus plain's, by dtype and shape.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run(FILES, args, NO_CUDA_MESSAGE, dtype=args.dtype, noise=noise_text(args), sigma=args.sigma,
                    targets=args.targets, method=method_description(args),
                    targets_psn_over_plain={"peak_memory": MEMORY_TARGET, "step_time": TIME_TARGET},
                    warmup=args.warmup, iters=args.iters, seed=args.seed, mismatch={})
    if run is None:
        return 2
    meta = run.meta

    def failed(model: str, exc: BaseException) -> None:
        if model in args.models:
            failed_model(run, args, model, exc)
        if model == args.mismatch_model and not args.no_mismatch:
            meta["mismatch"] = {"model": model, "error": error_text(exc)}

    models = list(args.models)
    if not args.no_mismatch and args.mismatch_model not in models:
        models.append(args.mismatch_model)
    make = lambda model, dtype, *rest: model_configs.cached_random_checkpoint(model, DTYPE_NAMES[dtype], *rest)  # noqa: E731
    for model, path in random_checkpoints(run, args, models, "psnrl-learner-", failed, make):
        if model == args.mismatch_model and not args.no_mismatch:
            run.log(f"{model}: engine vs learner mismatch")
            try:
                meta["mismatch"] = measure_mismatch(path, model, args, args.spec)
            except Exception as exc:
                meta["mismatch"] = {"model": model, "error": error_text(exc)}
                run.log(f"mismatch failed: {meta['mismatch']['error']}")
            free_memory(args.device)
        if model in args.models:
            run_model(model, path, args, args.spec, run)
    rc = run.close()
    return 1 if rc or meta["mismatch"].get("error") else 0

if __name__ == "__main__":
    raise SystemExit(main())
