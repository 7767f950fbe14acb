"""GLUE / SuperGLUE task definitions, data loading (local files or ``datasets``) and classification metrics,
shared by the ``nlu`` and ``seq2seq`` pipelines. Metrics are plain NumPy (no scipy / scikit-learn)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from kadapt.train.common import check_columns, read_table

__all__ = [
    "METRICS", "TASKS", "Task", "accuracy", "compacter_splits", "compute_metrics", "f1", "label_index",
    "load_splits", "matthews_correlation", "pearson", "resolve_task", "spearman",
]


# -------------------------------------------------------------------------------------------- metrics

def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold))) if len(gold) else 0.0


def f1(pred: np.ndarray, gold: np.ndarray, num_labels: int = 2) -> float:
    """Binary F1 of class 1 for two classes, else macro F1 over the ``num_labels`` classes."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = [1] if num_labels == 2 else list(range(num_labels))
    scores = []
    for c in classes:
        tp = float(np.sum((pred == c) & (gold == c)))
        fp = float(np.sum((pred == c) & (gold != c)))
        fn = float(np.sum((pred != c) & (gold == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def matthews_correlation(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (multi-class form; 0 when either side is constant)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    labels = np.union1d(pred, gold)
    if len(gold) == 0:
        return 0.0
    p = np.array([np.sum(pred == c) for c in labels], dtype=np.float64)
    t = np.array([np.sum(gold == c) for c in labels], dtype=np.float64)
    correct, n = float(np.sum(pred == gold)), float(len(gold))
    denom = math.sqrt((n * n - float(p @ p)) * (n * n - float(t @ t)))
    return (correct * n - float(p @ t)) / denom if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearman")


def compute_metrics(names: Sequence[str], pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """The named metrics, plus ``combined_score`` (their mean) when there are several."""
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = accuracy(pred, gold)
        elif name == "f1":
            out[name] = f1(pred, gold, num_labels)
        elif name == "matthews_correlation":
            out[name] = matthews_correlation(pred, gold)
        elif name == "pearson":
            out[name] = pearson(pred, gold)
        elif name == "spearman":
            out[name] = spearman(pred, gold)
        else:
            raise ValueError(f"metric={name!r}; allowed: {', '.join(METRICS)}")
    if len(names) > 1:
        out["combined_score"] = float(np.mean([out[n] for n in names]))
    return out


# ---------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    """A GLUE/SuperGLUE task: its text columns, label names (None: regression), metrics (the first, or their
    mean ``combined_score`` when there are several, selects the model), hub location and splits."""

    name: str
    text_columns: tuple[str, ...]
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    hub: tuple[str, str]
    validation_split: str = "validation"
    test_split: str | None = None       # a labelled split used as test (MNLI: validation_matched)
    size: str = "small"                  # Compacter split rule: "small", "large" or "mnli"
    label_column: str = "label"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def selection_metric(self) -> str:
        return self.metrics[0] if len(self.metrics) == 1 else "combined_score"


def _glue(name: str, columns: tuple[str, ...], labels: tuple[str, ...] | None, metrics: tuple[str, ...],
          **kw: Any) -> Task:
    return Task(name, columns, labels, metrics, ("nyu-mll/glue", name), **kw)


def _superglue(name: str, columns: tuple[str, ...], labels: tuple[str, ...], metrics: tuple[str, ...]) -> Task:
    return Task(name, columns, labels, metrics, ("aps/super_glue", name.removeprefix("superglue-")))


TASKS: dict[str, Task] = {t.name: t for t in (
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), size="large"),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), size="large"),
    _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman")),
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
          validation_split="validation_mismatched", test_split="validation_matched", size="mnli"),
    _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), size="large"),
    _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
    _superglue("superglue-boolq", ("question", "passage"), ("False", "True"), ("accuracy",)),
    _superglue("superglue-rte", ("premise", "hypothesis"), ("entailment", "not_entailment"), ("accuracy",)),
    _superglue("superglue-cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
               ("f1", "accuracy")),
    _superglue("superglue-copa", ("premise", "choice1", "choice2"), ("choice1", "choice2"), ("accuracy",)),
    _superglue("superglue-wic", ("sentence1", "sentence2", "word"), ("False", "True"), ("accuracy",)),
)}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "boolq": "superglue-boolq", "cb": "superglue-cb",
            "copa": "superglue-copa", "wic": "superglue-wic"}
GLUE_TASKS = tuple(n for n in TASKS if not n.startswith("superglue-"))


def resolve_task(name: str | None, allowed: Sequence[str]) -> Task | None:
    """The task named ``--task`` (case-insensitive; "sst-2", "boolq" accepted), None for None."""
    if name is None:
        return None
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in allowed:
        raise ValueError(f"--task={name!r}: unknown task; allowed: {', '.join(allowed)}")
    return TASKS[key]


def label_index(value: Any, task_labels: Sequence[str] | None, where: str) -> int:
    """A row's label as a class index: an integer (or integer string) < the number of labels, or a label name."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        index = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value.strip())
    elif isinstance(value, str) and task_labels is not None and value.strip() in task_labels:
        return list(task_labels).index(value.strip())
    else:
        allowed = f"0..{len(task_labels) - 1} or {', '.join(task_labels)}" if task_labels else "an integer"
        raise ValueError(f"{where}: label {value!r}; allowed: {allowed}")
    if task_labels is not None and not 0 <= index < len(task_labels):
        raise ValueError(f"{where}: label {index}; allowed: 0..{len(task_labels) - 1} or {', '.join(task_labels)}")
    return index


# ----------------------------------------------------------------------------------------------- data

def _hub_rows(task: Task, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"--task={task.name!r} without --train-file/--validation-file loads the task with the "
                         f"`datasets` package, which is not installed: `pip install 'kadapt[train]'`, or give local "
                         f"files with --train-file and --validation-file") from err
    try:
        data = datasets.load_dataset(*task.hub, split=split)
    except Exception as err:  # offline, unknown split, hub errors: one clear message before any training
        raise ValueError(f"--task={task.name!r}: cannot load {'/'.join(task.hub)} split {split!r} with `datasets` "
                         f"({type(err).__name__}: {err}); give local files with --train-file/--validation-file"
                         ) from err
    return [dict(row) for row in data]


def load_splits(args: argparse.Namespace, task: Task | None) -> dict[str, list[dict[str, Any]]]:
    """Rows of "train", "validation" and, when given, "test": from ``--train-file``/``--validation-file``/
    ``--test-file`` (stdlib readers) when given, otherwise from the hub through ``datasets`` (``--task``)."""
    files = {"train": args.train_file, "validation": args.validation_file, "test": getattr(args, "test_file", None)}
    if args.train_file or args.validation_file:
        if not (args.train_file and args.validation_file):
            raise ValueError("--train-file and --validation-file: give both (or neither, with --task, to load the "
                             "task from the hub)")
        return {split: read_table(path, f"--{split}-file") for split, path in files.items() if path}
    if task is None:
        raise ValueError("no data: give --task (a GLUE task, loaded with `datasets`) or --train-file and "
                         "--validation-file")
    if files["test"]:
        raise ValueError("--test-file needs --train-file and --validation-file too")
    splits = {"train": _hub_rows(task, "train"), "validation": _hub_rows(task, task.validation_split)}
    if task.test_split:
        splits["test"] = _hub_rows(task, task.test_split)
    return splits


def compacter_splits(splits: dict[str, list[dict[str, Any]]], task: Task, seed: int = 42
                     ) -> dict[str, list[dict[str, Any]]]:
    """The Compacter paper's splits (METHODS.md §11), from the original train and validation sets: small tasks
    halve validation into validation and test; large ones (QQP, QNLI, SST-2) take 1,000 training examples as
    validation and test on the original validation set; MNLI validates on mismatched and tests on matched.
    Each permutation is ``torch.randperm`` with a generator seeded with ``seed``."""
    import torch

    def perm(n: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()

    train, validation = splits["train"], splits["validation"]
    if task.size == "mnli":
        if "test" not in splits:
            raise ValueError("--splits compacter for mnli needs validation_mismatched and validation_matched (the "
                             "hub) or a --test-file with the matched set")
        return dict(splits)
    if task.size == "large":
        order = perm(len(train))
        return {"train": [train[i] for i in order[1000:]], "validation": [train[i] for i in order[:1000]],
                "test": validation}
    order, half = perm(len(validation)), len(validation) // 2
    return {"train": train, "validation": [validation[i] for i in order[:half]],
            "test": [validation[i] for i in order[half:]]}


def check_rows(splits: dict[str, list[dict[str, Any]]], columns: Sequence[str], flag: str) -> None:
    """Every split has the text and label columns (``flag`` names the option that chose them)."""
    for split, rows in splits.items():
        check_columns(rows, columns, flag, f"the {split} data")


def rows_to(fn: Callable[[dict[str, Any], str], Any], rows: Sequence[dict[str, Any]], split: str) -> list[Any]:
    """``fn(row, where)`` over rows, ``where`` naming the split and row for error messages."""
    return [fn(row, f"{split} row {i + 1}") for i, row in enumerate(rows)]
