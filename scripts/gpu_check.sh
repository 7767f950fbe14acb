#!/usr/bin/env bash
# gpu_check.sh: prove every kadapt kernel on the GPU machine in ONE device call (<= 9 minutes on a fresh H200,
# build included): build + install, a bounded GPU correctness sweep, the microbenchmarks at the issue's target
# shapes, an end-to-end training step. Writes $OUT/summary.md, complete after every stage (see Output).
#
# Usage
#   bash scripts/gpu_check.sh                        # default stages: build tune test bench attn fastfood said train
#   bash scripts/gpu_check.sh test_full attn_full    # any stages, in the order given (e.g. a second call)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh    # the same stages on the CPU, tiny shapes (~2-4 min on 2 cores)
# Device call: run(command="bash scripts/gpu_check.sh", timeout_s=600); read $OUT/summary.md (also printed
# at the end). A second call on the still-warm machine keeps the installed build and Triton's kernel cache:
# run it without `build`, e.g. `GPU_CHECK_BUDGET=570 bash scripts/gpu_check.sh test_full`.
#
# Default stages, in order. cap = the stage's timeout (env knob); [expected on a fresh H200; none measured yet]
#   build  cap 240 s BUILD_TIMEOUT  [~2 min] `pip install --no-build-isolation --no-deps .` (TORCH_CUDA_ARCH_LIST
#          9.0, MAX_JOBS 16), then `python -m kadapt info` from /. FAIL unless kadapt._C is built, a CUDA device
#          is visible and both fused backends (triton, cuda) are available. Meanwhile the prewarm
#          (TEST_PREWARM=1, PREWARM_JOBS=6 workers) runs the test units below from the SOURCE tree (no _C;
#          results discarded; logs in prewarm/) only to fill Triton's on-disk kernel cache, which the test
#          stage then hits (its key is the kernel's source, not its path): nvcc leaves most cores idle, and each
#          cold Triton specialisation costs ~2.5 s; the sweep below needs several hundred. Stopped after `info`.
#          Likewise the tune prewarm (TUNE_PREWARM=1): `scripts/tune_triton.py --check-only` (TUNE_PREWARM_JOBS=4
#          processes, from the source tree) compiles and checks the tune stage's candidates, recording the results
#          (the tune stage reuses them) and filling Triton's cache; log in prewarm/tune.log.
#   tune   cap  45 s TUNE_TIMEOUT   [~25 s after the prewarm; ~50 s cold, cut at the cap: the finished kernels
#          are kept, attention first] scripts/tune_triton.py --install: the launch configuration (tiles, warps,
#          stages) of every tuned Triton kernel, chosen among <= 8 candidates (each checked against the reference
#          first; the default is one) by CUDA-graph timing at the issue's target shapes (bf16; inducer attention
#          B=8 H=16 d=64 L 1024 and 4096: forward, dK/dV and dQ kernels; fused adapter T=8192 D=1024 m=64: dense
#          and low-rank kernels, Kronecker weight build and factor gradients of PHM and Compacter). The table goes
#          to tuning/<arch>.json (commit it as kadapt/ops/tuning_tables/<arch>.json) and into the installed kadapt,
#          so the stages after this one run the tuned configs; it is rewritten after every kernel.
#   test   cap  80 s TEST_TIMEOUT   [= its cap; the cap is 120 s in a dry run, which collects every unit file]
#          the bounded correctness sweep: pytest "units" (a test file and a -k selection, TEST_UNITS below)
#          taken in priority order from a queue by TEST_JOBS=8 parallel workers
#          (Triton compiles on the CPU, one core per process), each `python -m pytest -q -rfE` from / against
#          the installed package, KADAPT_REQUIRE_EXTENSION=1, no -x, --timeout=TEST_CASE_TIMEOUT (120 s) per
#          test when pytest-timeout is installed, TORCHINDUCTOR_COMPILE_THREADS=1. A file not (yet) in the tree
#          is listed as missing. The random-configuration sweeps run chunk 0 only (24-25 configurations per
#          backend and dtype; every chunk would compile far more Triton specialisations than fit); the CUDA
#          backend (prebuilt, nothing to compile) runs every chunk. Priority: CUDA kernels (test_cuda_kernels);
#          Triton bf16 of fused_adapter, inducer_attention, phm; test_build, test_ops, test_custom_ops,
#          test_op_autocast; the CUDA Fastfood tests; the rest of those op files (dispatch, bad inputs,
#          torch.compile, CUDA chunks); the rest of test_fastfood;
#          test_inducer_gqa, _dropout, _bias (chunk 0); Triton fp32, then fp16; the model-level GPU tests
#          (Triton/compile in test_attention_methods, test_patch, test_llama); test_mixed_precision and
#          test_conformance (CPU-only tests) last. Units still queued at the cap are reported NOT RUN, an
#          interrupted one TIMEOUT with pytest's summary of what it ran.
#   bench  cap  85 s BENCH_TIMEOUT  [~1.5 min] the copy bandwidth, measured here (benchmarks/adapter.py does not
#          measure one; its --bandwidth default 2.96e12 is the H100's): y.copy_(x), 1 GiB fp32, bytes read +
#          written, median of 20 (CUDA events); then benchmarks/adapter.py --device cuda --dtype bf16 --shapes
#          8192x1024 --m 64 --kinds dense lowrank phm compacter (every provider) --bandwidth <measured>.
#   attn   cap  95 s ATTN_TIMEOUT   [~2 min: the last lengths may be cut] benchmarks/inducer_attention.py
#          --device cuda --dtype bf16 --d 64 --L 512 1024 2048 4096 --B 8 --H 16 (causal, every provider;
#          FlexAttention compiles once per L).
#   fastfood cap 55 s FASTFOOD_TIMEOUT [~45 s] benchmarks/fastfood.py --device cuda --reps 3: the Fastfood
#          transform over every T5-base tensor (K 257, ΣL 388 M, d_z 19,742), forward and backward, providers
#          triton cuda peer reference; the copy of ΣL fp32 timed in the same run gives the floor (issue 11).
#   said   cap  45 s SAID_TIMEOUT   [~30 s] benchmarks/train_step.py --said --warmup 1 --steps 3: one AdamW step
#          of T5-base (bf16 autocast, 32 x 128 -> 8): floor, full fine-tuning, LoRA, Intrinsic-SAID (d_I 20,000);
#          time and peak memory, issue 11's targets (SAID <= 1.3x LoRA time, <= full FT peak memory).
#   train  cap  40 s TRAIN_TIMEOUT  [the later methods are cut: train_full has them all] benchmarks/train_step.py --models
#          gpt2-medium --warmup 1 --steps 3 (bf16 autocast, 8 x 512): floor, full_finetune, then kadapt's LoRA,
#          prefix and prompt tuning each beside peft's (when peft imports), then every other kadapt method
#          (TRAIN_METHODS, comma list, replaces the list). The CSV is rewritten after every method and SIGINT
#          prints the table of those that finished: a timeout keeps them.
# Time budget: GPU_CHECK_BUDGET=525 s for the whole call. A stage's timeout is min(its cap, the budget left
# minus GPU_CHECK_RESERVE=20 s per later stage); a stage left with less than min(cap, 15 s) is SKIP (budget
# exhausted). At the deadline a command gets SIGINT (pytest prints its summary, the benchmarks keep their
# CSVs), SIGKILL 8 s later: the call ends by ~535 s < 9 min whatever hangs. Expected: ~5 s preamble + ~120
# build + ~25 tune + 80 test + ~85 bench + ~95 attn + ~45 fastfood + ~30 said + ~40 train ~= 525 s (correctness
# first: test keeps 80 s; train, 40 s, keeps the floor, full fine-tuning and the LoRA/prefix/prompt pairs with peft): whichever stage runs late squeezes the ones
# after it (their results so far are kept), never the 9 minutes.

