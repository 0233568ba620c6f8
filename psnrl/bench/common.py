"""The benches' shared harness: a run's result files, markdown tables, ratios, timing, errors,
argument parsing.

Every bench writes ``psnrl/bench/results/<name>-<device slug>.json`` and ``.md`` through a
``BenchRun``, which rewrites both after every row (an interrupted run keeps what it measured).
The JSON is written with ``allow_nan=False`` so a broken measurement cannot produce a file other
tools fail to parse. Ratios between rows (mode over baseline) are computed once, by
``fill_ratios``, stored in the rows, and read back by ``report.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The benches' --dtype names: torch's dtypes, and the names an engine or a config takes.
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def device_slug(name: str) -> str:
    """A filename-safe slug of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def results_document(meta: dict, rows: Sequence[dict], meta_keys: Sequence[str]) -> dict:
    """``{meta_keys in order, other meta, "rows": [...]}``; ValueError if a required key is missing."""
    missing = [key for key in meta_keys if key not in meta]
    if missing:
        raise ValueError(f"results metadata lacks {missing}")
    doc = {key: meta[key] for key in meta_keys}
    doc.update({key: value for key, value in meta.items() if key not in meta_keys})
    doc["rows"] = [dict(row) for row in rows]
    return doc


def write_result_files(out_dir: str | os.PathLike, name: str, device: str, doc: dict,
                       markdown: str) -> tuple[Path, Path]:
    """Write ``<name>-<device slug>.json`` and ``.md`` into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_slug(device)}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def split_list(values: Sequence[str]) -> list[str]:
    """Command-line lists given with spaces, commas or both: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_ints(values: Sequence[str], option: str) -> list[int]:
    """A list option's values (spaces, commas or both) as integers >= 1, in order, without repeats."""
    out = []
    for part in split_list(values):
        try:
            out.append(positive_int(part))
        except (ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"{option}: expected integers >= 1, got {part!r}") from None
    return list(dict.fromkeys(out))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def fmt_cell(value, spec: str) -> str:
    """A markdown table cell: ``value`` formatted with ``spec``, or an em dash when it is missing."""
    return "—" if value is None else format(value, spec)


def device_and_sync(device: str) -> tuple[str, Callable[[], None]]:
    """The name of ``device`` ("cuda" or "cpu") and a function that waits for its queued work."""
    if device == "cuda":
        return torch.cuda.get_device_name(), torch.cuda.synchronize
    return "cpu", lambda: None


