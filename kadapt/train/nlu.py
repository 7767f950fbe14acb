"""The ``nlu`` pipeline: sequence classification (RoBERTa/BERT, the Llama family, GPT-2) with a kadapt method.

Data: a GLUE task by name through ``datasets`` (``--task sst2``), or local CSV/TSV/JSON(L) files read with the
standard library (``--train-file/--validation-file [--test-file]``, ``--text-columns``, ``--label-column``; with
``--task`` too, the task's columns, labels and metric apply). Metric: the task's (accuracy; F1 and accuracy for
MRPC/QQP; Matthews for CoLA; Pearson/Spearman for STS-B), or ``--metric`` for other data.

    kadapt-train nlu --model roberta-base --method kernel_adapters.nlu.inducer-lora --task sst2 \\
        --train-file glue/SST-2/train.tsv --validation-file glue/SST-2/dev.tsv --output-dir runs/sst2
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import kadapt
from kadapt.train.common import (KadaptTrainer, ListDataset, add_common_arguments, callbacks, finish, prepare,
                                 resume_checkpoint, stopped_by_request, training_arguments)
from kadapt.train.glue import GLUE_TASKS, METRICS, check_rows, compute_metrics, label_index, load_splits, resolve_task
from kadapt.train.heads import POOLINGS, set_pooling

__all__ = ["MODEL_TYPES", "add_arguments", "run"]

MODEL_TYPES = ("bert", "roberta", "llama", "qwen2", "mistral", "gpt2")
# METHODS.md §10, kernel_adapters.nlu: batch 16, lr 2e-4, 10 epochs, warmup 6%, weight decay 0.1,
# Adam (0.9, 0.98, 1e-6).
DEFAULTS: dict[str, Any] = {"epochs": 10.0, "lr": 2e-4, "batch_size": 16, "warmup_steps": 0.06, "weight_decay": 0.1,
                            "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-6, "max_length": 128,
                            "pooling": "cls"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nlu`` flags: the common ones plus data, pooling and length."""
    add_common_arguments(parser)
    d = parser.add_argument_group("data")
    d.add_argument("--task", default=None, help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    d.add_argument("--train-file", default=None, help="local .csv/.tsv/.json/.jsonl training file")
    d.add_argument("--validation-file", default=None)
    d.add_argument("--test-file", default=None, help="optional labelled test file, evaluated once at the end")
    d.add_argument("--text-columns", default=None,
                   help="one or two comma-separated column names (default: the task's, else 'sentence')")
    d.add_argument("--label-column", default=None, help="default: 'label'")
    d.add_argument("--regression", action="store_true", help="real-valued labels (local files without --task)")
    d.add_argument("--metric", default=None, help=f"local files without --task: one of {', '.join(METRICS)}")
    m = parser.add_argument_group("model")
    m.add_argument("--max-length", type=int, default=None, help="tokens per example (default 128)")
    m.add_argument("--pooling", default=None,
                   help="cls (the model's own head) or mean (mean over non-padding tokens; for sentence-embedding "
                        "checkpoints such as all-MiniLM-L6-v2)")


def _columns(args: argparse.Namespace, task) -> tuple[list[str], str]:
    if args.text_columns is not None:
        text = [c.strip() for c in args.text_columns.split(",") if c.strip()]
        if not 1 <= len(text) <= 2:
            raise ValueError(f"--text-columns={args.text_columns!r}: give one or two comma-separated column names")
    else:
        text = list(task.text_columns) if task else ["sentence"]
    return text, args.label_column or (task.label_column if task else "label")


def _labels(splits: dict[str, list[dict]], label_col: str, task, regression: bool
            ) -> tuple[dict[str, list[Any]], tuple[str, ...] | None]:
    """Per-split labels (class indices or floats) and the label names (None for regression)."""
    if regression:
        out = {}
        for split, rows in splits.items():
            values = []
            for i, row in enumerate(rows):
                try:
                    values.append(float(row[label_col]))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{split} row {i + 1}: label {row[label_col]!r} is not a number "
                                     f"(a regression task)") from err
            out[split] = values
        return out, None
    if task is not None:
        return ({split: [label_index(r[label_col], task.labels, f"{split} row {i + 1}") for i, r in enumerate(rows)]
                 for split, rows in splits.items()}, task.labels)
    raw = {split: [r[label_col] for r in rows] for split, rows in splits.items()}
    names = sorted({str(v).strip() for v in raw["train"]})
    if all(n.lstrip("-").isdigit() for n in names):
        ints = sorted({int(n) for n in names})
        if ints[0] < 0:
            raise ValueError(f"--label-column={label_col!r}: negative label {ints[0]} in the training data")
        names = [str(i) for i in range(ints[-1] + 1)]
    if len(names) < 2:
        raise ValueError(f"--label-column={label_col!r}: the training data has {len(names)} distinct label(s); "
                         f"classification needs at least 2 (use --regression for real-valued labels)")
    out = {}
    for split, values in raw.items():
        out[split] = []
        for i, v in enumerate(values):
            key = str(v).strip()
            if key not in names:
                raise ValueError(f"{split} row {i + 1}: label {v!r} does not occur in the training data; "
                                 f"allowed: {', '.join(names)}")
            out[split].append(names.index(key))
    return out, tuple(names)


