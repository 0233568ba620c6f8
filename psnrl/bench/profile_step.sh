#!/usr/bin/env bash
# Profile a short training run: Nsight Systems when it works, else torch.profiler.
#
#   psnrl/bench/profile_step.sh [--out-dir DIR] [--iterations N] [--config NAME] [--torch] [--dry-run] [section.key=value ...]
#
# With a working nsys on PATH (checked by profiling `true` first), it runs
#   PSNRL_NVTX=1 nsys profile -t cuda,nvtx --capture-range=none -o DIR/step-<device> \
#       python -m psnrl.trainer.cli train train.iterations=N train.sft_warmup_steps=0 eval.every=0 ...
# so the psnrl NVTX ranges of psnrl/kernels/profiling.py (rollout, prefill, decode_step, sample, reward,
# learner/forward, learner/backward, optimizer, ...) frame the CUDA kernels on the timeline, and
# writes DIR/step-<device>.nsys-rep (open with nsys-ui) plus an NVTX range summary
# (nsys stats nvtx_sum) in DIR/step-<device>_nvtx_sum.csv.
#
# Without nsys, when it fails, or with --torch, it runs `python -m psnrl.bench.profile_step` instead:
# a torch.profiler Chrome trace with the same ranges, DIR/step-trace-<device>.json (open in
# https://ui.perfetto.dev or chrome://tracing) and DIR/step-ranges-<device>.json. That path also
# works on a CPU.
#
# Defaults: DIR = psnrl/bench/results/profile, N = 3, the tiny config. --dry-run prints the choice (after
# probing nsys) and the command. Environment: PYTHON (default python3), NSYS (default nsys).
set -euo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$ROOT/psnrl/bench/results/profile"
ITERS=3
CONFIG=()
FORCE_TORCH=0
DRY=0
OVERRIDES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out-dir) OUT="$2"; shift 2 ;;
        --out-dir=*) OUT="${1#*=}"; shift ;;
        --iterations) ITERS="$2"; shift 2 ;;
        --iterations=*) ITERS="${1#*=}"; shift ;;
        --config) CONFIG=(--config "$2"); shift 2 ;;
        --config=*) CONFIG=(--config "${1#*=}"); shift ;;
        --torch) FORCE_TORCH=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "profile_step.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done
if ! [[ "$ITERS" =~ ^[1-9][0-9]*$ ]]; then
    echo "profile_step.sh: --iterations must be a positive integer, got '$ITERS'" >&2
    exit 2
fi

PYTHON="${PYTHON:-python3}"
NSYS="${NSYS:-nsys}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: $PYTHON not found; set PYTHON to the interpreter that has psnrl installed." >&2
    exit 2
fi
cd "$ROOT"

# Does nsys exist, and does it produce a report? (Some containers have nsys but no working collector.)
NSYS_OK=0
WHY=""
if [[ $FORCE_TORCH -eq 1 ]]; then
    WHY="--torch given"
elif ! command -v "$NSYS" >/dev/null 2>&1; then
    WHY="$NSYS is not on PATH"
else
    probe="$(mktemp -d)"
    if "$NSYS" profile -t cuda,nvtx --capture-range=none -o "$probe/probe" --force-overwrite true true \
            >"$probe/log" 2>&1 && ls "$probe"/probe.*rep >/dev/null 2>&1; then
        NSYS_OK=1
    else
        WHY="$NSYS profile does not work here ($(tail -n 1 "$probe/log" 2>/dev/null || echo 'no output'))"
    fi
    rm -rf "$probe"
fi

TRAIN_ARGS=(train.iterations="$ITERS" train.sft_warmup_steps=0 eval.every=0 checkpoint.every=0
            log.dir="$OUT/run")
if [[ ${#OVERRIDES[@]} -gt 0 ]]; then TRAIN_ARGS+=("${OVERRIDES[@]}"); fi

if [[ $NSYS_OK -eq 1 ]]; then
    DEVICE="$("$PYTHON" -c 'import torch; from psnrl.bench.common import device_slug as s; print(s(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown-device)"
    REP="$OUT/step-$DEVICE"
    cmd=(env PSNRL_NVTX=1 "$NSYS" profile -t cuda,nvtx --capture-range=none -o "$REP" --force-overwrite true
         "$PYTHON" -m psnrl.trainer.cli train ${CONFIG[@]+"${CONFIG[@]}"} "${TRAIN_ARGS[@]}")
    echo "Nsight Systems: ${cmd[*]}"
    if [[ $DRY -eq 1 ]]; then exit 0; fi
    mkdir -p "$OUT"
    if "${cmd[@]}" && [[ -f "$REP.nsys-rep" ]]; then
        for report in nvtx_sum nvtxsum; do  # the report's name changed across nsys versions
            if "$NSYS" stats --report "$report" --format csv --force-export true -o "$REP" "$REP.nsys-rep" \
                    >/dev/null 2>&1; then
                break
            fi
        done
        echo "wrote $REP.nsys-rep (open with nsys-ui)"
        ls "$REP"_nvtx*sum*.csv 2>/dev/null | sed 's/^/wrote /' || true
        exit 0
    fi
    WHY="nsys profile of the training run failed or wrote no report"
    echo "warning: $WHY; falling back to torch.profiler" >&2
fi

cmd=("$PYTHON" -m psnrl.bench.profile_step --out-dir "$OUT" --iterations "$ITERS" ${CONFIG[@]+"${CONFIG[@]}"}
     ${OVERRIDES[@]+"${OVERRIDES[@]}"})
echo "torch.profiler fallback ($WHY): ${cmd[*]}"
if [[ $DRY -eq 1 ]]; then exit 0; fi
exec "${cmd[@]}"
