"""The ``nlg`` pipeline: data-to-text with a causal LM (GPT-2, the Llama family) on source→target files.

Data. CSV (E2E: columns ``mr``, ``ref``; several rows sharing a source are several references), TSV, JSON or
JSON lines (a row's target may be a list of references). Training uses every (source, reference) pair;
evaluation groups the references of each source (``--max-eval-samples`` / ``--max-test-samples`` count
sources). A training sequence is ``source + separator + target + EOS`` with the
loss on the target tokens (and EOS) only.

Evaluation. Validation loss each epoch (early stopping on it, i.e. on perplexity, as kernel-adapters does),
then decoding of every validation (and test) source with the KV cache, greedy or beam search, batched with
left padding, scored with multi-reference BLEU, ROUGE-L and METEOR (kadapt.train.generation_metrics).

    kadapt-train nlg --model gpt2 --method kernel_adapters.nlg.pfeiffer-adapter \\
        --train-file e2e/devset.csv --validation-file e2e/testset_w_refs.csv --output-dir runs/e2e
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

import kadapt
from kadapt.train.common import (KadaptTrainer, ListDataset, add_common_arguments, callbacks, finish, load_method,
                                 prepare, read_table, resume_checkpoint, stopped_by_request, training_arguments)
from kadapt.train.generation_metrics import check_metric_packages, generation_metrics

__all__ = [
    "CAUSAL_LM_MODEL_TYPES", "DEFAULTS", "CausalLMCollator", "CausalLMDataset", "DataToText", "NLGTrainer",
    "add_arguments", "check_model_type", "decode", "group_references", "perplexity", "read_pairs", "run",
]

# Model types the pipeline trains (kadapt's GPT-2 and Llama-family backbones).
CAUSAL_LM_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
# Column names tried, in order, when --source-column / --target-column are not given.
SOURCE_COLUMNS = ("mr", "source", "src", "input")
TARGET_COLUMNS = ("ref", "target", "tgt", "output", "references")


# ------------------------------------------------------------------------------------------- data files

def _column(given: str | None, candidates: Sequence[str], found: Sequence[str], what: str, flag: str,
            path: Path) -> str:
    if given is not None:
        if given not in found:
            raise ValueError(f"--{what}-column={given!r}: no such column in {flag}={str(path)!r}; its columns: "
                             f"{', '.join(map(str, found))}")
        return given
    for name in candidates:
        if name in found:
            return name
    raise ValueError(f"{flag}={str(path)!r}: no {what} column; expected one of {', '.join(candidates)} (or name it "
                     f"with --{what}-column); its columns: {', '.join(map(str, found))}")


def read_pairs(path: str | Path, source_column: str | None = None, target_column: str | None = None, *,
               flag: str = "file") -> list[tuple[str, str]]:
    """(source, reference) pairs of a CSV, TSV, JSON or JSON-lines file, in file order; a JSON row whose target
    is a list gives one pair per reference. Columns default to the first present of SOURCE_COLUMNS /
    TARGET_COLUMNS. ValueError naming ``flag`` and the path for an unreadable file, a missing column, an
    empty source or reference, or no rows."""
    path = Path(path)
    rows = read_table(path, flag)
    found = list(rows[0])
    src = _column(source_column, SOURCE_COLUMNS, found, "source", flag, path)
    tgt = _column(target_column, TARGET_COLUMNS, found, "target", flag, path)
    pairs = []
    for i, row in enumerate(rows, start=1):
        source, targets = row.get(src), row.get(tgt)
        targets = targets if isinstance(targets, list) else [targets]
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{flag}={str(path)!r}: row {i} has an empty or missing source (column {src!r})")
        if not targets:
            raise ValueError(f"{flag}={str(path)!r}: row {i} has an empty list of targets (column {tgt!r})")
        for target in targets:
            if not isinstance(target, str) or not target.strip():
                raise ValueError(f"{flag}={str(path)!r}: row {i} has an empty or missing target (column {tgt!r})")
            pairs.append((source.strip(), target.strip()))
    return pairs


def group_references(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """One (source, [references...]) per distinct source, in order of first appearance."""
    grouped: dict[str, list[str]] = {}
    for source, target in pairs:
        grouped.setdefault(source, []).append(target)
    return list(grouped.items())


# ---------------------------------------------------------------------------------------- tokenisation

@dataclass
class DataToText:
    """How a (source, target) pair becomes token ids: ``source + separator`` is the prompt, ``target + EOS``
    the continuation. Sources are cut to ``max_source_length`` tokens (keeping their start), targets to
    ``max_target_length`` (before EOS)."""

    tokenizer: Any
    separator: str
    max_source_length: int = 256
    max_target_length: int = 128

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no EOS token (eos_token), which ends every target")
        self._sep = self.tokenizer(self.separator, add_special_tokens=False)["input_ids"]
        if not self._sep:
            raise ValueError(f"--separator={self.separator!r}: tokenises to no tokens; give a non-empty separator")
        self._n_special = len(self.tokenizer("", add_special_tokens=True)["input_ids"])

    def prompt(self, source: str) -> list[int]:
        """Token ids of ``source + separator`` (with the tokenizer's own leading special tokens, e.g. Llama's
        BOS)."""
        ids = self.tokenizer(source, add_special_tokens=True)["input_ids"]
        return list(ids[: self.max_source_length + self._n_special]) + self._sep

    def target(self, target: str) -> list[int]:
        """Token ids of ``" " + target`` cut to max_target_length, then EOS."""
        ids = self.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        return list(ids[: self.max_target_length]) + [self.tokenizer.eos_token_id]

    def example(self, source: str, target: str) -> dict[str, list[int]]:
        """``input_ids`` and ``labels`` (-100 on the prompt) of one training sequence."""
        prompt, continuation = self.prompt(source), self.target(target)
        return {"input_ids": prompt + continuation, "labels": [-100] * len(prompt) + continuation}


class CausalLMDataset(ListDataset):
    """Tokenised (source, target) pairs for ``Trainer``: dicts of ``input_ids`` and ``labels``."""

    def __init__(self, pairs: Sequence[tuple[str, str]], fmt: DataToText):
        super().__init__([fmt.example(source, target) for source, target in pairs])


@dataclass
class CausalLMCollator:
    """Pads a batch on the right: ``input_ids`` with ``pad_token_id``, ``labels`` with -100, and the
    ``attention_mask``."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -------------------------------------------------------------------------------------------- decoding

