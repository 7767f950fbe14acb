"""The ``seq2seq`` pipeline of kadapt-train end to end on a tiny T5 saved to disk and tiny local data files
(Compacter formatting, greedy decoding, label-word metrics): metrics.json and the plot are written, a run
stopped mid-way and resumed ends exactly where an uninterrupted one does, bad input is refused before
training."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")  # Trainer needs it

from kadapt.train import main  # noqa: E402
from kadapt.train.glue import TASKS, compacter_splits  # noqa: E402
from kadapt.train.seq2seq import format_source, format_target  # noqa: E402
import _train_fixtures as F  # noqa: E402

FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--logging-steps", "1", "--warmup-steps", "0",
        "--generation-max-length", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2s")
    F.save_model("t5", d / "t5")
    F.save_model("bert", d / "bert")
    F.write_rows(F.pair_rows(32, 0), d / "train.jsonl")
    F.write_rows(F.pair_rows(12, 1), d / "dev.jsonl")
    return d


def _run(data, out, *extra, method="lora"):
    return main(["seq2seq", "--model", str(data / "t5"), "--method", method, "--task", "rte", "--train-file",
                 str(data / "train.jsonl"), "--validation-file", str(data / "dev.jsonl"), "--output-dir", str(out),
                 *FAST, *extra])


def test_compacter_formatting():
    rte, stsb = TASKS["rte"], TASKS["stsb"]
    row = {"sentence1": "a b", "sentence2": "c", "label": 1}
    assert format_source(rte, row, prefix=True) == "rte sentence1: a b sentence2: c"
    assert format_source(rte, row, prefix=False) == "sentence1: a b sentence2: c"
    assert format_target(rte, 1, "index", "row") == "1"
    assert format_target(rte, "not_entailment", "word", "row") == "not_entailment"
    assert format_target(stsb, 3.47, "index", "row") == "3.4"        # nearest 0.2
    assert format_target(stsb, 3.47, "index", "row", stsb_0p1=True) == "3.5"
    with pytest.raises(ValueError, match="label 5; allowed: 0..1 or entailment, not_entailment"):
        format_target(rte, 5, "index", "train row 3")
    sst2 = TASKS["sst2"]
    splits = compacter_splits({"train": [{"i": i} for i in range(1500)], "validation": [{"v": 1}] * 7}, sst2)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (500, 1000, 7)
    small = compacter_splits({"train": [{"i": 0}], "validation": [{"v": i} for i in range(9)]}, rte)
    assert (len(small["validation"]), len(small["test"])) == (4, 5)
    assert sorted(r["v"] for r in small["validation"] + small["test"]) == list(range(9))


def test_end_to_end_and_resume_match(data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert _run(data, full) == 0                              # 2 epochs x 4 steps, greedy decoding each epoch
    metrics = json.loads((full / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    assert metrics["task_prefix"] is True and metrics["selection_metric"] == "accuracy"  # LoRA: prefix added
    assert (full / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(full.glob("checkpoint-*/model.safetensors"))
    assert _run(data, split, "--stop-after-steps", "3") == 0
    state = json.loads((split / "checkpoint-3" / "trainer_state.json").read_text())
    assert not [h for h in state["log_history"] if "eval_loss" in h]  # no evaluation the full run lacks
    assert _run(data, split, "--resume", str(split / "checkpoint-3")) == 0
    resumed = json.loads((split / "metrics.json").read_text())
    assert resumed["global_step"] == metrics["global_step"] == 8
    assert resumed["eval_accuracy"] == metrics["eval_accuracy"]
    assert resumed["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6, abs=1e-7)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_decoded_label_words_are_scored(data):
    """The metric reads decoded label strings: generated ids of the gold words score 1.0, a wrong or unknown
    word counts as an error."""
    from transformers import AutoTokenizer
    from transformers.trainer_utils import EvalPrediction

    from kadapt.train.seq2seq import decoded_metrics

    tok = AutoTokenizer.from_pretrained(data / "t5")
    words = ["entailment", "not_entailment", "entailment", "not_entailment"]

    def ids(texts):
        enc = tok(text_target=texts, padding=True)["input_ids"]
        return np.array([[t if t != tok.pad_token_id else -100 for t in row] for row in enc])

    fn = decoded_metrics(TASKS["rte"], tok, "word")
    assert fn(EvalPrediction(predictions=ids(words), label_ids=ids(words)))["accuracy"] == 1.0
    wrong = ["entailment", "entailment", "movie", "not_entailment"]
    assert fn(EvalPrediction(predictions=ids(wrong), label_ids=ids(words)))["accuracy"] == 0.5
    stsb = decoded_metrics(TASKS["stsb"], tok, "index")
    scores = ["0", "1", "2", "1"]
    out = stsb(EvalPrediction(predictions=ids(scores), label_ids=ids(scores)))
    assert out["pearson"] == pytest.approx(1.0) and out["combined_score"] == pytest.approx(1.0)


def test_adapter_method_runs_without_task_prefix_and_label_words(data, tmp_path):
    out = tmp_path / "words"
    assert _run(data, out, "--label-format", "word", "--max-steps", "1", "--method", "pfeiffer",
                "--max-eval-samples", "4") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_format"] == "word" and metrics["task_prefix"] is False  # adapter family: no prefix
    assert "eval_accuracy" in metrics


@pytest.mark.parametrize("extra, message", [
    (["--task", "rtx"], "--task='rtx': unknown task; allowed: cola, sst2"),
    (["--task", "mrpc"], "--task='mrpc' (its columns): column(s) ['sentence1', 'sentence2'] not in the train data"),
    (["--method", "kernel_adapters.nlu.inducer-lora"], "is a preset for the 'nlu' pipeline, not 'seq2seq'"),
    (["--model", "BERT"], "is a 'bert' model; the seq2seq pipeline trains: t5"),
    (["--label-format", "name"], "--label-format='name'; allowed: index, word"),
    (["--validation-file", "MISSING.jsonl"], "cannot read the file"),
    (["--splits", "random"], "--splits='random'; allowed: given, compacter"),
    (["--generation-max-length", "0"], "--generation-max-length=0: must be an integer >= 1"),
])
def test_bad_input_is_refused_before_training(data, tmp_path, capsys, extra, message):
    F.write_rows([{"question1": "a", "question2": "b", "label": 0}], tmp_path / "qqp.jsonl")
    subst = {"BERT": str(data / "bert"), "MISSING.jsonl": str(tmp_path / "missing.jsonl")}
    extra = [subst.get(x, x) for x in extra]
    out = tmp_path / "out"
    argv_data = ["--train-file", str(tmp_path / "qqp.jsonl")] if "mrpc" in extra else []
    assert _run(data, out, *argv_data, *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()
