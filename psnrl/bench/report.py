"""The benchmark summary (``psnrl bench all``): result JSON dicts in, markdown tables, PNG charts and
regressions out; plain dicts, so tested on the CPU. Each bench's section, targets and ratios are the
bench's own (never recomputed); lm_head rows are read one per (shape, impl); missing files and fields
print as "—"; a change over ``threshold`` (10%) against a baseline is a regression (psnrl/bench/README.md).
"""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from psnrl.bench import decode, learner, noisy_gemm, step
from psnrl.bench.common import Column, device_slug, markdown_table

KINDS = ("noisy_gemm", "decode", "learner", "step", "lm_head")
FILE_PREFIXES = {kind: (kind,) for kind in KINDS} | {"lm_head": ("lm_head_logprob", "lm_head", "lm-head")}
TITLES = {
    "noisy_gemm": "Noisy GEMM vs cuBLAS",
    "decode": "Decode throughput: ours vs HF",
    "learner": "Learner step: memory and time",
    "step": "Training step by phase",
    "lm_head": "Fused lm_head log-prob",
}
BENCHES = {"noisy_gemm": noisy_gemm, "decode": decode, "learner": learner, "step": step}
THRESHOLD = 0.10
GIB = 1 << 30
MIB = 1 << 20
PHASES = step.PHASES
LM_HEAD_COLUMNS = (Column("tokens", "tokens"), Column("vocab", "vocab"), Column("hidden", "hidden"),
                   Column("impl", "impl", left=True), Column("ms", "ms", "{:.2f}"),
                   Column("peak_bytes", "peak MiB", "mib"))



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
    """The bench's rows (T, V, H, ours_ms, naive_ms, ours_peak_bytes, ...) one per (shape, impl);
    rows already in that form pass through."""
    out = []
    for row in rows:
        if "impl" in row or "T" not in row:
            out.append(row)
            continue
        for impl in [k[:-len("_ms")] for k in row if k.endswith("_ms")] or ["ours", "naive"]:
            out.append({"tokens": row.get("T"), "vocab": row.get("V"), "hidden": row.get("H"), "impl": impl,
                        "ms": row.get(f"{impl}_ms"), "peak_bytes": row.get(f"{impl}_peak_bytes"),
                        **({"error": row["error"]} if row.get("error") else {})})
    return out


def decode_mode(mode) -> str:
    """decode modes of older files: ours-clean -> clean, HF -> hf."""
    mode = str(mode or "?")
    return mode[len("ours-"):] if mode.startswith("ours-") else mode.lower() if mode.lower() == "hf" else mode


NORMALIZE: dict[str, Callable[[list[dict]], list[dict]]] = {
    "lm_head": _lm_head_long,
    "decode": lambda rows: [dict(r, mode=decode_mode(r.get("mode"))) for r in rows],
}


def _load(read: Callable[[str], str | None], where: Callable[[str], str], slug: str,
          problems: list[str] | None) -> dict:
    """{kind: document or None}: the first of a kind's file names ``read`` finds."""
    problems = [] if problems is None else problems
    out: dict[str, dict | None] = {}
    for kind in KINDS:
        out[kind] = None
        for name in candidate_names(kind, slug):
            text = read(name)
            if text is not None:
                doc = _parse(text, where(name), problems)
                out[kind] = dict(doc, rows=NORMALIZE[kind](doc["rows"])) if doc and kind in NORMALIZE else doc
                break
    return out


def load_results(results_dir: str | Path, slug: str, problems: list[str] | None = None) -> dict:
    """{kind: document or None} from ``results_dir``; unreadable files are None (noted in ``problems``)."""
    def read(name: str) -> str | None:
        path = Path(results_dir) / name
        return path.read_text(encoding="utf-8") if path.is_file() else None
    return _load(read, str, slug, problems)


