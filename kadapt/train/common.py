"""What every ``kadapt-train`` pipeline shares: the common command-line arguments, method presets and config
files, ``TrainingArguments``, a ``Trainer`` whose checkpoints hold the trainable state only, and the final
metrics file and plot.

Contract of a pipeline module (``kadapt.train.nlu``, ``nlg``, ``seq2seq``)::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # calls add_common_arguments(parser) itself
    def run(args: argparse.Namespace) -> dict                     # the final metrics (also in metrics.json)

A pipeline's ``run`` typically does::

    config = prepare(args, "nlu", defaults={"lr": 2e-4})          # method + hyperparameters, seeds set
    ... read and check the data, load the model, kadapt.patch(model, config) ...
    trainer = KadaptTrainer(model=model, args=training_arguments(args, "accuracy", True), ...,
                            callbacks=callbacks(args))
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    return finish(args.output_dir, trainer, metrics)

Hyperparameters resolve in this order: the command line, the ``training`` section of a method config file
(``examples/configs/*.json``), the pipeline's defaults, ``COMMON_DEFAULTS``. Every check runs before any
training starts and raises ``ValueError`` naming the flag and the allowed values.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback

import kadapt
from kadapt.api import CONFIG_NAME, WEIGHTS_NAME
from kadapt.methods.base import KadaptConfig
from kadapt.train import distributed

__all__ = [
    "COMMON_DEFAULTS", "PIPELINES", "PRESET_PIPELINES", "KadaptSeq2SeqTrainer", "KadaptTrainer", "ListDataset",
    "MethodSpec", "StopAfterSteps", "add_common_arguments", "callbacks", "check_columns", "finish", "load_method",
    "method_config", "prepare", "read_table", "resume_checkpoint", "set_seed", "stopped_by_request",
    "training_arguments",
]

PIPELINES = ("nlu", "nlg", "seq2seq")
# Which pipeline each published preset was tuned for (METHODS.md §9-§10).
PRESET_PIPELINES = {
    "compacter_paper.": "seq2seq",
    "kernel_adapters.nlg.": "nlg",
    "kernel_adapters.nlu.": "nlu",
    "he2022_mam_roberta": "nlu",
}
# Defaults of the common hyperparameters when neither the command line, the config file nor the pipeline sets them.
COMMON_DEFAULTS: dict[str, Any] = {
    "epochs": 3.0, "lr": 1e-3, "batch_size": 16, "eval_batch_size": None, "grad_accum": 1, "seed": 42,
    "bf16": False, "fp16": False, "max_steps": None, "eval_steps": None, "logging_steps": 10,
    "early_stopping_patience": None, "stop_after_steps": None, "weight_decay": 0.0, "warmup_steps": 0.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "lr_scheduler": "linear",
    "label_smoothing": 0.0, "max_train_samples": None, "max_eval_samples": None, "save_total_limit": 2,
}
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")
# Keys a config file's "training" section may not set: they name the run, not the method's recipe.
_NOT_IN_FILE = ("model", "method", "output_dir", "resume", "pipeline", "train_file", "validation_file", "test_file",
                "stop_after_steps", "command")


# ------------------------------------------------------------------------------------------ arguments

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every pipeline takes. Hyperparameters default to None: ``prepare`` fills them in."""
    g = parser.add_argument_group("model, method and run")
    g.add_argument("--model", required=True, help="hub name or local path of the pretrained model")
    g.add_argument("--method", required=True,
                   help="a preset name (kadapt.PRESETS), a registered method name (kadapt.METHODS, default "
                        "config) or a JSON config file (examples/configs/*.json)")
    g.add_argument("--output-dir", required=True, help="checkpoints, the final adapter, metrics.json and the plot")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory, or (no value / 'auto') from the last one in --output-dir")
    t = parser.add_argument_group("training (defaults: the method config file, then the pipeline)")
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--batch-size", type=int, default=None, help="per-device training batch size")
    t.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    t.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    t.add_argument("--seed", type=int, default=None)
    prec = t.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (GPU)")
    prec.add_argument("--fp16", action="store_true", default=None, help="fp16 autocast with loss scaling (GPU)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="train for this many optimizer steps (overrides --epochs; sets the schedule's length)")
    t.add_argument("--stop-after-steps", type=int, default=None,
                   help="end the run after N optimizer steps with a checkpoint, keeping the full run's schedule "
                        "(continue it later with --resume)")
    t.add_argument("--eval-steps", type=int, default=None,
                   help="evaluate and checkpoint every N steps (default: every epoch)")
    t.add_argument("--logging-steps", type=int, default=None)
    t.add_argument("--early-stopping-patience", type=int, default=None,
                   help="stop after N evaluations without improving the validation metric")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--warmup-steps", type=float, default=None, help="steps (>= 1) or a fraction of training (< 1)")
    t.add_argument("--adam-beta1", type=float, default=None)
    t.add_argument("--adam-beta2", type=float, default=None)
    t.add_argument("--adam-epsilon", type=float, default=None)
    t.add_argument("--max-grad-norm", type=float, default=None)
    t.add_argument("--lr-scheduler", default=None, help=f"one of {', '.join(LR_SCHEDULERS)}")
    t.add_argument("--label-smoothing", type=float, default=None)
    t.add_argument("--save-total-limit", type=int, default=None, help="checkpoints kept (the best one always)")
    t.add_argument("--max-train-samples", type=int, default=None, help="use the first N training examples")
    t.add_argument("--max-eval-samples", type=int, default=None, help="use the first N validation examples")


# -------------------------------------------------------------------------------------------- methods

@dataclass
class MethodSpec:
    """A resolved ``--method``: the kadapt config(s), the config file's training section, and a label."""

    config: KadaptConfig | list[KadaptConfig]
    training: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    pipeline: str | None = None  # the pipeline the preset or file was made for, if it says


def _preset_pipeline(name: str) -> str | None:
    for prefix, pipeline in PRESET_PIPELINES.items():
        if name.startswith(prefix):
            return pipeline
    return None


def _check_pipeline(pipeline: str) -> None:
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}; allowed: {', '.join(PIPELINES)}")


def _config_from_json(data: Any, where: str) -> KadaptConfig | list[KadaptConfig]:
    try:
        if isinstance(data, str):
            if data in kadapt.PRESETS:
                return kadapt.preset(data)
            if data in kadapt.METHODS:
                return kadapt.METHODS[data]()
            raise ValueError(f"{data!r} is neither a preset ({', '.join(kadapt.PRESETS)}) nor a method "
                             f"({', '.join(kadapt.METHODS)})")
        if isinstance(data, list) and data:
            return [KadaptConfig.from_dict(d) for d in data]
        if isinstance(data, dict):
            return KadaptConfig.from_dict(data)
        raise ValueError(f"expected a preset/method name, a config object or a non-empty list of them, "
                         f"got {type(data).__name__}")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: invalid method config: {err}") from err


def load_method(spec: str, pipeline: str) -> MethodSpec:
    """Resolve ``--method``: a preset name, a registered method name, or a JSON file.

    A JSON file is either a plain config (``config.to_dict()``, or a list of them), or a preset file::

        {"pipeline": "nlu", "method": <preset/method name | config dict | list>, "training": {"lr": 2e-4, ...}}

    A preset (or file) made for another pipeline is refused."""
    _check_pipeline(pipeline)
    if not isinstance(spec, str) or not spec:
        raise ValueError("--method: empty; give a preset name, a method name or a JSON config file")
    if spec in kadapt.PRESETS:
        made_for = _preset_pipeline(spec)
        if made_for is not None and made_for != pipeline:
            same = [p for p in kadapt.PRESETS if _preset_pipeline(p) in (pipeline, None)]
            raise ValueError(f"--method={spec!r} is a preset for the {made_for!r} pipeline, not {pipeline!r}; "
                             f"presets for {pipeline!r}: {', '.join(same) or 'none'} (or a method name: "
                             f"{', '.join(kadapt.METHODS)}, or a config file)")
        return MethodSpec(kadapt.preset(spec), {}, spec, made_for)
    if spec in kadapt.METHODS:
        return MethodSpec(kadapt.METHODS[spec](), {}, spec, None)
    path = Path(spec)
    if path.suffix.lower() != ".json" and not path.exists():
        raise ValueError(f"--method={spec!r}: not a preset ({', '.join(kadapt.PRESETS)}), not a method "
                         f"({', '.join(kadapt.METHODS)}) and not a .json config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--method={spec!r}: cannot read the config file ({type(err).__name__}: {err})") from err
    if isinstance(data, dict) and ("training" in data or "pipeline" in data):
        unknown = sorted(set(data) - {"pipeline", "method", "training", "description", "source"})
        if unknown:
            raise ValueError(f"--method={spec!r}: unknown key(s) {unknown}; allowed: description, method, pipeline, "
                             f"source, training")
        if "method" not in data:
            raise ValueError(f"--method={spec!r}: the file has no 'method' entry")
        made_for = data.get("pipeline")
        if made_for is not None:
            if made_for not in PIPELINES:
                raise ValueError(f"--method={spec!r}: pipeline={made_for!r}; allowed: {', '.join(PIPELINES)}")
            if made_for != pipeline:
                raise ValueError(f"--method={spec!r} is a config for the {made_for!r} pipeline, not {pipeline!r}")
        training = data.get("training", {})
        if not isinstance(training, dict):
            raise ValueError(f"--method={spec!r}: 'training' must be a JSON object, got {type(training).__name__}")
        config = _config_from_json(data["method"], f"--method={spec!r}")
        return MethodSpec(config, dict(training), path.stem, made_for)
    return MethodSpec(_config_from_json(data, f"--method={spec!r}"), {}, path.stem, None)


def method_config(spec: str, family: str) -> KadaptConfig | list[KadaptConfig]:
    """The kadapt config for ``--method`` in pipeline ``family`` ("nlu", "nlg" or "seq2seq")."""
    return load_method(spec, family).config


# ------------------------------------------------------------------------------------ resolve and check

def _apply_training(args: argparse.Namespace, values: dict[str, Any], where: str) -> None:
    """Fill the unset (None) attributes of ``args`` from ``values``; unknown keys are refused."""
    allowed = sorted(k for k in vars(args) if k not in _NOT_IN_FILE)
    for key, value in values.items():
        if key in _NOT_IN_FILE or not hasattr(args, key):
            raise ValueError(f"{where}: unknown training key {key!r}; allowed: {', '.join(allowed)}")
        if getattr(args, key) is None:
            setattr(args, key, value)


def _check_number(args: argparse.Namespace, name: str, *, integer: bool, low: float, strict: bool,
                  optional: bool = False) -> None:
    value = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ValueError(f"{flag}={value!r}: must be {kind} {'>' if strict else '>='} {low}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{flag}={value!r}: must be {kind} {'>' if strict else '>='} {low}")
    if integer:
        setattr(args, name, int(value))


def prepare(args: argparse.Namespace, pipeline: str, defaults: dict[str, Any] | None = None
            ) -> KadaptConfig | list[KadaptConfig]:
    """Resolve ``--method`` and every unset hyperparameter (command line > config file > ``defaults`` >
    ``COMMON_DEFAULTS``), check them, seed every RNG, and return the kadapt config. Stores the resolved
    method on ``args.method_spec``."""
    spec = load_method(args.method, pipeline)
    args.method_spec = spec
    _apply_training(args, spec.training, f"--method={args.method!r}")
    _apply_training(args, defaults or {}, f"{pipeline} defaults")
    for key, value in COMMON_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    _check_number(args, "epochs", integer=False, low=0, strict=True)
    _check_number(args, "lr", integer=False, low=0, strict=True)
    for name in ("batch_size", "eval_batch_size", "grad_accum", "logging_steps"):
        _check_number(args, name, integer=True, low=1, strict=False)
    for name in ("max_steps", "stop_after_steps", "eval_steps", "early_stopping_patience", "max_train_samples",
                 "max_eval_samples"):
        _check_number(args, name, integer=True, low=1, strict=False, optional=True)
    _check_number(args, "save_total_limit", integer=True, low=1, strict=False)
    _check_number(args, "seed", integer=True, low=0, strict=False)
    for name in ("weight_decay", "warmup_steps", "adam_epsilon", "max_grad_norm", "label_smoothing"):
        _check_number(args, name, integer=False, low=0, strict=False)
    for name in ("adam_beta1", "adam_beta2"):
        _check_number(args, name, integer=False, low=0, strict=False)
        if getattr(args, name) >= 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r}: must be in [0, 1)")
    if args.label_smoothing >= 1:
        raise ValueError(f"--label-smoothing={args.label_smoothing!r}: must be in [0, 1)")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr-scheduler={args.lr_scheduler!r}; allowed: {', '.join(LR_SCHEDULERS)}")
    args.bf16, args.fp16 = bool(args.bf16), bool(args.fp16)
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16: choose at most one")
    if (args.bf16 or args.fp16) and not torch.cuda.is_available():
        raise ValueError(f"--{'bf16' if args.bf16 else 'fp16'}: mixed precision here needs a CUDA GPU, and none "
                         f"is available; drop the flag to train in fp32")
    resume_checkpoint(args)  # checks an explicit --resume path now
    set_seed(args.seed)
    return spec.config


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    from transformers import set_seed as hf_set_seed

    random.seed(seed)
    hf_set_seed(seed)


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from: ``--resume DIR``, or with ``--resume``/``--resume auto`` the last
    ``checkpoint-N`` in ``--output-dir`` (None when there is none: training starts fresh)."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(args.output_dir)
        return get_last_checkpoint(str(out)) if out.is_dir() else None
    path = Path(args.resume)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, "trainer_state.json") if not (path / n).is_file()]
    if missing:
        raise ValueError(f"--resume={args.resume!r}: not a kadapt-train checkpoint (missing {', '.join(missing)}); "
                         f"give a checkpoint-N directory of an earlier run or 'auto'")
    return str(path)