def free_memory(device: str) -> None:
    """Drop unreferenced objects and, on CUDA, return cached blocks (between measurements)."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def error_text(error: BaseException, limit: int = 500) -> str:
    """``"OutOfMemoryError: ..."``: how an exception is stored in a row."""
    return f"{type(error).__name__}: {error}".strip()[:limit]


def error_row(row_keys: Sequence[str], error: BaseException, **fields) -> dict:
    """A row that failed: every key None but the ``fields`` that name the case, and ``error``."""
    row = dict.fromkeys(row_keys)
    row.update(fields, error=error_text(error))
    return row


def fill_ratios(rows: Sequence[dict], case: Callable[[dict], tuple], is_base: Callable[[dict], bool],
                ratios: Sequence[tuple[str, str, int]]) -> list[dict]:
    """Copies of ``rows`` with each ``(out, field, digits)`` of ``ratios`` set to the row's field
    over that of the base row of the same case (rounded), or None for failed rows and missing
    values."""
    base = {case(r): r for r in rows if is_base(r) and not r.get("error")}
    out = []
    for row in rows:
        row = dict(row)
        b = None if row.get("error") else base.get(case(row))
        for key, field, digits in ratios:
            row[key] = round_or_none(ratio(row.get(field), b.get(field)), digits) if b else None
        out.append(row)
    return out


@dataclass(frozen=True)
class Column:
    """One column of a markdown table: the row's ``key`` (or a function of the row), its title,
    and a ``str.format`` pattern ("mib" / "gib": bytes in MiB / GiB); missing values print as —."""

    key: str | Callable[[dict], object]
    title: str
    fmt: str = "{}"
    left: bool = False

    def cell(self, row: dict) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        if value is None:
            return "—"
        if self.fmt in ("mib", "gib"):
            return f"{value / 2 ** (20 if self.fmt == 'mib' else 30):,.{1 if self.fmt == 'mib' else 2}f}"
        return self.fmt.format(value)


def errors_section(rows: Sequence[dict], label: Callable[[dict], str]) -> list[str]:
    """The markdown lines of a results file's "Errors" section: each failed row as
    ``- <label>: <error>``; no lines when every row ran."""
    failed = [f"- {label(r)}: {r['error']}" for r in rows if r.get("error")]
    return ["## Errors", "", *failed, ""] if failed else []


def markdown_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(c.title for c in columns) + " |",
             "|" + "|".join("---" if c.left else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_document(name: str, meta: dict, rows: Sequence[dict], label: Callable[[dict], str], *,
                    setting: str = "", paragraphs: Sequence[str] = (), body: Sequence[str] = ()) -> str:
    """A results file's markdown: ``# <name> on <device>``, the library versions and ``setting``,
    the non-empty ``paragraphs``, the ``body`` lines (the tables), then the Errors section."""
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "transformers") if meta.get(k))
    parts = [f"# {name} on {meta['device']}", "", versions + (f"; {setting}" if setting else "") + ".", ""]
    parts += [line for p in paragraphs if p for line in (p, "")]
    return "\n".join([*parts, *body, *errors_section(rows, label)])


@dataclass(frozen=True)
class Bound:
    """A target: ``field`` of every row that ``applies`` accepts stays at most ``limit`` (at least,
    with ``at_least``); ``limit`` is a number or the name of a row field (the weight's bytes, say).
    ``where`` names a row in the lists of misses."""

    title: str
    field: str
    limit: float | str
    applies: Callable[[dict], bool] = lambda r: not r.get("error")
    where: Callable[[dict], str] = str
    at_least: bool = False

    def check(self, row: dict) -> tuple[object, object, bool]:
        """(value, limit, met) of one row."""
        value = row.get(self.field)
        limit = row.get(self.limit) if isinstance(self.limit, str) else self.limit
        met = value is not None and limit is not None and (value >= limit if self.at_least else value <= limit)
        return value, limit, met


def run_meta(device: str, **fields) -> dict:
    """The metadata every result file starts with: device, torch, triton, transformers."""
    import transformers
    import triton

    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, **fields}


@dataclass(frozen=True)
class BenchFiles:
    """What a bench's result files hold: ``<name>-<device>.json`` (``meta_keys`` first, then the
    other metadata, then the rows) and the markdown ``render(meta, rows)`` makes; ``finish(rows)``
    completes the rows before they are written (ratios between rows)."""

    name: str
    meta_keys: tuple[str, ...]
    render: Callable[[dict, list[dict]], str]
    finish: Callable[[Sequence[dict]], list[dict]] = list

    def write(self, out_dir: str | os.PathLike, meta: dict, rows: Sequence[dict]) -> tuple[Path, Path]:
        """Write both files into ``out_dir`` atomically; return their paths."""
        rows = self.finish(rows)
        doc = results_document(meta, rows, self.meta_keys)
        return write_result_files(out_dir, self.name, meta["device"], doc, self.render(meta, rows))

    def previous_rows(self, out_dir: str | os.PathLike, device: str, keep: Callable[[dict], bool]) -> list[dict]:
        """The rows of this device's results file in ``out_dir`` that ``keep`` accepts (``--merge``:
        a long run split into several commands keeps what the others measured)."""
        path = Path(out_dir) / f"{self.name}-{device_slug(device)}.json"
        if not path.is_file():
            return []
        return [row for row in json.loads(path.read_text()).get("rows", []) if keep(row)]


class BenchRun:
    """The rows of one bench run, its files rewritten after every ``record`` so that an
    interrupted run keeps what it measured. A measurement that is not a row (the learner's
    mismatch, say) goes into ``meta``, which the bench may update between writes."""

    def __init__(self, files: BenchFiles, meta: dict, out_dir: str | os.PathLike, rows: Sequence[dict] = (),
                 sync: Callable[[], None] = lambda: None):
        self.files, self.meta, self.out_dir, self.sync = files, meta, out_dir, sync
        self.rows: list[dict] = list(rows)

    def log(self, message: str) -> None:
        print(f"[{self.files.name}] {message}", file=sys.stderr, flush=True)

    def record(self, row: dict, label: str, detail: str | None = None) -> None:
        """Add a row, log ``label: error`` (or ``label: detail``), and rewrite the files."""
        self.rows.append(row)
        if row.get("error") or detail:
            self.log(f"{label}: {row.get('error') or detail}")
        self.write()

    def attempt(self, measure: Callable[[], dict], failed: Callable[[BaseException], dict],
                label: str | Callable[[dict], str], detail: Callable[[dict], str] | None = None) -> dict:
        """Record the row ``measure`` returns, or ``failed(error)`` when it raises (a failed case is a
        row: OOM, a kernel failure; the others still run); ``detail`` of a good row is logged."""
        try:
            row = measure()
        except Exception as exc:
            row = failed(exc)
        self.record(row, label(row) if callable(label) else label,
                    detail(row) if detail and not row.get("error") else None)
        return row

    def write(self) -> tuple[Path, Path]:
        return self.files.write(self.out_dir, self.meta, self.rows)

    def close(self, summary: str | None = None) -> int:
        """Write the files a last time, print ``summary`` (default: the markdown) and where they
        went; 1 if a row failed, else 0."""
        json_path, md_path = self.write()
        print(summary if summary is not None else md_path.read_text())
        print(f"wrote {json_path}\nwrote {md_path}")
        return 1 if any(r.get("error") for r in self.rows) else 0


def start_run(files: BenchFiles, args: argparse.Namespace, no_cuda: str, device: str | None = None,
              previous: Callable[[str], list[dict]] | None = None, **meta) -> BenchRun | None:
    """The start of a bench's ``main`` on ``device`` (default ``args.device``): None, after printing
    ``no_cuda``, when that is CUDA and there is none; else its ``BenchRun``, with the device's
    synchronize as ``sync``, metadata ``run_meta(<device name>, **meta)`` (the bench may add to it
    before the first row) and, with ``--merge``, the rows ``previous(<device name>)`` gives."""
    device = device or args.device
    if cuda_missing(device, no_cuda):
        return None
    name, sync = device_and_sync(device)
    rows = previous(name) if previous and getattr(args, "merge", False) else []
    return BenchRun(files, run_meta(name, **meta), args.out_dir, rows, sync)


def cuda_missing(device: str, message: str) -> bool:
    """True (after printing ``message``) when a bench asked for CUDA and there is none."""
    if device == "cuda" and not torch.cuda.is_available():
        print(message, file=sys.stderr)
        return True
    return False


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None,
                  check: Callable[[argparse.Namespace], None]) -> argparse.Namespace:
    """Parse ``argv`` and run ``check`` on the result; its ValueError is the parser's usage error."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    return args