@torch.no_grad()
def decode(model: nn.Module, fmt: DataToText, sources: Sequence[str], *, num_beams: int = 1,
           max_new_tokens: int = 40, batch_size: int = 16, use_cache: bool = True,
           progress: bool = False) -> list[str]:
    """Generate a target for every source with ``model.generate``: greedy (``num_beams=1``) or beam search,
    batched with left padding, with the KV cache unless ``use_cache=False``. Returns the decoded
    continuations (special tokens dropped), in the order of ``sources``; ``progress`` shows a progress bar."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    tok = fmt.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              early_stopping=num_beams > 1, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                              bos_token_id=tok.bos_token_id, use_cache=use_cache)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [fmt.prompt(s) for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="decoding", disable=not progress):
            batch = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(prompts[i])
                ids[row, width - n:] = torch.tensor(prompts[i])
                mask[row, width - n:] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)
            for row, i in enumerate(batch):
                outputs[i] = tok.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs


# ---------------------------------------------------------------------------------------------- checks

def check_model_type(model_type: str | None, flag: str = "--model") -> None:
    """ValueError unless the pipeline can train this model type (a causal LM of kadapt's GPT-2 or Llama
    families)."""
    if model_type not in CAUSAL_LM_MODEL_TYPES:
        raise ValueError(f"{flag}: the nlg pipeline trains causal LMs of model type "
                         f"{', '.join(CAUSAL_LM_MODEL_TYPES)}; got model type {model_type!r} "
                         f"(use the nlu pipeline for RoBERTa/BERT and seq2seq for T5)")


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------- trainer

class NLGTrainer(KadaptTrainer):
    """``KadaptTrainer`` whose validation loss is the plain token NLL even when training uses label smoothing,
    and which logs ``eval_perplexity`` = exp(eval_loss) (the metric early stopping and model selection use)."""

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        if model.training or self.label_smoother is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        smoother, self.label_smoother = self.label_smoother, None
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.label_smoother = smoother

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for key in [k for k in logs if k.endswith("_loss") and not k.startswith("train")]:
            logs[key[: -len("loss")] + "perplexity"] = perplexity(logs[key])  # in place: evaluate() returns it
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------------------------------------- CLI

# METHODS.md §10, kernel_adapters.nlg: AdamW, weight decay 0, clip 1, 500 warmup steps then linear decay, 10 epochs,
# label smoothing 0.1 (0 for full fine-tuning), lr 1.25e-3 (6.25e-5 for full fine-tuning), batch 8, early stopping
# on validation perplexity with patience 5.
DEFAULTS: dict[str, Any] = {"epochs": 10.0, "lr": 1.25e-3, "batch_size": 8, "warmup_steps": 500.0,
                            "weight_decay": 0.0, "max_grad_norm": 1.0, "lr_scheduler": "linear",
                            "label_smoothing": 0.1, "early_stopping_patience": 5}
FULL_FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 6.25e-5, "label_smoothing": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The nlg flags: the common ones, the data files and columns, the sequence format and decoding."""
    add_common_arguments(parser)
    d = parser.add_argument_group("data (CSV, TSV, JSON or JSON lines; rows sharing a source are its references)")
    d.add_argument("--train-file", required=True)
    d.add_argument("--validation-file", required=True,
                   help="validation loss/perplexity each evaluation (early stopping) and the final decoding")
    d.add_argument("--test-file", default=None, help="decoded and scored after training, if given")
    d.add_argument("--source-column", default=None,
                   help=f"default: the first present of {', '.join(SOURCE_COLUMNS)}")
    d.add_argument("--target-column", default=None,
                   help=f"default: the first present of {', '.join(TARGET_COLUMNS)} (a JSON list = several "
                        f"references)")
    d.add_argument("--separator", default=None,
                   help="text between source and target (default: the tokenizer's BOS token, else its EOS token)")
    d.add_argument("--max-source-length", type=int, default=256, help="source tokens kept")
    d.add_argument("--max-target-length", type=int, default=128, help="target tokens kept in training")
    d.add_argument("--max-test-samples", type=int, default=None, help="use the first N test sources")
    g = parser.add_argument_group("decoding")
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy (the kernel-adapters setting)")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--no-cache", action="store_true", help="decode without the KV cache (slow; for checks)")


