#!/usr/bin/env bash
# Every GPU check issue 4 asks for, in one run on a machine with one CUDA GPU (no internet, no model download):
#   1) the Triton kernel compiled for real against float64 (every config bucket, 7B shapes) and through generate,
#   2) the fused adapter-matmul vs cuBLAS at every Qwen2.5-7B projection shape, M = 1, 8, 64, 256, 4096,
#   3) sampler tokens/s at 1.5B and 7B shapes, batch 1/64/256, context ~1k, vs the bandwidth roofline, adapter on/off.
# Usage: bash dev/gpu_checks.sh [OUT_DIR]   (logs go to OUT_DIR, default ./gpu_checks; ~5-8 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python -m pytest -q tests/test_kernel.py -rs 2>&1 | tee "$out/test_kernel.txt"
timeout 300 python dev/bench_sample.py --what kernel 2>&1 | tee "$out/kernel.txt"
timeout 420 python dev/bench_sample.py --what sampler 2>&1 | tee "$out/sampler.txt"
