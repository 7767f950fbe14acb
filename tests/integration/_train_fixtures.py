"""Tiny offline models, tokenizers and data files for the kadapt-train pipeline tests (nothing downloaded)."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "boring"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "very", "quite", "and", "acting", "story"]
LABEL_WORDS = ["0", "1", "2", "negative", "positive", "sentence:", "sentence1:", "sentence2:", "premise:",
               "hypothesis:", "sst2", "rte", "mrpc", "cola", "stsb", "entailment", "not_entailment"]
WORDS = POSITIVE + NEGATIVE + FILLER + LABEL_WORDS


def tokenizer(kind: str):
    """A WordLevel fast tokenizer over WORDS: ``kind="bert"`` adds [CLS] ... [SEP] (pairs: [SEP] between),
    ``kind="t5"`` appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


def save_model(kind: str, directory: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny randomly initialised model and its tokenizer, saved with save_pretrained into ``directory``."""
    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification, T5Config, T5ForConditionalGeneration)

    tok = tokenizer("t5" if kind == "t5" else "bert")
    vocab = len(tok)
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                  vocab_size=vocab, max_position_embeddings=64, pad_token_id=0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**{**common, "max_position_embeddings": 66,
                                                                  "pad_token_id": 0}))
    elif kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=2 * hidden,
                                                    num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=4,
                                                    decoder_start_token_id=0))
    else:
        raise KeyError(kind)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose label (1 positive, 0 negative) is the majority of sentiment words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def pair_rows(n: int, seed: int) -> list[dict]:
    """Sentence pairs labelled 0 (same sentiment: entailment) or 1 (different: not_entailment), like RTE."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 1), rng.randint(0, 1)
        s1 = " ".join(rng.sample(FILLER, 2) + rng.sample(POSITIVE if a else NEGATIVE, 1))
        s2 = " ".join(rng.sample(FILLER, 2) + rng.sample(POSITIVE if b else NEGATIVE, 1))
        rows.append({"sentence1": s1, "sentence2": s2, "label": int(a != b)})
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    """``rows`` as .tsv/.csv (header line) or .jsonl, by the suffix of ``path``."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return path
