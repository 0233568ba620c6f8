"""Digest Nsight Compute reports into a small JSON per kernel launch (fields: psnrl/bench/README.md).

    python -m psnrl.bench.ncu_digest psnrl/bench/results/ncu/*.ncu-rep      # runs ncu --import on each
    python -m psnrl.bench.ncu_digest --csv details.csv                  # an already exported CSV
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from psnrl.bench.common import fmt_cell

SOL = "GPU Speed Of Light Throughput"
MWA = "Memory Workload Analysis"
OCC = "Occupancy"

# digest key -> (metric name, preferred section, kind); kind "pct" takes a "%" value only.
SUMMARY_METRICS = {
    "dram_throughput_pct": ("DRAM Throughput", SOL, "pct"),
    "memory_throughput_pct": ("Memory Throughput", SOL, "pct"),
    "sm_throughput_pct": ("Compute (SM) Throughput", SOL, "pct"),
    "l1_throughput_pct": ("L1/TEX Cache Throughput", SOL, "pct"),
    "l2_throughput_pct": ("L2 Cache Throughput", SOL, "pct"),
    "achieved_occupancy_pct": ("Achieved Occupancy", OCC, "pct"),
    "theoretical_occupancy_pct": ("Theoretical Occupancy", OCC, "pct"),
    "duration_us": ("Duration", SOL, "time"),
    "dram_gbps": ("Memory Throughput", MWA, "rate"),
    "l2_hit_rate_pct": ("L2 Hit Rate", MWA, "pct"),
    "mem_busy_pct": ("Mem Busy", MWA, "pct"),
    "max_bandwidth_pct": ("Max Bandwidth", MWA, "pct"),
}
HEADLINE = ("dram_throughput_pct", "sm_throughput_pct", "achieved_occupancy_pct", "duration_us")

_TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
               "s": 1e6, "second": 1e6}
_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "t": 1e12, "T": 1e12}
_RATE = re.compile(r"^(?P<prefix>[kKmMgGtT]?)(?:byte|B)/(?:second|s)$")


class DigestError(RuntimeError):
    pass



def csv_rows(text: str) -> list[dict[str, str]]:
    """The rows of ncu's CSV, skipping anything before its header (==PROF== lines, program output)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith('"ID"')), None)
    if start is None:
        raise DigestError('no ncu CSV header ("ID",...) in the input; was it made with --csv --page details?')
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    missing = {"ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"} \
        - set(reader.fieldnames or ())
    if missing:
        raise DigestError(f"ncu CSV lacks the columns {sorted(missing)} (has {reader.fieldnames})")
    return [row for row in reader if row.get("ID") not in (None, "", "ID")]


