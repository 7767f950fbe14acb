"""The benchmark scripts run and write what they promise (tiny shapes, CPU)."""
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
