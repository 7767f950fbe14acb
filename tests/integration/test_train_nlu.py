"""The ``nlu`` pipeline of kadapt-train end to end on a tiny BERT/RoBERTa saved to disk and tiny local data
files: metrics.json, the plot and trainable-only checkpoints are written, a run stopped mid-way and resumed
ends exactly where an uninterrupted one does, bad input is refused before training; plus the metrics and
the mean-pooling head."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")  # Trainer needs it

import kadapt  # noqa: E402
from kadapt.train import main  # noqa: E402
from kadapt.train.glue import accuracy, compute_metrics, f1, matthews_correlation, pearson, spearman  # noqa: E402
from kadapt.train.heads import get_pooling, masked_mean, set_pooling  # noqa: E402
import _train_fixtures as F  # noqa: E402

FAST = ["--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--logging-steps", "1", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("nlu")
    F.save_model("bert", d / "bert")
    F.save_model("roberta", d / "roberta")
    F.save_model("t5", d / "t5")
    F.write_rows(F.sentiment_rows(32, 0), d / "train.tsv")
    F.write_rows(F.sentiment_rows(16, 1), d / "dev.tsv")
    return d


def _run(data, out, *extra, model="bert", method="lora"):
    argv = ["nlu", "--model", str(data / model), "--method", method, "--train-file", str(data / "train.tsv"),
            "--validation-file", str(data / "dev.tsv"), "--output-dir", str(out), *FAST, *extra]
    return main(argv)


def test_end_to_end_writes_metrics_plot_and_trainable_only_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    assert _run(data, out, "--pooling", "mean", model="roberta", method="prefix_tuning") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    assert metrics["pooling"] == "mean" and metrics["trainable_parameters"] < metrics["total_parameters"]
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints
    for ckpt in checkpoints:  # the trainable state only: no full model weights
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}
    # The final adapter loads into a fresh model with the same pooling, the head included.
    from transformers import AutoModelForSequenceClassification

    fresh = set_pooling(AutoModelForSequenceClassification.from_pretrained(data / "roberta"), "mean")
    kadapt.load_adapter(fresh, out)
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert any(k.startswith("classifier.") for k in saved)
    params = dict(fresh.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor)


def test_stopped_and_resumed_run_ends_like_an_uninterrupted_one(data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert _run(data, full) == 0                             # 2 epochs x 4 steps
    assert _run(data, split, "--stop-after-steps", "5") == 0  # stops mid-epoch 2 with a checkpoint
    stopped = json.loads((split / "metrics.json").read_text())
    assert stopped["stopped_at_step"] == 5 and (split / "checkpoint-5").is_dir()
    assert _run(data, split, "--resume") == 0                # auto: the last checkpoint
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, split))
    assert a["global_step"] == b["global_step"] == 8
    assert b["eval_accuracy"] == a["eval_accuracy"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6, abs=1e-7)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_regression_task_from_jsonl_reports_pearson_and_spearman(data, tmp_path):
    rows = [{"sentence1": r["sentence"], "sentence2": r["sentence"], "label": 2.5 + 2 * r["label"] + 0.1 * i}
            for i, r in enumerate(F.sentiment_rows(16, 3))]
    F.write_rows(rows, tmp_path / "train.jsonl")
    F.write_rows(rows[:8], tmp_path / "dev.jsonl")
    out = tmp_path / "stsb"
    assert main(["nlu", "--model", str(data / "bert"), "--method", "bitfit", "--task", "stsb", "--train-file",
                 str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "dev.jsonl"),
                 "--output-dir", str(out), "--max-steps", "2", *FAST[2:]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval_pearson", "eval_spearman", "eval_combined_score"} <= metrics.keys()
    assert metrics["selection_metric"] == "combined_score"


@pytest.mark.parametrize("extra, message", [
    (["--task", "sst3"], "--task='sst3': unknown task; allowed: cola, sst2"),
    (["--text-columns", "text"], "column(s) ['text'] not in the train data"),
    (["--label-column", "gold"], "column(s) ['gold'] not in the train data"),
    (["--method", "compacter_paper.compacter"], "is a preset for the 'seq2seq' pipeline, not 'nlu'"),
    (["--method", "no_such_method"], "not a preset"),
    (["--train-file", "MISSING.tsv"], "--train-file="),
    (["--train-file", "BINARY.tsv"], "cannot read the file"),
    (["--train-file", "DATA.parquet"], "unknown file type '.parquet'"),
    (["--model", "T5"], "is a 't5' model; the nlu pipeline trains: bert, roberta"),
    (["--pooling", "max"], "--pooling='max'; allowed: cls, mean"),
    (["--lr", "-1"], "--lr=-1.0: must be a number > 0"),
    (["--lr-scheduler", "cyclic"], "--lr-scheduler='cyclic'; allowed: linear"),
    (["--resume", "NOCKPT"], "not a kadapt-train checkpoint"),
    (["--metric", "auc"], "--metric='auc'; allowed: accuracy"),
])
def test_bad_input_is_refused_before_training(data, tmp_path, capsys, extra, message):
    (tmp_path / "BINARY.tsv").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "DATA.parquet").write_bytes(b"PAR1")
    subst = {"MISSING.tsv": str(tmp_path / "missing.tsv"), "BINARY.tsv": str(tmp_path / "BINARY.tsv"),
             "DATA.parquet": str(tmp_path / "DATA.parquet"), "T5": str(data / "t5"), "NOCKPT": str(tmp_path)}
    extra = [subst.get(x, x) for x in extra]
    out = tmp_path / "out"
    assert _run(data, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()  # nothing trained, nothing written


def test_label_outside_the_training_labels_is_refused(data, tmp_path, capsys):
    rows = F.sentiment_rows(8, 5)
    rows[3]["label"] = "maybe"
    F.write_rows(rows, tmp_path / "dev.csv")
    assert main(["nlu", "--model", str(data / "bert"), "--method", "lora", "--train-file", str(data / "train.tsv"),
                 "--validation-file", str(tmp_path / "dev.csv"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "validation row 4: label 'maybe' does not occur in the training data; allowed: 0, 1" in \
        capsys.readouterr().err


def test_metrics():
    pred, gold = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
    assert accuracy(pred, gold) == 0.75
    assert f1(pred, gold) == pytest.approx(2 / 3)
    assert matthews_correlation(pred, gold) == pytest.approx(2 / math.sqrt(12))
    assert matthews_correlation(np.zeros(4), gold) == 0.0  # constant prediction
    assert matthews_correlation(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2])) == pytest.approx(1.0)
    assert f1(np.array([0, 1, 2]), np.array([0, 1, 1]), num_labels=3) == pytest.approx((1 + 2 / 3 + 0) / 3)
    x = np.array([1.0, 2.0, 2.0, 3.0, 7.0])
    y = np.array([0.5, 1.0, 3.0, 2.0, 9.0])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([1, 2, 4, 3, 5])  # average ranks for the tie
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    both = compute_metrics(("f1", "accuracy"), pred, gold, 2)
    assert both["combined_score"] == pytest.approx((2 / 3 + 0.75) / 2)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mean_pooling_ignores_padding_and_survives_patch_save_load(data, tmp_path, family):
    from transformers import AutoModelForSequenceClassification

    def build():
        return set_pooling(AutoModelForSequenceClassification.from_pretrained(data / family), "mean").eval()

    model = build()
    assert get_pooling(model) == "mean"
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0], [2, 10, 11, 12, 3, 0, 0]])
    mask = (ids != 0).long()
    short = model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).logits
    padded = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[0:1], short, rtol=1e-5, atol=1e-6)
    kadapt.patch(model, kadapt.PromptTuningConfig(prompt_length=3))   # prompt positions count as tokens
    head = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier")]
    assert head  # the head trains
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    kadapt.save_adapter(model, tmp_path / "a")
    fresh = build()
    kadapt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="already patched"):
        set_pooling(model, "cls")
    hidden = torch.randn(2, 5, 4)
    torch.testing.assert_close(masked_mean(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]]))[0], hidden[0, :4].mean(0))
