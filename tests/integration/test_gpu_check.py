"""scripts/gpu_check.sh, the one-call GPU check, in its CPU dry run (GPU_CHECK_DRY_RUN=1): every default stage at
tiny shapes (Triton in its interpreter, nothing built, the test stage as collection only), so that the script the
next engineer runs on the GPU machine, with one call to spare, has run end to end in CI. The dry run takes about two
minutes on 2 cores."""
import os
import re
import subprocess
import sys
from pathlib import Path

from kadapt.ops import tuning

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DEFAULT_STAGES = ["build", "tune", "test", "bench", "attn", "fastfood", "said", "train"]
# knobs that would change the run if they leaked in from the environment
KNOBS = ("GPU_CHECK_BUDGET", "GPU_CHECK_RESERVE", "BUILD_TIMEOUT", "TEST_TIMEOUT", "BENCH_TIMEOUT", "ATTN_TIMEOUT",
         "TRAIN_TIMEOUT", "TEST_JOBS", "TEST_ARGS", "TEST_CASE_TIMEOUT", "TEST_UNITS_FILE", "TEST_PREWARM",
         "PREWARM_JOBS", "BENCH_BANDWIDTH", "BENCH_ARGS", "ATTN_ARGS", "TRAIN_ARGS", "TRAIN_METHODS", "DRY_TEST_UNITS",
         "FASTFOOD_TIMEOUT", "SAID_TIMEOUT", "FASTFOOD_ARGS", "SAID_ARGS", "TRAIN_FULL_ARGS",
         "TUNE_TIMEOUT", "TUNE_JOBS", "TUNE_PREWARM", "TUNE_PREWARM_JOBS", "TUNE_ARGS")


def _run(tmp_path: Path, *stages: str, timeout: int = 600, **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    if env.get("PYTHONPATH"):  # the stages run from /: keep a relative PYTHONPATH valid
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env.update(GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, **extra)
    proc = subprocess.run(["bash", str(SCRIPT), *stages], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return proc, out


def _stage_rows(summary: str) -> dict[str, str]:
    """stage -> status from the summary's overview table."""
    return dict(re.findall(r"^\| \d+ \| (\w+) \| [^|]* \| \*\*([A-Z+ ]+)\*\* \|", summary, re.M))


def test_dry_run_runs_every_default_stage_and_writes_the_summary(tmp_path):
    proc, out = _run(tmp_path)
    summary_path = out / "summary.md"
    assert summary_path.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = summary_path.read_text()
    assert proc.returncode == 0, summary[-8000:] + proc.stderr[-3000:]
    assert "DRY RUN" in summary
    rows = _stage_rows(summary)
    assert list(rows) == DEFAULT_STAGES, rows
    assert set(rows.values()) == {"PASS"}, rows
    for stage in DEFAULT_STAGES:
        assert re.search(rf"^## {stage}: PASS \(\d+ s, timeout \d+ s\)$", summary, re.M), stage

    # build: nothing built or installed, `python -m kadapt info` of this environment
    assert "nothing is built or installed" in summary and "pip install" not in summary
    assert "kadapt._C:" in (out / "info.txt").read_text()
    # tune: the dry-run sweep (after the tune prewarm, stopped with the build) wrote a table the library accepts
    assert "Tune prewarm (tune_triton.py --check-only" in summary
    table = tuning.load_table(out / "tuning" / "cpu.json")
    assert {"fused_adapter_fwd", "inducer_attention_fwd", "inducer_attention_bwd_dq"} <= set(table.entries)
    assert "| fused_adapter_fwd | down=dense up=dense bm=16 dtype=32bit |" in summary
    # test: the worker path ran pytest --co from /, and every unit's -k selected tests (or the file is absent)
    test_section = summary.split("## test:")[1].split("\n## ")[0]
    units = re.findall(r"^\| (\d+) \| ([\w.]+) \| ((?:\w+/)?test_\w+\.py) \| `[^`]*` \| ([A-Z ()0-9]+) \|", test_section, re.M)
    assert len(units) >= 10 and {u[3] for u in units} == {"PASS"}, test_section
    assert {"cuda_kernels", "fused_adapter.triton.bf16", "inducer_attention.triton.bf16"} <= {u[1] for u in units}
    assert "tests collected" in (out / "tests" / "test" / "00_cuda_kernels.log").read_text()
    # bench: the copy bandwidth is measured in the same run and given to the adapter benchmark
    assert re.search(r"^copy bandwidth: [\d.]+ TB/s", summary, re.M) and "--bandwidth " in summary
    for name in ("adapter_fp32_cpu.csv", "inducer_attention_fp32_cpu.csv", "inducer_attention_targets_fp32.md"):
        assert (out / "results" / name).stat().st_size > 0, name
    # fastfood: every provider at tiny sizes, the floor from the copy timed in the same run, cuda skipped
    assert re.search(r"^# fastfood .*copy of ΣL fp32 [\d.]+ ms .*floor 2\.00 passes", summary, re.M)
    assert "cuda       fwd          nan      nan      nan         -  skipped: inputs are not CUDA tensors" in summary
    assert "Fastfood targets (issue 11):" in summary and "- cuda bwd: NOT MEASURED" in summary
    # said and train: one row per method with ratios to the frozen floor; no method failed
    said = summary.split("## said:")[1].split("\n## ")[0]
    assert "| intrinsic_said | kadapt | 500 |" in said and "Intrinsic-SAID targets (issue 11):" in said
    train = summary.split("## train:")[1].split("\n## ")[0]
    assert re.search(r"^\| floor \| floor \| 64 \| [\d.]+ \| 1\.00 \|", train, re.M)
    assert re.search(r"^\| full_finetune \| kadapt \| [\d,]+ \| [\d.]+ \| [\d.]+ \| - \| - \| 1\.00 \|", train, re.M)
    for method in ("inducer_tuning", "intrinsic_said", "prompt_tuning", "compacter"):
        assert f"| {method} | kadapt |" in train, method
    assert "| error |" not in summary and "| oom |" not in summary
    for name in ("fastfood_cpu.csv", "train_step_cpu_fp32_tiny_said.csv", "train_step_cpu_fp32_tiny.csv"):
        assert (out / "results" / name).stat().st_size > 0, name


def test_a_timed_out_stage_is_recorded_and_later_stages_still_run(tmp_path):
    """bench gets 8 s (the adapter benchmark alone needs more): TIMEOUT with what it has, then train runs; exit 1."""
    proc, out = _run(tmp_path, "bench", "train", BENCH_TIMEOUT="8")
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, summary[-4000:]
    assert _stage_rows(summary) == {"bench": "TIMEOUT", "train": "PASS"}, summary[:3000]
    assert "## bench: TIMEOUT" in summary and "## train: PASS" in summary


def test_unknown_stage_is_refused(tmp_path):
    proc, out = _run(tmp_path, "bench", "nonsense", timeout=60)
    assert proc.returncode == 2 and "unknown stage 'nonsense'" in proc.stderr
    assert not (out / "summary.md").exists()
