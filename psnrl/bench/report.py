"""The benchmark summary: result JSON dicts in, markdown tables, PNG charts and regressions out.

``psnrl bench all`` (psnrl/bench/all.py) runs the GPU benches and then calls ``write_summary``; the
functions here take plain dicts, so they are tested on the CPU (tests/test_bench_report.py).

Result files (``psnrl/bench/results/<name>-<device slug>.json``), by kind:

  noisy_gemm  rows: shape, M, N, K, cublas_us, clean_us, noisy_us, mixed_us, materialized_us,
              noisy_over_cublas, extra_bytes, ...                     (psnrl/bench/noisy_gemm.py)
  decode      rows: model, workload (fixed|nano-vllm), batch, prompt_len, output_len, mode
              (clean|noisy|mixed|hf, or ours-clean|ours-noisy|ours-mixed), tok_s, hf_tok_s,
              roofline_frac, step_ms, gbps, over_hf, over_clean
  learner     rows: model, tokens, mode (plain|psn|naive), peak_bytes, step_ms (also saved_bytes,
              over_plain_mem, over_plain_time, ...); "mismatch": {flat name: value}
              (psnrl/bench/learner.py: engine vs learner log-probs of the same noisy policy)
  step        rows: model, mode (plain|psn|psn-var2), phases_ms {rollout, reward, learner, sync},
              step_ms, peak_bytes
  lm_head     rows: tokens, vocab, hidden, impl, peak_bytes, ms       (lm_head_logprob-<device>.json;
              psnrl/bench/lm_head_logprob.py's wide rows T, V, H, ours_ms, naive_ms, ours_peak_bytes,
              naive_peak_bytes are read as one row per impl)

Ratios between rows (noisy/cuBLAS, mode over plain, ours over HF) are the ones each bench
stored in its rows (psnrl/bench/common.py's fill_ratios); the summary never recomputes them.
Every file and field may be missing: a missing file is reported as such, a missing field
prints as "—". Comparisons with a baseline (the files committed at HEAD, or a directory) flag
a change worse than ``threshold`` (10%) as a regression: times and bytes that grew by more
than 10%, tokens/s that fell by more than 10%.
"""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from psnrl.bench.common import device_slug

KINDS = ("noisy_gemm", "decode", "learner", "step", "lm_head")
FILE_PREFIXES = {
    "noisy_gemm": ("noisy_gemm",),
    "decode": ("decode",),
    "learner": ("learner",),
    "step": ("step",),
    "lm_head": ("lm_head_logprob", "lm_head", "lm-head"),
}
TITLES = {
    "noisy_gemm": "Noisy GEMM vs cuBLAS",
    "decode": "Decode throughput: ours vs HF",
    "learner": "Learner step: memory and time",
    "step": "Training step by phase",
    "lm_head": "Fused lm_head log-prob",
}
THRESHOLD = 0.10
GIB = 1 << 30
MIB = 1 << 20

# Targets (psnrl/bench/README.md).
GEMM_DECODE_MAX_M, GEMM_DECODE_RATIO = 256, 1.50   # noisy/cuBLAS at decode M (on the way to 1.10)
GEMM_LEARNER_MIN_M, GEMM_LEARNER_RATIO = 4096, 1.30
GEMM_MIXED_RATIO = 1.05                             # mixed/noisy: clean rows ride on the same W read
GEMM_CLEAN_RATIO = 1.05                             # the clean path (cuBLAS) over cuBLAS itself
LEARNER_MEMORY_RATIO, LEARNER_TIME_RATIO = 1.02, 1.15
STEP_PSN_RATIO, STEP_VAR2_RATIO = 1.05, 1.10
DECODE_NOISE_RATIO = 0.90                    # noisy and mixed tok/s over clean, at least
DECODE_ROOFLINE_MODEL, DECODE_ROOFLINE = "Qwen2.5-7B", 0.70  # batch-1 decode, fraction of peak HBM
DECODE_HF_BATCH, DECODE_HF_RATIO = 256, 20.0  # ours over transformers generate, at least

PHASES = ("rollout", "reward", "learner", "sync")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def candidate_names(kind: str, slug: str) -> list[str]:
    return [f"{prefix}-{slug}.json" for prefix in FILE_PREFIXES[kind]]


