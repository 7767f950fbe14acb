"""The ``seq2seq`` pipeline: T5 text-to-text on GLUE/SuperGLUE, formatted as the Compacter paper's code does.

Source: ``[task prefix] field1: text1 field2: text2 ...`` (e.g. ``rte sentence1: ... sentence2: ...``), the task
prefix added only for methods outside the adapter family (``--task-prefix auto``), truncated to
``--max-source-length`` (128). Target: the label index as a string (Compacter), or the label name with
``--label-format word``; STS-B's score rounded to the nearest 0.2. Evaluation decodes greedily (up to
``--generation-max-length``, 128) and scores the decoded labels with the task's metrics; the model is selected
on their mean. ``--splits compacter`` re-creates the paper's validation/test splits (METHODS.md §11).

    kadapt-train seq2seq --model t5-base --method examples/configs/seq2seq/compacter.json --task rte --output-dir runs/rte
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import kadapt
from kadapt.train.common import (KadaptSeq2SeqTrainer, ListDataset, add_common_arguments, callbacks, finish,
                                 prepare, resume_checkpoint, stopped_by_request, training_arguments)
from kadapt.train.glue import TASKS, Task, check_rows, compacter_splits, compute_metrics, label_index, load_splits, \
    resolve_task

__all__ = ["ADAPTER_METHODS", "MODEL_TYPES", "add_arguments", "decoded_metrics", "format_source", "format_target",
           "run"]

MODEL_TYPES = ("t5",)
# Methods the Compacter code runs without a task prefix (METHODS.md §11, "Formatting").
ADAPTER_METHODS = ("adapter", "pfeiffer", "low_rank_adapter", "phm_adapter", "compacter", "compacter++")
# METHODS.md §10, compacter_paper: AdamW (0.9, 0.999, 1e-8), no weight decay, clip 1, 500 warmup steps, 20 epochs.
DEFAULTS: dict[str, Any] = {"epochs": 20.0, "lr": 3e-4, "batch_size": 100, "warmup_steps": 500.0,
                            "weight_decay": 0.0, "max_grad_norm": 1.0, "max_source_length": 128,
                            "max_target_length": 128, "generation_max_length": 128, "label_format": "index",
                            "task_prefix": "auto", "splits": "given"}
LABEL_FORMATS = ("index", "word")
PREFIX_CHOICES = ("auto", "yes", "no")
SPLIT_CHOICES = ("given", "compacter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``seq2seq`` flags: the common ones plus task, data, formatting and lengths."""
    add_common_arguments(parser)
    d = parser.add_argument_group("data")
    d.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)} (boolq, cb, copa, wic accepted)")
    d.add_argument("--train-file", default=None, help="local .csv/.tsv/.json/.jsonl file in the task's columns "
                                                      "(default: the task from the hub through `datasets`)")
    d.add_argument("--validation-file", default=None)
    d.add_argument("--test-file", default=None, help="optional labelled test file, evaluated once at the end")
    d.add_argument("--splits", default=None, help="given (as loaded) or compacter (the paper's re-split, "
                                                  "test = a held-out part)")
    f = parser.add_argument_group("format and decoding")
    f.add_argument("--task-prefix", default=None,
                   help="auto (Compacter: only for methods outside the adapter family), yes or no")
    f.add_argument("--label-format", default=None, help="index (Compacter: '0', '1') or word ('entailment')")
    f.add_argument("--compat-stsb-round-0p1", action="store_true",
                   help="round STS-B targets to 0.1 as the Compacter code does (default: nearest 0.2)")
    f.add_argument("--max-source-length", type=int, default=None)
    f.add_argument("--max-target-length", type=int, default=None)
    f.add_argument("--generation-max-length", type=int, default=None, help="greedy decoding up to N tokens")


def format_source(task: Task, row: dict[str, Any], prefix: bool) -> str:
    """``[task] col1: text1 col2: text2 ...`` in the task's column order."""
    parts = [task.name] if prefix else []
    for column in task.text_columns:
        parts += [f"{column}:", str(row[column])]
    return " ".join(parts)


def format_target(task: Task, label: Any, label_format: str, where: str, stsb_0p1: bool = False) -> str:
    """The target string of a row's label."""
    if task.labels is None:
        try:
            score = float(label)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: label {label!r} is not a number (task {task.name!r})") from err
        return f"{round(score, 1) if stsb_0p1 else round(score * 5) / 5:.1f}"
    index = label_index(label, task.labels, where)
    return task.labels[index] if label_format == "word" else str(index)


def _choice(args: argparse.Namespace, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(args, name) not in allowed:
        raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r}; allowed: {', '.join(allowed)}")


