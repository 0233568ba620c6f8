"""PNG charts from numpy and zlib alone: line charts (log axes, a right-hand y axis), grouped and
stacked bar charts, with a title, axis labels, numeric ticks and a legend drawn in a built-in
5x7 bitmap font. No matplotlib: ``psnrl train`` and ``psnrl eval --plot`` always have them."""
from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# The classic 5x7 LCD font, ASCII 32..126: five column bytes per glyph (bit 0 = top row), in hex;
# g j p q y have a descender in an eighth row.
_FONT_HEX = (
    "0000000000" "00005f0000" "0007000700" "147f147f14" "242a7f2a12" "2313086462" "3649552250"
    "0005030000" "001c224100" "0041221c00" "082a1c2a08" "08083e0808" "0050300000" "0808080808"
    "0060600000" "2010080402" "3e5149453e" "00427f4000" "4261514946" "2141454b31" "1814127f10"
    "2745454539" "3c4a494930" "0171090503" "3649494936" "064949291e" "0036360000" "0056360000"
    "0008142241" "1414141414" "4122140800" "0201510906" "324979413e" "7e1111117e" "7f49494936"
    "3e41414122" "7f4141221c" "7f49494941" "7f09090101" "3e41415132" "7f0808087f" "00417f4100"
    "2040413f01" "7f08142241" "7f40404040" "7f0204027f" "7f0408107f" "3e4141413e" "7f09090906"
    "3e4151215e" "7f09192946" "4649494931" "01017f0101" "3f4040403f" "1f2040201f" "7f2018207f"
    "6314081463" "0304780403" "6151494543" "007f414100" "0204081020" "0041417f00" "0402010204"
    "4040404040" "0001020400" "2054545478" "7f48444438" "3844444420" "384444487f" "3854545418"
    "087e090102" "18a4a4a47c" "7f08040478" "00447d4000" "4080847d00" "007f102844" "00417f4000"
    "7c04180478" "7c08040478" "3844444438" "fc24242418" "18242424fc" "7c08040408" "4854545420"
    "043f444020" "3c4040207c" "1c2040201c" "3c4030403c" "4428102844" "1ca0a0a07c" "4464544c44"
    "0008364100" "00007f0000" "0041360800" "0804081008"
)
_GLYPHS = {chr(32 + i): np.array([[int(_FONT_HEX[10 * i + 2 * c:10 * i + 2 * c + 2], 16) >> r & 1
                                    for c in range(5)] for r in range(8)], dtype=bool) for i in range(95)}

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BLACK, GRID = (0, 0, 0), (225, 225, 225)
W, H, S, PAD = 960, 540, 2, 14  # canvas, text scale, margin
CW, CH = 6 * S, 8 * S           # advance and height of a character at scale S


def write_png(path: str | Path, pixels: np.ndarray) -> None:
    """An RGB uint8 (height, width, 3) array as a PNG, written atomically (temp file + rename)."""
    h, w, _ = pixels.shape
    raw = np.hstack([np.zeros((h, 1), np.uint8), pixels.astype(np.uint8).reshape(h, w * 3)]).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)


def _text_mask(text: str, scale: int = S) -> np.ndarray:
    m = np.zeros((8, max(6 * len(text) - 1, 0)), dtype=bool)
    for i, ch in enumerate(text):
        m[:, 6 * i:6 * i + 5] = _GLYPHS.get(ch, _GLYPHS["?"])
    return m.repeat(scale, 0).repeat(scale, 1)