def _check_model_type(model: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as err:  # missing path, offline hub, bad config.json
        raise ValueError(f"--model={model!r}: cannot load its config ({type(err).__name__}: {err})") from err
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"--model={model!r} is a {config.model_type!r} model; the nlu pipeline trains: "
                         f"{', '.join(MODEL_TYPES)}")
    return config


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate; returns the final metrics (also written to ``<output-dir>/metrics.json``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    config = prepare(args, "nlu", DEFAULTS)
    if args.pooling not in POOLINGS:
        raise ValueError(f"--pooling={args.pooling!r}; allowed: {', '.join(POOLINGS)}")
    if not isinstance(args.max_length, int) or args.max_length < 2:
        raise ValueError(f"--max-length={args.max_length!r}: must be an integer >= 2")
    task = resolve_task(args.task, GLUE_TASKS)
    regression = bool(args.regression) or (task is not None and task.labels is None)
    if task is not None and args.regression and task.labels is not None:
        raise ValueError(f"--regression: task {task.name!r} is a classification task")
    if args.metric is not None and task is not None:
        raise ValueError(f"--metric: task {task.name!r} has its own metrics ({', '.join(task.metrics)}); drop --metric")
    metric = args.metric or ("pearson" if regression else "accuracy")
    if metric not in METRICS:
        raise ValueError(f"--metric={metric!r}; allowed: {', '.join(METRICS)}")
    metrics_names = task.metrics if task else ((metric, "spearman") if metric == "pearson" else (metric,))
    selection = metrics_names[0] if len(metrics_names) == 1 else "combined_score"

    # Data: read and check everything before the model is loaded.
    splits = load_splits(args, task)
    text_cols, label_col = _columns(args, task)
    check_rows(splits, [*text_cols, label_col], "--text-columns/--label-column")
    if args.max_train_samples:
        splits["train"] = splits["train"][: args.max_train_samples]
    if args.max_eval_samples:
        splits["validation"] = splits["validation"][: args.max_eval_samples]
    labels, names = _labels(splits, label_col, task, regression)
    num_labels = 1 if regression else len(names)

    model_config = _check_model_type(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"--model={args.model!r}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token

    def encode(split: str) -> ListDataset:
        rows = splits[split]
        columns = [[str(r[c]) for r in rows] for c in text_cols]
        enc = tokenizer(*columns, truncation=True, max_length=args.max_length)
        return ListDataset([{**{k: v[i] for k, v in enc.items()}, "labels": labels[split][i]}
                            for i in range(len(rows))])

    datasets = {split: encode(split) for split in splits}
    kw: dict[str, Any] = {"num_labels": num_labels, "problem_type": "regression" if regression
                          else "single_label_classification"}
    if names:
        kw.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if model_config.pad_token_id is None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    # A checkpoint whose head has another number of labels gets a fresh head (it trains either way).
    model = AutoModelForSequenceClassification.from_pretrained(args.model, ignore_mismatched_sizes=True, **kw)
    set_pooling(model, args.pooling)
    kadapt.patch(model, config)
    # The loss is a per-example mean: without this, the Trainer (seeing the forward's **kwargs) would scale it by
    # the number of processes under DDP/FSDP.
    model.accepts_loss_kwargs = False

    def metrics_fn(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        pred = logits.reshape(-1) if regression else np.argmax(logits, axis=-1)
        return compute_metrics(metrics_names, pred, eval_pred.label_ids, num_labels)

    trainer = KadaptTrainer(model=model, args=training_arguments(args, selection, True),
                            train_dataset=datasets["train"], eval_dataset=datasets["validation"],
                            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                            compute_metrics=metrics_fn, callbacks=callbacks(args))
    train_out = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    result: dict[str, Any] = {"pipeline": "nlu", "model": args.model, "method": args.method_spec.name,
                              "task": task.name if task else None, "pooling": args.pooling,
                              "selection_metric": selection, **train_out.metrics}
    if stopped_by_request(trainer):
        return finish(Path(args.output_dir), trainer, {**result, "stopped_at_step": trainer.state.global_step})
    result.update(trainer.evaluate(datasets["validation"], metric_key_prefix="eval"))
    if "test" in datasets:
        result.update(trainer.evaluate(datasets["test"], metric_key_prefix="test"))
    return finish(Path(args.output_dir), trainer, result)
