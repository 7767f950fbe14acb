#!/usr/bin/env bash
# Build kadapt on the GPU machine and run the GPU tests + benchmarks in one call, results in $OUT.
#
# The GPU machine has torch/transformers/triton/nvcc but no network and may lack pytest: carry
# pure-Python wheels in .wheels/ (made here with `pip download -d .wheels pytest pluggy iniconfig
# packaging hypothesis sortedcontainers attrs matplotlib ...`) and pass `carry: [".wheels"]`.
#
#   device run: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
OUT="${OUT:-/tmp/kadapt_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -d .wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .wheels pytest hypothesis matplotlib 2>&1 | tail -2
fi
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -5 | tee "$OUT/build.txt"
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/build.txt"
(cd / && "$PY" -m kadapt info) | tee "$OUT/info.txt"

# GPU tests: the CUDA kernel vs the reference (every dtype), and the whole CPU suite on this box.
# Run from / so that `python -m pytest` imports the installed kadapt (with _C), not the source tree.
(cd / && KADAPT_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests" 2>&1) \
    | tail -30 | tee "$OUT/tests_gpu.txt"

# End-to-end training step, T5-base shapes, bf16: every method vs full fine-tuning.
"$PY" benchmarks/train_step.py --family t5 --size base --device cuda --dtype bf16 --batch 32 --seq 128 \
    --out "$OUT" 2>&1 | tail -14 | tee "$OUT/train_step.txt"