# ---------------------------------------------------------------------------------------------- data

class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts as a map-style dataset."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl"}


def read_table(path: str | os.PathLike, flag: str) -> list[dict[str, Any]]:
    """Rows of a local CSV, TSV (header line), JSON lines, or JSON (a list of objects, or one object of
    columns) file, read with the standard library. Unreadable or malformed files raise ``ValueError``
    naming ``flag``."""
    import csv

    path = Path(path)
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{flag}={str(path)!r}: unknown file type {path.suffix!r}; allowed: "
                         f"{', '.join(TABLE_FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8")
        if fmt in ("csv", "tsv"):
            csv.field_size_limit(1 << 30)
            rows: list[Any] = list(csv.DictReader(text.splitlines(), delimiter="," if fmt == "csv" else "\t",
                                                  quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE))
        elif fmt == "jsonl" or (fmt == "json" and not text.lstrip().startswith(("[", "{"))):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSON lines under a .json name
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
            if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
                data = data["data"]
            if isinstance(data, dict):  # columns -> rows
                lengths = {len(v) for v in data.values() if isinstance(v, list)}
                if len(lengths) != 1 or not all(isinstance(v, list) for v in data.values()):
                    raise ValueError("a JSON object must map every column to a list of one common length")
                n = lengths.pop()
                data = [{k: v[i] for k, v in data.items()} for i in range(n)]
            rows = data
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{flag}={str(path)!r}: cannot read the file ({type(err).__name__}: {err})") from err
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{flag}={str(path)!r}: expected rows of named columns (CSV/TSV with a header line, JSON "
                         f"objects)")
    if not rows:
        raise ValueError(f"{flag}={str(path)!r}: the file holds no rows")
    return rows


