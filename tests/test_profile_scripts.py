"""The Nsight scripts on the CPU: clear failures without ncu / a GPU, the ncu CSV digest, and the
torch.profiler fallback of psnrl/bench/profile_step.sh."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psnrl.bench import ncu_digest, profile_targets
from psnrl.kernels import profiling

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "bench"
BASH = shutil.which("bash")
# What the scripts need besides ncu / nsys / nvidia-smi.
TOOLS = ("dirname", "awk", "sed", "head", "tail", "mktemp", "rm", "ls", "env", "cat")


@pytest.fixture
def bare_path(tmp_path):
    """A PATH with the basic tools only (no ncu, nsys or nvidia-smi, wherever they live here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def run_script(script: str, bin_dir: Path, *args: str, **env):
    environ = {"PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run([BASH, str(ROOT / "psnrl" / "bench" / script), *args], capture_output=True, text=True,
                          env=environ, timeout=120)


# -- profile_kernels.sh -----------------------------------------------------------------------------

def test_profile_kernels_without_ncu_fails_fast(bare_path):
    done = run_script("profile_kernels.sh", bare_path)
    assert done.returncode == 2
    assert "Nsight Compute's command line (ncu) is not on PATH" in done.stderr


def test_profile_kernels_without_a_gpu_fails_fast(bare_path, tmp_path):
    fake_tool(bare_path, "ncu", "echo ncu should not run >&2; exit 3")
    done = run_script("profile_kernels.sh", bare_path, "--out-dir", str(tmp_path / "out"),
                      CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2
    assert "error: no CUDA GPU" in done.stderr
    assert "ncu should not run" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_profile_kernels_dry_run_lists_the_cases(bare_path):
    done = run_script("profile_kernels.sh", bare_path, "--dry-run", "--out-dir", "/x")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    names = [line.split(":")[0][3:] for line in lines]
    assert names == [f"gemm-{s}-m{m}-{mode}" for s in ("gate_up", "down") for m in (1, 32, 256, 4096)
                     for mode in ("noisy", "cublas")] + ["attn-b32-ctx1024", "attn-b256-ctx1024", "attn-b1-ctx8192"]
    first = lines[0]
    for part in ("--profile-from-start off", "--section SpeedOfLight", "--section MemoryWorkloadAnalysis",
                 "--section Occupancy", "--kernel-name regex:_noisy_linear_kernel", "-o /x/gemm-gate_up-m1-noisy",
                 "-m psnrl.bench.profile_targets gemm --model 1.5B --shape gate_up --m 1 --mode noisy"):
        assert part in first
    assert "--kernel-name" not in lines[1]  # cuBLAS: whatever it launches
    assert "--kernel-name regex:_decode(_reduce)?_kernel" in lines[-1]
    picked = run_script("profile_kernels.sh", bare_path, "--dry-run", "--only", "gemm", "--m", "1 256", "--no-cublas")
    assert [line.split(":")[0][3:] for line in picked.stdout.splitlines() if line.startswith("== ")] == [
        f"gemm-{s}-m{m}-noisy" for s in ("gate_up", "down") for m in (1, 256)]


# -- ncu_digest ---------------------------------------------------------------------------------------

def test_digest_of_the_gemm_fixture():
    (k,) = ncu_digest.digest_csv((FIXTURES / "ncu_gemm_details.csv").read_text())
    assert k["kernel"] == "_noisy_linear_kernel" and k["id"] == 0
    assert k["grid_size"] == "(1, 280, 2)" and k["block_size"] == "(256, 1, 1)" and k["cc"] == "9.0"
    assert k["dram_throughput_pct"] == 84.37
    assert k["sm_throughput_pct"] == 41.26
    assert k["achieved_occupancy_pct"] == 23.61
    assert k["theoretical_occupancy_pct"] == 25.0
    assert k["duration_us"] == pytest.approx(19.456)  # "19,456" ns
    assert k["memory_throughput_pct"] == 87.93
    assert k["dram_gbps"] == pytest.approx(2830.118, rel=1e-6)  # byte/s in Memory Workload Analysis
    assert k["l2_hit_rate_pct"] == 3.71
    assert k["metrics"]["GPU Speed Of Light Throughput / Elapsed Cycles"] == {"unit": "cycle", "value": 30937.0}
    assert k["metrics"]["Memory Workload Analysis / Mem Pipes Busy"]["value"] == "n/a"
    assert [r["rule"] for r in k["rules"]] == ["SOLBottleneck", "TheoreticalOccupancy"]
    assert k["rules"][1]["estimated_speedup_pct"] == 12.07


def test_digest_of_the_attention_fixture_has_one_entry_per_launch():
    kernels = ncu_digest.digest_csv((FIXTURES / "ncu_attention_details.csv").read_text())
    assert [(k["id"], k["kernel"]) for k in kernels] == [(0, "_decode_kernel"), (1, "_decode_reduce_kernel")]
    assert [k["dram_throughput_pct"] for k in kernels] == [29.76, 0.42]
    assert [k["duration_us"] for k in kernels] == [pytest.approx(8.32), pytest.approx(2.464)]


def test_digest_of_older_ncu_csv_with_auto_units():
    text = "\n".join([
        "==PROF== Connected to process 1 (/usr/bin/python3)",
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Kernel Time","Context","Stream",'
        '"Section Name","Metric Name","Metric Unit","Metric Value"',
        '"0","1","python3","h","_decode_kernel","2024-Jan-01 00:00:00","1","7","GPU Speed Of Light Throughput",'
        '"DRAM Throughput","%","71.20"',
        '"0","1","python3","h","_decode_kernel","2024-Jan-01 00:00:00","1","7","GPU Speed Of Light Throughput",'
        '"Duration","usecond","1,021.50"',
        '"0","1","python3","h","_decode_kernel","2024-Jan-01 00:00:00","1","7","GPU Speed Of Light Throughput",'
        '"Compute (SM) Throughput","%","12.5"',
        '"0","1","python3","h","_decode_kernel","2024-Jan-01 00:00:00","1","7","Memory Workload Analysis",'
        '"Memory Throughput","Tbyte/second","2.39"',
        '"0","1","python3","h","_decode_kernel","2024-Jan-01 00:00:00","1","7","Occupancy",'
        '"Achieved Occupancy","%","n/a"',
    ])
    (k,) = ncu_digest.digest_csv(text)
    assert k["dram_throughput_pct"] == 71.2 and k["sm_throughput_pct"] == 12.5
    assert k["duration_us"] == pytest.approx(1021.5)
    assert k["dram_gbps"] == pytest.approx(2390.0)
    assert k["achieved_occupancy_pct"] is None


def test_digest_rejects_text_that_is_not_ncu_csv():
    with pytest.raises(ncu_digest.DigestError, match="no ncu CSV header"):
        ncu_digest.digest_csv("==WARNING== No kernels were profiled.\n")


def test_digest_command_line(tmp_path, capsys):
    for name in ("ncu_gemm_details.csv", "ncu_attention_details.csv"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    assert ncu_digest.main(["--csv", str(tmp_path / "ncu_gemm_details.csv"),
                            "--csv", str(tmp_path / "ncu_attention_details.csv")]) == 0
    per_report = json.loads((tmp_path / "ncu_gemm_details.json").read_text())
    assert per_report["kernels"][0]["dram_throughput_pct"] == 84.37
    digest = json.loads((tmp_path / "digest.json").read_text())
    assert [d["case"] for d in digest] == ["ncu_gemm_details", "ncu_attention_details"]
    md = (tmp_path / "digest.md").read_text()
    assert "| ncu_gemm_details | `_noisy_linear_kernel` | (1, 280, 2) | (256, 1, 1) | 84.4 | 41.3 | 23.6 | 19.46 |" in md  # noqa: E501
    # a report to import needs ncu
    assert ncu_digest.main(["--ncu", str(tmp_path / "no-ncu"), str(tmp_path / "x.ncu-rep")]) == 2
    assert "not found" in capsys.readouterr().err


# -- profile_targets ---------------------------------------------------------------------------------

def test_profile_targets_brackets_only_the_profiled_calls(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch paths: this checks the driver, not the kernels
    events = []

    class Profiler:
        def start(self):
            events.append("start")

        def stop(self):
            events.append("stop")

    for argv in (["gemm", "--model", "0.5B", "--m", "2", "--shape", "down", "--mode", "clean", "--dtype", "fp32"],
                 ["attention", "--batch", "2", "--context", "40", "--dtype", "fp32"]):
        args = profile_targets.build_parser().parse_args(argv + ["--warmup", "2", "--iters", "1"])
        fn, _ = (profile_targets.gemm_call if args.target == "gemm" else profile_targets.attention_call)(args, "cpu")
        events.clear()
        profile_targets.run_profiled(lambda: events.append("call") or fn(), args.warmup, args.iters, Profiler())
        assert events == ["call", "call", "start", "call", "stop"]


# -- profile_step -------------------------------------------------------------------------------------

def test_profile_step_falls_back_without_nsys(bare_path):
    done = run_script("profile_step.sh", bare_path, "--dry-run", "--iterations", "1")
    assert done.returncode == 0, done.stderr
    assert "torch.profiler fallback (nsys is not on PATH)" in done.stdout
    assert "-m psnrl.bench.profile_step" in done.stdout and "--iterations 1" in done.stdout


def test_profile_step_falls_back_when_nsys_does_not_work(bare_path):
    fake_tool(bare_path, "nsys", 'echo "no CUDA collector available" >&2; exit 1')
    done = run_script("profile_step.sh", bare_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "torch.profiler fallback (nsys profile does not work here (no CUDA collector available))" in done.stdout


def test_profile_step_uses_nsys_when_it_works(bare_path):
    fake_tool(bare_path, "nsys", 'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then : > "$2.nsys-rep"; fi; shift; done')
    done = run_script("profile_step.sh", bare_path, "--dry-run", "--iterations", "2", "noise.enabled=false")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("Nsight Systems: env PSNRL_NVTX=1 nsys profile -t cuda,nvtx --capture-range=none")
    assert "-m psnrl.trainer.cli train train.iterations=2" in line and line.endswith("noise.enabled=false")


def test_profile_step_torch_profiler_trace_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU torch paths keep it fast
    from psnrl.bench import profile_step
    rc = profile_step.main(["--out-dir", str(tmp_path), "--iterations", "1", "rollout.prompts_per_iter=4",
                            "rollout.group_size=2", "train.mini_batch_prompts=4", "rollout.max_tokens=3"])
    assert rc == 0
    traces = list(tmp_path.glob("step-trace-*.json"))
    assert len(traces) == 1
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"rollout", "learner/forward", "learner/backward", "decode_step", "reward"} <= names
    ranges = json.loads(next(tmp_path.glob("step-ranges-*.json")).read_text())
    assert ranges["iterations"] == 1
    assert ranges["ranges"]["rollout"]["count"] == 1 and ranges["ranges"]["learner/forward"]["total_ms"] > 0
    assert not profiling.nvtx_enabled()  # the ranges are off again afterwards


# -- gpu_check.sh -----------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_check_without_a_gpu_fails_fast_and_writes_nothing(bare_path, tmp_path):
    fake_tool(bare_path, "timeout", "echo no step may run >&2; exit 3")
    for check in ("kernels", "learner", "decode"):
        done = run_script("gpu_check.sh", bare_path, check, str(tmp_path / "out"))
        assert done.returncode == 2
        assert "gpu_check.sh: no CUDA GPU visible" in done.stderr
        assert "no step may run" not in done.stderr
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_gpu_check_names_its_checks(bare_path, tmp_path):
    for args in ((), ("prefill",), (str(tmp_path / "out"),)):
        done = run_script("gpu_check.sh", bare_path, *args)
        assert done.returncode == 2 and "usage: gpu_check.sh {kernels|learner|decode}" in done.stderr
