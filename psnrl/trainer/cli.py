"""The ``psnrl`` command line.

Each subcommand dispatches to the module that does the work; heavy imports happen
only once a subcommand is chosen, so ``psnrl --help`` is instant. Bad input (missing or
unreadable files, wrong types, values out of range) ends in one line on stderr naming the
problem and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# bench name -> module with a ``main(argv) -> int``
BENCHES = {
    "noisy-gemm": "psnrl.bench.noisy_gemm",
    "kernel-sass": "psnrl.bench.kernel_sass",
    "lm-head": "psnrl.bench.lm_head_logprob",
    "decode": "psnrl.bench.decode",
    "step": "psnrl.bench.step",
    "learner": "psnrl.bench.learner",
    "tiny-ab": "psnrl.bench.tiny_ab",
    "host": "psnrl.bench.host",
    "all": "psnrl.bench.all",
}
DEFAULT_EVAL_SETS = ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
CONFIG_SECTIONS = ("model", "data", "rollout", "noise", "algo", "train", "eval", "checkpoint", "log")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``psnrl eval: error: argument --n: invalid int value: 'x'``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.bench])
    return module.main(args.bench_args)


def _run_train(args: argparse.Namespace) -> int:
    from psnrl.trainer import distributed
    from psnrl.trainer.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.show_config:
        print(dump_config(cfg), end="")
        return 0
    from psnrl.trainer.loop import PSNTrainer

    trainer = None
    try:
        trainer = PSNTrainer(cfg, resume=args.resume, overwrite=args.overwrite)
        history = trainer.run()
    except KeyboardInterrupt:
        if trainer is None or trainer.saved_iteration is None:
            print("\ninterrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        else:
            print(f"\ninterrupted: the checkpoint of iteration {trainer.saved_iteration} is in "
                  f"{trainer.ckpt_dir}; continue with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    if trainer.main:
        _print_summary(history, trainer.metrics_path)
    return 0


def _print_summary(history: list[dict], metrics_path: Path) -> None:
    """The whole run's figures (metrics.jsonl), also after a resume; the last evaluation."""
    if not history:
        print(f"nothing to do: the run in {metrics_path.parent} is complete")
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    window = max(1, len(rows) // 5)
    first = sum(r["reward_mean"] for r in rows[:window]) / window
    last = sum(r["reward_mean"] for r in rows[-window:]) / window
    print(f"mean reward: first {window} iterations {first:.3f}, last {window} {last:.3f}")
    from psnrl.trainer.evaluate import format_table
    from psnrl.trainer.loop import EVAL_BEFORE_RL

    before = metrics_path.parent / EVAL_BEFORE_RL
    if before.is_file():
        print("pass@k before RL (after the warm-up):")
        print(format_table(json.loads(before.read_text())))
    evals = [r for r in rows if "eval" in r]
    if evals:
        print(f"pass@k after iteration {evals[-1]['iteration']}:")
        print(format_table(evals[-1]["eval"]))
    print(f"metrics: {metrics_path}; policy: {metrics_path.parent / 'final'}")


def _run_eval(args: argparse.Namespace) -> int:
    from psnrl.engine.llm import LLM
    from psnrl.engine.sampling import SamplingParams
    from psnrl.trainer.datasets import format_prompt, load_problems
    from psnrl.trainer.evaluate import format_table, pass_at_k_eval, plot_curves, write_json
    from psnrl.trainer.export import resolve_policy
    from psnrl.trainer.passk import default_ks
    from psnrl.trainer.reward import math_reward
    from psnrl.trainer.tiny import TINY_SET, ArithmeticTask, exact_answer_reward

    ks = args.ks or default_ks(args.n)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)
    if any(k < 1 or k > args.n for k in ks):
        raise ValueError(f"every k must be in [1, n={args.n}], got {ks}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    model = resolve_policy(args.model)
    names = args.sets or _default_eval_sets(Path(args.model))
    for other in args.compare:  # read before the long part, so a bad file fails at once
        try:
            json.loads(Path(other).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--compare {other}: not JSON ({e})") from None
    sets = {name: ArithmeticTask(seed=args.seed).problems(args.limit or 128) if name == TINY_SET
            else load_problems(name, limit=args.limit) for name in names}
    options = {"dtype": args.dtype}
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    llm = LLM(model, **options)
    if llm.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files")
    tiny = set(names) == {TINY_SET}

    def prompt(p):
        return p.problem if tiny else format_prompt(p, args.template, llm.tokenizer)

    embedder = None
    if args.embedder != "none":
        import functools
        import warnings

        from psnrl.trainer.logprobs import last_hidden
        from psnrl.trainer.embedders import make_embedder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback is reported below
            embedder = make_embedder(args.embedder, hidden_fn=functools.partial(last_hidden, llm.model),
                                     device=llm.device)
        print(f"semantic similarity with {type(embedder).__name__}", file=sys.stderr)
    result = pass_at_k_eval(llm, sets, params, ks, prompt, exact_answer_reward if tiny else math_reward,
                            embedder, use_tqdm=True)
    result["model"] = str(model)
    print(format_table(result))
    if args.output:
        write_json(result, args.output)
    if args.plot:
        runs = {str(model): result}
        for other in args.compare:
            runs[other] = json.loads(Path(other).read_text())
        try:
            plot_curves(runs, args.plot)
        except (ValueError, ImportError) as e:  # no k to plot; matplotlib missing
            raise ValueError(f"--plot: {e}") from None
    return 0


def _default_eval_sets(model: Path) -> list[str]:
    """A run folder's own eval sets (its config's eval.sets); else the six shipped benchmarks."""
    if (model / "config.yaml").is_file() and not (model / "config.json").is_file():
        from psnrl.trainer.config import load_config
        return list(load_config(model / "config.yaml").eval.sets)
    return list(DEFAULT_EVAL_SETS)


def _run_export(args: argparse.Namespace) -> int:
    from psnrl.trainer.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.out, args.iteration)
    print(f"wrote {out} (psnrl eval {out}, psnrl generate {out}, or "
          f"transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from psnrl.engine.llm import LLM
    from psnrl.engine.noise_spec import NoiseSpec
    from psnrl.engine.sampling import SamplingParams
    from psnrl.trainer.export import resolve_policy

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{args.prompts_file}:{n}: expected a JSON object with a "
                                         f"'prompt' field ({e})") from None
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts-file FILE.jsonl")
    if not args.sigma >= 0:  # NaN too
        raise ValueError(f"--sigma must be >= 0 (0: the clean policy), got {args.sigma}")
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    noise = NoiseSpec(args.noise_seed, args.sigma, args.targets) if args.sigma > 0 else None
    options = {"dtype": args.dtype, "block_size": args.block_size}
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    llm = LLM(resolve_policy(args.model), **options)
    outputs = llm.generate(prompts, params, noise=noise)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for request in outputs:
            for c in request.outputs:
                out.write(json.dumps({"prompt": request.prompt, "index": c.index, "text": c.text,
                                      "token_ids": c.token_ids, "logprobs": c.logprobs,
                                      "finish_reason": c.finish_reason}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    failed = [(r.prompt, c.finish_reason) for r in outputs for c in r.outputs[:1]
              if (c.finish_reason or "").startswith("error")]
    if failed:  # e.g. a prompt the tokenizer reduced to nothing (characters outside its vocabulary)
        prompt, reason = failed[0]
        print(f"psnrl generate: {len(failed)} of {len(outputs)} prompts failed; {prompt!r}: {reason}",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="psnrl",
        description="RL for LLM reasoners with parameter-space noise fused into the kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    bench = sub.add_parser("bench", help="run a benchmark and write psnrl/bench/results/<name>-<device>.*",
                           description="Run a benchmark; arguments after the name go to it "
                                       "(e.g. psnrl bench noisy-gemm --help).")
    bench.add_argument("bench", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(run=_run_bench)

    train = sub.add_parser(
        "train", help="run PSN-GRPO (default: the tiny CPU task)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with PSN-GRPO. Overrides are section.key=value, e.g. noise.enabled=false "
                    "for plain GRPO.",
        epilog=f"config sections: {', '.join(CONFIG_SECTIONS)}.\n"
               "`psnrl train --show-config [--config C] [overrides]` prints every key with its value\n"
               "(the defaults are the tiny run's).\n\n"
               "The run folder is log.dir (default runs/tiny): config.yaml, metrics.jsonl, checkpoints/\n"
               "(checkpoint.dir), tensorboard/, reward_sigma.png and, at the end, final/ (the trained\n"
               "policy as a Hugging Face folder). A folder holding another run is refused: --resume it,\n"
               "pick a new log.dir, or --overwrite it.")
    train.add_argument("overrides", nargs="*", help="section.key=value settings")
    train.add_argument("--config", default=None,
                       help="YAML file or shipped config name (tiny, qwen2.5-math-1.5b, qwen2.5-math-7b)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in log.dir from its last checkpoint")
    start.add_argument("--overwrite", action="store_true", help="replace the run log.dir holds")
    train.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=_run_train)

    export = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face model folder",
                            description="The policy of a checkpoint (default: the last) with the run's "
                                        "config and tokenizer files, for psnrl eval/generate and transformers.")
    export.add_argument("run_dir", help="the run folder (log.dir)")
    export.add_argument("out", help="a new folder to write")
    export.add_argument("--iteration", type=int, default=None, help="which checkpoint (default: the last)")
    export.set_defaults(run=_run_export)

    ev = sub.add_parser("eval", help="pass@k of a checkpoint on math benchmarks (table, JSON, plot)",
                        description="n samples per problem; unbiased pass@k per benchmark and averaged.")
    ev.add_argument("model", help="local Hugging Face checkpoint directory, or a run folder (its final policy)")
    ev.add_argument("--sets", nargs="+", default=None,
                    help="shipped names, .jsonl files, or tiny-arith (default: a run folder's eval.sets, "
                         f"else {' '.join(DEFAULT_EVAL_SETS)})")
    ev.add_argument("--n", type=int, default=16, help="samples per problem")
    ev.add_argument("--ks", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... up to n")
    ev.add_argument("--max-tokens", type=int, default=1024)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--template", default="plain", help="plain or chat")
    ev.add_argument("--limit", type=int, default=None, help="first N problems of each set")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--max-model-len", type=int, default=None)
    ev.add_argument("--embedder", default="auto", choices=["auto", "minilm", "hidden", "none"],
                    help="sentence embedder for the semantic similarity of correct answers "
                         "(auto: MiniLM when installed, else the model's hidden states)")
    ev.add_argument("--output", help="write the results as JSON here")
    ev.add_argument("--plot", help="write a PNG of pass@k curves (log2 k axis) here")
    ev.add_argument("--compare", nargs="*", default=[], help="earlier --output JSON files to plot alongside")
    ev.set_defaults(run=_run_eval)

    gen = sub.add_parser("generate", help="sample completions from a local checkpoint (JSON Lines out)",
                         description="Generate with the rollout engine, optionally from a perturbed "
                                     "policy (--sigma > 0).")
    gen.add_argument("model", help="local Hugging Face checkpoint directory, or a run folder (its final policy)")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="JSON Lines file with a 'prompt' field per line")
    gen.add_argument("--output", help="write JSON Lines here instead of stdout")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--sigma", type=float, default=0.0, help="parameter noise std (0: clean policy)")
    gen.add_argument("--noise-seed", type=int, default=0)
    gen.add_argument("--targets", default="mlp", help="mlp, attn, lm_head or all")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--block-size", type=int, default=16)
    gen.set_defaults(run=_run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as e:  # bad input (ConfigError and CheckpointError are ValueErrors)
        message = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"psnrl {args.command}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npsnrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
