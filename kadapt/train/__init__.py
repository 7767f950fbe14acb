"""``kadapt-train``: training pipelines on Hugging Face's Trainer (``python -m kadapt.train``).

    kadapt-train nlu --model roberta-base --method kernel_adapters.nlu.inducer-lora --task sst2 --output-dir runs/sst2
    kadapt-train seq2seq --model t5-base --method examples/configs/seq2seq/compacter.json --task rte --output-dir runs/rte
    kadapt-train nlg --model gpt2 --method kernel_adapters.nlg.pfeiffer-adapter --train-file ... --output-dir ...

Each pipeline is a module with ``add_arguments(parser)`` and ``run(args) -> dict``; only the chosen one is
imported. Shared pieces are in ``kadapt.train.common``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

__all__ = ["PIPELINE_MODULES", "build_parser", "main"]

# subcommand -> (module, one-line description)
PIPELINE_MODULES: dict[str, tuple[str, str]] = {
    "nlu": ("kadapt.train.nlu", "sequence classification (RoBERTa/BERT, Llama family) on GLUE or local files"),
    "nlg": ("kadapt.train.nlg", "data-to-text with a causal LM (GPT-2, Llama family); BLEU, ROUGE-L, METEOR"),
    "seq2seq": ("kadapt.train.seq2seq", "T5 text-to-text on GLUE/SuperGLUE, formatted as in the Compacter paper"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``kadapt-train`` parser; only ``command``'s pipeline module is imported to add its flags."""
    parser = argparse.ArgumentParser(prog="kadapt-train", description="Train a kadapt method with HF Trainer.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(PIPELINE_MODULES) + "}")
    for name, (module, description) in PIPELINE_MODULES.items():
        p = sub.add_parser(name, help=description, description=description)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one pipeline; print its final metrics as JSON. Bad input exits with status 2 and the message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in PIPELINE_MODULES else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(PIPELINE_MODULES[args.command][0])
    try:
        metrics = module.run(args)
    except ValueError as err:
        print(f"kadapt-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return 0
