"""pass@k evaluation: n samples per problem, unbiased pass@k per benchmark and averaged,
plus the diversity of the correct answers (docs/design.md, "Rewards and evaluation")."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

from psnrl.engine.llm import LLM
from psnrl.engine.sampling import SamplingParams
from psnrl.trainer.charts import line_chart
from psnrl.trainer.datasets import Problem
from psnrl.trainer.passk import pass_at_k_curve
from psnrl.trainer.embedders import HiddenStateEmbedder

# A binary operation on two numbers as written in a solution: "12 + 7", "3\times 4", "10/2".
_OPERATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(\+|-|\*|/|\^|×|÷|\\times|\\cdot|\\div)\s*(\d+(?:\.\d+)?)")
_OPERATORS = {"×": "*", "\\times": "*", "\\cdot": "*", "÷": "/", "\\div": "/"}


def operations(text: str) -> set[str]:
    """The distinct numeric operations a solution writes down, normalized ("3*4")."""
    return {f"{a}{_OPERATORS.get(op, op)}{b}" for a, op, b in _OPERATION.findall(text)}


def operation_diversity(correct: list[list[str]]) -> float | None:
    """Mean over problems (with a correct answer) of the distinct operations their correct samples use."""
    counts = [len(set().union(*(operations(t) for t in texts))) for texts in correct if texts]
    return sum(counts) / len(counts) if counts else None


def semantic_similarity_of(embedder, correct: list[list[tuple[str, list[int]]]]) -> float | None:
    """Mean pairwise cosine similarity of the correct samples of a problem (lower: more diverse),
    averaged over problems with at least two correct samples."""
    scores = []
    for samples in correct:
        if len(samples) < 2:
            continue
        if isinstance(embedder, HiddenStateEmbedder):
            emb = embedder.embed(token_ids=[ids for _, ids in samples])
        else:
            emb = embedder.embed(texts=[text for text, _ in samples])
        sim = emb @ emb.T
        n = len(samples)
        scores.append(((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item())
    return sum(scores) / len(scores) if scores else None


def pass_at_k_eval(llm: LLM, problem_sets: dict[str, list[Problem]], params: SamplingParams,
                   ks: Sequence[int], prompt: Callable[[Problem], str],
                   reward: Callable[[str, str], float], embedder=None, use_tqdm: bool = False) -> dict:
    """{"sets": {name: {"problems", "pass@k"..., diversity}}, "average": {"pass@k": ...}}, n = params.n.

    Diversity (of the correct samples): ``operation_diversity`` always, ``semantic_similarity``
    when an embedder (psnrl.trainer.embedders.make_embedder) is given.
    """
    out: dict = {"n": params.n, "sets": {}}
    for name, problems in problem_sets.items():
        outs = llm.generate([prompt(p) for p in problems], params, use_tqdm=use_tqdm)
        right = [[c for c in o.outputs if c.token_ids and reward(c.text, p.answer) > 0]
                 for o, p in zip(outs, problems)]
        curve = pass_at_k_curve([len(r) for r in right], params.n, ks)
        row = {"problems": len(problems), **{f"pass@{k}": v for k, v in curve.items()},
               "operation_diversity": operation_diversity([[c.text for c in r] for r in right])}
        if embedder is not None:
            with torch.no_grad():
                row["semantic_similarity"] = semantic_similarity_of(
                    embedder, [[(c.text, c.token_ids) for c in r] for r in right])
        out["sets"][name] = row
    llm.reset_prefix_cache()
    keys = [f"pass@{k}" for k in ks]
    sets = list(out["sets"].values())
    out["average"] = {key: sum(s[key] for s in sets) / len(sets) for key in keys} if sets else {}
    return out


def format_table(result: dict) -> str:
    """A markdown table: one row per benchmark, one column per k and diversity, and the average."""
    keys = list(result["average"])
    extra = [k for k in ("operation_diversity", "semantic_similarity")
             if any(k in row for row in result["sets"].values())]
    lines = ["| benchmark | problems | " + " | ".join(keys + extra) + " |",
             "|---|---:|" + "---:|" * len(keys + extra)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, row in result["sets"].items():
        lines.append(f"| {name} | {row['problems']} | " + " | ".join(fmt(row.get(k)) for k in keys + extra) + " |")
    lines.append("| average | | " + " | ".join(fmt(result["average"][k]) for k in keys) + " |" + " |" * len(extra))
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def plot_curves(results: dict[str, dict], path: str | Path) -> None:
    """pass@k against k (log2 axis) of the average over benchmarks, one line per run (A/B), as a PNG."""
    series = {}
    for label, result in results.items():
        ks = [int(k.split("@")[1]) for k in result["average"]]
        series[label] = (ks, list(result["average"].values()))
    line_chart(path, series, title="pass@k", xlabel="k", ylabel="pass@k (average over benchmarks)", logx=True)