def _check_int(args: argparse.Namespace, name: str, low: int, optional: bool = False) -> None:
    value = getattr(args, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{name.replace('_', '-')}={value!r}: must be an integer >= {low}")


def _first_sources(pairs: list[tuple[str, str]], n: int | None) -> list[tuple[str, str]]:
    """The pairs of the first ``n`` distinct sources (all pairs when ``n`` is None)."""
    if n is None:
        return pairs
    keep = {source for source, _ in group_references(pairs)[:n]}
    return [p for p in pairs if p[0] in keep]


def _load_model_config(model: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as err:  # a missing path, an unreachable hub, a broken config.json
        raise ValueError(f"--model={model!r}: cannot load its config ({type(err).__name__}: {err})") from err
    check_model_type(getattr(config, "model_type", None), f"--model={model!r}")
    return config


def _position_limit(model_config: Any, method: Any) -> int | None:
    limit = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if limit is None:
        return None
    configs = method if isinstance(method, list) else [method]
    return limit - sum(getattr(c, "prompt_length", 0) for c in configs)  # prompt tuning occupies positions


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, then decode and score; returns the final metrics (also in ``<output-dir>/metrics.json``;
    the hypotheses in ``predictions_<split>.txt``). Every check runs before the model is loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback

    spec = load_method(args.method, "nlg")
    configs = spec.config if isinstance(spec.config, list) else [spec.config]
    full = any(c.method == "full_finetune" for c in configs)
    method = prepare(args, "nlg", {**DEFAULTS, **(FULL_FINETUNE_DEFAULTS if full else {})})
    for name in ("max_source_length", "max_target_length", "max_new_tokens", "num_beams"):
        _check_int(args, name, 1)
    _check_int(args, "max_test_samples", 1, optional=True)
    check_metric_packages()  # scoring runs after training: fail now, not then

    # Data, read and checked before the model is loaded.
    columns = (args.source_column, args.target_column)
    train = read_pairs(args.train_file, *columns, flag="--train-file")[: args.max_train_samples]
    validation = _first_sources(read_pairs(args.validation_file, *columns, flag="--validation-file"),
                                args.max_eval_samples)
    test = (_first_sources(read_pairs(args.test_file, *columns, flag="--test-file"), args.max_test_samples)
            if args.test_file else None)

    model_config = _load_model_config(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.eos_token is None:
        raise ValueError(f"--model={args.model!r}: its tokenizer has no EOS token, which ends every target")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    separator = args.separator if args.separator is not None else (tokenizer.bos_token or tokenizer.eos_token)
    fmt = DataToText(tokenizer, separator, args.max_source_length, args.max_target_length)
    datasets = {"train": CausalLMDataset(train, fmt), "validation": CausalLMDataset(validation, fmt)}
    if test is not None:
        datasets["test"] = CausalLMDataset(test, fmt)
    limit = _position_limit(model_config, method)
    if limit is not None:
        longest = max(len(r["input_ids"]) for ds in datasets.values() for r in ds.rows)
        prompts = max(r["labels"].count(-100) for ds in datasets.values() for r in ds.rows)
        if longest > limit or prompts + args.max_new_tokens > limit:
            raise ValueError(f"--max-source-length={args.max_source_length} / --max-target-length="
                             f"{args.max_target_length} / --max-new-tokens={args.max_new_tokens}: sequences of up "
                             f"to {max(longest, prompts + args.max_new_tokens)} tokens exceed the model's "
                             f"{limit} positions; lower them")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    kadapt.patch(model, method)

    trainer = NLGTrainer(model=model, args=training_arguments(args, "perplexity", False, prediction_loss_only=True),
                         train_dataset=datasets["train"], eval_dataset=datasets["validation"],
                         data_collator=CausalLMCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                         callbacks=callbacks(args))
    train_out = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    trainer.remove_callback(EarlyStoppingCallback)  # it would look for eval_perplexity in the test metrics
    result: dict[str, Any] = {"pipeline": "nlg", "model": args.model, "method": spec.name,
                              "decoding": "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams})",
                              **train_out.metrics}
    out = Path(args.output_dir)
    if stopped_by_request(trainer):  # --stop-after-steps: a checkpoint to resume from, nothing to score yet
        return finish(out, trainer, {**result, "stopped_at_step": trainer.state.global_step})
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix, pairs in (("validation", "eval", validation), ("test", "test", test)):
        if pairs is None:
            continue
        result.update(trainer.evaluate(datasets[split], metric_key_prefix=prefix))
        grouped = group_references(pairs)
        hypotheses = decode(trainer.model, fmt, [s for s, _ in grouped], num_beams=args.num_beams,
                            max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                            use_cache=not args.no_cache,
                            progress=trainer.is_world_process_zero() and not trainer.args.disable_tqdm)
        if trainer.args.should_save:
            lines = "".join(" ".join(h.splitlines()) + "\n" for h in hypotheses)  # one line per source
            (out / f"predictions_{split}.txt").write_text(lines, encoding="utf-8")
        result.update({f"{prefix}_{k}": v for k, v in
                       generation_metrics(hypotheses, [refs for _, refs in grouped]).items()})
    return finish(out, trainer, result)
