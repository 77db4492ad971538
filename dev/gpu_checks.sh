#!/usr/bin/env bash
# The one GPU check (dev/gpu_check.py): on one CUDA GPU with PyTorch + Triton only, no download, ~8 minutes on an H200
# (a 690 s budget for its five stages: real-size rehearsal, the kernel vs float64, the kernel vs cuBLAS, the sampler vs
# the HBM roofline, one GRPO step at the paper's GSM8K setup). Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
# Usage: bash dev/gpu_checks.sh [OUT_DIR]          (default ./gpu_checks)
# Dry run on CPU at tiny sizes (every stage end to end; figures meaningless): DRY=1 bash dev/gpu_checks.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_checks}"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TRITON_DEFAULT_FP_FUSION=1
if [ "${DRY:-0}" = 1 ]; then
    exec python dev/gpu_check.py --out "$out" --dry-run
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.txt" 2>&1 || true
exec python dev/gpu_check.py --out "$out"