def bench_cli(command: str, description: str, options: Callable[[argparse.ArgumentParser], None],
              check: Callable[[argparse.Namespace], None] = lambda args: None, merge: bool = False
              ) -> tuple[Callable[[], argparse.ArgumentParser], Callable[..., argparse.Namespace]]:
    """``psnrl bench <command>``'s ``build_parser()`` and ``parse_args(argv)``: ``options`` adds the
    bench's options, then come ``--out-dir`` (and ``--merge``); ``parse_args`` runs ``check`` on the
    result (``parse_checked``)."""
    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"psnrl bench {command}", description=description)
        options(parser)
        add_out_dir(parser, merge)
        return parser

    def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
        return parse_checked(build_parser(), argv, check)
    return build_parser, parse_args


def pick(values: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """The ``allowed`` names among ``values`` (spaces, commas or both), in ``allowed``'s order;
    ValueError for an unknown one."""
    given = split_list(values)
    for value in given:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return [a for a in allowed if a in given]


def check_sigma(sigma: float) -> None:
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"--sigma must be finite and > 0, got {sigma}")


def add_modes(parser: argparse.ArgumentParser, modes: Sequence[str]) -> None:
    parser.add_argument("--modes", nargs="+", default=list(modes), metavar="MODE",
                        help=f"what to run: {', '.join(modes)} (default all)")


def add_noise(parser: argparse.ArgumentParser, noise_seed: int | None = None, sigma: float = 0.004) -> None:
    """``--sigma``, ``--targets`` (and ``--noise-seed`` when it has a default)."""
    parser.add_argument("--sigma", type=float, default=sigma, help="noise std (default %(default)s)")
    parser.add_argument("--targets", default="mlp", help="noise targets: mlp, attn, lm_head or all (default mlp)")
    if noise_seed is not None:
        parser.add_argument("--noise-seed", type=int, default=noise_seed)


def noise_text(args: argparse.Namespace) -> str:
    return f"NoiseSpec(seed={args.noise_seed}, sigma={args.sigma}, targets={args.targets!r})"


