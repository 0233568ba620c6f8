"""pass@k evaluation: n samples per problem, unbiased pass@k per benchmark and averaged."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from engine.llm import LLM
from engine.sampling import SamplingParams
from trainer.datasets import Problem
from trainer.passk import pass_at_k_curve


def pass_at_k_eval(llm: LLM, problem_sets: dict[str, list[Problem]], params: SamplingParams,
                   ks: Sequence[int], prompt: Callable[[Problem], str],
                   reward: Callable[[str, str], float], use_tqdm: bool = False) -> dict:
    """{"sets": {name: {"problems", "pass@k"...}}, "average": {"pass@k": ...}} with n = params.n."""
    out: dict = {"n": params.n, "sets": {}}
    for name, problems in problem_sets.items():
        outs = llm.generate([prompt(p) for p in problems], params, use_tqdm=use_tqdm)
        correct = [sum(reward(c.text, p.answer) > 0 for c in o.outputs) for o, p in zip(outs, problems)]
        curve = pass_at_k_curve(correct, params.n, ks)
        out["sets"][name] = {"problems": len(problems), **{f"pass@{k}": v for k, v in curve.items()}}
    llm.blocks.clear_prefix_cache()
    keys = [f"pass@{k}" for k in ks]
    sets = list(out["sets"].values())
    out["average"] = {key: sum(s[key] for s in sets) / len(sets) for key in keys} if sets else {}
    return out


def format_table(result: dict) -> str:
    """A markdown table: one row per benchmark, one column per k, and the average."""
    keys = list(result["average"])
    lines = ["| benchmark | problems | " + " | ".join(keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for name, row in result["sets"].items():
        lines.append(f"| {name} | {row['problems']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    lines.append("| average | | " + " | ".join(f"{result['average'][k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def plot_curves(results: dict[str, dict], path: str | Path) -> None:
    """pass@k against k (log2 axis) of the average over benchmarks, one line per run (A/B)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, result in results.items():
        ks = [int(k.split("@")[1]) for k in result["average"]]
        ax.plot(ks, list(result["average"].values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (average over benchmarks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