def _fit(text: str, width: int, scale: int = S) -> str:
    """The text, its middle elided with '..' if it is wider than width pixels."""
    n = max((width + scale) // (6 * scale), 3)
    return text if len(text) <= n else text[:(n - 2) // 2] + ".." + text[len(text) - (n - 2 - (n - 2) // 2):]


class _Canvas:
    def __init__(self) -> None:
        self.px = np.full((H, W, 3), 255, dtype=np.uint8)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color) -> None:
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        self.px[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = color

    def text(self, text: str, x: float, y: float, ha: str = "left", va: str = "top", scale: int = S,
             rotate: bool = False, color=BLACK) -> None:
        m = _text_mask(text, scale)
        if rotate:  # reads bottom to top
            m = np.rot90(m)
        h, w = m.shape
        x = int(round(x - {"left": 0, "center": w / 2, "right": w}[ha]))
        y = int(round(y - {"top": 0, "center": h / 2, "bottom": h}[va]))
        x, y = max(min(x, W - w), 0), max(min(y, H - h), 0)  # kept inside the canvas
        m = m[:H - y, :W - x]
        self.px[y:y + m.shape[0], x:x + m.shape[1]][m] = color

    def polyline(self, xs: np.ndarray, ys: np.ndarray, color, box) -> None:
        """A 2 px line through the points, clipped to box = (x0, y0, x1, y1)."""
        if len(xs) == 1:
            px, py = np.array(xs), np.array(ys)
        else:
            n = (np.maximum(np.abs(np.diff(xs)), np.abs(np.diff(ys))).astype(int) + 2)
            px = np.concatenate([np.linspace(a, b, k) for a, b, k in zip(xs[:-1], xs[1:], n)])
            py = np.concatenate([np.linspace(a, b, k) for a, b, k in zip(ys[:-1], ys[1:], n)])
        self._stamp(px - 0.5, py - 0.5, (0, 1), color, box)

    def markers(self, xs: np.ndarray, ys: np.ndarray, color, box) -> None:
        self._stamp(xs - 0.5, ys - 0.5, range(-3, 4), color, box)

    def _stamp(self, px, py, offsets, color, box) -> None:
        x0, y0, x1, y1 = box
        px, py = np.floor(px).astype(int), np.floor(py).astype(int)
        for dx in offsets:
            for dy in offsets:
                x, y = px + dx, py + dy
                keep = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
                self.px[y[keep], x[keep]] = color


def _sci(v: float) -> str:
    if v == 0:
        return "0"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def _num(v: float) -> str:
    return f"{v:g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else _sci(v)


class _Axis:
    """Ticks, labels and the value -> [0, 1] map of one axis (linear, or log with powers of 2 or 10)."""

    def __init__(self, values: np.ndarray, log: bool, n: int, pad_lo: bool = True, pad_hi: bool = True,
                 integer: bool = False):
        self.log = log
        lo, hi = float(np.min(values)), float(np.max(values))
        if log:
            a, b = math.log2(lo), math.log2(hi)
            base = 2 if b - a <= 12 else 10
            a, b = math.log(lo, base), math.log(hi, base)
            if b - a < 1e-9:
                a, b = a - 1, b + 1
            a, b = math.floor(a + 1e-9), math.ceil(b - 1e-9)
            step = max(1, math.ceil((b - a) / n))
            self.ticks = [float(base) ** e for e in range(a, a + step * math.ceil((b - a) / step) + 1, step)]
            self.labels = [_num(t) for t in self.ticks]
            a, b = math.log10(self.ticks[0]), math.log10(self.ticks[-1])
        else:
            if hi - lo <= 1e-12 * max(abs(lo), abs(hi)):
                d = abs(lo) * 0.1 or 1.0
                lo, hi = lo - d * pad_lo, hi + d * (pad_hi or not pad_lo)
            raw = (hi - lo) / n
            mag = 10.0 ** math.floor(math.log10(raw))
            step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
            step = max(step, 1.0) if integer else step  # no 1.5th iteration
            ia, ib = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            self.ticks = [i * step for i in range(ia, ib + 1)]
            big = max(abs(self.ticks[0]), abs(self.ticks[-1]))
            decimals = max(0, -math.floor(math.log10(step) + 1e-9))
            self.labels = [_sci(t) if big >= 1e5 or big < 1e-3 else f"{t:.{decimals}f}" for t in self.ticks]
            a, b = self.ticks[0], self.ticks[-1]
        margin = 0.03 * (b - a)
        self.lo, self.hi = a - margin * pad_lo, b + margin * pad_hi

    def frac(self, v) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        if self.log:
            v = np.log10(v)
        return (v - self.lo) / (self.hi - self.lo)

    def width(self) -> int:
        return max(len(label) for label in self.labels) * CW


class _Figure:
    """Title, legend and margins around a plot box; the caller draws the data and the x axis."""

    def __init__(self, title: str, xlabel: str, ylabel: str, legend: list[tuple[str, tuple, str]],
                 left, right=None, right_label: str = ""):
        self.c, self.xlabel, self.legend = _Canvas(), xlabel, legend
        top = PAD
        if title:
            scale = 3 if len(title) * 18 <= W - 2 * PAD else S
            self.c.text(_fit(title, W - 2 * PAD, scale), W / 2, top, ha="center", scale=scale)
            top += 8 * scale + 10
        self.rows = self._rows()
        bottom = H - PAD - len(self.rows) * (CH + 10) - (CH + 10 if xlabel else 0) - (CH + 16)
        self.y0, self.y1 = top + CH // 2, bottom
        n = max(3, min(8, (self.y1 - self.y0) // 60))
        self.left, self.right = left(n), right(n) if right else None
        self.x0 = PAD + (CH + 12 if ylabel else 0) + self.left.width() + 12
        self.x1 = W - PAD - (self.right.width() + 12 + (CH + 12 if right_label else 0) if self.right else 2 * CW)
        if ylabel:
            self.c.text(_fit(ylabel, self.y1 - self.y0), PAD, (self.y0 + self.y1) / 2, va="center", rotate=True)
        if self.right and right_label:
            self.c.text(_fit(right_label, self.y1 - self.y0), W - PAD, (self.y0 + self.y1) / 2, ha="right",
                        va="center", rotate=True)
        for t in self.left.ticks:
            self.c.rect(self.x0, self.y(t), self.x1, self.y(t) + 1, GRID)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1

    def y(self, v, axis=None) -> np.ndarray:
        return self.y1 - (axis or self.left).frac(v) * (self.y1 - self.y0)

    def _rows(self) -> list[list]:
        rows, row, used = [], [], 0
        for label, color, kind in self.legend:
            label = _fit(label, W - 2 * PAD - 40)
            w = 34 + len(label) * CW + 24
            if row and used + w > W - 2 * PAD:
                rows, row, used = rows + [row], [], 0
            row.append((label, color, kind, w))
            used += w
        return rows + [row] if row else rows

    def finish(self, path: str | Path, xticks: list[tuple[float, str]], grid_x: bool = True) -> None:
        c, (x0, y0, x1, y1) = self.c, self.box
        for px, label in xticks:
            if grid_x and x0 < px < x1 - 1:
                c.rect(px, y0, px + 1, y1, GRID)
            c.rect(px, y1, px + 1, y1 + 6, BLACK)
            c.text(label, px, y1 + 9, ha="center")
        for axis, edge, sign in ((self.left, x0, -1), (self.right, x1, 1)):
            for t, label in zip(axis.ticks, axis.labels) if axis else ():
                py = self.y(t, axis)
                c.rect(edge, py, edge + 6 * sign, py + 1, BLACK)
                c.text(label, edge + 9 * sign, py, ha="right" if sign < 0 else "left", va="center")
        for xa, ya, xb, yb in ((x0, y0, x1 + 1, y0 + 1), (x0, y1, x1 + 1, y1 + 1),
                               (x0, y0, x0 + 1, y1 + 1), (x1, y0, x1 + 1, y1 + 1)):
            c.rect(xa, ya, xb, yb, BLACK)
        y = y1 + CH + 18
        if self.xlabel:
            c.text(_fit(self.xlabel, x1 - x0), (x0 + x1) / 2, y, ha="center")
            y += CH + 10
        for row in self.rows:
            x = (W - sum(e[3] for e in row) + 24) / 2
            for label, color, kind, w in row:
                if kind == "line":
                    c.rect(x, y + CH / 2 - 1, x + 28, y + CH / 2 + 1, color)
                else:
                    c.rect(x + 6, y, x + 6 + CH, y + CH, color)
                c.text(label, x + 34, y)
                x += w
            y += CH + 10
        write_png(path, c.px)


def _series(series: Mapping[str, tuple], logx: bool, logy: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for name, (xs, ys) in series.items():
        x, y = np.asarray(xs, dtype=float).ravel(), np.asarray(ys, dtype=float).ravel()
        if len(x) != len(y):
            raise ValueError(f"series {name!r}: {len(x)} x values but {len(y)} y values")
        with np.errstate(invalid="ignore"):
            keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) | (not logx)) & ((y > 0) | (not logy))
        out.append((str(name), x[keep], y[keep]))
    return out


def line_chart(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False,
               secondary: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
               secondary_label: str = "") -> None:
    """One line per series {name: (xs, ys)}; ``secondary`` series use a right-hand y axis.

    NaN points (and non-positive ones on a log axis) are skipped, the rest joined in order;
    series of at most 40 points also get a marker at each point.
    """
    prim, sec = _series(series, logx, logy), _series(secondary or {}, logx, False)
    if not any(len(x) for _, x, _ in prim):
        raise ValueError("line_chart: no data to plot (every series is empty, NaN, or <= 0 on a log axis)")
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(prim) + len(sec))]
    legend = [(name, col, "line") for (name, _, _), col in zip(prim, colors)]
    legend += [(f"{name} (right)", col, "line") for (name, _, _), col in zip(sec, colors[len(prim):])]
    ys = np.concatenate([y for _, _, y in prim])
    ys2 = np.concatenate([y for _, _, y in sec]) if sec else np.zeros(0)
    fig = _Figure(title, xlabel, ylabel, legend, lambda n: _Axis(ys, logy, n),
                  (lambda n: _Axis(ys2, False, n)) if len(ys2) else None, secondary_label)
    xs = np.concatenate([x for _, x, _ in prim + sec])
    for n in (10, 8, 6, 5, 4, 3, 2, 1):
        xaxis = _Axis(xs, logx, n, integer=bool(np.all(xs == np.round(xs))))
        if (xaxis.width() + CW) * len(xaxis.ticks) <= fig.x1 - fig.x0:
            break
    px = lambda v: fig.x0 + xaxis.frac(v) * (fig.x1 - fig.x0)  # noqa: E731
    for (name, x, y), color, axis in zip(prim + sec, colors, [fig.left] * len(prim) + [fig.right] * len(sec)):
        if len(x):
            fig.c.polyline(px(x), fig.y(y, axis), color, fig.box)
            if len(x) <= 40:
                fig.c.markers(px(x), fig.y(y, axis), color, fig.box)
    fig.finish(path, [(px(t), label) for t, label in zip(xaxis.ticks, xaxis.labels)])


def _bars(path, categories: Sequence[str], series: Mapping[str, Sequence[float]], stacked: bool,
          title: str, xlabel: str, ylabel: str) -> None:
    what = "stacked_bar_chart" if stacked else "bar_chart"
    categories = [str(c) for c in categories]
    if not categories or not series:
        raise ValueError(f"{what}: needs at least one category and one series")
    vals = {}
    for name, v in series.items():
        vals[str(name)] = np.asarray(v, dtype=float).ravel()
        if len(vals[str(name)]) != len(categories):
            raise ValueError(f"{what}: series {name!r} has {len(vals[str(name)])} values for "
                             f"{len(categories)} categories")
    table = np.nan_to_num(np.stack(list(vals.values())), nan=0.0, posinf=0.0, neginf=0.0)
    if stacked:
        ends = np.concatenate([np.clip(table, 0, None).sum(0), np.clip(table, None, 0).sum(0)])
    else:
        ends = np.concatenate([v[np.isfinite(v)] for v in vals.values()])
    if not len(ends) or not np.isfinite(np.stack(list(vals.values()))).any():
        raise ValueError(f"{what}: no finite values to plot")
    ends = np.append(ends, 0.0)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(vals))]
    fig = _Figure(title, xlabel, ylabel, [(n, c, "box") for n, c in zip(vals, colors)],
                  lambda n: _Axis(ends, False, n, pad_lo=ends.min() < 0, pad_hi=ends.max() > 0))
    group = (fig.x1 - fig.x0) / len(categories)
    width = group * 0.6 if stacked else group * 0.8 / len(vals)
    base_pos, base_neg = np.zeros(len(categories)), np.zeros(len(categories))
    for k, ((name, v), color) in enumerate(zip(vals.items(), colors)):
        for i, value in enumerate(v):
            if not np.isfinite(value):
                continue
            left = fig.x0 + group * i + (group * 0.2 if stacked else group * 0.1 + k * width)
            if stacked:
                base = base_pos if value >= 0 else base_neg
                lo, hi = base[i], base[i] + value
                base[i] = hi
            else:
                lo, hi = 0.0, value
            fig.c.rect(left + 1, fig.y(hi), left + max(width - 1, 2), fig.y(lo), color)
    fig.c.rect(fig.x0, fig.y(0.0), fig.x1, fig.y(0.0) + 1, BLACK)
    ticks = []
    for i, cat in enumerate(categories):
        ticks.append((fig.x0 + group * (i + 0.5), _fit(cat, int(group) - 4)))
    fig.finish(path, ticks, grid_x=False)


def bar_chart(path: str | Path, categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
              title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """Grouped bars: one group per category, one bar per series {name: values per category}."""
    _bars(path, categories, series, False, title, xlabel, ylabel)


def stacked_bar_chart(path: str | Path, categories: Sequence[str], parts: Mapping[str, Sequence[float]], *,
                      title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """One bar per category, the parts {name: values per category} stacked bottom up in order
    (e.g. step time split by phase); negative parts stack downward from zero."""
    _bars(path, categories, parts, True, title, xlabel, ylabel)