def load_git_results(results_dir: str | Path, slug: str, rev: str = "HEAD",
                     problems: list[str] | None = None) -> dict | None:
    """{kind: document or None} as committed at ``rev``; None when results_dir is not in a git checkout."""
    results_dir = Path(results_dir).resolve()
    try:
        top = subprocess.run(["git", "-C", str(results_dir), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    rel = results_dir.relative_to(Path(top).resolve()).as_posix()

    def spec(name: str) -> str:
        return f"{rev}:{rel}/{name}" if rel != "." else f"{rev}:{name}"

    def read(name: str) -> str | None:
        done = subprocess.run(["git", "-C", top, "show", spec(name)], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None
    return _load(read, lambda name: f"{rev}:{rel}/{name}", slug, problems)


def result_slugs(results_dir: str | Path) -> set[str]:
    """Device slugs that have at least one result file in ``results_dir``."""
    slugs = set()
    prefixes = sorted({p for ps in FILE_PREFIXES.values() for p in ps}, key=len, reverse=True)
    for path in Path(results_dir).glob("*.json"):
        prefix = next((p for p in prefixes if path.name.startswith(p + "-")), None)
        if prefix:
            slugs.add(path.name[len(prefix) + 1:-len(".json")])
    return slugs



def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value, spec: str = ".3g") -> str:
    v = _num(value)
    return "—" if v is None else format(v, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def _rows(doc: dict | None) -> list[dict]:
    return [r for r in (doc or {}).get("rows", []) if isinstance(r, dict)]


def _ok(row: dict) -> bool:
    return not row.get("error")


def bench_table(kind: str, doc: dict) -> str:
    """A bench's section of the summary: the bench's own tables of its rows."""
    rows = _rows(doc)
    if kind == "lm_head":
        return markdown_table(LM_HEAD_COLUMNS, rows)
    if kind == "learner":
        return "\n".join(learner.render_tables(rows, "###", doc.get("mismatch"))).strip()
    return "\n".join(BENCHES[kind].render_tables(rows, "###")).strip()



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
        return self.value is not None and (self.value >= self.limit if self.at_least else self.value <= self.limit)


def check_targets(current: Mapping[str, dict | None]) -> list[Target]:
    """Each bench's ``TARGETS`` on its rows."""
    return [Target(kind, b.title, b.where(r), _num(r.get(b.field)), float(b.limit), b.at_least)
            for kind, module in BENCHES.items() for b in module.TARGETS
            for r in _rows(current.get(kind)) if b.applies(r)]


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



LOWER, HIGHER = "lower", "higher"


# kind -> how a row is named in the regression table; rows of the same name are compared
ROW_LABELS: dict[str, Callable[[dict], str]] = {
    "noisy_gemm": lambda r: f"{r.get('shape')} M={r.get('M')}",
    "decode": lambda r: (f"{r.get('model')}{'' if r.get('workload', 'fixed') == 'fixed' else ' ' + r['workload']} "
                         f"batch {r.get('batch')} prompt {r.get('prompt_len')} output {r.get('output_len')} "
                         f"{r.get('mode')}"),
    "learner": lambda r: (f"{r.get('model')} {r.get('tokens')} tokens"
                          f"{' act-ckpt' if r.get('activation_checkpointing') else ''} {r.get('mode')}"),
    "step": lambda r: f"{r.get('model')} {r.get('mode')}",
    "lm_head": lambda r: f"{r.get('tokens')} x {r.get('vocab')} (hidden {r.get('hidden')}) {r.get('impl')}",
}
# kind -> [(metric, better)]; a step's "<phase>_ms" is read from its phases_ms
COMPARISONS: dict[str, list[tuple[str, str]]] = {
    "noisy_gemm": [("noisy_us", LOWER), ("noisy_over_cublas", LOWER)],
    "decode": [("tok_s", HIGHER)],
    "learner": [("step_ms", LOWER), ("peak_bytes", LOWER)],
    "step": [("step_ms", LOWER), ("peak_bytes", LOWER), *[(f"{p}_ms", LOWER) for p in PHASES]],
    "lm_head": [("ms", LOWER), ("peak_bytes", LOWER)],
}


def _metric(row: dict, name: str) -> object:
    phases = row.get("phases_ms")
    return row.get(name) if name in row or not isinstance(phases, dict) else phases.get(name[:-len("_ms")])


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
        return None if self.current is None else self.current / self.baseline - 1

    def _beyond(self, worse: bool) -> bool:
        c = self.change
        return c is not None and (c > self.threshold if (self.better == LOWER) == worse else c < -self.threshold)

    @property
    def regression(self) -> bool:
        return self.current is None or self._beyond(True)  # measured before, an error now

    @property
    def improvement(self) -> bool:
        return self._beyond(False)


def compare(current: Mapping[str, dict | None], baseline: Mapping[str, dict | None] | None,
            threshold: float = THRESHOLD) -> list[Change]:
    """Every metric measured in both (rows matched by their key); an error row that had a value is kept too."""
    out: list[Change] = []
    if not baseline:
        return out
    for kind, metrics in COMPARISONS.items():
        label = ROW_LABELS[kind]
        base_rows = {label(r): r for r in _rows(baseline.get(kind)) if _ok(r)}
        for row in _rows(current.get(kind)):
            base = base_rows.get(label(row))
            for name, better in metrics if base else ():
                b = _num(_metric(base, name))
                c = _num(_metric(row, name)) if _ok(row) else None
                if b is None or b <= 0 or (c is None and _ok(row)):
                    continue  # not measured before, or a field this run did not write
                out.append(Change(kind, label(row), name, b, c, better, threshold))
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



def _sorted_xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    points = sorted(points)
    return [p[0] for p in points], [p[1] for p in points]


def _bars(rows: Sequence[dict], category: Callable[[dict], str], series: str, unit: int) -> dict:
    """A bar chart's categories and, per value of the rows' ``series`` field, each category's peak bytes
    in ``unit`` (NaN where a series has no row)."""
    cats = list(dict.fromkeys(category(r) for r in rows))
    values = {name: [math.nan] * len(cats) for name in dict.fromkeys(str(r.get(series, "?")) for r in rows)}
    for r in rows:
        values[str(r.get(series, "?"))][cats.index(category(r))] = r["peak_bytes"] / unit
    return {"categories": cats, "series": values}


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
        lo, lo_ratio, hi, hi_ratio = (noisy_gemm.DECODE_MAX_M, noisy_gemm.DECODE_RATIO, noisy_gemm.LEARNER_MIN_M,
                                      noisy_gemm.LEARNER_RATIO)
        if min(ms) <= lo:
            lines[f"target {lo_ratio:.2f} (M <= {lo})"] = ([min(ms), min(max(ms), lo)], [lo_ratio] * 2)
        if max(ms) >= hi:
            lines[f"target {hi_ratio:.2f} (M >= {hi})"] = ([max(min(ms), hi), max(ms)], [hi_ratio] * 2)
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
            name = str(r.get("mode"))
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
        bars = _bars(learner, lambda r: (f"{r.get('model', '?')} {r.get('tokens', '?')} tok"
                                         f"{' ckpt' if r.get('activation_checkpointing') else ''}"), "mode", GIB)
        specs.append(("learner", "learner_memory.png", "bar_chart",
                      dict(**bars, title="learner peak memory: PSN vs plain vs naive", ylabel="peak GiB")))
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
        bars = _bars(lm, lambda r: f"{r.get('tokens', '?')}x{r.get('vocab', '?')}", "impl", MIB)
        specs.append(("lm_head", "lm_head_memory.png", "bar_chart",
                      dict(**bars, title="lm_head log-prob peak memory (tokens x vocab)", ylabel="peak MiB")))
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
        parts += [bench_table(kind, doc), ""]
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