def _parse(text: str, where: str, problems: list[str]) -> dict | None:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{where}: not valid JSON ({e})")
        return None
    if not isinstance(doc, dict):
        problems.append(f"{where}: expected a JSON object, got {type(doc).__name__}")
        return None
    if not isinstance(doc.get("rows", []), list):
        problems.append(f"{where}: 'rows' is not a list")
        doc = dict(doc, rows=[])
    doc["rows"] = [r for r in doc.get("rows", []) if isinstance(r, dict)]
    doc["_file"] = where
    return doc


def _lm_head_long(rows: list[dict]) -> list[dict]:
    """psnrl/bench/lm_head_logprob.py writes one row per shape (T, V, H, ours_ms, naive_ms,
    ours_peak_bytes, ...); the summary wants one per (shape, impl): tokens, vocab, hidden, impl, ms,
    peak_bytes. Rows already in that form pass through."""
    out = []
    for row in rows:
        if "impl" in row or "T" not in row:
            out.append(row)
            continue
        impls = [k[:-len("_ms")] for k in row if k.endswith("_ms")] or ["ours", "naive"]
        for impl in impls:
            long = {"tokens": row.get("T"), "vocab": row.get("V"), "hidden": row.get("H"), "impl": impl,
                    "ms": row.get(f"{impl}_ms"), "peak_bytes": row.get(f"{impl}_peak_bytes")}
            if row.get("error"):
                long["error"] = row["error"]
            out.append(long)
    return out


NORMALIZE: dict[str, Callable[[list[dict]], list[dict]]] = {"lm_head": _lm_head_long}


def normalize(kind: str, doc: dict | None) -> dict | None:
    """The document with its rows in the form the summary reads (see the module docstring)."""
    if doc is None or kind not in NORMALIZE:
        return doc
    return dict(doc, rows=NORMALIZE[kind](doc.get("rows", [])))


def load_results(results_dir: str | Path, slug: str, problems: list[str] | None = None) -> dict:
    """{kind: document or None} from ``results_dir``; unreadable files are None (noted in ``problems``)."""
    problems = [] if problems is None else problems
    out: dict[str, dict | None] = {}
    for kind in KINDS:
        out[kind] = None
        for name in candidate_names(kind, slug):
            path = Path(results_dir) / name
            if path.is_file():
                out[kind] = normalize(kind, _parse(path.read_text(encoding="utf-8"), name, problems))
                break
    return out


