"""PNG charts on matplotlib: line charts (log axes, a right-hand y axis), grouped and stacked bars.

matplotlib is an optional extra (``pip install 'psnrl[plots]'``): without it every chart raises
``ChartsUnavailable`` with that hint, and the callers (the training run's reward/sigma plot,
``psnrl eval --plot``, the bench summary) say what is off and carry on or stop with one line.
Charts are drawn on a standalone ``Figure`` (no pyplot state) and written atomically.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

MISSING = "matplotlib is not installed (pip install 'psnrl[plots]')"


class ChartsUnavailable(ImportError):
    """matplotlib, which draws the charts, is not installed."""


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ChartsUnavailable(MISSING) from None
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: str | Path) -> None:
    """Write the PNG next to ``path`` first, then rename it over: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _points(name: str, xs: Sequence[float], ys: Sequence[float], logx: bool, logy: bool
            ) -> tuple[list[float], list[float]]:
    """The finite points of a series (positive ones on a log axis)."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if len(xs) != len(ys):
        raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
    keep = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)
            and (x > 0 or not logx) and (y > 0 or not logy)]
    return [x for x, _ in keep], [y for _, y in keep]


def line_chart(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False,
               secondary: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
               secondary_label: str = "") -> None:
    """One line per series {name: (xs, ys)}; ``secondary`` series use a right-hand y axis.

    NaN points (and non-positive ones on a log axis) are skipped, the rest joined in order;
    series of at most 40 points also get a marker at each point.
    """
    prim = {str(n): _points(str(n), xs, ys, logx, logy) for n, (xs, ys) in series.items()}
    sec = {str(n): _points(str(n), xs, ys, logx, False) for n, (xs, ys) in (secondary or {}).items()}
    if not any(xs for xs, _ in prim.values()):
        raise ValueError("line_chart: no data to plot (every series is empty, NaN, or <= 0 on a log axis)")
    fig, ax = _figure(title, xlabel, ylabel)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    lines = []
    for i, (name, (xs, ys)) in enumerate(prim.items()):
        lines += ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, label=name, color=f"C{i % 10}")
    if sec:
        right = ax.twinx()
        right.set_ylabel(secondary_label)
        for i, (name, (xs, ys)) in enumerate(sec.items(), start=len(prim)):  # colors go on from the left's
            lines += right.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, linestyle="--",
                                label=f"{name} (right)", color=f"C{i % 10}")
    ax.legend(handles=lines, loc="best", fontsize="small")
    _save(fig, path)


def _bars(path: str | Path, categories: Sequence[str], series: Mapping[str, Sequence[float]], stacked: bool,
          title: str, xlabel: str, ylabel: str) -> None:
    what = "stacked_bar_chart" if stacked else "bar_chart"
    categories = [str(c) for c in categories]
    if not categories or not series:
        raise ValueError(f"{what}: needs at least one category and one series")
    values: dict[str, list[float]] = {}
    for name, v in series.items():
        values[str(name)] = [float(x) for x in v]
        if len(values[str(name)]) != len(categories):
            raise ValueError(f"{what}: series {name!r} has {len(values[str(name)])} values for "
                             f"{len(categories)} categories")
    if not any(math.isfinite(x) for v in values.values() for x in v):
        raise ValueError(f"{what}: no finite values to plot")
    fig, ax = _figure(title, xlabel, ylabel)
    where = range(len(categories))
    width = 0.6 if stacked else 0.8 / len(values)
    up, down = [0.0] * len(categories), [0.0] * len(categories)
    for k, (name, v) in enumerate(values.items()):
        v = [x if math.isfinite(x) else 0.0 for x in v]
        if stacked:  # negative parts stack downward from zero
            base = [d if x < 0 else u for x, u, d in zip(v, up, down)]
            ax.bar(where, v, width, bottom=base, label=name)
            up = [u + max(x, 0.0) for x, u in zip(v, up)]
            down = [d + min(x, 0.0) for x, d in zip(v, down)]
        else:
            ax.bar([i - 0.4 + width * (k + 0.5) for i in where], v, width, label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(list(where), categories, rotation=20 if len(categories) > 4 else 0, ha="right"
                  if len(categories) > 4 else "center", fontsize="small")
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def bar_chart(path: str | Path, categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
              title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """Grouped bars: one group per category, one bar per series {name: values per category}."""
    _bars(path, categories, series, False, title, xlabel, ylabel)


def stacked_bar_chart(path: str | Path, categories: Sequence[str], parts: Mapping[str, Sequence[float]], *,
                      title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """One bar per category, the parts {name: values per category} stacked bottom up in order
    (e.g. step time split by phase); negative parts stack downward from zero."""
    _bars(path, categories, parts, True, title, xlabel, ylabel)