# Opt-in stages (a second call; each is still bounded by GPU_CHECK_BUDGET, so raise it to ~570 for one long
# stage in a 600 s call):
#   test_full   cap 560 s TEST_FULL_TIMEOUT   every unit file whole: every chunk, dtype and backend.
#   bench_full  cap 300 s BENCH_FULL_TIMEOUT  adapter.py's default sweep (3 shapes x m 24, 64), to results_full/.
#   attn_full   cap 560 s ATTN_FULL_TIMEOUT   inducer_attention.py's default sweep (d 64 and 128), results_full/.
#   attn_train  cap 240 s ATTN_TRAIN_TIMEOUT  GPT-2 small, bf16, 8 x 512: full_finetune lora kernel_mix
#                                             inducer_tuning prefix_tuning mam.
#   train_t5    cap 240 s TRAIN_T5_TIMEOUT    T5-base, bf16 autocast, 32 x 128 -> 8, every method.
#   fastfood_full cap 180 s FASTFOOD_FULL_TIMEOUT  fastfood.py at T5-base, every provider, --reps 20, to results_full/.
#   said_full   cap 150 s SAID_FULL_TIMEOUT   train_step.py --said --warmup 2 --steps 10, to results_full/.
#   train_full  cap 560 s TRAIN_FULL_TIMEOUT  train_step.py: GPT-2-medium, RoBERTa-base, T5-base and Llama-3.2-1B-
#                                             shaped, every method, peft peers and the floor (--warmup 2 --steps 5),
#                                             to results_full/ (TRAIN_FULL_ARGS appended, e.g. "--models llama-3.2-1b").
#
# Other env knobs
#   OUT (/tmp/kadapt_gpu; the device tool sets it), PYTHON (python3; the CI test passes sys.executable),
#   TEST_JOBS (8; dry run 2), TEST_ARGS (extra pytest args for every unit, e.g. "-n 2" with pytest-xdist
#   carried in .wheels), TEST_CASE_TIMEOUT (120), TEST_UNITS_FILE (lines "label|test_file.py|-k expression"
#   replacing TEST_UNITS; an empty expression runs the whole file), TEST_PREWARM (1; 0 = off), PREWARM_JOBS
#   (6), TORCHINDUCTOR_COMPILE_THREADS (1 in the test workers), BENCH_BANDWIDTH (B/s: use it, measure
#   nothing), BENCH_ARGS, ATTN_ARGS, FASTFOOD_ARGS, SAID_ARGS, TRAIN_ARGS, TRAIN_FULL_ARGS (flags appended to the
#   benchmark's command line: the last occurrence wins, e.g. ATTN_ARGS="--providers sdpa triton cuda"),
#   TRAIN_METHODS (comma list), TUNE_JOBS (8; dry run 1: the tune stage's check processes), TUNE_PREWARM (1;
#   0 = off), TUNE_PREWARM_JOBS (4; dry run 1), TUNE_ARGS (appended to tune_triton.py's command line, e.g.
#   "--kernels inducer_attention_fwd"),
#   CUDA_HOME (/usr/local/cuda), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16).
#
# Dry run (GPU_CHECK_DRY_RUN=1; tests/integration/test_gpu_check.py runs it in CI): every requested stage on the CPU,
# to test this script, not kadapt. CUDA_VISIBLE_DEVICES="" and TRITON_INTERPRET=1 (Triton in its
# interpreter); nvidia-smi may be absent. build: NOTHING is built or installed (no pip, no .wheels):
# `python -m kadapt info` of the current environment; the prewarm runs `sleep 60` stand-ins, stopped after
# info (the start/stop path), as does the tune prewarm (tune_triton.py --dry-run --check-only). tune:
# tune_triton.py --dry-run from the source tree (Triton's interpreter, tiny fp32 shapes, one bucket per kernel, 2
# candidates; the table is written to tuning/cpu.json, never installed). test: collection only (pytest --co), because the units would take many minutes
# in the interpreter and the GPU-only tests skip on a CPU anyway: units 0-1 (DRY_TEST_UNITS=2) through the
# GPU run's queue/worker/timeout path, and every unit's -k applied by pytest's own matcher to ONE collection
# of all unit files (~25 pytest start-ups would take minutes on 2 cores); a unit whose -k selects nothing
# (a renamed test would silently leave the GPU sweep) or whose file does not collect fails. bench/attn/
# fastfood/said/train: the same scripts at tiny shapes in fp32 (adapter --quick; attention --quick --L 24;
# fastfood --tiny: 4 small tensors; train_step --tiny: 2-layer models, batch 2 x 8, one step), the
# providers/methods that run on a CPU; the cuda provider, torch.compile and FlexAttention are skipped with
# the reason in the summary.
#
# Output under $OUT: summary.md: a header, a table of every requested stage (status, seconds, timeout, note),
# then one section per finished stage (key lines, tables, failures); rewritten atomically at each stage's
# start and end, so it is complete if the call is killed (that stage then shows RUNNING, later ones PENDING).
# Status: PASS, FAIL, TIMEOUT, FAIL+TIMEOUT (test), SKIP. Full logs: <stage>.log (+ <stage>.err for the
# benchmarks), tests/<stage>/<nn>_<unit>.log, prewarm/, info.txt, gpu.txt, copy_bandwidth.txt, tuning/ (the
# table <arch>.json, summary.md, checks.jsonl); benchmark
# CSV/PNG/targets under results/ (results_full/ for the *_full stages). Exit status: 0 when every stage
# passed, 1 otherwise, 2 for an unknown stage.
#
# The GPU machine has torch, transformers, triton, nvcc, pytest, pytest-timeout, hypothesis, matplotlib
# and no network. A missing package travels as wheels in .wheels/ (`pip download -d .wheels --python-version
# 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform any pytest hypothesis matplotlib`,
# numpy removed) passed with `carry: [".wheels"]`; they are installed only when pytest, hypothesis or
# matplotlib fail to import, never in a dry run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
T0=$(date +%s)
PY="${PYTHON:-python3}"
DRY=0
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && DRY=1
BUDGET="${GPU_CHECK_BUDGET:-525}"
RESERVE="${GPU_CHECK_RESERVE:-20}"
MIN_STAGE=15
KILL_GRACE=8

DEFAULT_STAGES="build tune test bench attn fastfood said train"
OPTIONAL_STAGES="test_full bench_full attn_full attn_train train_t5 fastfood_full said_full train_full"
declare -A CAP=(
    [build]="${BUILD_TIMEOUT:-240}" [tune]="${TUNE_TIMEOUT:-45}" [test]="${TEST_TIMEOUT:-$(( DRY ? 120 : 80 ))}"
    [bench]="${BENCH_TIMEOUT:-85}"
    [attn]="${ATTN_TIMEOUT:-95}" [fastfood]="${FASTFOOD_TIMEOUT:-55}" [said]="${SAID_TIMEOUT:-45}"
    [train]="${TRAIN_TIMEOUT:-40}"
    [fastfood_full]="${FASTFOOD_FULL_TIMEOUT:-180}" [said_full]="${SAID_FULL_TIMEOUT:-150}"
    [train_full]="${TRAIN_FULL_TIMEOUT:-560}"
    [test_full]="${TEST_FULL_TIMEOUT:-560}" [bench_full]="${BENCH_FULL_TIMEOUT:-300}"
    [attn_full]="${ATTN_FULL_TIMEOUT:-560}" [attn_train]="${ATTN_TRAIN_TIMEOUT:-240}"
    [train_t5]="${TRAIN_T5_TIMEOUT:-240}")