def check_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str], flag: str, where: str) -> None:
    """Every name in ``columns`` is a column of ``rows`` (checked on the first row and on any row lacking it)."""
    present = list(rows[0]) if rows else []
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(f"{flag}: column(s) {missing} not in {where}; its columns: {', '.join(map(str, present))}")
    for i, row in enumerate(rows):
        for c in columns:
            if c not in row or row[c] is None:
                raise ValueError(f"{where}: row {i + 1} has no value for column {c!r}")


# ---------------------------------------------------------------------------------------- the Trainer

class _TrainableStateCheckpoints:
    """Mixin for ``transformers.Trainer``: checkpoints and the final save hold kadapt's trainable state only
    (adapter_config.json + adapter_model.safetensors), resuming and loading the best checkpoint load it back.
    Saving and loading go through ``kadapt.train.distributed`` (plain, DDP-wrapped or FSDP2-sharded models; the
    Trainer calls ``save_model`` on every rank, rank 0 writes). Optimizer, scheduler, RNG and trainer state are
    saved by the Trainer as usual, so ``train(resume_from_checkpoint=...)`` continues the run exactly."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        distributed.save_adapter(self.model, output_dir)  # every rank: a sharded adapter is gathered first
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        distributed.load_adapter(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        distributed.load_adapter(self.model, self.state.best_model_checkpoint)


class KadaptTrainer(_TrainableStateCheckpoints, Trainer):
    """``transformers.Trainer`` with trainable-state-only checkpoints (kadapt.save_adapter)."""


class KadaptSeq2SeqTrainer(_TrainableStateCheckpoints, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with trainable-state-only checkpoints (kadapt.save_adapter)."""


