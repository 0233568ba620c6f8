"""psnrl/bench/common.py: the harness every bench writes its results through."""
import json

import pytest

from psnrl.bench import common


def test_device_slug():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.device_slug("NVIDIA H200") == "nvidia-h200"
    assert common.device_slug("???") == "unknown-device"


def test_fill_ratios_divides_by_the_base_row_of_the_same_case():
    rows = [{"case": "a", "mode": "plain", "ms": 10.0}, {"case": "a", "mode": "psn", "ms": 11.0},
            {"case": "b", "mode": "psn", "ms": 5.0}, {"case": "a", "mode": "naive", "ms": None},
            {"case": "a", "mode": "psn", "ms": 1.0, "error": "boom"}]
    out = common.fill_ratios(rows, lambda r: r["case"], lambda r: r["mode"] == "plain", [("over", "ms", 3)])
    assert [r["over"] for r in out] == [1.0, 1.1, None, None, None]  # no base for b; missing; failed
    assert "over" not in rows[0]  # the input rows are left as they were


def test_columns_format_and_missing_values():
    cols = [common.Column("name", "name", left=True), common.Column("bytes", "MiB", "mib"),
            common.Column(lambda r: r["a"] / r["b"], "a/b", "{:.2f}")]
    table = common.markdown_table(cols, [{"name": "x", "bytes": 3 * 2**20, "a": 1, "b": 4},
                                         {"name": "y", "bytes": None, "a": 1, "b": 8}])
    assert table.splitlines() == ["| name | MiB | a/b |", "|---|---:|---:|", "| x | 3.0 | 0.25 |",
                                  "| y | — | 0.12 |"]


def test_bench_run_rewrites_its_files_after_every_row(tmp_path, capsys):
    files = common.BenchFiles("demo", ("device", "torch"), lambda meta, rows: f"# {len(rows)} rows\n",
                              finish=lambda rows: common.fill_ratios(rows, lambda r: 0, lambda r: r["mode"] == "a",
                                                                     [("over_a", "ms", 2)]))
    run = common.BenchRun(files, {"device": "Some GPU", "torch": "2.x", "note": "n"}, tmp_path)
    run.record({"mode": "a", "ms": 2.0}, "a")
    doc = json.loads((tmp_path / "demo-some-gpu.json").read_text())
    assert list(doc) == ["device", "torch", "note", "rows"] and len(doc["rows"]) == 1
    run.meta["mismatch"] = {"mean": 0.5}
    run.record(common.error_row(("mode", "ms"), RuntimeError("out of memory"), mode="b"), "b")
    assert "[demo] b: RuntimeError: out of memory" in capsys.readouterr().err
    doc = json.loads((tmp_path / "demo-some-gpu.json").read_text())
    assert doc["rows"][0]["over_a"] == 1.0 and doc["rows"][1]["error"] == "RuntimeError: out of memory"
    assert doc["mismatch"] == {"mean": 0.5} and list(doc)[-1] == "rows"
    assert (tmp_path / "demo-some-gpu.md").read_text() == "# 2 rows\n"
    assert run.close() == 1  # a row failed
    assert "# 2 rows" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-some-gpu.json", "demo-some-gpu.md"]  # no temp files


def test_results_need_their_metadata_and_finite_numbers(tmp_path):
    files = common.BenchFiles("demo", ("device", "torch"), lambda meta, rows: "")
    with pytest.raises(ValueError, match="lacks"):
        files.write(tmp_path, {"device": "cpu"}, [])
    with pytest.raises(ValueError):
        files.write(tmp_path, {"device": "cpu", "torch": "x"}, [{"ms": float("nan")}])
    assert not list(tmp_path.glob("*.json"))  # a failed write leaves nothing behind


def test_median_and_errors():
    assert common.median([3.0, None, 1.0, 2.0]) == 2.0 and common.median([None]) is None
    assert common.error_text(ValueError("x" * 600)).startswith("ValueError: xxx")
    assert len(common.error_text(ValueError("x" * 600))) == 500


def test_errors_section_lists_failed_rows_only():
    from psnrl.bench.common import errors_section

    rows = [{"batch": 1}, {"batch": 2, "error": "RuntimeError: boom"}, {"batch": 3, "error": None}]
    assert errors_section(rows, lambda r: f"batch {r['batch']}") == \
        ["## Errors", "", "- batch 2: RuntimeError: boom", ""]
    assert errors_section(rows[:1], lambda r: "x") == []