def _check_model_type(model: str) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as err:
        raise ValueError(f"--model={model!r}: cannot load its config ({type(err).__name__}: {err})") from err
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"--model={model!r} is a {config.model_type!r} model; the seq2seq pipeline trains: "
                         f"{', '.join(MODEL_TYPES)}")


def decoded_metrics(task: Task, tokenizer, label_format: str) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for Seq2SeqTrainer: decode generated and gold ids, map the strings to label indices
    (STS-B: to floats) and score them with the task's metrics. A generated string that is no label counts as
    wrong (index -1; an unparsable STS-B score is -1, as in the Compacter code)."""
    import numpy as np

    label_strings = (None if task.labels is None else
                     [name if label_format == "word" else str(i) for i, name in enumerate(task.labels)])

    def to_value(text: str) -> float:
        text = text.strip()
        if label_strings is None:
            try:
                return float(text)
            except ValueError:
                return -1.0
        return float(label_strings.index(text)) if text in label_strings else -1.0

    def metrics_fn(eval_pred) -> dict[str, float]:
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        golds = np.where(eval_pred.label_ids < 0, tokenizer.pad_token_id, eval_pred.label_ids)
        pred = np.array([to_value(t) for t in tokenizer.batch_decode(preds, skip_special_tokens=True)])
        gold = np.array([to_value(t) for t in tokenizer.batch_decode(golds, skip_special_tokens=True)])
        return compute_metrics(task.metrics, pred, gold, task.num_labels)

    return metrics_fn


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate; returns the final metrics (also written to ``<output-dir>/metrics.json``)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq

    config = prepare(args, "seq2seq", DEFAULTS)
    _choice(args, "label_format", LABEL_FORMATS)
    _choice(args, "task_prefix", PREFIX_CHOICES)
    _choice(args, "splits", SPLIT_CHOICES)
    for name in ("max_source_length", "max_target_length", "generation_max_length"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value!r}: must be an integer >= 1")
    task = resolve_task(args.task, tuple(TASKS))
    methods = [c.method for c in (config if isinstance(config, list) else [config])]
    prefix = args.task_prefix == "yes" or (args.task_prefix == "auto" and
                                           not all(m in ADAPTER_METHODS for m in methods))

    splits = load_splits(args, task)
    check_rows(splits, [*task.text_columns, task.label_column], f"--task={task.name!r} (its columns)")
    if args.splits == "compacter":
        splits = compacter_splits(splits, task, args.seed)
    if args.max_train_samples:
        splits["train"] = splits["train"][: args.max_train_samples]
    if args.max_eval_samples:
        splits["validation"] = splits["validation"][: args.max_eval_samples]
    pairs = {split: [(format_source(task, r, prefix),
                      format_target(task, r[task.label_column], args.label_format, f"{split} row {i + 1}",
                                    args.compat_stsb_round_0p1))
                     for i, r in enumerate(rows)] for split, rows in splits.items()}

    _check_model_type(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"--model={args.model!r}: its tokenizer has no pad token")

    def encode(split: str) -> ListDataset:
        sources, targets = zip(*pairs[split])
        enc = tokenizer(list(sources), truncation=True, max_length=args.max_source_length)
        tgt = tokenizer(text_target=list(targets), truncation=True, max_length=args.max_target_length)
        return ListDataset([{**{k: v[i] for k, v in enc.items()}, "labels": tgt["input_ids"][i]}
                            for i in range(len(sources))])

    datasets = {split: encode(split) for split in pairs}
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    kadapt.patch(model, config)
    # The loss is a per-example mean: without this, the Trainer (seeing the forward's **kwargs) would scale it by
    # the number of processes under DDP/FSDP.
    model.accepts_loss_kwargs = False

    metrics_fn = decoded_metrics(task, tokenizer, args.label_format)

    train_args = training_arguments(args, task.selection_metric, True, seq2seq=True, predict_with_generate=True,
                                    generation_max_length=args.generation_max_length, generation_num_beams=1)
    trainer = KadaptSeq2SeqTrainer(model=model, args=train_args, train_dataset=datasets["train"],
                                   eval_dataset=datasets["validation"], processing_class=tokenizer,
                                   data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                   compute_metrics=metrics_fn, callbacks=callbacks(args))
    train_out = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    result: dict[str, Any] = {"pipeline": "seq2seq", "model": args.model, "method": args.method_spec.name,
                              "task": task.name, "task_prefix": prefix, "label_format": args.label_format,
                              "selection_metric": task.selection_metric, **train_out.metrics}
    if stopped_by_request(trainer):
        return finish(Path(args.output_dir), trainer, {**result, "stopped_at_step": trainer.state.global_step})
    result.update(trainer.evaluate(datasets["validation"], metric_key_prefix="eval"))
    if "test" in datasets:
        result.update(trainer.evaluate(datasets["test"], metric_key_prefix="test"))
    return finish(Path(args.output_dir), trainer, result)