def training_arguments(args: argparse.Namespace, metric_name: str, greater_is_better: bool, *,
                       seq2seq: bool = False, **overrides: Any):
    """``TrainingArguments`` (``Seq2SeqTrainingArguments`` with ``seq2seq=True``) from resolved ``args``
    (call ``prepare`` first): evaluation and checkpoints every epoch (or every ``--eval-steps``), the best
    checkpoint by ``eval_<metric_name>`` loaded at the end, no external loggers. ``overrides`` win."""
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    strategy = "steps" if args.eval_steps else "epoch"
    kw: dict[str, Any] = dict(
        output_dir=str(args.output_dir), num_train_epochs=float(args.epochs),
        max_steps=args.max_steps if args.max_steps else -1,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm, lr_scheduler_type=args.lr_scheduler,
        label_smoothing_factor=args.label_smoothing, seed=args.seed, data_seed=args.seed,
        bf16=args.bf16, fp16=args.fp16,
        eval_strategy=strategy, save_strategy=strategy, logging_strategy="steps",
        logging_steps=args.logging_steps, logging_first_step=True,
        load_best_model_at_end=True, metric_for_best_model=metric_name, greater_is_better=greater_is_better,
        save_total_limit=args.save_total_limit, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        # without it, CPU processes under torchrun would each train alone on the same batches
        use_cpu=not torch.cuda.is_available(),
    )
    if args.eval_steps:
        kw.update(eval_steps=args.eval_steps, save_steps=args.eval_steps)
    kw.update(overrides)
    return (Seq2SeqTrainingArguments if seq2seq else TrainingArguments)(**kw)