declare -A WHAT=(
    [build]="build + kadapt info" [tune]="Triton launch configs: sweep -> table" [test]="GPU correctness sweep (bounded)" [bench]="copy bandwidth + fused adapter, target shape"
    [attn]="inducer attention, d=64, target shapes" [fastfood]="Fastfood transform, T5-base"
    [said]="training step, T5-base: SAID vs LoRA vs full" [train]="training step, GPT-2-medium, every method"
    [fastfood_full]="Fastfood transform, T5-base, 20 reps" [said_full]="SAID vs LoRA vs full, 10 steps"
    [train_full]="training step, 4 models, every method"
    [test_full]="every GPU test, whole files" [bench_full]="fused adapter, full sweep"
    [attn_full]="inducer attention, full sweep" [attn_train]="training step, attention methods"
    [train_t5]="training step, T5-base")

if [ $# -gt 0 ]; then STAGES=("$@"); else read -r -a STAGES <<< "$DEFAULT_STAGES"; fi
for s in "${STAGES[@]}"; do
    if [[ " $DEFAULT_STAGES $OPTIONAL_STAGES " != *" $s "* ]]; then
        echo "gpu_check.sh: unknown stage '$s'; stages: $DEFAULT_STAGES (default), $OPTIONAL_STAGES" >&2
        exit 2
    fi
done
has() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }
KNOBS=""  # the env knobs set by the caller (for the summary's header)
for v in GPU_CHECK_BUDGET GPU_CHECK_RESERVE BUILD_TIMEOUT TEST_TIMEOUT BENCH_TIMEOUT ATTN_TIMEOUT TRAIN_TIMEOUT \
         TEST_FULL_TIMEOUT BENCH_FULL_TIMEOUT ATTN_FULL_TIMEOUT ATTN_TRAIN_TIMEOUT TRAIN_T5_TIMEOUT TEST_JOBS \
         FASTFOOD_TIMEOUT SAID_TIMEOUT FASTFOOD_FULL_TIMEOUT SAID_FULL_TIMEOUT TRAIN_FULL_TIMEOUT \
         TEST_ARGS TEST_CASE_TIMEOUT TEST_UNITS_FILE TEST_PREWARM PREWARM_JOBS DRY_TEST_UNITS BENCH_BANDWIDTH \
         BENCH_ARGS ATTN_ARGS FASTFOOD_ARGS SAID_ARGS TRAIN_ARGS TRAIN_FULL_ARGS TRAIN_METHODS \
         TUNE_TIMEOUT TUNE_JOBS TUNE_PREWARM TUNE_PREWARM_JOBS TUNE_ARGS; do
    [ -n "${!v+x}" ] && KNOBS+=" $v=${!v}"
done

OUT="${OUT:-/tmp/kadapt_gpu}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    TEST_JOBS="${TEST_JOBS:-2}"
    PREWARM_JOBS="${PREWARM_JOBS:-1}"
    TUNE_JOBS="${TUNE_JOBS:-1}"
    TUNE_PREWARM_JOBS="${TUNE_PREWARM_JOBS:-1}"
else
    TEST_JOBS="${TEST_JOBS:-8}"
    PREWARM_JOBS="${PREWARM_JOBS:-6}"
    TUNE_JOBS="${TUNE_JOBS:-8}"
    TUNE_PREWARM_JOBS="${TUNE_PREWARM_JOBS:-4}"
fi
TEST_CASE_TIMEOUT="${TEST_CASE_TIMEOUT:-120}"
# parallel pytest workers: inductor compiles in-process (no pool of cpu_count compile workers per pytest)
INDUCTOR_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-1}"

SD="$OUT/.summary"
rm -rf "$SD" "$OUT/tests" "$OUT/prewarm" "$OUT/tuning"
mkdir -p "$SD/bin" "$OUT/tests"
SUM="$OUT/summary.md"

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu_check +$(elapsed)s] $*"; }

# ---------------------------------------------------------------------------------------------------------
# helper programs (written here so the script stays one file)

cat > "$SD/bin/copybw.py" <<'PYEOF'
"""Device copy bandwidth: y.copy_(x) of N MiB fp32, bytes read + written / time (median)."""
import statistics
import sys
import time

import torch

dev, mib = sys.argv[1], int(sys.argv[2])
n = mib * 2**20 // 4
x = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
times = []
if dev == "cuda":
    torch.cuda.synchronize()
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    name = torch.cuda.get_device_name()
else:
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t)
    name = "cpu"
bw = 2 * n * 4 / statistics.median(times)
print(f"copy bandwidth: {bw / 1e12:.3f} TB/s ({bw:.4g} B/s) on {name}: y.copy_(x), {mib} MiB fp32, "
      f"bytes read + written, median of {len(times)}")
print(f"{bw:.6g}")
PYEOF

cat > "$SD/bin/csv2md.py" <<'PYEOF'
"""csv2md.py FILE COL,COL,... [MAX_ROWS]: the named columns (those present) of a CSV as a markdown table."""
import csv
import sys

path, cols = sys.argv[1], sys.argv[2].split(",")
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 80
with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
if not rows:
    print(f"({path}: no rows)")
    sys.exit(0)
cols = [c for c in cols if c in rows[0]]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows[:limit]:
    print("| " + " | ".join(str(r.get(c, "")).replace("|", "/").replace("\n", " ")[:80] for c in cols) + " |")
if len(rows) > limit:
    print(f"\n({len(rows) - limit} more rows in {path})")
PYEOF

cat > "$SD/bin/gpu_check_unitsel.py" <<'PYEOF'
"""pytest plugin (dry run): one collection of every unit file; for each unit ($GPU_CHECK_QUEUE/units, lines
"label|file|-k expression") the number of tests its -k selects, by pytest's own -k matcher, written as
$GPU_CHECK_QUEUE/sel_<n> ("n|label|file|k|rc|0": rc 0 selected some, 5 none, 2 the file did not collect) and
$GPU_CHECK_LOGDIR/<nn>_<label>.log."""
import os

from _pytest.mark import KeywordMatcher
from _pytest.mark.expression import Expression

QUEUE, LOGDIR = os.environ["GPU_CHECK_QUEUE"], os.environ["GPU_CHECK_LOGDIR"]
BROKEN = set()


def pytest_collectreport(report):
    if report.failed:
        BROKEN.add(os.path.basename(report.nodeid.split("::")[0]))


def pytest_collection_modifyitems(session, config, items):
    by_file = {}
    for item in items:
        by_file.setdefault(os.path.basename(str(item.path)), []).append(item)
    with open(f"{QUEUE}/units") as f:
        units = [line.rstrip("\n").split("|") for line in f if line.strip()]
    for n, (label, file, k) in enumerate(units):
        tests = by_file.get(os.path.basename(file), [])  # units name tests/<layer>/<file>; basenames are unique
        if os.path.basename(file) in BROKEN:
            rc, line = 2, f"{file}: collection error (collect.log)"
        else:
            chosen = tests
            if k:
                expr = Expression.compile(k)
                chosen = [t for t in tests if expr.evaluate(KeywordMatcher.from_item(t))]
            rc, line = (0 if chosen else 5), f"{len(chosen)}/{len(tests)} tests selected (one collection: collect.log)"
        with open(f"{QUEUE}/sel_{n}", "w") as f:
            f.write(f"{n}|{label}|{file}|{k}|{rc}|0\n")
        log = f"{LOGDIR}/{n:02d}_{label}.log"
        if not os.path.exists(log):  # else a worker runs this unit (it wrote its log's first line at its start)
            with open(log, "w") as f:
                f.write(f"# {file} -k '{k}'\n{line}\n")