def load_git_results(results_dir: str | Path, slug: str, rev: str = "HEAD",
                     problems: list[str] | None = None) -> dict | None:
    """{kind: document or None} as committed at ``rev``; None when results_dir is not in a git checkout."""
    problems = [] if problems is None else problems
    results_dir = Path(results_dir).resolve()
    try:
        top = subprocess.run(["git", "-C", str(results_dir), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    rel = results_dir.relative_to(Path(top).resolve()).as_posix()
    out: dict[str, dict | None] = {}
    for kind in KINDS:
        out[kind] = None
        for name in candidate_names(kind, slug):
            spec = f"{rev}:{rel}/{name}" if rel != "." else f"{rev}:{name}"
            done = subprocess.run(["git", "-C", top, "show", spec], capture_output=True, text=True)
            if done.returncode == 0:
                out[kind] = normalize(kind, _parse(done.stdout, f"{rev}:{rel}/{name}", problems))
                break
    return out


def result_slugs(results_dir: str | Path) -> set[str]:
    """Device slugs that have at least one result file in ``results_dir``."""
    slugs = set()
    prefixes = sorted({p for ps in FILE_PREFIXES.values() for p in ps}, key=len, reverse=True)
    for path in Path(results_dir).glob("*.json"):
        for prefix in prefixes:
            if path.name.startswith(prefix + "-"):
                slugs.add(path.name[len(prefix) + 1:-len(".json")])
                break
    return slugs


# ---------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------

def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value, spec: str = ".3g") -> str:
    v = _num(value)
    return "—" if v is None else format(v, spec)


def fmt_bytes(value, unit: int = GIB, digits: int = 2) -> str:
    v = _num(value)
    return "—" if v is None else f"{v / unit:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def decode_mode(mode) -> str:
    """decode modes as psnrl/bench/decode.py writes them: ours-clean -> clean, HF -> hf."""
    mode = str(mode or "?")
    return mode[len("ours-"):] if mode.startswith("ours-") else mode.lower() if mode.lower() == "hf" else mode


def _workload_tag(row: dict) -> str:
    """" nano-vllm" for rows of a workload other than the default fixed one."""
    workload = row.get("workload", "fixed")
    return "" if workload == "fixed" else f" {workload}"


def _rows(doc: dict | None) -> list[dict]:
    return [r for r in (doc or {}).get("rows", []) if isinstance(r, dict)]


def _ok(row: dict) -> bool:
    return not row.get("error")


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------

@dataclass
class Target:
    bench: str
    target: str
    where: str
    value: float | None
    limit: float
    at_least: bool = False  # the value must reach the limit (else stay under it)

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def _decode_targets(rows: list[dict]) -> list[Target]:
    """Issue targets of the decode bench: noise costs <= 10%, the 7B batch-1 roofline, ours vs HF."""
    out: list[Target] = []
    for r in rows:
        mode, model, batch = decode_mode(r.get("mode")), r.get("model"), r.get("batch")
        workload = r.get("workload", "fixed")
        where = f"{model} {workload} batch {batch}"
        if mode in ("noisy", "mixed"):
            out.append(Target("decode", f"{mode}/clean tok/s >= {DECODE_NOISE_RATIO:.2f}", where,
                              _num(r.get("over_clean")), DECODE_NOISE_RATIO, at_least=True))
        if mode in ("clean", "noisy") and batch == 1 and model == DECODE_ROOFLINE_MODEL and workload == "fixed":
            out.append(Target("decode", f"batch-1 {DECODE_ROOFLINE_MODEL} decode >= {DECODE_ROOFLINE:.0%} of "
                              f"peak HBM bandwidth", f"{model} {mode}", _num(r.get("roofline_frac")),
                              DECODE_ROOFLINE, at_least=True))
        if mode in ("clean", "noisy") and batch == DECODE_HF_BATCH and workload == "fixed":
            out.append(Target("decode", f"batch {DECODE_HF_BATCH}: ours/HF tok/s >= {DECODE_HF_RATIO:.0f}",
                              f"{model} {mode}", _num(r.get("over_hf")), DECODE_HF_RATIO, at_least=True))
    return out


def check_targets(current: Mapping[str, dict | None]) -> list[Target]:
    out: list[Target] = []
    for row in _rows(current.get("noisy_gemm")):
        m = _num(row.get("M"))
        if m is None:
            continue
        value = _num(row.get("noisy_over_cublas"))
        where = f"{row.get('shape', '?')} M={int(m)}"
        if m <= GEMM_DECODE_MAX_M:
            out.append(Target("noisy_gemm", f"noisy/cuBLAS <= {GEMM_DECODE_RATIO:.2f} at M <= {GEMM_DECODE_MAX_M}",
                              where, value, GEMM_DECODE_RATIO))
        elif m >= GEMM_LEARNER_MIN_M:
            out.append(Target("noisy_gemm", f"noisy/cuBLAS <= {GEMM_LEARNER_RATIO:.2f} at M >= {GEMM_LEARNER_MIN_M}",
                              where, value, GEMM_LEARNER_RATIO))
    out += _decode_targets([r for r in _rows(current.get("decode")) if _ok(r)])
    for row in _rows(current.get("learner")):
        if row.get("mode") != "psn" or not _ok(row):
            continue
        model, tokens, checkpointing = _learner_case(row)
        where = f"{model} {tokens} tokens{', activation checkpointing' if checkpointing else ''}"
        out.append(Target("learner", f"peak memory PSN/plain <= {LEARNER_MEMORY_RATIO:.2f}", where,
                          _num(row.get("over_plain_mem")), LEARNER_MEMORY_RATIO))
        out.append(Target("learner", f"step time PSN/plain <= {LEARNER_TIME_RATIO:.2f}", where,
                          _num(row.get("over_plain_time")), LEARNER_TIME_RATIO))
    for row in _rows(current.get("step")):
        limit = {"psn": STEP_PSN_RATIO, "psn-var2": STEP_VAR2_RATIO}.get(row.get("mode"))
        if limit is None or not _ok(row):
            continue
        label = "PSN" if row["mode"] == "psn" else "Var-II"
        out.append(Target("step", f"step time {label}/plain <= {limit:.2f}", str(row.get("model")),
                          _num(row.get("over_plain")), limit))
    return out


def render_targets(targets: Sequence[Target]) -> list[str]:
    if not targets:
        return ["No target could be checked (no results with the needed rows)."]
    groups: dict[tuple[str, str], list[Target]] = {}
    for t in targets:
        groups.setdefault((t.bench, t.target), []).append(t)
    lines = []
    for (bench, name), ts in groups.items():
        misses = [t for t in ts if not t.ok]
        if not misses:
            lines.append(f"- **met** ({bench}): {name} ({len(ts)} checked)")
        else:
            detail = "; ".join(f"{t.where}: {fmt(t.value, '.3f')}" for t in misses)
            lines.append(f"- **missed** ({bench}): {name}: {len(misses)} of {len(ts)} ({detail})")
    return lines


# ---------------------------------------------------------------------------
# Regressions
# ---------------------------------------------------------------------------

LOWER, HIGHER = "lower", "higher"


def _step_phase(phase: str) -> Callable[[dict], object]:
    return lambda r: (r.get("phases_ms") or {}).get(phase) if isinstance(r.get("phases_ms"), dict) else None


# kind -> how a row is named in the regression table (its key: the same fields)
ROW_LABELS: dict[str, Callable[[dict], str]] = {
    "noisy_gemm": lambda r: f"{r.get('shape')} M={r.get('M')}",
    "decode": lambda r: (f"{r.get('model')}{_workload_tag(r)} batch {r.get('batch')} prompt "
                         f"{r.get('prompt_len')} output {r.get('output_len')} {decode_mode(r.get('mode'))}"),
    "learner": lambda r: (f"{r.get('model')} {r.get('tokens')} tokens"
                          f"{' act-ckpt' if r.get('activation_checkpointing') else ''} {r.get('mode')}"),
    "step": lambda r: f"{r.get('model')} {r.get('mode')}",
    "lm_head": lambda r: f"{r.get('tokens')} x {r.get('vocab')} (hidden {r.get('hidden')}) {r.get('impl')}",
}

# kind -> (row key, [(metric name, getter, better)])
COMPARISONS: dict[str, tuple[Callable[[dict], tuple], list[tuple[str, Callable[[dict], object], str]]]] = {
    "noisy_gemm": (lambda r: (r.get("shape"), r.get("M")),
                   [("noisy_us", lambda r: r.get("noisy_us"), LOWER),
                    ("noisy_over_cublas", lambda r: r.get("noisy_over_cublas"), LOWER)]),
    "decode": (lambda r: (r.get("model"), r.get("workload", "fixed"), r.get("batch"), r.get("prompt_len"),
                          r.get("output_len"), decode_mode(r.get("mode"))),
               [("tok_s", lambda r: r.get("tok_s"), HIGHER)]),
    "learner": (lambda r: (*_learner_case(r), r.get("mode")),
                [("step_ms", lambda r: r.get("step_ms"), LOWER),
                 ("peak_bytes", lambda r: r.get("peak_bytes"), LOWER)]),
    "step": (lambda r: (r.get("model"), r.get("mode")),
             [("step_ms", lambda r: r.get("step_ms"), LOWER),
              ("peak_bytes", lambda r: r.get("peak_bytes"), LOWER)]
             + [(f"{p}_ms", _step_phase(p), LOWER) for p in PHASES]),
    "lm_head": (lambda r: (r.get("tokens"), r.get("vocab"), r.get("hidden"), r.get("impl")),
                [("ms", lambda r: r.get("ms"), LOWER),
                 ("peak_bytes", lambda r: r.get("peak_bytes"), LOWER)]),
}


@dataclass
class Change:
    bench: str
    row: str
    metric: str
    baseline: float
    current: float | None
    better: str
    threshold: float = THRESHOLD

    @property
    def change(self) -> float | None:
        """Relative change, current / baseline - 1 (None when no longer measured)."""
        if self.current is None:
            return None
        return self.current / self.baseline - 1

    @property
    def regression(self) -> bool:
        if self.current is None:
            return True  # measured before, an error now
        c = self.change
        return c > self.threshold if self.better == LOWER else c < -self.threshold

    @property
    def improvement(self) -> bool:
        if self.current is None:
            return False
        c = self.change
        return c < -self.threshold if self.better == LOWER else c > self.threshold


def compare(current: Mapping[str, dict | None], baseline: Mapping[str, dict | None] | None,
            threshold: float = THRESHOLD) -> list[Change]:
    """Every metric measured in both (rows matched by their key); an error row that had a value is kept too."""
    out: list[Change] = []
    if not baseline:
        return out
    for kind, (key_fn, metrics) in COMPARISONS.items():
        base_rows = {key_fn(r): r for r in _rows(baseline.get(kind)) if _ok(r)}
        for row in _rows(current.get(kind)):
            key = key_fn(row)
            base = base_rows.get(key)
            if base is None:
                continue
            for name, get, better in metrics:
                b = _num(get(base))
                if b is None or b <= 0:
                    continue
                c = _num(get(row)) if _ok(row) else None
                if c is None and _ok(row):
                    continue  # a field this run did not write: nothing to compare
                out.append(Change(kind, ROW_LABELS[kind](row), name, b, c, better, threshold))
    return out


def render_changes(changes: Sequence[Change], source: str | None, threshold: float) -> list[str]:
    if source is None:
        return ["No baseline: no committed results for this device (and no --baseline directory)."]
    regressions = [c for c in changes if c.regression]
    improvements = [c for c in changes if c.improvement]
    lines = [f"Baseline: {source}. {len(changes)} figures compared; a change worse than "
             f"{threshold:.0%} is a regression.", ""]
    if not regressions:
        lines.append(f"**No regression over {threshold:.0%}.**")
    else:
        lines += [f"**{len(regressions)} regression(s) over {threshold:.0%}:**", ""]
        lines.append(table(["bench", "row", "metric", "baseline", "now", "change", ""],
                           [[c.bench, c.row, c.metric, fmt(c.baseline, ".4g"), fmt(c.current, ".4g"),
                             "error now" if c.change is None else f"{c.change:+.1%}", "**REGRESSION**"]
                            for c in regressions], "lllrrrl"))
    if improvements:
        lines += ["", f"Improved by more than {threshold:.0%}:", ""]
        lines.append(table(["bench", "row", "metric", "baseline", "now", "change"],
                           [[c.bench, c.row, c.metric, fmt(c.baseline, ".4g"), fmt(c.current, ".4g"),
                             f"{c.change:+.1%}"] for c in improvements], "lllrrr"))
    return lines


# ---------------------------------------------------------------------------
# Sections: tables
# ---------------------------------------------------------------------------

def noisy_gemm_table(doc: dict) -> str:
    rows = []
    for r in _rows(doc):
        over = r.get("noisy_over_cublas")
        rows.append([str(r.get("shape", "?")), fmt(r.get("M"), "g"),
                     fmt(r.get("cublas_us"), ".1f"), fmt(r.get("clean_us"), ".1f"), fmt(r.get("noisy_us"), ".1f"),
                     fmt(r.get("mixed_us"), ".1f"), fmt(r.get("materialized_us"), ".1f"), fmt(over, ".3f"),
                     fmt(r.get("extra_bytes"), ",.0f")])
    return table(["shape", "M", "cuBLAS µs", "clean µs", "noisy µs", "mixed µs", "materialized µs",
                  "noisy/cuBLAS", "extra B"], rows)


def decode_table(doc: dict) -> str:
    rows = []
    for r in _rows(doc):
        rows.append([str(r.get("model", "?")) + _workload_tag(r), fmt(r.get("batch"), "g"),
                     fmt(r.get("prompt_len"), "g"), fmt(r.get("output_len"), "g"), decode_mode(r.get("mode")),
                     fmt(r.get("tok_s"), ",.0f"), fmt(r.get("step_ms"), ".2f"), fmt(r.get("gbps"), ",.0f"),
                     fmt(r.get("roofline_frac"), ".1%"), fmt(r.get("over_hf"), ".2f"),
                     fmt(r.get("over_clean"), ".3f")])
    return table(["model", "batch", "prompt", "output", "mode", "tok/s", "ms/step", "GB/s", "roofline",
                  "over HF", "over clean"], rows, "lrrrlrrrrrr")


def _learner_case(r: dict) -> tuple:
    """Learner rows compared with each other (files from before the option: checkpointing off)."""
    return r.get("model"), r.get("tokens"), bool(r.get("activation_checkpointing"))


def learner_table(doc: dict) -> str:
    rows = []
    for r in _rows(doc):
        rows.append([str(r.get("model", "?")), fmt(r.get("tokens"), "g"),
                     "on" if r.get("activation_checkpointing") else "off", str(r.get("mode", "?")),
                     fmt_bytes(r.get("peak_bytes")), fmt(r.get("step_ms"), ".1f"),
                     fmt(r.get("over_plain_mem"), ".3f"), fmt(r.get("over_plain_time"), ".3f")])
    text = table(["model", "tokens", "act. ckpt", "mode", "peak GiB", "step ms", "memory / plain", "time / plain"],
                 rows, "lrllrrrr")
    mismatch = doc.get("mismatch")
    if isinstance(mismatch, dict) and mismatch:
        text += "\n\nMismatch: " + ", ".join(f"{k} = {fmt(v, '.3g') if _num(v) is not None else v}"
                                               for k, v in mismatch.items())
    return text


def step_table(doc: dict) -> str:
    rows = []
    for r in _rows(doc):
        phases = r.get("phases_ms") if isinstance(r.get("phases_ms"), dict) else {}
        over = r.get("over_plain")  # None for plain itself
        rows.append([str(r.get("model", "?")), str(r.get("mode", "?")), fmt(r.get("step_ms"), ",.1f"),
                     *[fmt(phases.get(ph), ",.1f") for ph in PHASES], fmt_bytes(r.get("peak_bytes")),
                     fmt(over, ".3f")])
    return table(["model", "mode", "step ms", *[f"{p} ms" for p in PHASES], "peak GiB", "time / plain"],
                 rows, "llrrrrrrr")


def lm_head_table(doc: dict) -> str:
    rows = [[fmt(r.get("tokens"), "g"), fmt(r.get("vocab"), "g"), fmt(r.get("hidden"), "g"), str(r.get("impl", "?")),
             fmt(r.get("ms"), ".2f"), fmt_bytes(r.get("peak_bytes"), MIB, 1)] for r in _rows(doc)]
    return table(["tokens", "vocab", "hidden", "impl", "ms", "peak MiB"], rows, "rrrlrr")


TABLES = {"noisy_gemm": noisy_gemm_table, "decode": decode_table, "learner": learner_table,
          "step": step_table, "lm_head": lm_head_table}


# ---------------------------------------------------------------------------
# Charts (psnrl/trainer/charts.py)
# ---------------------------------------------------------------------------

def _sorted_xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    points = sorted(points)
    return [p[0] for p in points], [p[1] for p in points]


def chart_specs(current: Mapping[str, dict | None]) -> list[tuple[str, str, str, dict]]:
    """[(kind, file name, chart function name, keyword arguments)] for the data present."""
    specs = []
    gemm = [r for r in _rows(current.get("noisy_gemm")) if _ok(r)]
    series: dict[str, list] = {}
    for r in gemm:
        m, over = _num(r.get("M")), _num(r.get("noisy_over_cublas"))
        if m is not None and over is not None:
            series.setdefault(str(r.get("shape", "?")), []).append((m, over))
    if series:
        ms = [p[0] for pts in series.values() for p in pts]
        lines = {name: _sorted_xy(pts) for name, pts in series.items()}
        if min(ms) <= GEMM_DECODE_MAX_M:
            lines[f"target {GEMM_DECODE_RATIO:.2f} (M <= {GEMM_DECODE_MAX_M})"] = (
                [min(ms), min(max(ms), GEMM_DECODE_MAX_M)], [GEMM_DECODE_RATIO] * 2)
        if max(ms) >= GEMM_LEARNER_MIN_M:
            lines[f"target {GEMM_LEARNER_RATIO:.2f} (M >= {GEMM_LEARNER_MIN_M})"] = (
                [max(min(ms), GEMM_LEARNER_MIN_M), max(ms)], [GEMM_LEARNER_RATIO] * 2)
        specs.append(("noisy_gemm", "noisy_gemm_ratio.png", "line_chart",
                      dict(series=lines, title="noisy / cuBLAS time vs M", xlabel="M (rows)",
                           ylabel="noisy / cuBLAS", logx=True)))
    decode = [r for r in _rows(current.get("decode")) if _ok(r) and r.get("workload", "fixed") == "fixed"]
    for model in dict.fromkeys(str(r.get("model", "?")) for r in decode):
        mine = [r for r in decode if str(r.get("model", "?")) == model]
        lengths = sorted({(r.get("prompt_len"), r.get("output_len")) for r in mine}, key=str)
        lines = {}
        for r in mine:
            x, y = _num(r.get("batch")), _num(r.get("tok_s"))
            if x is None or y is None:
                continue
            name = decode_mode(r.get("mode"))
            name = ("HF" if name == "hf" else f"ours {name}")
            if len(lengths) > 1:
                name += f" p{r.get('prompt_len')}/o{r.get('output_len')}"
            lines.setdefault(name, []).append((x, y))
        if lines:
            specs.append(("decode", f"decode_{device_slug(model)}.png", "line_chart",
                          dict(series={k: _sorted_xy(v) for k, v in lines.items()},
                               title=f"decode tokens/s vs batch: {model}", xlabel="batch",
                               ylabel="output tokens/s", logx=True, logy=True)))
    learner = [r for r in _rows(current.get("learner")) if _ok(r) and _num(r.get("peak_bytes")) is not None]
    if learner:
        def cat(r: dict) -> str:
            return (f"{r.get('model', '?')} {r.get('tokens', '?')} tok"
                    f"{' ckpt' if r.get('activation_checkpointing') else ''}")
        cats = list(dict.fromkeys(cat(r) for r in learner))
        modes = list(dict.fromkeys(str(r.get("mode", "?")) for r in learner))
        values = {m: [math.nan] * len(cats) for m in modes}
        for r in learner:
            values[str(r.get("mode", "?"))][cats.index(cat(r))] = r["peak_bytes"] / GIB
        specs.append(("learner", "learner_memory.png", "bar_chart",
                      dict(categories=cats, series=values, title="learner peak memory: PSN vs plain vs naive",
                           ylabel="peak GiB")))
    steps = [r for r in _rows(current.get("step")) if _ok(r) and isinstance(r.get("phases_ms"), dict)]
    if steps:
        cats = [f"{r.get('model', '?')} {r.get('mode', '?')}" for r in steps]
        parts = {p: [_num(r["phases_ms"].get(p)) or 0.0 for r in steps] for p in PHASES}
        other = [max((_num(r.get("step_ms")) or 0.0) - sum(parts[p][i] for p in PHASES), 0.0)
                 for i, r in enumerate(steps)]
        if any(v > 0 for v in other):
            parts["other"] = other
        specs.append(("step", "step_phases.png", "stacked_bar_chart",
                      dict(categories=cats, parts=parts, title="training step time by phase", ylabel="ms")))
    lm = [r for r in _rows(current.get("lm_head")) if _ok(r) and _num(r.get("peak_bytes")) is not None]
    if lm:
        cats = list(dict.fromkeys(f"{r.get('tokens', '?')}x{r.get('vocab', '?')}" for r in lm))
        impls = list(dict.fromkeys(str(r.get("impl", "?")) for r in lm))
        values = {i: [math.nan] * len(cats) for i in impls}
        for r in lm:
            values[str(r.get("impl", "?"))][cats.index(f"{r.get('tokens', '?')}x{r.get('vocab', '?')}")] = \
                r["peak_bytes"] / MIB
        specs.append(("lm_head", "lm_head_memory.png", "bar_chart",
                      dict(categories=cats, series=values, title="lm_head log-prob peak memory (tokens x vocab)",
                           ylabel="peak MiB")))
    return specs


def make_charts(current: Mapping[str, dict | None], fig_dir: str | Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Draw the charts into ``fig_dir``; returns ({kind: [png paths]}, [problems])."""
    from psnrl.trainer import charts

    fig_dir = Path(fig_dir)
    made: dict[str, list[Path]] = {}
    problems = []
    for kind, name, fn_name, kwargs in chart_specs(current):
        path = fig_dir / name
        try:
            getattr(charts, fn_name)(path, **kwargs)
        except Exception as e:  # a chart must not stop the summary
            problems.append(f"{name}: {type(e).__name__}: {e}")
            continue
        made.setdefault(kind, []).append(path)
    return made, problems


# ---------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------

def render_summary(current: Mapping[str, dict | None], *, device: str,
                   baseline: Mapping[str, dict | None] | None = None, baseline_source: str | None = None,
                   figures: Mapping[str, Sequence[Path]] | None = None, figures_root: Path | None = None,
                   run_status: Sequence[dict] | None = None, notes: Sequence[str] = (),
                   threshold: float = THRESHOLD) -> tuple[str, list[Change]]:
    """The summary markdown and the comparisons behind its regression table."""
    names = {doc.get("device") for doc in current.values() if doc and doc.get("device")}
    title_device = ", ".join(sorted(names)) if names else device
    parts = [f"# Benchmark summary: {title_device}", ""]
    if run_status:
        parts += ["## Runs", "",
                  table(["bench", "status", "seconds", "detail"],
                        [[s.get("bench", "?"), s.get("status", "?"), fmt(s.get("seconds"), ".0f"),
                          str(s.get("detail", "")).replace("|", "/").replace("\n", " ")[:200]]
                         for s in run_status], "llrl"), ""]
    missing = [k for k in KINDS if not current.get(k)]
    if missing:
        parts += ["Missing results (no file for this device): "
                  + ", ".join(f"{k} (`{candidate_names(k, device_slug(device))[0]}`)" for k in missing), ""]
    changes = compare(current, baseline, threshold) if baseline else []
    parts += ["## Targets", "", *render_targets(check_targets(current)), ""]
    parts += ["## Regressions", "", *render_changes(changes, baseline_source if baseline else None, threshold), ""]
    for kind in KINDS:
        doc = current.get(kind)
        if not doc:
            continue
        parts += [f"## {TITLES[kind]}", ""]
        meta = [f"{k} {doc[k]}" for k in ("torch", "triton", "dtype") if doc.get(k) is not None]
        src = f"From `{doc.get('_file', '?')}`" + (f" ({', '.join(meta)})" if meta else "") + "."
        parts += [src, ""]
        for path in (figures or {}).get(kind, []):
            rel = Path(path).relative_to(figures_root).as_posix() if figures_root else Path(path).name
            parts += [f"![{Path(path).stem}]({rel})", ""]
        parts += [TABLES[kind](doc), ""]
        errors = [r for r in _rows(doc) if r.get("error")]
        if errors:
            parts += [f"{len(errors)} row(s) failed: " + "; ".join(str(r["error"])[:120] for r in errors[:5]), ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts), changes


def write_summary(results_dir: str | Path, slug: str, *, baseline_dir: str | Path | None = None,
                  git_rev: str | None = "HEAD", run_status: Sequence[dict] | None = None,
                  charts: bool = True, threshold: float = THRESHOLD,
                  out_dir: str | Path | None = None) -> tuple[Path, list[Change]]:
    """Write ``summary-<slug>.md`` (and its PNGs under ``summary-<slug>/``); returns (path, regressions)."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir
    notes: list[str] = []
    current = load_results(results_dir, slug, notes)
    if baseline_dir is not None:
        baseline = load_results(baseline_dir, slug, notes)
        source = f"`{baseline_dir}`"
    elif git_rev:
        baseline = load_git_results(results_dir, slug, git_rev, notes)
        source = f"the files committed at {git_rev}"
    else:
        baseline, source = None, None
    if baseline is not None and not any(baseline.values()):
        baseline = None
    figures: dict[str, list[Path]] = {}
    if charts:
        figures, problems = make_charts(current, out_dir / f"summary-{slug}")
        notes += [f"chart skipped: {p}" for p in problems]
    text, changes = render_summary(current, device=slug, baseline=baseline, baseline_source=source,
                                   figures=figures, figures_root=out_dir, run_status=run_status,
                                   notes=notes, threshold=threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"summary-{slug}.md"
    path.write_text(text, encoding="utf-8")
    return path, [c for c in changes if c.regression]
