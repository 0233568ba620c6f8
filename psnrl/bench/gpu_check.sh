#!/usr/bin/env bash
# GPU checks, each sized for one device call (about 6 minutes).
#
#   psnrl/bench/gpu_check.sh CHECK [OUT_DIR]   (default: $OUT if set, else psnrl/bench/results/gpu-check)
#
# On a CUDA machine whose torch and Triton are already installed (and no registry in reach), each
# check first installs the project (pip install --no-deps --no-build-isolation -e .; the C++ block
# manager builds), then:
#   kernels   tests: the gpu-marked noise, noisy_linear and noisy_gate_up tests;
#             bench: psnrl bench noisy-gemm on the Qwen2.5-1.5B and 7B MLP shapes (all M);
#             ncu:   psnrl/bench/profile_kernels.sh on the 1.5B gate_up / down noisy matmul and
#                    its cuBLAS twin at M = 1 and M = 256
#   learner   tests: every gpu-marked test;
#             learner: psnrl bench learner --models 1.5B (8k and 16k tokens, activation
#                    checkpointing off and on, plain / psn / naive, the engine mismatch);
#             step:  psnrl bench step --models 0.5B --iters 2 (plain, psn, psn-var2 in one process)
#   decode    tests: the gpu-marked engine, sampler and CUDA-graph tests;
#             host:  psnrl bench host --device cuda (the model stubbed, V = 151,936: the engine's
#                    time and launches per decode step, forward / sampler / engine apart);
#             decode: psnrl bench decode --models 1.5B --batches 1 64 256 --output-len 256 (clean and HF,
#                    each step split into forward / sampler / host ms) and the nano-vllm workload
#                    on 0.5B; then the clean rows again with --no-overlap (one step at a time)
# Tests run under pytest -n 8 when pytest-xdist is there. Each step runs under its own `timeout`
# (seconds: INSTALL_S, TESTS_S, BENCH_S, NCU_S, STEP_S); a step that fails or runs out of time is
# logged and the next one still runs. Everything it wrote (logs, the benches' <name>-<device>.json
# and .md, ncu digests and reports) is packed into one tarball, OUT_DIR/gpu-check-CHECK-<device>.tar.gz,
# and summary.txt lists each step's exit status.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHECK="${1:-}"
case "$CHECK" in
    kernels) TIMES=(60 100 120 80) ;;  # install, tests, bench, ncu
    learner) TIMES=(45 110 100 90) ;;  # install, tests, learner bench, step bench
    decode) TIMES=(45 90 150 50) ;;  # install, tests, decode bench, host bench and the one-at-a-time decode
    *) echo "usage: gpu_check.sh {kernels|learner|decode} [OUT_DIR]" >&2; exit 2 ;;
esac
DEST="${2:-${OUT:-$ROOT/psnrl/bench/results/gpu-check}}"
PYTHON="${PYTHON:-python3}"
INSTALL_S="${INSTALL_S:-${TIMES[0]}}" TESTS_S="${TESTS_S:-${TIMES[1]}}"
BENCH_S="${BENCH_S:-${TIMES[2]}}" NCU_S="${NCU_S:-${TIMES[3]}}" STEP_S="${STEP_S:-${TIMES[3]}}"
cd "$ROOT"

step() {  # step NAME SECONDS COMMAND...: run, log to NAME.log, record the exit status
    local name="$1" seconds="$2"
    shift 2
    echo "== $name (timeout ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    local note=""
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then note=" (timed out)"; fi
    echo "$name: exit $rc$note after $((SECONDS - start))s" | tee -a "$WORK/summary.txt"
    tail -n 5 "$WORK/$name.log"
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to $PYTHON (no torch, or torch.cuda.is_available() is False)" >&2
    exit 2
fi
WORK="$(mktemp -d)"
mkdir -p "$DEST" "$WORK/results"
"$PYTHON" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    >"$WORK/versions.txt" 2>&1
DEVICE="$("$PYTHON" -c 'import torch; from psnrl.bench.common import device_slug; print(device_slug(torch.cuda.get_device_name()))' 2>/dev/null \
    || echo unknown-device)"

step install "$INSTALL_S" "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
XDIST=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
BENCH=("$PYTHON" -m psnrl.trainer.cli bench)
case "$CHECK" in
kernels)
    step tests "$TESTS_S" "$PYTHON" -m pytest -q -m gpu "${XDIST[@]}" tests/test_noise.py tests/test_noisy_linear.py \
        tests/test_noisy_gate_up.py
    step bench "$BENCH_S" "${BENCH[@]}" noisy-gemm --models 1.5B 7B --out-dir "$WORK/results"
    if command -v "${NCU:-ncu}" >/dev/null 2>&1; then
        step ncu "$NCU_S" env PYTHON="$PYTHON" bash psnrl/bench/profile_kernels.sh --only gemm --m "1 256" \
            --out-dir "$WORK/results/ncu"
    else
        echo "ncu: skipped (no ncu on PATH)" | tee -a "$WORK/summary.txt"
    fi
    ;;
learner)
    step tests "$TESTS_S" "$PYTHON" -m pytest -q -m gpu "${XDIST[@]}" tests
    step learner "$BENCH_S" "${BENCH[@]}" learner --models 1.5B --out-dir "$WORK/results"
    step step "$STEP_S" "${BENCH[@]}" step --models 0.5B --warmup 1 --iters 2 --out-dir "$WORK/results"
    ;;
decode)
    step tests "$TESTS_S" "$PYTHON" -m pytest -q -m gpu "${XDIST[@]}" tests/test_llm.py tests/test_sampling.py \
        tests/test_sampler_kernel.py tests/test_cuda_graphs.py tests/test_engine_lifetime.py tests/test_overlap.py
    step host "$STEP_S" "${BENCH[@]}" host --device cuda --out-dir "$WORK/results"
    step decode "$BENCH_S" "${BENCH[@]}" decode --models 1.5B --batches 1 64 256 --modes clean hf --output-len 256 \
        --nano-vllm-model 0.5B --out-dir "$WORK/results"
    step decode-one-at-a-time "$STEP_S" "${BENCH[@]}" decode --models 1.5B --batches 1 64 256 --modes clean \
        --output-len 256 --no-overlap --out-dir "$WORK/results/no-overlap"
    ;;
esac

TARBALL="$DEST/gpu-check-$CHECK-$DEVICE.tar.gz"
tar -czf "$TARBALL" -C "$WORK" .
echo "wrote $TARBALL"
cat "$WORK/summary.txt"
