"""The Triton kernels compile for Hopper (sm_90) on any machine, without spills.

The interpreter runs kernels as numpy code and accepts things the GPU compiler
rejects; compiling to a cubin catches those without a GPU. Besides hand-typed
fill signatures, the report compiles every launch that the public
wrappers make (``psnrl.bench.kernel_sass.compile_all_launches``). It runs in a fresh
process because this one runs Triton in interpreter mode.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_fill_kernel", "_noisy_linear_kernel", "_splitk_reduce_kernel", "_decode_kernel",
           "_decode_reduce_kernel", "_prefill_kernel", "_store_kv_kernel", "_partials_kernel",
           "_grad_logits_kernel", "_sample_kernel"}


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "psnrl.bench.kernel_sass", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.stdout, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert not report["failures"], "\n\n".join(f"{f['dtype']} {f['case']}: {f['error'][-3000:]}"
                                               for f in report["failures"])
    assert out.returncode == 0, out.stderr[-3000:]
    fill = {r["variant"]: r for r in report["rows"] if r["kernel"] == "fill_noise"}
    # Pairing makes two normals per hash: it must stay well under the per-element path.
    assert fill["paired"]["instructions_per_element"] < 0.7 * fill["unpaired"]["instructions_per_element"]

    launches = report["launches"]
    for dtype in ("bf16", "fp16", "fp32"):
        assert {r["kernel"] for r in launches if r["dtype"] == dtype} == KERNELS, dtype
        # the gated-MLP epilogue (noisy_gate_up), with and without split-K (fp32's narrow tiles
        # have programs enough without it; the interpreter tests run its split-K)
        glu = {r["constexprs"]["PARTIAL"] for r in launches if r["dtype"] == dtype
               and r["kernel"] == "_noisy_linear_kernel" and r["constexprs"]["GLU"]}
        assert glu == ({False} if dtype == "fp32" else {False, True}), dtype
    for row in launches:
        # Only the fp32 noisy_linear (the exact reference path) spills today.
        if not (row["dtype"] == "fp32" and row["kernel"] == "_noisy_linear_kernel"):
            assert row["stack"] == 0 and row["local"] == 0, row
    # The noise budget: generating and applying each weight element's noise costs at most 16
    # issued instructions in the K loop of every fused launch the engine and learner make.
    noisy = [r for r in launches if r["kernel"] == "_noisy_linear_kernel" and r["dtype"] != "fp32"]
    assert len(noisy) >= 12
    for row in noisy:
        assert 0 < row["noise_instructions_per_element"] <= report["noise_budget"] == 16, row
        assert row["noise_mufu_per_element"] == 2.0, row  # lg2, sqrt, sin, cos per pair