class StopAfterSteps(TrainerCallback):
    """Ends training after ``steps`` optimizer steps with a checkpoint (the learning-rate schedule stays that of
    the full run), so a later ``train(resume_from_checkpoint=...)`` continues it as if never stopped."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer ends the epoch after a stop; its epoch-end evaluation would be one the full run does not
        # make (it would move the RNG and the best-checkpoint record), and the checkpoint is already written.
        if state.global_step >= self.steps and state.global_step < state.max_steps:
            control.should_evaluate = False
            control.should_save = False
        return control


def callbacks(args: argparse.Namespace) -> list[TrainerCallback]:
    """Trainer callbacks from ``args``: early stopping on the validation metric (``--early-stopping-patience``)
    and ``--stop-after-steps``."""
    from transformers import EarlyStoppingCallback

    out: list[TrainerCallback] = []
    if args.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    if getattr(args, "stop_after_steps", None):
        out.append(StopAfterSteps(args.stop_after_steps))
    return out


def stopped_by_request(trainer: Trainer) -> bool:
    """True when ``--stop-after-steps`` ended the run before its last step (the run is to be resumed)."""
    stops = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopAfterSteps)]
    return any(trainer.state.global_step >= cb.steps for cb in stops) and \
        trainer.state.global_step < trainer.state.max_steps


# --------------------------------------------------------------------------------------------- finish

def _plot(history: list[dict[str, Any]], metric_name: str | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    key = f"eval_{metric_name}" if metric_name else None
    metric = [(h["step"], h[key]) for h in history if key and key in h]
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend()
    if metric:
        ax = axes[0][1]
        ax.plot(*zip(*metric), "o-", color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel(metric_name)
        ax.set_title(f"validation {metric_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def finish(output_dir: str | os.PathLike, trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """Save the final (best, when one was tracked) adapter into ``output_dir``, and write ``metrics.json``
    (``metrics`` plus trainable/total parameter counts and the best checkpoint) and ``training_curves.png``
    (training/validation loss and the validation metric per step). Returns the metrics written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out))
    if not trainer.args.should_save:
        return metrics
    trainable, total = kadapt.trainable_parameters(distributed.unwrap(trainer.model))
    result = dict(metrics)
    result.setdefault("trainable_parameters", trainable)
    result.setdefault("total_parameters", total)
    result.setdefault("global_step", trainer.state.global_step)
    result.setdefault("best_checkpoint", trainer.state.best_model_checkpoint)
    result = {k: _json_value(v) for k, v in result.items()}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    metric_name = trainer.args.metric_for_best_model
    if metric_name and metric_name.startswith("eval_"):
        metric_name = metric_name[len("eval_"):]
    if not _plot(trainer.state.log_history, metric_name, out / "training_curves.png"):
        print("kadapt-train: matplotlib is not installed; training_curves.png not written")
    return result


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    try:
        return _json_value(value.item())  # numpy / torch scalars
    except (AttributeError, ValueError):
        return str(value)