PYEOF

# ---------------------------------------------------------------------------------------------------------
# summary: $SD/status_<NN> = "name<TAB>status<TAB>seconds<TAB>timeout<TAB>note", $SD/sec_<NN>.md = its section

regen() {
    local f n st secs tmo note
    {
        cat "$SD/header.md"
        echo "| # | stage | what | status | seconds | timeout | note |"
        echo "|---|---|---|---|---|---|---|"
        for f in "$SD"/status_*; do
            [ -f "$f" ] || continue
            IFS=$'\t' read -r n st secs tmo note < "$f"
            echo "| ${f##*_} | $n | ${WHAT[$n]} | **$st** | $secs | $tmo | $note |"
        done
        echo
        for f in "$SD"/sec_*.md; do
            [ -f "$f" ] && cat "$f" && echo
        done
    } > "$SUM.tmp" && mv -f "$SUM.tmp" "$SUM"
}
set_status() {  # idx name status seconds timeout note
    printf '%s\t%s\t%s\t%s\t%s\n' "$2" "$3" "$4" "$5" "$6" > "$SD/status_$1"
}
sec() { printf '%s\n' "$@" >> "$SEC"; }              # lines of the current stage's section
sec_code() {                                           # sec_code FILE [TAIL_LINES]: a file (tail) as code
    local f=$1 n=${2:-0}
    [ -s "$f" ] || { sec "($(basename "$f"): empty)"; return; }
    echo '```' >> "$SEC"
    if [ "$n" -gt 0 ]; then tail -n "$n" "$f" >> "$SEC"; else cat "$f" >> "$SEC"; fi
    echo '```' >> "$SEC"
}

# bounded LOG CMD...: run CMD (stdout and stderr appended to LOG; stderr to $ERRLOG instead when set) until
# the stage's deadline: SIGINT then (pytest prints its summary, the benchmarks keep their CSV), SIGKILL
# KILL_GRACE s later. Returns CMD's status, 124 (or 137) when it timed out.
bounded() {
    local log=$1; shift
    local left=$(( STAGE_END - $(date +%s) ))
    if (( left < 3 )); then
        echo "gpu_check: not started, the stage's time is up" >> "$log"
        return 124
    fi
    timeout -s INT -k "$KILL_GRACE" "$left" "$@" >> "$log" 2>> "${ERRLOG:-$log}"
}

# ---------------------------------------------------------------------------------------------------------
# test units: "label|file|-k expression" (empty expression: the whole file), in priority order

TEST_UNITS=(
    "cuda_kernels|ops/test_cuda_kernels.py|"
    "fused_adapter.triton.bf16|ops/test_fused_adapter.py|[triton-bf16-0]"
    "inducer_attention.triton.bf16|ops/test_inducer_attention.py|[triton-bf16-0]"
    "phm.triton.bf16|ops/test_phm.py|[triton-bf16-0]"
    "build|integration/test_build.py|"
    "ops|ops/test_ops.py|"
    "custom_ops|ops/test_custom_ops.py|"
    "op_autocast|ops/test_op_autocast.py|"
    "fastfood.cuda|ops/test_fastfood.py|cuda"
    "fused_adapter.rest|ops/test_fused_adapter.py|not random_configs or [cuda- or [reference-bf16-0]"
    "inducer_attention.rest|ops/test_inducer_attention.py|not random_configs or [reference-bf16-0]"
    "phm.rest|ops/test_phm.py|not random_configs or [cuda- or [reference-bf16-0]"
    "inducer_gqa|ops/test_inducer_gqa.py|not kernels_match_reference or [0]"
    "inducer_dropout|ops/test_inducer_dropout.py|not random_configs or [0]"
    "inducer_bias|ops/test_inducer_bias.py|not random_configs or [0]"
    "fastfood.rest|ops/test_fastfood.py|not cuda"
    "fused_adapter.triton.fp32|ops/test_fused_adapter.py|[triton-fp32-0]"
    "inducer_attention.triton.fp32|ops/test_inducer_attention.py|[triton-fp32-0]"
    "phm.triton.fp32|ops/test_phm.py|[triton-fp32-0]"
    "fused_adapter.triton.fp16|ops/test_fused_adapter.py|[triton-fp16-0]"
    "inducer_attention.triton.fp16|ops/test_inducer_attention.py|[triton-fp16-0]"
    "phm.triton.fp16|ops/test_phm.py|[triton-fp16-0]"
    "attention_methods|methods/test_attention_methods.py|triton or compile or fused"
    "patch|integration/test_patch.py|compile"
    "llama|methods/test_llama.py|triton or compile"
    "mixed_precision|integration/test_mixed_precision.py|"
    "conformance|integration/test_conformance.py|"
)
if [ -n "${TEST_UNITS_FILE:-}" ]; then
    mapfile -t TEST_UNITS < <(grep -v '^[[:space:]]*\(#\|$\)' "$TEST_UNITS_FILE")
fi

# make_queue DIR full|bounded: the unit lines of the files that exist; prints the missing files
make_queue() {
    local q=$1 mode=$2 u label file k
    mkdir -p "$q"
    : > "$q/units"
    declare -A seen=()
    for u in "${TEST_UNITS[@]}"; do
        IFS='|' read -r label file k <<< "$u"
        file="${file#tests/}"
        if [ ! -f "$ROOT/tests/$file" ]; then
            [ -z "${seen[$file]:-}" ] && echo "$file"
            seen[$file]=1
            continue
        fi
        if [ "$mode" = full ]; then
            [ -n "${seen[$file]:-}" ] && continue
            seen[$file]=1
            printf '%s|%s|\n' "${file%.py}" "$file" >> "$q/units"
        else
            printf '%s|%s|%s\n' "$label" "$file" "$k" >> "$q/units"
        fi
    done
    echo 0 > "$q/next"
}
next_unit() {  # atomically take the next unit index of queue $1
    local q=$1 n
    until mkdir "$q/lock" 2>/dev/null; do sleep 0.05; done
    n=$(cat "$q/next")
    echo $(( n + 1 )) > "$q/next"
    rmdir "$q/lock"
    echo "$n"
}
# worker Q LOGDIR EXTRA_ENV...: take units until the first UNIT_LIMIT (default all) are taken, the stage's
# time is up or Q/stop exists. UNIT_RUNNER=pytest (default) or sleep (the dry run's prewarm: tests the stop path).
worker() {
    local q=$1 logdir=$2; shift 2
    local total n label file k ulog s rc cmd
    total=$(wc -l < "$q/units")
    (( ${UNIT_LIMIT:-total} < total )) && total=$UNIT_LIMIT
    while [ ! -e "$q/stop" ]; do
        n=$(next_unit "$q")
        (( n >= total )) && break
        IFS='|' read -r label file k < <(sed -n "$(( n + 1 ))p" "$q/units")
        ulog="$logdir/$(printf '%02d' "$n")_$label.log"
        s=$(date +%s)
        if (( STAGE_END - s < 3 )) || [ -e "$q/stop" ]; then
            printf '%s|%s|%s|%s|%s|%s\n' "$n" "$label" "$file" "$k" "NOT RUN" "0" > "$q/res_$n"
            continue
        fi
        echo "# $file -k '$k'" > "$ulog"
        if [ "${UNIT_RUNNER:-pytest}" = sleep ]; then
            cmd=(sleep 60)
        else
            # shellcheck disable=SC2206
            cmd=("$PY" -m pytest -q -p no:cacheprovider -rfE "${PYTEST_EXTRA[@]}" "$ROOT/tests/$file" ${TEST_ARGS:-})
            [ -n "$k" ] && cmd+=(-k "$k")
        fi
        # from / (pytest must import the installed kadapt); exec: $! is timeout's pid, for stop_workers
        (cd / && exec env "$@" timeout -s INT -k "$KILL_GRACE" $(( STAGE_END - s )) "${cmd[@]}" >> "$ulog" 2>&1) &
        echo $! > "$q/pid_$BASHPID"
        wait $!
        rc=$?
        rm -f "$q/pid_$BASHPID"
        printf '%s|%s|%s|%s|%s|%s\n' "$n" "$label" "$file" "$k" "$rc" "$(( $(date +%s) - s ))" > "$q/res_$n"
    done
}
start_workers() {  # Q LOGDIR JOBS EXTRA_ENV...: workers in the background, their pids in WORKER_PIDS
    local q=$1 logdir=$2 jobs=$3 i; shift 3
    WORKER_PIDS=()
    for (( i = 0; i < jobs; i++ )); do
        worker "$q" "$logdir" "$@" &
        WORKER_PIDS+=($!)
    done
}
stop_workers() {  # Q: no new units; interrupt the running ones (SIGINT to their timeout, which forwards it)
    local q=$1 f
    touch "$q/stop"
    for f in "$q"/pid_*; do
        [ -f "$f" ] && kill -INT "$(cat "$f")" 2>/dev/null
    done
    wait "${WORKER_PIDS[@]}" 2>/dev/null
}
unit_status() {  # rc -> status
    case $1 in
        0) echo PASS ;; 1) echo FAIL ;; 5) echo "NONE SELECTED" ;; 124|137) echo TIMEOUT ;; 130) echo STOPPED ;;
        "NOT RUN") echo "NOT RUN" ;; *) echo "ERROR (rc $1)" ;;
    esac
}

