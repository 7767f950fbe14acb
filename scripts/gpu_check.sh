#!/usr/bin/env bash
# Build kadapt on the GPU machine, run the GPU tests and the benchmarks, results under $OUT.
#
# The GPU machine has torch/transformers/triton/nvcc but no network and may lack pytest: carry
# wheels in .wheels/ (made with `pip download -d .wheels --python-version 3.12 --only-binary=:all:
# --platform manylinux2014_x86_64 --platform any pytest hypothesis matplotlib`, numpy removed) and
# pass `carry: [".wheels"]`.
#
#   bash scripts/gpu_check.sh [stages]      stages: any of build test bench train attn attn_train
#                                           (default: build test bench)
#
#   attn (opt-in): benchmarks/inducer_attention.py, bf16, the issue-4 sweep (fused inducer vs SDPA,
#   FlexAttention + LSE, prefix via SDPA, the eager concat reference; d 64/128, L 512..4096, fwd and
#   fwd+bwd, time and peak memory), extra flags from $ATTN_ARGS (e.g. ATTN_ARGS="--d 64" to fit a
#   10-minute call: FlexAttention compiles once per (d, L)).
#   attn_train (opt-in): one AdamW step on GPT-2 small, bf16, batch 8 × 512, for full fine-tuning, LoRA,
#   kernel-mix, inducer, prefix and MAM (benchmarks/train_step.py).
#
# A fresh machine compiles every Triton specialisation the GPU tests reach (minutes) and the build
# takes ~1.5–2 min: within the 10-minute limit of one device call run `build` first, then `test`
# (TEST_TIMEOUT=560), `bench`, `attn` (ATTN_ARGS="--d 64", then "--d 128") and `attn_train` as separate
# calls on the same warm machine (the installed build is kept while it stays warm).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
OUT="${OUT:-/tmp/kadapt_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES="${*:-build test bench}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
has() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -d .wheels ] && ! "$PY" -c "import pytest, hypothesis, matplotlib" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links .wheels pytest hypothesis matplotlib 2>&1 | tail -2
fi
if has build; then
    start=$(date +%s)
    "$PY" -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -5 | tee "$OUT/build.txt"
    echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/build.txt"
    (cd / && "$PY" -m kadapt info) | tee "$OUT/info.txt"
fi

# GPU tests: every fused op and backend vs the reference in fp32/fp16/bf16, the CUDA kernels, the
# patched models. Run from / so that pytest imports the installed kadapt (with _C), not the source tree.
if has test; then
    start=$(date +%s)
    (cd / && KADAPT_REQUIRE_EXTENSION=1 timeout "${TEST_TIMEOUT:-450}" "$PY" -m pytest -q -p no:cacheprovider -rf \
        "$ROOT/tests/test_cuda_kernels.py" "$ROOT/tests/test_fused_adapter.py" "$ROOT/tests/test_phm.py" \
        "$ROOT/tests/test_ops.py" "$ROOT/tests/test_build.py" "$ROOT/tests/test_patch.py" \
        "$ROOT/tests/test_custom_ops.py" "$ROOT/tests/test_inducer_attention.py" \
        "$ROOT/tests/test_inducer_dropout.py" "$ROOT/tests/test_inducer_bias.py" \
        "$ROOT/tests/test_attention_methods.py" 2>&1) \
        | tail -40 | tee "$OUT/tests_gpu.txt"
    echo "test seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/tests_gpu.txt"
fi

# Fused adapter microbenchmark (bf16; the issue's shapes, every weight kind and provider).
if has bench; then
    (cd / && "$PY" "$ROOT/benchmarks/adapter.py" --device cuda --dtype bf16 --out "$OUT/results" ${BENCH_ARGS:-} 2>&1) \
        | tail -80 | tee "$OUT/adapter_bench.txt"
fi

# Inducer attention (issue 4), opt-in: fused inducer vs SDPA / FlexAttention+LSE / prefix-SDPA / eager, bf16.
if has attn; then
    (cd / && "$PY" "$ROOT/benchmarks/inducer_attention.py" --device cuda --dtype bf16 --out "$OUT/results" \
        ${ATTN_ARGS:-} 2>&1) | tail -120 | tee "$OUT/inducer_attention_bench.txt"
fi

# End-to-end training step, T5-base shapes, bf16: every method vs full fine-tuning.
if has train; then
    "$PY" benchmarks/train_step.py --family t5 --size base --device cuda --dtype bf16 --batch 32 --seq 128 \
        --out "$OUT" 2>&1 | tail -14 | tee "$OUT/train_step.txt"
fi

# End-to-end training step for the attention-side methods, GPT-2 small, bf16 (issue 4), opt-in.
if has attn_train; then
    "$PY" benchmarks/train_step.py --family gpt2 --size base --device cuda --dtype bf16 --batch 8 --seq 512 \
        --methods full_finetune lora kernel_mix inducer_tuning prefix_tuning mam --out "$OUT" 2>&1 | tail -10 \
        | tee "$OUT/train_step_attn.txt"
fi
