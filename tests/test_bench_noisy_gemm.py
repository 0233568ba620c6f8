"""psnrl/bench/noisy_gemm.py: case list, markdown, results files on the CPU; the run itself on a GPU."""
import json

import pytest
import torch

from psnrl.bench import noisy_gemm as bench
from psnrl.bench.common import device_slug

HAS_CUDA = torch.cuda.is_available()


def fixture_row(shape="Qwen2.5-7B/gate_up", m=8, n=37888, k=3584, ratio=1.05, mixed=0.99,
                extra=0, **overrides):
    noisy = 100.0 * ratio
    row = {
        "shape": shape, "M": m, "N": n, "K": k,
        "cublas_us": 100.0, "clean_us": 98.0, "noisy_us": noisy, "mixed_us": noisy * mixed,
        "fused_us": noisy, "materialized_us": 400.0, "noisy_over_cublas": ratio, "mixed_over_noisy": mixed,
        "clean_over_cublas": 0.98, "extra_bytes": extra, "weight_bytes": n * k * 2,
        "materialized_extra_bytes": n * k * 2,
        "noisy_gbps": 2600.0, "noisy_tflops": 21.5,
        "glu_unfused_us": 120.0, "glu_fused_us": 100.0, "glu_fused_over_unfused": 0.8333,
    }
    row.update(overrides)
    return row


META = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.9.0", "dtype": "bf16",
        "sigma": 0.004, "method": "CUDA events, median of 100"}


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU path")
def test_main_without_cuda_returns_2_with_message(capsys):
    assert bench.main([]) == 2
    assert "psnrl bench noisy-gemm needs a CUDA GPU; none found" in capsys.readouterr().err


def test_bad_arguments_are_usage_errors():
    with pytest.raises(SystemExit) as exc:
        bench.main(["--models", "13B"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "qkv"])


def test_default_cases_cover_every_model_shape_and_m():
    cases = bench.build_cases()
    assert len(cases) == 3 * 2 * 8
    assert sorted({c.m for c in cases}) == [1, 8, 32, 128, 256, 1024, 4096, 16384]
    nk = {(c.model, c.shape): (c.n, c.k) for c in cases}
    assert nk == {
        ("Qwen2.5-0.5B", "gate_up"): (9728, 896), ("Qwen2.5-0.5B", "down"): (896, 4864),
        ("Qwen2.5-1.5B", "gate_up"): (17920, 1536), ("Qwen2.5-1.5B", "down"): (1536, 8960),
        ("Qwen2.5-7B", "gate_up"): (37888, 3584), ("Qwen2.5-7B", "down"): (3584, 18944),
    }


def test_subset_from_arguments():
    args = bench.parse_args(["--models", "7b", "--shapes", "down", "--m", "1,128", "4096"])
    cases = bench.build_cases(args.models, args.shapes, args.m)
    assert [(c.name, c.m, c.n, c.k) for c in cases] == [
        ("Qwen2.5-7B/down", 1, 3584, 18944), ("Qwen2.5-7B/down", 128, 3584, 18944),
        ("Qwen2.5-7B/down", 4096, 3584, 18944)]
    assert args.dtype == "bf16" and args.sigma == 0.004


def test_mixed_rows_are_half_noisy_and_m1_is_noisy():
    assert bench.mixed_row_streams(1, "cpu").tolist() == [1]
    assert bench.mixed_row_streams(6, "cpu").tolist() == [1, 0, 1, 0, 1, 0]


def test_markdown_flags_a_slow_decode_row_and_passes_a_fast_one():
    slow = fixture_row(m=8, ratio=1.7)
    fast = fixture_row(shape="Qwen2.5-7B/down", m=8, n=3584, k=18944, ratio=1.05)
    md = bench.render_markdown(META, [slow, fast])
    assert "| shape | M | N | K | cuBLAS µs |" in md
    assert "NVIDIA H100 80GB HBM3" in md and META["method"] in md
    target = next(line for line in md.splitlines() if line.startswith("- noisy/cuBLAS <= 1.50"))
    assert "MISS 1 of 2" in target
    assert "Qwen2.5-7B/gate_up M=8: 1.700 (+0.200" in target
    assert "Qwen2.5-7B/down" not in target
    assert "**Targets: 1 miss.**" in md

    md_ok = bench.render_markdown(META, [fast])
    assert "- noisy/cuBLAS <= 1.50 at M <= 256: PASS (1 row)" in md_ok
    assert "**Targets: all met.**" in md_ok


def test_markdown_checks_learner_mixed_clean_and_extra_bytes():
    weight = 37888 * 3584 * 2
    rows = [
        fixture_row(m=4096, ratio=1.4, extra=weight),      # learner miss; one weight of scratch is fine
        fixture_row(m=16384, ratio=1.2),                   # learner pass
        fixture_row(m=128, ratio=1.0, mixed=1.2),          # mixed slower than noisy
        fixture_row(m=32, ratio=1.0, extra=4096),          # allocates at a decode shape
        fixture_row(m=1024, ratio=3.0, extra=weight + 1),  # no ratio target at M = 1024; over one weight
        fixture_row(m=8, ratio=1.0, clean_over_cublas=1.2),  # the clean path slower than cuBLAS
    ]
    results = {r["target"].split(" (")[0]: r for r in bench.check_targets(rows)}
    assert [m[0]["M"] for m in results["noisy/cuBLAS <= 1.30 at M >= 4096"]["misses"]] == [4096]
    assert [m[0]["M"] for m in results["mixed no slower than noisy"]["misses"]] == [128]
    assert [m[0]["M"] for m in results["extra bytes = 0 at M <= 256"]["misses"]] == [32]
    assert [m[0]["M"] for m in results["extra bytes <= one weight at M >= 1024"]["misses"]] == [1024]
    assert [m[0]["M"] for m in results["clean path/cuBLAS <= 1.05"]["misses"]] == [8]
    assert results["noisy/cuBLAS <= 1.50 at M <= 256"]["misses"] == []
    md = bench.render_markdown(META, rows)
    assert "Qwen2.5-7B/gate_up M=32: 4096 B (limit 0 B)" in md
    assert "**Targets: 5 misses.**" in md