PREWARM_Q=""
prewarm_start() {
    [ "${TEST_PREWARM:-1}" = 1 ] || return 0
    local mode
    if has test; then mode=bounded; elif has test_full; then mode=full; else return 0; fi
    PREWARM_Q="$SD/prewarm_q"
    mkdir -p "$OUT/prewarm"
    make_queue "$PREWARM_Q" "$mode" > /dev/null
    PYTEST_EXTRA=()
    # dry run: a `sleep 60` per unit instead of pytest, stopped with the build: tests the start/stop path only
    local runner=pytest
    [ "$DRY" = 1 ] && runner=sleep
    # the source tree (pip has not installed kadapt yet): only Triton's cache matters, CUDA tests skip
    UNIT_RUNNER=$runner start_workers "$PREWARM_Q" "$OUT/prewarm" "$PREWARM_JOBS" "PYTHONPATH=$ROOT" \
        "KADAPT_REQUIRE_EXTENSION=0" "TORCHINDUCTOR_COMPILE_THREADS=$INDUCTOR_THREADS"
    PREWARM_PIDS=("${WORKER_PIDS[@]}")
    log "prewarm: $PREWARM_JOBS workers filling Triton's cache from the source tree ($runner)"
}
prewarm_stop() {
    [ -n "$PREWARM_Q" ] || return 0
    WORKER_PIDS=("${PREWARM_PIDS[@]}")
    stop_workers "$PREWARM_Q"
    local done_units
    done_units=$(grep -l -E '\|(0|1)\|[0-9]+$' "$PREWARM_Q"/res_* 2>/dev/null | wc -l)
    local stopped
    stopped=$(( $(ls "$PREWARM_Q"/res_* 2>/dev/null | wc -l) - done_units ))
    sec "" "Prewarm (Triton cache from the source tree, during the build): $PREWARM_JOBS workers, $done_units of \
$(wc -l < "$PREWARM_Q/units") units completed, $stopped stopped when the build finished; logs in prewarm/."
    PREWARM_Q=""
}

# the tune prewarm: tune_triton.py --check-only in the background during the build (from the source tree), its
# results recorded in $TUNE_CHECKS for the tune stage; stopped (SIGINT to its timeout, which passes it to the
# process group: the check processes too) after `info`
TUNE_CHECKS="$OUT/tuning/checks.jsonl"
TUNE_PREWARM_PID=""
tune_prewarm_start() {
    [ "${TUNE_PREWARM:-1}" = 1 ] && has tune || return 0
    local dry=()
    [ "$DRY" = 1 ] && dry=(--dry-run)
    mkdir -p "$OUT/prewarm" "$OUT/tuning"
    (cd "$ROOT" && exec env PYTHONPATH="$ROOT" timeout -s INT -k "$KILL_GRACE" $(( STAGE_END - $(date +%s) )) \
        "$PY" "$ROOT/scripts/tune_triton.py" --check-only --jobs "$TUNE_PREWARM_JOBS" --checks "$TUNE_CHECKS" \
        "${dry[@]}" > "$OUT/prewarm/tune.log" 2>&1) &
    TUNE_PREWARM_PID=$!
    log "tune prewarm: tune_triton.py --check-only, $TUNE_PREWARM_JOBS processes, from the source tree"
}
tune_prewarm_stop() {
    [ -n "$TUNE_PREWARM_PID" ] || return 0
    kill -INT "$TUNE_PREWARM_PID" 2>/dev/null
    wait "$TUNE_PREWARM_PID" 2>/dev/null
    TUNE_PREWARM_PID=""
    local n
    n=$(grep -c . "$TUNE_CHECKS" 2>/dev/null)
    sec "" "Tune prewarm (tune_triton.py --check-only from the source tree, during the build): ${n:-0} candidate \
checks recorded for the tune stage; log in prewarm/tune.log."
}

# ---------------------------------------------------------------------------------------------------------
# stages: each writes its section with sec/sec_code and returns 0 (pass) or not; STAGE_TIMEDOUT=1 on timeout

stage_build() {
    local rc=0 s
    if [ "$DRY" = 1 ]; then
        sec "Dry run: nothing is built or installed; \`python -m kadapt info\` of the current environment ($PY)."
        prewarm_start
        tune_prewarm_start
    else
        prewarm_start
        tune_prewarm_start
        s=$(date +%s)
        (cd "$ROOT" && bounded "$LOG" "$PY" -m pip install --no-build-isolation --no-deps "$ROOT")
        rc=$?
        (( rc == 124 || rc == 137 )) && STAGE_TIMEDOUT=1
        sec "pip install --no-build-isolation --no-deps . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS): \
rc $rc, $(( $(date +%s) - s )) s"
        sec_code "$LOG" 8
    fi
    : > "$OUT/info.txt"
    (cd / && bounded "$OUT/info.txt" "$PY" -m kadapt info)
    local irc=$?
    (( irc == 124 || irc == 137 )) && STAGE_TIMEDOUT=1
    prewarm_stop
    tune_prewarm_stop
    sec "" "\`python -m kadapt info\` (from /): rc $irc"
    sec_code "$OUT/info.txt"
    (( rc == 0 && irc == 0 )) || return 1
    if [ "$DRY" = 0 ]; then
        local bad=""
        grep -E '^kadapt._C: *built' "$OUT/info.txt" | grep -vq 'does not load' || bad+=" kadapt._C not built or not loading;"
        grep -q '^CUDA device: *none' "$OUT/info.txt" && bad+=" no CUDA device visible;"
        grep -E '^available:' "$OUT/info.txt" | grep -q triton || bad+=" triton backend unavailable;"
        grep -E '^available:' "$OUT/info.txt" | grep -q cuda || bad+=" cuda backend unavailable;"
        if [ -n "$bad" ]; then
            STAGE_NOTE="${bad%;}"
            sec "" "**FAIL:**$bad"
            return 1
        fi
    fi
    return 0
}

