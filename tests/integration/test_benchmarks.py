"""The benchmark scripts run and write what they promise (tiny shapes, CPU)."""
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_train_step_benchmark_writes_csv_png_and_table(tmp_path, capsys, family):
    bench = _load("train_step")
    rows = bench.main(["--family", family, "--size", "tiny", "--device", "cpu", "--methods", "full_finetune",
                       "compacter", "bitfit", "--batch", "2", "--seq", "8", "--warmup", "0", "--steps", "1",
                       "--out", str(tmp_path)])
    stem = f"train_step_{family}_tiny_cpu_fp32"
    with open(tmp_path / f"{stem}.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["full_finetune", "compacter", "bitfit"]
    assert all(float(r["ms_per_step"]) > 0 for r in table)
    assert int(table[0]["trainable"]) == int(table[0]["total"]) > int(table[1]["trainable"]) > 0
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "vs full FT" in out and "1.00x" in out and len(rows) == 3


def test_adapter_benchmark_cpu_smoke(tmp_path):
    """benchmarks/adapter.py as a subprocess (TRITON_INTERPRET=1 must be set before Triton is imported):
    a row with a positive time for every requested (kind, provider, mode), the PNG, nothing else written."""
    import os
    import subprocess
    import sys

    kinds = ["dense", "lowrank", "phm", "compacter"]
    providers = ["reference", "peer"] + (["triton"] if importlib.util.find_spec("triton") else [])
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, TRITON_INTERPRET="1")
    if env.get("PYTHONPATH"):  # the run starts in another directory: keep a relative PYTHONPATH valid
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "adapter.py"), "--device", "cpu", "--dtype", "fp32", "--quick",
         "--kinds", *kinds, "--providers", *providers, "--reps", "2", "--out", str(out)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "adapter_fp32_cpu.csv") as f:
        table = list(csv.DictReader(f))
    assert not [r for r in table if r["timing"] == "error"], [r["note"] for r in table if r["timing"] == "error"]
    want = {(k, p, mode) for k in kinds for p in providers for mode in ("fwd", "fwd+bwd")
            if not (p == "peer" and k in ("dense", "lowrank"))}  # peer is the reference for those kinds
    got = {(r["kind"], r["provider"], r["mode"]) for r in table}
    assert got == want
    for r in table:
        assert r["timing"] == "eager" and float(r["us"]) > 0 and float(r["floor_us"]) > 0, r
        assert r["check"] == "ok" and float(r["err"]) < 1e-4, r
        assert (r["grad_err"] == "") == (r["mode"] == "fwd"), r
    assert (out / "adapter_fp32_cpu.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["adapter_fp32_cpu.csv", "adapter_fp32_cpu.png"]
    assert not list(cwd.iterdir())
    assert "targets: T=8192, D=1024, m=64 is not in this sweep" in proc.stdout
    assert "peer" in proc.stdout and "y err" in proc.stdout


def test_inducer_attention_benchmark_cpu_smoke(tmp_path):
    """benchmarks/inducer_attention.py as a subprocess (TRITON_INTERPRET=1 before Triton is imported), tiny shapes:
    a timed row for every requested (provider, mode, L) with O, w, LSE and gradients matching the fp32 reference,
    the PNG and the targets markdown. FlexAttention has no CPU backward (torch raises NotImplementedError for CPU
    inputs that require grad), so flex_lse's fwd+bwd may be an error row saying so; nothing else may fail."""
    import os
    import subprocess
    import sys

    providers = ["sdpa", "prefix_sdpa", "eager", "flex_lse"]
    providers += ["triton"] if importlib.util.find_spec("triton") else []
    modes, lengths = ["fwd", "fwd+bwd"], ["24", "48"]
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, TRITON_INTERPRET="1")
    if env.get("PYTHONPATH"):  # the run starts in another directory: keep a relative PYTHONPATH valid
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inducer_attention.py"), "--device", "cpu", "--dtype", "fp32",
         "--quick", "--providers", *providers, "--reps", "2", "--out", str(out)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "inducer_attention_fp32_cpu.csv") as f:
        table = list(csv.DictReader(f))
    timed = [r for r in table if r["timing"] not in ("error", "oom", "skip")]
    failed = [r for r in table if r not in timed]
    flex_no_cpu_backward = [r for r in failed
                            if (r["provider"], r["mode"], r["timing"]) == ("flex_lse", "fwd+bwd", "error")
                            and "NotImplementedError" in r["note"] and "backward on CPU" in r["note"]]
    assert failed == flex_no_cpu_backward, [(r["provider"], r["mode"], r["timing"], r["note"]) for r in failed]
    want = {(p, mode, L) for p in providers for mode in modes for L in lengths}
    got = {(r["provider"], r["mode"], r["L"]) for r in timed}
    assert got | {(r["provider"], r["mode"], r["L"]) for r in flex_no_cpu_backward} == want
    assert {r["d"] for r in table} == {"32"} and {r["B"] for r in table} == {"1"} and {r["H"] for r in table} == {"2"}
    for r in timed:
        assert r["timing"] == "eager" and float(r["us"]) > 0 and float(r["ratio_to_sdpa"]) > 0, r
        assert r["peak_mib"] == "", r  # no memory figures on the CPU
        assert r["check"] == "ok" and float(r["err"]) < 1e-4, r
        assert (r["w_err"] != "") == (r["provider"] in ("triton", "flex_lse", "eager")), r
        assert (r["lse_err"] != "") == (r["provider"] in ("triton", "flex_lse")), r
        for col in ("w_err", "lse_err"):
            assert r[col] == "" or float(r[col]) < 1e-4, r
        assert (r["grad_err"] == "") == (r["mode"] == "fwd"), r
        assert r["grad_err"] == "" or float(r["grad_err"]) < 1e-4, r
        if r["provider"] == "sdpa":
            assert float(r["ratio_to_sdpa"]) == 1.0, r
    assert (out / "inducer_attention_fp32_cpu.png").stat().st_size > 1000
    md = (out / "inducer_attention_targets_fp32.md").read_text()
    assert "Inducer attention targets: fp32, d=32" in md and "faster than flex_lse at every L" in md
    assert ("**triton**" in md) == ("triton" in providers)
    assert sorted(p.name for p in out.iterdir()) == ["inducer_attention_fp32_cpu.csv", "inducer_attention_fp32_cpu.png",
                                                      "inducer_attention_targets_fp32.md"]
    assert not list(cwd.iterdir())
    assert "×sdpa" in proc.stdout and "prefix_sdpa" in proc.stdout and "NOT MEASURED" in proc.stdout
