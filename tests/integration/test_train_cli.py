"""The ``kadapt-train`` entry point and the shared scaffold (kadapt.train.common): subcommands and lazy imports,
the console script, --method resolution (presets, method names, config files, a preset of another pipeline),
hyperparameter precedence (command line > config file > pipeline defaults), checks before training, and the
preset files under examples/configs/."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

import kadapt  # noqa: E402
from kadapt.train import PIPELINE_MODULES, build_parser, main  # noqa: E402
from kadapt.train import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Flags a pipeline's parser requires besides the common ones.
REQUIRED = {"seq2seq": ["--task", "rte"], "nlg": ["--train-file", "t.csv", "--validation-file", "v.csv"]}
CONFIGS = sorted((ROOT / "examples" / "configs").rglob("*.json"))


def _env() -> dict:
    """Run subprocesses against the kadapt this test imported (source tree or installed)."""
    return {**os.environ, "PYTHONPATH": str(Path(kadapt.__file__).resolve().parents[1])}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common.add_common_arguments(parser)
    parser.add_argument("--max-length", type=int, default=None)  # a pipeline flag a config file may set
    return parser.parse_args(["--model", "m", "--output-dir", "o", *argv])


def test_module_entry_lists_pipelines_and_imports_only_the_chosen_one(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kadapt.train", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("nlu", "nlg", "seq2seq"):
        assert name in out.stdout
    code = ("import sys; from kadapt.train import build_parser; p = build_parser('nlu'); "
            "print(sorted(m for m in ('kadapt.train.nlu', 'kadapt.train.nlg', 'kadapt.train.seq2seq') "
            "if m in sys.modules)); p.parse_args(['nlu', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "['kadapt.train.nlu']"
    for flag in ("--task", "--pooling", "--method", "--resume", "--early-stopping-patience", "--stop-after-steps"):
        assert flag in out.stdout


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'kadapt-train = "kadapt.train:main"' in text
    assert set(PIPELINE_MODULES) == {"nlu", "nlg", "seq2seq"}


def test_main_without_a_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "nlu" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nlx"])


def test_method_resolution_and_cross_pipeline_presets(tmp_path):
    assert isinstance(common.method_config("kernel_adapters.nlu.inducer-lora", "nlu"), kadapt.InducerTuningConfig)
    assert isinstance(common.method_config("lora", "seq2seq"), kadapt.LoRAConfig)  # a method: any pipeline
    with pytest.raises(ValueError, match="'compacter_paper.compacter' is a preset for the 'seq2seq' pipeline, "
                                         "not 'nlu'; presets for 'nlu': kernel_adapters.nlu.kernel-mix"):
        common.method_config("compacter_paper.compacter", "nlu")
    with pytest.raises(ValueError, match="is a preset for the 'nlg' pipeline, not 'seq2seq'"):
        common.method_config("kernel_adapters.nlg.pfeiffer-adapter", "seq2seq")
    with pytest.raises(ValueError, match="pipeline='vision'; allowed: nlu, nlg, seq2seq"):
        common.method_config("lora", "vision")
    # Config files: a plain config, a list (composition), a preset file; bad ones named.
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(kadapt.LoRAConfig(r=3).to_dict()))
    assert common.method_config(str(plain), "nlu") == kadapt.LoRAConfig(r=3)
    combo = tmp_path / "combo.json"
    combo.write_text(json.dumps([kadapt.PrefixTuningConfig().to_dict(), kadapt.LoRAConfig().to_dict()]))
    assert [c.method for c in common.method_config(str(combo), "nlu")] == ["prefix_tuning", "lora"]
    cases = {
        "other.json": ({"pipeline": "nlg", "method": "lora"}, "is a config for the 'nlg' pipeline, not 'nlu'"),
        "key.json": ({"pipeline": "nlu", "method": "lora", "extra": 1}, "unknown key(s) ['extra']"),
        "field.json": ({"method": "lora", "rank": 4}, "unknown field(s) ['rank'] for method 'lora'"),
        "name.json": ({"pipeline": "nlu", "method": "loraa"}, "'loraa' is neither a preset"),
        "train.json": ({"pipeline": "nlu", "method": "lora", "training": []}, "'training' must be a JSON object"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            common.method_config(str(tmp_path / name), "nlu")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the config file"):
        common.method_config(str(tmp_path / "broken.json"), "nlu")
    with pytest.raises(ValueError, match="cannot read the config file"):
        common.method_config(str(tmp_path / "absent.json"), "nlu")


def test_precedence_and_checks(tmp_path):
    spec = tmp_path / "preset.json"
    spec.write_text(json.dumps({"pipeline": "nlu", "method": "bitfit",
                                "training": {"lr": 0.05, "batch_size": 4, "max_length": 64}}))
    args = _args("--method", str(spec), "--batch-size", "2")
    config = common.prepare(args, "nlu", {"lr": 1.0, "epochs": 7.0, "max_length": 128})
    assert isinstance(config, kadapt.BitFitConfig)
    assert (args.batch_size, args.lr, args.epochs, args.max_length) == (2, 0.05, 7.0, 64)  # CLI > file > defaults
    assert args.grad_accum == common.COMMON_DEFAULTS["grad_accum"] and args.eval_batch_size == 2
    spec.write_text(json.dumps({"pipeline": "nlu", "method": "bitfit", "training": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match="unknown training key 'learning_rate'; allowed: "):
        common.prepare(_args("--method", str(spec)), "nlu")
    bad = [(["--epochs", "0"], "--epochs=0.0: must be a number > 0"),
           (["--batch-size", "0"], "--batch-size=0: must be an integer >= 1"),
           (["--adam-beta2", "1.5"], "--adam-beta2=1.5: must be in [0, 1)"),
           (["--resume", str(tmp_path)], "not a kadapt-train checkpoint (missing adapter_config.json")]
    if not __import__("torch").cuda.is_available():
        bad.append((["--bf16"], "--bf16: mixed precision here needs a CUDA GPU"))
    for extra, message in bad:
        with pytest.raises(ValueError) as err:
            common.prepare(_args("--method", "lora", *extra), "nlu")
        assert message in str(err.value)
    assert common.resume_checkpoint(_args("--method", "lora", "--resume")) is None  # auto, nothing yet: fresh


def test_read_table_formats_and_errors(tmp_path):
    (tmp_path / "cols.json").write_text(json.dumps({"sentence": ["a", "b"], "label": [0, 1]}))
    assert common.read_table(tmp_path / "cols.json", "--train-file") == [{"sentence": "a", "label": 0},
                                                                         {"sentence": "b", "label": 1}]
    (tmp_path / "rows.json").write_text(json.dumps([{"sentence": "a", "label": 0}]))
    assert common.read_table(tmp_path / "rows.json", "--train-file") == [{"sentence": "a", "label": 0}]
    (tmp_path / "q.tsv").write_text('sentence\tlabel\nit "quoted\t1\n')  # GLUE TSV: quotes are text
    assert common.read_table(tmp_path / "q.tsv", "--train-file") == [{"sentence": 'it "quoted', "label": "1"}]
    (tmp_path / "empty.csv").write_text("sentence,label\n")
    with pytest.raises(ValueError, match="--train-file=.*empty.csv.*: the file holds no rows"):
        common.read_table(tmp_path / "empty.csv", "--train-file")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected rows of named columns"):
        common.read_table(tmp_path / "list.jsonl", "--validation-file")


def test_task_without_files_needs_datasets_or_the_hub(tmp_path, capsys):
    """Without local files, --task loads GLUE through `datasets`; absent (or offline) it is a clear error."""
    import _train_fixtures as F

    F.save_model("bert", tmp_path / "bert")
    assert main(["nlu", "--model", str(tmp_path / "bert"), "--method", "lora", "--task", "sst2",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--task='sst2'" in err and ("`datasets` package, which is not installed" in err or "cannot load" in err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_configs_resolve_for_their_pipeline(path):
    data = json.loads(path.read_text())
    pipeline = data["pipeline"]
    assert path.parent.name == pipeline
    if pipeline not in PIPELINE_MODULES:
        pytest.fail(f"{path}: unknown pipeline {pipeline!r}")
    parser = build_parser(pipeline)
    args = parser.parse_args([pipeline, "--model", "m", "--output-dir", "o", "--method", str(path),
                              *REQUIRED.get(pipeline, [])])
    spec = common.load_method(str(path), pipeline)
    common._apply_training(args, spec.training, str(path))  # every training key is a flag of the pipeline
    assert set(spec.training) >= {"lr", "batch_size", "epochs", "seed"}
    others = [p for p in common.PIPELINES if p != pipeline]
    with pytest.raises(ValueError, match=f"for the '{pipeline}' pipeline"):
        common.load_method(str(path), others[0])