run_tests() {  # bounded|full
    local mode=$1 q="$SD/test_q_$STAGE" logdir="$OUT/tests/$STAGE" missing total
    mkdir -p "$logdir"
    missing=$(make_queue "$q" "$mode")
    total=$(wc -l < "$q/units")
    PYTEST_EXTRA=()
    if [ "$DRY" = 0 ]; then
        "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA=(--timeout="$TEST_CASE_TIMEOUT")
        sec "$total units ($mode), $TEST_JOBS parallel workers, from / against the installed kadapt, \
KADAPT_REQUIRE_EXTENSION=1, pytest -q -rfE ${PYTEST_EXTRA[*]} ${TEST_ARGS:-}; logs in tests/$STAGE/."
        [ -n "$missing" ] && sec "" "Not present (skipped): $(echo $missing | sed 's/ /, /g')"
        start_workers "$q" "$logdir" "$TEST_JOBS" "KADAPT_REQUIRE_EXTENSION=1" \
            "TORCHINDUCTOR_COMPILE_THREADS=$INDUCTOR_THREADS"
        wait "${WORKER_PIDS[@]}" 2>/dev/null
    else
        # Dry run: collection only. The first DRY_TEST_UNITS (2) units go through the GPU run's path (queue,
        # workers, timeout, pytest --co from /); every unit's -k is checked by one collection of all unit
        # files (gpu_check_unitsel.py applies pytest's -k matcher per unit): ~25 pytest start-ups would take
        # minutes on 2 cores.
        local files
        files=$(cut -d'|' -f2 "$q/units" | sort -u | sed "s|^|$ROOT/tests/|")
        PYTEST_EXTRA=(--co)
        sec "Dry run: collection only (pytest --co); nothing runs. Units 0-$(( ${DRY_TEST_UNITS:-2} - 1 )) through the \
queue/worker path of the GPU run; every unit's -k checked against one collection of all $(echo "$files" | wc -l) unit \
files (collect.log). A unit whose -k selects nothing, or whose file does not collect, fails."
        [ -n "$missing" ] && sec "" "Not present (skipped): $(echo $missing | sed 's/ /, /g')"
        UNIT_LIMIT=${DRY_TEST_UNITS:-2} start_workers "$q" "$logdir" "$TEST_JOBS" "KADAPT_REQUIRE_EXTENSION=1"
        # shellcheck disable=SC2086
        (cd / && GPU_CHECK_QUEUE="$q" GPU_CHECK_LOGDIR="$logdir" KADAPT_REQUIRE_EXTENSION=1 \
            PYTHONPATH="$SD/bin${PYTHONPATH:+:$PYTHONPATH}" bounded "$logdir/collect.log" "$PY" -m pytest --co -q \
            -p no:cacheprovider -p gpu_check_unitsel --continue-on-collection-errors $files)
        local crc=$?
        wait "${WORKER_PIDS[@]}" 2>/dev/null
        (( crc == 124 || crc == 137 )) && STAGE_TIMEDOUT=1
        local i
        for (( i = 0; i < total; i++ )); do
            [ -f "$q/res_$i" ] || { [ -f "$q/sel_$i" ] && mv "$q/sel_$i" "$q/res_$i"; }
        done
    fi
    local n label file k rc secs st line fails=0 tmo=0 passed=0 ulog
    sec "" "| # | unit | file | -k | status | s | pytest |" "|---|---|---|---|---|---|---|"
    for (( n = 0; n < total; n++ )); do
        if [ -f "$q/res_$n" ]; then
            IFS='|' read -r n label file k rc secs < "$q/res_$n"
        else
            IFS='|' read -r label file k < <(sed -n "$(( n + 1 ))p" "$q/units")
            rc="NOT RUN"; secs=0
        fi
        st=$(unit_status "$rc")
        ulog="$logdir/$(printf '%02d' "$n")_$label.log"
        line=""
        [ -f "$ulog" ] && line=$(grep -E '(passed|failed|error|skipped|deselected|selected|collected|no tests ran)' \
            "$ulog" | grep -v '^FAILED\|^ERROR' | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//; s/|/\//g')
        sec "| $n | $label | $file | \`${k:-all}\` | $st | $secs | $line |"
        case $st in
            PASS) passed=$(( passed + 1 )) ;; TIMEOUT|"NOT RUN") tmo=1 ;; *) fails=1 ;;
        esac
    done
    local failed_lines
    failed_lines=$(cat "$logdir"/*.log 2>/dev/null | grep -E '^(FAILED|ERROR) ' | head -n 60)
    if [ -n "$failed_lines" ]; then
        sec "" "Failures and errors (-rfE, first 60):" '```' "$failed_lines" '```'
    fi
    STAGE_NOTE="$passed of $total units passed"
    (( tmo )) && STAGE_TIMEDOUT=1
    (( fails == 0 ))
}
stage_tune() {
    local args=(--out "$OUT/tuning" --checks "$TUNE_CHECKS" --summary "$OUT/tuning/summary.md" --commit "$COMMIT"
                --jobs "$TUNE_JOBS")
    local env=()
    if [ "$DRY" = 1 ]; then
        # nothing is installed in a dry run: the source tree's kadapt
        env=(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}")
        args+=(--dry-run)
        sec "Dry run: Triton's interpreter, tiny fp32 shapes, one bucket per kernel, 2 candidates, from the source \
tree; the table is written to tuning/ only, never installed."
    else
        args+=(--install)
    fi
    # shellcheck disable=SC2086
    (cd / && ERRLOG="$OUT/$STAGE.err" bounded "$LOG" env "${env[@]}" "$PY" "$ROOT/scripts/tune_triton.py" "${args[@]}" \
        ${TUNE_ARGS:-})
    local rc=$?
    (( rc == 124 || rc == 137 )) && STAGE_TIMEDOUT=1
    sec "\`scripts/tune_triton.py ${args[*]} ${TUNE_ARGS:-}\`: rc $rc"
    sec "" "$(grep -E '^(checks:|table:)' "$LOG")"
    [ -s "$OUT/tuning/summary.md" ] && sec "" "$(cat "$OUT/tuning/summary.md")"
    local table
    table=$(ls "$OUT"/tuning/*.json 2>/dev/null | head -n 1)
    if [ -n "$table" ] && [ "$DRY" = 0 ]; then
        sec "" "Commit \`tuning/$(basename "$table")\` as \`kadapt/ops/tuning_tables/$(basename "$table")\`. In force now \
(from /): $(cd / && "$PY" -c 'from kadapt.ops import tuning; print(tuning.status())' 2>&1 | tail -n 1)"
    fi
    if (( rc != 0 )); then
        sec "" "stdout / stderr tails:"
        sec_code "$LOG" 25
        sec_code "$OUT/$STAGE.err" 15
    fi
    return $rc
}
stage_test() { run_tests bounded; }
stage_test_full() { run_tests full; }

measure_bandwidth() {
    BW="${BENCH_BANDWIDTH:-}"
    if [ -n "$BW" ]; then
        sec "Floors at BENCH_BANDWIDTH=$BW B/s (given, not measured)."
        return
    fi
    local dev=cuda mib=1024
    [ "$DRY" = 1 ] && dev=cpu mib=16
    : > "$OUT/copy_bandwidth.txt"
    (cd / && bounded "$OUT/copy_bandwidth.txt" "$PY" "$SD/bin/copybw.py" "$dev" "$mib")
    BW=$(tail -n 1 "$OUT/copy_bandwidth.txt" | grep -E '^[0-9.]+(e[+-]?[0-9]+)?$')
    if [ -n "$BW" ]; then
        sec "$(grep '^copy bandwidth' "$OUT/copy_bandwidth.txt"); the adapter floors use it (--bandwidth $BW)."
    else
        sec "Copy bandwidth: measurement failed (copy_bandwidth.txt); floors at adapter.py's default 2.96e12 B/s."
        sec_code "$OUT/copy_bandwidth.txt" 5
    fi
}

run_adapter() {  # RESULTS_DIR args...
    local res=$1; shift
    local args=("$@")
    [ -n "$BW" ] && args+=(--bandwidth "$BW")
    # shellcheck disable=SC2086
    (cd / && ERRLOG="$OUT/$STAGE.err" bounded "$LOG" "$PY" "$ROOT/benchmarks/adapter.py" "${args[@]}" --out "$res" \
        ${BENCH_ARGS:-})
    local rc=$?
    (( rc == 124 || rc == 137 )) && STAGE_TIMEDOUT=1
    sec "" "\`benchmarks/adapter.py ${args[*]} ${BENCH_ARGS:-}\`: rc $rc"
    if (( rc == 0 )); then
        sec_code "$LOG" 60
    else
        sec "Rows measured (the CSV is rewritten after every config):"
        local csv
        csv=$(ls "$res"/adapter_*.csv 2>/dev/null | head -n 1)
        [ -n "$csv" ] && sec "$("$PY" "$SD/bin/csv2md.py" "$csv" kind,T,D,m,provider,mode,timing,us,ratio_to_floor,err,grad_err,check,note 80)"
        sec "stdout / stderr tails:"
        sec_code "$LOG" 15
        sec_code "$OUT/$STAGE.err" 15
    fi
    return $rc
}
stage_bench() {
    measure_bandwidth
    if [ "$DRY" = 1 ]; then
        sec "Dry run: --quick shapes (96x48, m 8), fp32, Triton in the interpreter; providers reference peer triton \
(cuda: no GPU in a dry run; compile: torch.compile is minutes on the CPU)."
        run_adapter "$OUT/results" --device cpu --dtype fp32 --quick --kinds dense lowrank phm compacter \
            --providers reference peer triton --reps 1 --warmup 0
    else
        run_adapter "$OUT/results" --device cuda --dtype bf16 --shapes 8192x1024 --m 64 \
            --kinds dense lowrank phm compacter
    fi
}
stage_bench_full() {
    measure_bandwidth
    if [ "$DRY" = 1 ]; then
        run_adapter "$OUT/results_full" --device cpu --dtype fp32 --quick --providers reference triton --reps 2 --warmup 1
    else
        run_adapter "$OUT/results_full" --device cuda --dtype bf16
    fi
}

run_attn() {  # RESULTS_DIR args...
    local res=$1; shift
    # shellcheck disable=SC2086
    (cd / && ERRLOG="$OUT/$STAGE.err" bounded "$LOG" "$PY" "$ROOT/benchmarks/inducer_attention.py" "$@" \
        --out "$res" ${ATTN_ARGS:-})
    local rc=$?
    (( rc == 124 || rc == 137 )) && STAGE_TIMEDOUT=1
    sec "" "\`benchmarks/inducer_attention.py $* ${ATTN_ARGS:-}\`: rc $rc"
    if (( rc == 0 )); then
        sec_code "$LOG" 70
    else
        sec "Rows measured (the CSV is rewritten after every provider):"
        local csv
        csv=$(ls "$res"/inducer_attention_*.csv 2>/dev/null | head -n 1)
        [ -n "$csv" ] && sec "$("$PY" "$SD/bin/csv2md.py" "$csv" d,L,provider,mode,timing,us,ratio_to_sdpa,peak_mib,err,w_err,lse_err,grad_err,check,note 100)"
        sec "stdout / stderr tails:"
        sec_code "$LOG" 15
        sec_code "$OUT/$STAGE.err" 15
    fi
    return $rc
}
stage_attn() {
    if [ "$DRY" = 1 ]; then
        sec "Dry run: --quick (B 1, H 2, d 32) --L 24, fp32, Triton in the interpreter; providers sdpa triton \
prefix_sdpa eager (cuda: no GPU in a dry run; flex_lse: no FlexAttention backward on the CPU)."
        run_attn "$OUT/results" --device cpu --dtype fp32 --quick --L 24 --reps 1 --warmup 0 \
            --providers sdpa triton prefix_sdpa eager
    else
        run_attn "$OUT/results" --device cuda --dtype bf16 --d 64 --L 512 1024 2048 4096 --B 8 --H 16
    fi
}
stage_attn_full() {
    if [ "$DRY" = 1 ]; then
        run_attn "$OUT/results_full" --device cpu --dtype fp32 --quick --reps 2 --providers sdpa triton eager
    else
        run_attn "$OUT/results_full" --device cuda --dtype bf16
    fi
}

# run_py RESULTS_DIR SCRIPT STARTLINE args...: benchmarks/SCRIPT (stdout to $LOG, stderr to $STAGE.err) into
# RESULTS_DIR; its printed table (stdout from the line matching STARTLINE) goes into the section. The scripts
# rewrite their CSV as they go and print what finished when the deadline's SIGINT arrives.
run_py() {
    local res=$1 script=$2 start=$3; shift 3
    (cd / && ERRLOG="$OUT/$STAGE.err" bounded "$LOG" "$PY" "$ROOT/benchmarks/$script" "$@" --out "$res")
    local rc=$?
    (( rc == 124 || rc == 137 )) && STAGE_TIMEDOUT=1
    sec "\`benchmarks/$script $*\`: rc $rc" ""
    if grep -q "$start" "$LOG"; then
        sec "$(sed -n "/$start/,\$p" "$LOG")"
    else
        sec "(no table printed)"
    fi
    if (( rc != 0 )); then
        sec "" "stdout / stderr tails:"
        sec_code "$LOG" 15
        sec_code "$OUT/$STAGE.err" 25
    fi
    return $rc
}
DRY_TRAIN=(--tiny --device cpu --dtype fp32 --warmup 0 --steps 1)
run_fastfood() {  # RESULTS_DIR args...
    local res=$1; shift
    # shellcheck disable=SC2086
    if [ "$DRY" = 1 ]; then
        sec "Dry run: 4 small tensors (--tiny), Triton in the interpreter; the cuda provider is skipped (its reason below)."
        run_py "$res" fastfood.py '^# fastfood' --device cpu --tiny --reps 1 ${FASTFOOD_ARGS:-}
    else
        run_py "$res" fastfood.py '^# fastfood' --device cuda "$@" ${FASTFOOD_ARGS:-}
    fi
}
stage_fastfood() { run_fastfood "$OUT/results" --reps 3; }
stage_fastfood_full() { run_fastfood "$OUT/results_full" --reps 20; }
run_said() {  # RESULTS_DIR args...
    local res=$1; shift
    # shellcheck disable=SC2086
    if [ "$DRY" = 1 ]; then
        sec "Dry run: a 2-layer T5 (--tiny), fp32, batch 2 x 8 -> 2, one step per method; no memory figures on the CPU."
        run_py "$res" train_step.py '^# train_step' --said "${DRY_TRAIN[@]}" ${SAID_ARGS:-}
    else
        run_py "$res" train_step.py '^# train_step' --said --device cuda --dtype bf16 "$@" ${SAID_ARGS:-}
    fi
}
stage_said() { run_said "$OUT/results" --warmup 1 --steps 3; }
stage_said_full() { run_said "$OUT/results_full" --warmup 2 --steps 10; }
run_train() {  # RESULTS_DIR METHODS(comma, empty: all) args...
    local res=$1 methods=$2; shift 2
    local margs=()
    [ -n "$methods" ] && margs=(--methods ${methods//,/ })
    if [ "$DRY" = 1 ]; then
        sec "Dry run: 2-layer models (--tiny), fp32, batch 2 x 8, one step per method."
        # shellcheck disable=SC2086
        run_py "$res" train_step.py '^# train_step' "$@" "${margs[@]}" "${DRY_TRAIN[@]}" ${TRAIN_ARGS:-}
    else
        # shellcheck disable=SC2086
        run_py "$res" train_step.py '^# train_step' "$@" "${margs[@]}" --device cuda --dtype bf16 ${TRAIN_ARGS:-}
    fi
}
stage_train() { run_train "$OUT/results" "${TRAIN_METHODS:-}" --models gpt2-medium --warmup 1 --steps 3; }
stage_attn_train() {
    run_train "$OUT/results_full" "floor,full_finetune,lora,peft:lora,kernel_mix,inducer_tuning,prefix_tuning,peft:prefix_tuning,mam" \
        --models gpt2
}
stage_train_t5() { run_train "$OUT/results_full" "" --models t5-base; }
stage_train_full() {
    # shellcheck disable=SC2086
    run_train "$OUT/results_full" "" --models gpt2-medium roberta-base t5-base llama-3.2-1b --warmup 2 --steps 5 \
        ${TRAIN_FULL_ARGS:-}
}

# ---------------------------------------------------------------------------------------------------------
# preamble: header, GPU, wheels

if [ "$DRY" = 1 ]; then
    GPU_LINE="dry run: the GPU is not used (CUDA_VISIBLE_DEVICES='', TRITON_INTERPRET=1)"
    if command -v nvidia-smi > /dev/null 2>&1; then GPU_LINE+="; nvidia-smi present"; else GPU_LINE+="; nvidia-smi not found"; fi
    echo "$GPU_LINE" > "$OUT/gpu.txt"
elif command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 \
        || echo "nvidia-smi failed" >> "$OUT/gpu.txt"
    GPU_LINE=$(head -n 3 "$OUT/gpu.txt" | paste -sd ';' -)
else
    GPU_LINE="nvidia-smi not found"
    echo "$GPU_LINE" > "$OUT/gpu.txt"
fi
WHEELS_LINE="none needed"
if ! "$PY" -c "import pytest, hypothesis, matplotlib" 2> /dev/null; then
    if [ "$DRY" = 1 ]; then
        WHEELS_LINE="pytest/hypothesis/matplotlib missing; a dry run installs nothing"
    elif [ -d "$ROOT/.wheels" ]; then
        "$PY" -m pip install -q --no-index --find-links "$ROOT/.wheels" pytest hypothesis matplotlib > "$OUT/wheels.txt" 2>&1
        WHEELS_LINE="installed from .wheels: rc $?"
    else
        WHEELS_LINE="pytest/hypothesis/matplotlib missing and no .wheels/ carried"
    fi
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo "unknown (no git)")
{
    if [ "$DRY" = 1 ]; then
        echo "# kadapt GPU check: DRY RUN on the CPU ($(date -u '+%Y-%m-%d %H:%M UTC'))"
        echo
        echo "Tiny shapes, fp32, Triton in its interpreter, nothing built: this checks scripts/gpu_check.sh, it measures nothing."
    else
        echo "# kadapt GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    fi
    echo
    echo "- host $(hostname), commit $COMMIT, python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
    echo "- GPU: $GPU_LINE"
    echo "- stages: ${STAGES[*]}; budget ${BUDGET} s (GPU_CHECK_BUDGET), ${RESERVE} s kept per later stage"
    echo "- wheels: $WHEELS_LINE; env knobs set:${KNOBS:- none}"
    echo
} > "$SD/header.md"

i=0
for s in "${STAGES[@]}"; do
    set_status "$(printf '%02d' "$i")" "$s" PENDING - "${CAP[$s]}" ""
    i=$(( i + 1 ))
done
regen
log "OUT=$OUT, stages: ${STAGES[*]}, budget $BUDGET s$([ "$DRY" = 1 ] && echo ', DRY RUN')"

# ---------------------------------------------------------------------------------------------------------
# run the stages

ALL_OK=1
for (( i = 0; i < ${#STAGES[@]}; i++ )); do
    STAGE=${STAGES[$i]}
    idx=$(printf '%02d' "$i")
    later=$(( ${#STAGES[@]} - i - 1 ))
    now=$(date +%s)
    cap=${CAP[$STAGE]}
    avail=$(( T0 + BUDGET - now - RESERVE * later ))
    eff=$(( avail < cap ? avail : cap ))
    floor=$(( cap < MIN_STAGE ? cap : MIN_STAGE ))
    SEC="$SD/sec_$idx.md"
    LOG="$OUT/$STAGE.log"
    : > "$LOG"
    rm -f "$OUT/$STAGE.err"
    if (( avail < floor )); then
        set_status "$idx" "$STAGE" SKIP 0 "$cap" "budget exhausted ($(( T0 + BUDGET - now )) s left of $BUDGET)"
        printf '## %s: SKIP\n\nBudget exhausted: %s s left of GPU_CHECK_BUDGET=%s.\n' "$STAGE" \
            "$(( T0 + BUDGET - now ))" "$BUDGET" > "$SEC"
        ALL_OK=0
        regen
        log "stage $STAGE: SKIP (budget exhausted)"
        continue
    fi
    STAGE_END=$(( now + eff ))
    STAGE_TIMEDOUT=0
    STAGE_NOTE=""
    set_status "$idx" "$STAGE" RUNNING "-" "$eff" "started at +$(( now - T0 )) s"
    regen
    log "stage $STAGE: start (timeout $eff s)"
    : > "$SEC.body"
    SEC_FINAL=$SEC
    SEC="$SEC.body"
    "stage_$STAGE"
    rc=$?
    SEC=$SEC_FINAL
    secs=$(( $(date +%s) - now ))
    if (( rc != 0 && STAGE_TIMEDOUT )); then
        st="FAIL+TIMEOUT"
        [ "$STAGE" != test ] && [ "$STAGE" != test_full ] && st=TIMEOUT
    elif (( STAGE_TIMEDOUT )); then st=TIMEOUT
    elif (( rc != 0 )); then st=FAIL
    else st=PASS
    fi
    [ "$st" = PASS ] || ALL_OK=0
    note=$STAGE_NOTE
    [ "$st" = TIMEOUT ] && [ -z "$note" ] && note="stopped at its ${eff} s timeout"
    set_status "$idx" "$STAGE" "$st" "$secs" "$eff" "$note"
    { printf '## %s: %s (%s s, timeout %s s)\n\n' "$STAGE" "$st" "$secs" "$eff"; cat "$SEC.body"; } > "$SEC"
    rm -f "$SEC.body"
    regen
    log "stage $STAGE: $st in $secs s"
done

log "done in $(elapsed) s; summary: $SUM"
echo
cat "$SUM"
echo
echo "== overview (from $SUM) =="
awk '/^\| # \| stage \|/ { p = 1 } p && /^$/ { exit } p' "$SUM"
(( ALL_OK )) && exit 0
exit 1