def test_failed_case_shows_as_not_measured():
    case = bench.build_cases(["0.5B"], ["down"], [8])[0]
    row = bench.error_row(case, RuntimeError("CUDA out of memory"))
    assert set(bench.ROW_KEYS) <= set(row)
    md = bench.render_markdown(META, [row])
    assert "not measured (RuntimeError: CUDA out of memory)" in md
    assert "## Errors" in md


def test_write_results_is_valid_json_and_leaves_no_temp_file(tmp_path):
    rows = [fixture_row(m=1), fixture_row(m=8, ratio=1.3)]
    json_path, md_path = bench.FILES.write(tmp_path / "results", META, rows)
    assert json_path.name == "noisy_gemm-nvidia-h100-80gb-hbm3.json"
    assert md_path.name == "noisy_gemm-nvidia-h100-80gb-hbm3.md"
    doc = json.loads(json_path.read_text())
    assert set(bench.META_KEYS) | {"rows"} <= set(doc)
    assert doc["device"] == META["device"] and doc["sigma"] == 0.004
    assert len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert set(bench.ROW_KEYS) <= set(row)
    assert "| shape | M |" in md_path.read_text()
    # Rewriting replaces both files in place.
    bench.FILES.write(tmp_path / "results", META, rows[:1])
    assert len(json.loads(json_path.read_text())["rows"]) == 1
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [json_path.name, md_path.name]


def test_write_results_needs_the_metadata(tmp_path):
    with pytest.raises(ValueError, match="method"):
        bench.FILES.write(tmp_path, {k: v for k, v in META.items() if k != "method"}, [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_CUDA, reason="the GPU test below runs the real thing")
def test_time_case_wiring_on_the_interpreter():
    """Every timed callable runs (fp32, tiny shape, Triton interpreter) and the row adds up."""
    case = bench.Case("tiny", "gate_up", m=3, n=24, k=40)
    calls = []

    def timer(fn):
        out = fn()
        assert out.shape == ((case.m, case.n) if len(calls) < 6 else (case.m, case.n // 2))
        calls.append(out)
        return 10.0 * len(calls)

    row = bench.time_case(case, dtype=torch.float32, sigma=0.5, device="cpu", timer=timer,
                          extra_bytes=lambda fn: (fn(), 0)[1])
    cublas, clean, noisy, mixed, fused, materialized, glu_unfused, glu_fused = calls
    torch.testing.assert_close(fused, noisy)  # M = 3: the dispatcher's path is the fused kernel
    torch.testing.assert_close(glu_fused, glu_unfused, rtol=1e-4, atol=1e-4)
    gate, up = clean.chunk(2, dim=1)
    assert not torch.allclose(glu_fused, torch.nn.functional.silu(gate) * up)  # noisy, not clean
    assert (row["glu_unfused_us"], row["glu_fused_us"], row["glu_fused_over_unfused"]) == (70.0, 80.0, 1.1429)
    torch.testing.assert_close(clean, cublas, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(materialized, noisy, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(noisy, clean)
    torch.testing.assert_close(mixed[0::2], noisy[0::2])   # even rows noisy
    torch.testing.assert_close(mixed[1::2], clean[1::2])   # odd rows clean
    assert (row["cublas_us"], row["noisy_us"], row["mixed_us"]) == (10.0, 30.0, 40.0)
    assert row["noisy_over_cublas"] == 3.0
    assert row["mixed_over_noisy"] == pytest.approx(4 / 3, abs=1e-4)
    assert row["clean_over_cublas"] == 2.0 and row["weight_bytes"] == 24 * 40 * 4
    moved = (24 * 40 + 3 * 40 + 3 * 24) * 4
    assert row["noisy_gbps"] == pytest.approx(moved / 30e-6 / 1e9, abs=0.05)  # 1 decimal
    assert row["noisy_tflops"] == pytest.approx(2 * 3 * 24 * 40 / 30e-6 / 1e12, abs=1e-3)
    assert set(row) == set(bench.ROW_KEYS)


@pytest.mark.gpu
def test_main_on_a_small_subset(tmp_path):
    rc = bench.main(["--models", "0.5B", "--shapes", "down", "--m", "1", "128", "--warmup", "2",
                     "--iters", "5", "--out-dir", str(tmp_path)])
    assert rc == 0
    slug = device_slug(torch.cuda.get_device_name())
    doc = json.loads((tmp_path / f"noisy_gemm-{slug}.json").read_text())
    assert (tmp_path / f"noisy_gemm-{slug}.md").exists()
    assert set(bench.META_KEYS) <= set(doc) and doc["dtype"] == "bf16"
    assert [(r["shape"], r["M"], r["N"], r["K"]) for r in doc["rows"]] == [
        ("Qwen2.5-0.5B/down", 1, 896, 4864), ("Qwen2.5-0.5B/down", 128, 896, 4864)]
    for row in doc["rows"]:
        assert set(bench.ROW_KEYS) <= set(row) and "error" not in row
        for key in ("cublas_us", "clean_us", "noisy_us", "mixed_us", "materialized_us",
                    "noisy_gbps", "noisy_tflops"):
            assert row[key] > 0, key
        assert isinstance(row["extra_bytes"], int) and row["extra_bytes"] >= 0
        assert row["materialized_extra_bytes"] >= 896 * 4864 * 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