def parse_value(text: str | None) -> float | None:
    """A metric value as a float: thousands separators dropped; "n/a", "" or text -> None."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "")
    if not cleaned:
        return None
    try:
        return float(cleaned)
    except ValueError:
        return None


def to_us(value: float | None, unit: str) -> float | None:
    scale = _TIME_UNITS.get(unit.strip())
    return None if value is None or scale is None else value * scale


def to_gbps(value: float | None, unit: str) -> float | None:
    match = _RATE.match(unit.strip())
    if value is None or not match:
        return None
    return value * _PREFIX[match.group("prefix")] / 1e9


def _pick(metrics: dict[tuple[str, str], tuple[str, str]], name: str, section: str, kind: str):
    """The value of ``name``, from ``section`` when it has it, else from any section with a fitting unit."""
    candidates = [(sec, unit, raw) for (sec, met), (unit, raw) in metrics.items() if met == name]
    candidates.sort(key=lambda c: c[0] != section)
    for sec, unit, raw in candidates:
        value = parse_value(raw)
        if kind == "pct" and unit.strip() == "%":
            return value
        if kind == "time" and unit.strip() in _TIME_UNITS:
            return to_us(value, unit)
        if kind == "rate" and _RATE.match(unit.strip()):
            return to_gbps(value, unit)
    return None


def digest_rows(rows: Iterable[dict[str, str]]) -> list[dict]:
    """One digest dict per profiled launch (ncu's "ID"), in ID order."""
    launches: dict[str, dict] = {}
    for row in rows:
        launch = launches.get(row["ID"])
        if launch is None:
            launch = launches[row["ID"]] = {
                "id": int(row["ID"]) if row["ID"].strip().isdigit() else row["ID"],
                "kernel": row.get("Kernel Name", ""),
                "block_size": row.get("Block Size"), "grid_size": row.get("Grid Size"),
                "device": row.get("Device"), "cc": row.get("CC"),
                "_metrics": {}, "rules": [],
            }
        section, metric = row.get("Section Name", ""), row.get("Metric Name", "")
        if metric:
            launch["_metrics"][(section, metric)] = (row.get("Metric Unit", ""), row.get("Metric Value", ""))
        rule, description = row.get("Rule Name") or "", row.get("Rule Description") or ""
        if rule and description:
            finding = {"rule": rule, "type": row.get("Rule Type") or "", "description": description}
            speedup = parse_value(row.get("Estimated Speedup"))
            if speedup is not None:
                finding["estimated_speedup_pct"] = speedup
            launch["rules"].append(finding)
    out = []
    for launch in launches.values():
        metrics = launch.pop("_metrics")
        entry = {key: value for key, value in launch.items() if value is not None}
        for key, (name, section, kind) in SUMMARY_METRICS.items():
            entry[key] = _pick(metrics, name, section, kind)
        entry["metrics"] = {}
        for (sec, met), (unit, raw) in metrics.items():
            value = parse_value(raw)
            entry["metrics"][f"{sec} / {met}"] = {"unit": unit, "value": raw if value is None else value}
        out.append(entry)
    return sorted(out, key=lambda e: (isinstance(e["id"], str), e["id"]))


def digest_csv(text: str) -> list[dict]:
    return digest_rows(csv_rows(text))



def export_csv(report: Path, ncu: str = "ncu") -> str:
    """``ncu --import report --csv --page details --print-units base`` as text."""
    cmd = [ncu, "--import", str(report), "--csv", "--page", "details", "--print-units", "base"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DigestError(f"{ncu} not found: Nsight Compute's command line (ncu) must be on PATH") from None
    if done.returncode != 0:
        raise DigestError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def digest_report(report: Path, kernels: list[dict]) -> dict:
    return {"report": report.name, "case": report.stem, "kernels": kernels}


def render_markdown(digests: list[dict]) -> str:
    lines = ["# Nsight Compute digest", "",
             "DRAM / SM = % of peak (GPU Speed Of Light); occupancy = achieved % of warp slots; "
             "duration under ncu's locked base clocks and flushed caches.", "",
             "| case | kernel | grid | block | DRAM % | SM % | achieved occ. % | duration µs |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for d in digests:
        for k in d["kernels"]:
            lines.append(f"| {d['case']} | `{k['kernel']}` | {k.get('grid_size') or '—'} | "
                         f"{k.get('block_size') or '—'} | {fmt_cell(k['dram_throughput_pct'], '.1f')} | "
                         f"{fmt_cell(k['sm_throughput_pct'], '.1f')} | "
                         f"{fmt_cell(k['achieved_occupancy_pct'], '.1f')} | "
                         f"{fmt_cell(k['duration_us'], '.2f')} |")
        if not d["kernels"]:
            lines.append(f"| {d['case']} | (no kernel profiled) | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psnrl.bench.ncu_digest",
                                     description="Digest .ncu-rep files (or an exported details CSV) "
                                                 "into JSON: DRAM / SM throughput %, occupancy, duration.")
    parser.add_argument("reports", nargs="*", type=Path, help=".ncu-rep files")
    parser.add_argument("--csv", type=Path, action="append", default=[],
                        help="an exported `ncu --csv --page details` file instead of a report (repeatable)")
    parser.add_argument("--ncu", default="ncu", help="the ncu executable (default: ncu on PATH)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where digest.json/.md go (default: beside the first input)")
    args = parser.parse_args(argv)
    if not args.reports and not args.csv:
        parser.error("give .ncu-rep files or --csv FILE")
    if args.reports and shutil.which(args.ncu) is None and not Path(args.ncu).is_file():
        print(f"error: {args.ncu} not found on PATH; install Nsight Compute or pass --ncu /path/to/ncu",
              file=sys.stderr)
        return 2
    digests = []
    failed = 0
    for path in [*args.reports, *args.csv]:
        try:
            text = path.read_text() if path in args.csv else export_csv(path, args.ncu)
            kernels = digest_csv(text)
        except (DigestError, OSError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        d = digest_report(path, kernels)
        path.with_suffix(".json").write_text(json.dumps(d, indent=2) + "\n")
        digests.append(d)
        for k in kernels:
            print(f"{d['case']}: {k['kernel']} " + " ".join(f"{key}={k[key]}" for key in HEADLINE))
    if digests:
        out_dir = args.out_dir or [*args.reports, *args.csv][0].parent
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "digest.json").write_text(json.dumps(digests, indent=2) + "\n")
        (out_dir / "digest.md").write_text(render_markdown(digests))
        print(f"wrote {out_dir / 'digest.json'} and digest.md")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
