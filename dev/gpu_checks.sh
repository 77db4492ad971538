#!/usr/bin/env bash
# Every GPU check of the sampler in one run on a machine with one CUDA GPU (no internet, no model download):
#   1) tests/test_kernel.py: the Triton kernel compiled for real vs float64 (every config bucket, every s = x A
#      variant, 7B shapes incl. K = 18944) and generate with the kernel and with CUDA-graph decode vs the torch path,
#   2) generate with torch.compile(mode="reduce-overhead") decode vs the torch path (minutes of compiling),
#   3) the fused adapter-matmul (split / serial / fused s = x A) vs cuBLAS at every Qwen2.5-7B projection shape,
#   4) sampler tokens/s at 1.5B and 7B shapes, batch 1/64/256, context 1k and 4k, adapter off/on, eager (live) vs
#      CUDA-graph decode, as a fraction of the bandwidth floor (weights + live keys/values once a step).
# Usage: bash dev/gpu_checks.sh [OUT_DIR]   (logs go to OUT_DIR, default ./gpu_checks; ~8-10 minutes on an H200)
# Dry run on CPU (typos only): DRY=1 bash dev/gpu_checks.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_checks}"
mkdir -p "$out"
export TRITON_DEFAULT_FP_FUSION=1
if [ "${DRY:-0}" = 1 ]; then  # the same benchmark code at tiny sizes on CPU: the kernel under the interpreter
    TRITON_INTERPRET=1 timeout 600 python dev/bench_sample.py --what kernel --device cpu --M 1 20 2>&1 | tee "$out/kernel.txt"
    timeout 600 python dev/bench_sample.py --what sampler --device cpu --sizes tiny --contexts 40 300 \
        --batch-sizes 1 8 --decodes live static --steps 8 2>&1 | tee "$out/sampler.txt"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python -m pytest -q tests/test_kernel.py -rs 2>&1 | tee "$out/test_kernel.txt"
timeout 300 python tests/test_kernel.py gpu-compile 2>&1 | tail -20 | tee "$out/compile.txt"
timeout 300 python dev/bench_sample.py --what kernel 2>&1 | tee "$out/kernel.txt"
timeout 480 python dev/bench_sample.py --what sampler 2>&1 | tee "$out/sampler.txt"