def random_checkpoints(run: "BenchRun", args: argparse.Namespace, models: Sequence[str], prefix: str,
                       failed: Callable[[str, BaseException], None],
                       make: Callable[..., Path] | None = None) -> Iterator[tuple[str, Path]]:
    """(model, path) of a random ``args.dtype`` checkpoint of each model, kept in ``--ckpt-dir`` or
    deleted after its turn; a model whose checkpoint cannot be written goes to ``failed``."""
    from psnrl.bench import model_configs

    make = make or model_configs.cached_random_checkpoint
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for model in models:
            run.log(f"{model}: writing random {args.dtype} weights")
            try:
                path = make(model, args.dtype, args.seed, args.ckpt_dir, args.device, Path(tmp))
            except Exception as exc:
                failed(model, exc)
                continue
            yield model, path
            if not args.ckpt_dir:
                shutil.rmtree(path, ignore_errors=True)


def add_out_dir(parser: argparse.ArgumentParser, merge: bool = False) -> None:
    """``--out-dir`` (and ``--merge``, for benches whose runs may be split into several commands)."""
    parser.add_argument("--out-dir", default=str(RESULTS_DIR),
                        help="where the results go (default: psnrl/bench/results of this checkout)")
    if merge:
        parser.add_argument("--merge", action="store_true",
                            help="keep the rows of an existing results file of this device that this run "
                                 "does not measure (to split a long run into several commands)")


def add_model_runs(parser: argparse.ArgumentParser, default_models: Sequence[str], note: str = "") -> None:
    """The options of a bench that runs random-weight checkpoints: ``--models``, ``--device``
    (cpu: a smoke run) and ``--ckpt-dir``."""
    from psnrl.bench import model_configs

    parser.add_argument("--models", nargs="+", default=list(default_models), metavar="MODEL",
                        help=f"models (name or size; commas or spaces): {', '.join(model_configs.CONFIGS)} "
                             f"(default {' '.join(default_models)}{note})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run without a GPU (default cuda)")
    parser.add_argument("--ckpt-dir", default=None,
                        help="keep the random checkpoints here and reuse them (default: a temp dir)")



def gpu_timing_method(warmup: int, iters: int, flush_l2: bool, spin: bool = True) -> str:
    queued = ("each call queued behind a GPU spin kernel (torch.cuda._sleep) so that host launch "
              "overhead is excluded and only GPU time is measured" if spin else
              "host launch overhead included (torch.cuda._sleep unavailable)")
    l2 = ("L2 flushed (256 MiB buffer zeroed) before every call" if flush_l2 else
          "L2 not flushed between calls, so weights that fit in L2 (the smaller shapes) may be "
          "read from it")
    return (f"CUDA events around each call, {queued}; median of {iters} timed calls after "
            f"{warmup} warmup calls; {l2}; all columns of a row measured in the same run")


class EventTimer:
    """Median GPU time of a callable, in microseconds, from CUDA events around each call.

    Before each timed call a spin kernel keeps the GPU busy while the host enqueues the call and
    its events, so the events bracket GPU work only (no host launch gaps).
    """

    def __init__(self, warmup: int, iters: int, flush_l2: bool = False):
        self.warmup = warmup
        self.iters = iters
        self.spin = hasattr(torch.cuda, "_sleep")
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush_l2 else None
        self.cycles_per_us = self._calibrate() if self.spin else 0.0

    @staticmethod
    def _calibrate() -> float:
        """GPU clock cycles per microsecond as torch.cuda._sleep counts them."""
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        cycles = 10_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / max(start.elapsed_time(end) * 1e3, 1e-3)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        # Host time to enqueue one call: the spin must outlast it.
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host_us = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
        spin_cycles = int(max(3.0 * host_us + 20.0, 50.0) * self.cycles_per_us)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for i in range(self.iters):
            if self.flush is not None:
                self.flush.zero_()
            if self.spin:
                torch.cuda._sleep(spin_cycles)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def cuda_peak_bytes(fn: Callable[[], object], beyond_output: bool = False) -> int:
    """Peak CUDA memory allocated during one call, above what was allocated before it: its output
    included, or (``beyond_output``) less what the call still holds when it returns."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base if beyond_output else 0  # the output, as the allocator rounds it
    del out
    return int(torch.cuda.max_memory_allocated() - base - held)


def cuda_extra_bytes(fn: Callable[[], object]) -> int:
    """Bytes a call allocates beyond what it still holds when it returns (its output)."""
    return cuda_peak_bytes(fn, beyond_output=True)
