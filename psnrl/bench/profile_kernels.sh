#!/usr/bin/env bash
# Nsight Compute on psnrl's Triton kernels: the noisy GEMM and the paged decode attention.
#
#   psnrl/bench/profile_kernels.sh [--out-dir DIR] [--only gemm|attention] [--m "1 32 256 4096"] [--no-cublas] [--dry-run]
#   (--dry-run prints the ncu commands without checking for ncu or a GPU)
#
# Writes one .ncu-rep per case under DIR (default psnrl/bench/results/ncu/), then digests them with
# psnrl/bench/ncu_digest.py: <case>.json per report (DRAM throughput %, SM throughput %, achieved
# occupancy, duration per kernel launch) and digest.json / digest.md over all cases.
#
# Cases (Qwen2.5-1.5B, bf16):
#   gemm-<shape>-m<M>-noisy    noisy_linear with every row on one noisy stream, shapes gate_up
#                              (N=17920, K=1536) and down (N=1536, K=8960), M = 1, 32, 256
#                              (decode: the fused kernel and its split-K reduce) and 4096
#                              (learner: the perturbed-weight fill; its cuBLAS call is the
#                              cublas case's); --m picks the M values
#   gemm-<shape>-m<M>-cublas   torch.matmul on the same shape (the baseline; no kernel filter,
#                              whatever cuBLAS launches); skip with --no-cublas
#   attn-b<B>-ctx<T>           paged decode attention, 12 query / 2 KV heads, head_dim 128,
#                              16-token pages: B=32 and 256 at 1024 tokens, and B=1 at 8192 tokens
#                              (split-K: the reduce kernel shows up too); filter _decode(_reduce)?_kernel
#
# Sections: SpeedOfLight, MemoryWorkloadAnalysis, Occupancy (override with NCU_SECTIONS="A B").
# ncu locks clocks to base and flushes caches between replays (its defaults), so durations are
# longer than psnrl/bench/noisy_gemm.py's; compare the throughput percentages across cases.
# Environment: PYTHON (default python3), NCU (default ncu), NCU_EXTRA (more ncu arguments).
set -euo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$ROOT/psnrl/bench/results/ncu"
ONLY=""
MS="1 32 256 4096"
CUBLAS=1
DRY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out-dir) OUT="$2"; shift 2 ;;
        --out-dir=*) OUT="${1#*=}"; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        --only=*) ONLY="${1#*=}"; shift ;;
        --m) MS="$2"; shift 2 ;;
        --m=*) MS="${1#*=}"; shift ;;
        --no-cublas) CUBLAS=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "profile_kernels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$ONLY" in ""|gemm|attention) ;; *) echo "profile_kernels.sh: --only takes gemm or attention" >&2; exit 2 ;; esac

PYTHON="${PYTHON:-python3}"
NCU="${NCU:-ncu}"
read -r -a SECTIONS <<< "${NCU_SECTIONS:-SpeedOfLight MemoryWorkloadAnalysis Occupancy}"
read -r -a EXTRA <<< "${NCU_EXTRA:-}"

# -- fail fast: no ncu, no GPU (--dry-run only prints the commands) ------------------------------------
if [[ $DRY -eq 1 ]]; then
    :
elif ! command -v "$NCU" >/dev/null 2>&1; then
    echo "error: Nsight Compute's command line ($NCU) is not on PATH." >&2
    echo "       Install Nsight Compute (it ships with the CUDA toolkit: <cuda>/bin/ncu) and add it to" >&2
    echo "       PATH, or point NCU=/path/to/ncu at it." >&2
    exit 2
elif ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: $PYTHON not found; set PYTHON to the interpreter that has psnrl and a CUDA torch." >&2
    exit 2
elif ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    smi="nvidia-smi not found"
    if command -v nvidia-smi >/dev/null 2>&1; then
        smi="$(nvidia-smi -L 2>&1 | head -n 1 || true)"
    fi
    echo "error: no CUDA GPU: torch.cuda.is_available() is false for $PYTHON (nvidia-smi: ${smi:-no output})." >&2
    echo "       profile_kernels.sh profiles GPU kernels; run it on a machine with an NVIDIA GPU." >&2
    exit 2
elif [[ "${TRITON_INTERPRET:-0}" == "1" ]]; then
    echo "error: TRITON_INTERPRET=1 runs the kernels on the CPU; unset it to profile them." >&2
    exit 2
fi

if [[ $DRY -eq 0 ]]; then mkdir -p "$OUT"; fi
cd "$ROOT"

NCU_BASE=("$NCU" --profile-from-start off --force-overwrite)
for s in "${SECTIONS[@]}"; do NCU_BASE+=(--section "$s"); done
if [[ ${#EXTRA[@]} -gt 0 ]]; then NCU_BASE+=("${EXTRA[@]}"); fi

REPORTS=()
FAILED=()
profile() {  # profile NAME KERNEL_REGEX(or "") TARGET_ARGS...
    local name="$1" regex="$2"
    shift 2
    local cmd=("${NCU_BASE[@]}")
    if [[ -n "$regex" ]]; then cmd+=(--kernel-name "regex:$regex"); fi
    cmd+=(-o "$OUT/$name" "$PYTHON" -m psnrl.bench.profile_targets "$@")
    echo "== $name: ${cmd[*]}"
    if [[ $DRY -eq 1 ]]; then return 0; fi
    if "${cmd[@]}" && [[ -f "$OUT/$name.ncu-rep" ]]; then
        REPORTS+=("$OUT/$name.ncu-rep")
    else
        echo "warning: $name: ncu failed or wrote no report" >&2
        FAILED+=("$name")
    fi
}

if [[ -z "$ONLY" || "$ONLY" == gemm ]]; then
    for shape in gate_up down; do
        for m in $MS; do
            profile "gemm-$shape-m$m-noisy" "_noisy_linear_kernel|_splitk_reduce_kernel|_fill_kernel" gemm --model 1.5B --shape "$shape" --m "$m" --mode noisy
            if [[ $CUBLAS -eq 1 ]]; then
                profile "gemm-$shape-m$m-cublas" "" gemm --model 1.5B --shape "$shape" --m "$m" --mode cublas
            fi
        done
    done
fi
if [[ -z "$ONLY" || "$ONLY" == attention ]]; then
    for bc in 32:1024 256:1024 1:8192; do
        b="${bc%%:*}"; ctx="${bc##*:}"
        profile "attn-b$b-ctx$ctx" "_decode(_reduce)?_kernel" attention --batch "$b" --context "$ctx"
    done
fi

if [[ $DRY -eq 1 ]]; then exit 0; fi
if [[ ${#REPORTS[@]} -eq 0 ]]; then
    echo "error: no report was written (failed: ${FAILED[*]:-none})" >&2
    exit 1
fi
"$PYTHON" -m psnrl.bench.ncu_digest --ncu "$NCU" --out-dir "$OUT" "${REPORTS[@]}"
echo "reports: $OUT/*.ncu-rep (open with ncu-ui); digest: $OUT/digest.md"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "failed: ${FAILED[*]}" >&2
    exit 1
fi
