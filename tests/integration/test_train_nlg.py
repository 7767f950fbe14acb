"""The ``kadapt-train nlg`` pipeline (kadapt.train.nlg) end to end on a tiny GPT-2 and a tiny Llama saved to
disk, a byte-level BPE tokenizer trained here on the test data, and small E2E-like files: reading and grouping
references, the causal-LM examples, decoding with and without the KV cache, the metrics, resume, bad input.
Nothing is downloaded; every run takes seconds on one CPU thread."""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # Trainer needs it
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kadapt.train import generation_metrics as gm  # noqa: E402
from kadapt.train import main as kadapt_train  # noqa: E402
from kadapt.train import nlg  # noqa: E402

NAMES = ("Alimentum", "Aromi", "Bibimbap", "Cotto", "Zizzi", "Strada")
FOODS = ("Chinese", "English", "Italian", "French")
AREAS = ("riverside", "city centre")


def e2e_rows() -> list[dict[str, str]]:
    """E2E-style rows: every meaning representation with two references."""
    rows = []
    for i, name in enumerate(NAMES):
        for j, food in enumerate(FOODS):
            area = AREAS[(i + j) % 2]
            mr = f"name[{name}], food[{food}], area[{area}]"
            rows.append({"mr": mr, "ref": f"{name} serves {food} food in the {area}."})
            rows.append({"mr": mr, "ref": f"In the {area}, {name} is a {food} place."})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], fields: tuple[str, ...] = ("mr", "ref")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_tokenizer(directory: Path) -> transformers.GPT2Tokenizer:
    """A GPT-2 (byte-level BPE) tokenizer with a 300-token vocabulary learnt from the test rows."""
    texts = [t for r in e2e_rows() for t in r.values()]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return transformers.GPT2Tokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))


def save_model(directory: Path, family: str, tokenizer) -> Path:
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, initializer_range=0.2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos,
                                       initializer_range=0.2)
        model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nlg")
    tokenizer = build_tokenizer(root / "bpe")
    rows = e2e_rows()
    return {"gpt2": save_model(root / "gpt2", "gpt2", tokenizer),
            "llama": save_model(root / "llama", "llama", tokenizer),
            "train": write_csv(root / "train.csv", rows[:32]),
            "validation": write_csv(root / "validation.csv", rows[32:40]),
            "test": write_csv(root / "test.csv", rows[40:]),
            "tokenizer": root / "gpt2"}


def cli(files: dict[str, Path], out: Path, *extra: str, model: str = "gpt2", method: str = "lora") -> list[str]:
    extra = tuple(str(files["test"]) if e == "test.csv" else e for e in extra)
    return ["nlg", "--model", str(files[model]), "--method", method, "--output-dir", str(out),
            "--train-file", str(files["train"]), "--validation-file", str(files["validation"]),
            "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "0", "--epochs", "2",
            "--max-new-tokens", "12", "--logging-steps", "2", *extra]


def parse(argv: list[str]) -> argparse.Namespace:
    from kadapt.train import build_parser

    return build_parser("nlg").parse_args(argv)


# ---------------------------------------------------------------------------------------------- data

def test_read_pairs_csv_groups_references(files):
    pairs = nlg.read_pairs(files["train"], flag="--train-file")
    assert len(pairs) == 32 and pairs[0][0] == "name[Alimentum], food[Chinese], area[riverside]"
    grouped = nlg.group_references(pairs)
    assert len(grouped) == 16
    assert grouped[0] == ("name[Alimentum], food[Chinese], area[riverside]",
                          ["Alimentum serves Chinese food in the riverside.",
                           "In the riverside, Alimentum is a Chinese place."])


def test_read_pairs_jsonl_lists_and_tsv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"source": "a", "target": ["x", "y"]}) + "\n" +
                     json.dumps({"source": "b", "target": "z"}) + "\n", encoding="utf-8")
    assert nlg.group_references(nlg.read_pairs(jsonl)) == [("a", ["x", "y"]), ("b", ["z"])]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("input\toutput\na\tx\na\ty\n", encoding="utf-8")
    assert nlg.read_pairs(tsv) == [("a", "x"), ("a", "y")]
    assert nlg.read_pairs(tsv, "output", "input") == [("x", "a"), ("y", "a")]


def test_examples_train_on_the_target_only(files):
    tok = transformers.AutoTokenizer.from_pretrained(files["tokenizer"])
    fmt = nlg.DataToText(tok, tok.eos_token)
    ex = fmt.example("name[Aromi]", "Aromi is nice.")
    prompt = tok("name[Aromi]")["input_ids"] + [tok.eos_token_id]
    target = tok(" Aromi is nice.")["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + target
    assert ex["labels"] == [-100] * len(prompt) + target
    batch = nlg.CausalLMCollator(pad_token_id=7)([ex, fmt.example("name[Aromi]", "Hi.")])
    n = len(fmt.example("name[Aromi]", "Hi.")["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["input_ids"][1, n:] == 7).all() and (batch["labels"][1, n:] == -100).all()
    assert batch["attention_mask"][1].sum() == n and batch["attention_mask"][0].all()
    cut = nlg.DataToText(tok, tok.eos_token, max_source_length=2, max_target_length=3)
    short = cut.example("name[Aromi]", "Aromi is nice.")
    assert len(short["input_ids"]) == 2 + 1 + 3 + 1 and short["labels"][-1] == tok.eos_token_id
    # A tokenizer that adds BOS (the Llama family) keeps it in front of the cut source.
    bos = transformers.AutoTokenizer.from_pretrained(files["tokenizer"], add_bos_token=True)
    with_bos = nlg.DataToText(bos, bos.eos_token, max_source_length=2).example("name[Aromi]", "Hi.")
    assert with_bos["input_ids"][:4] == [bos.bos_token_id, *tok("name[Aromi]")["input_ids"][:2], tok.eos_token_id]


# -------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_cache_and_batching_agree(files, family):
    """Greedy with the KV cache == greedy without it == one source at a time (left padding is neutral)."""
    tok = transformers.AutoTokenizer.from_pretrained(files[family])
    model = transformers.AutoModelForCausalLM.from_pretrained(files[family], dtype=torch.float32)
    import kadapt
    kadapt.patch(model, kadapt.LoRAConfig(r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))  # a non-trivial adapter
    fmt = nlg.DataToText(tok, tok.eos_token)
    sources = [s for s, _ in nlg.group_references(nlg.read_pairs(files["validation"]))]
    sources.append("name[Zizzi]")  # a much shorter prompt: real left padding in its batch
    cached = nlg.decode(model, fmt, sources, max_new_tokens=10, batch_size=3)
    uncached = nlg.decode(model, fmt, sources, max_new_tokens=10, batch_size=3, use_cache=False)
    single = [nlg.decode(model, fmt, [s], max_new_tokens=10)[0] for s in sources]
    assert cached == uncached == single
    assert any(cached)
    beams = nlg.decode(model, fmt, sources, num_beams=3, max_new_tokens=10, batch_size=3)
    assert len(beams) == len(sources) and all(isinstance(b, str) for b in beams)


# --------------------------------------------------------------------------------------------- metrics

def test_bleu_multi_reference_by_hand():
    """Every n-gram of both hypotheses is matched, so BLEU = 100 * brevity penalty. Hypothesis lengths 4 + 4;
    the closest reference lengths are 5 (of 6 and 5) and 4, so BP = exp(1 - 9/8)."""
    hyps = ["a b c d", "p q r s"]
    refs = [["a b c d e f", "a b c d x"], ["p q r s"]]
    assert gm.bleu(hyps, refs) == pytest.approx(100 * math.exp(-1 / 8), abs=1e-9)
    # Only the first reference stream: closest lengths 6 + 4, BP = exp(1 - 10/8).
    assert gm.bleu(hyps, [r[:1] for r in refs]) == pytest.approx(100 * math.exp(-2 / 8), abs=1e-9)
    assert gm.bleu(["a b c d"], [["x y z w", "a b c d"]]) == pytest.approx(100.0)
    assert gm.rouge_l(["a b c d"], [["x y", "a b c d"]]) == pytest.approx(100.0)
    assert gm.rouge_l(["a b"], [["a b c d"]]) == pytest.approx(100 * 2 * (1 * 0.5) / 1.5)
    with pytest.raises(ValueError, match=r"references: expected one list of references per hypothesis"):
        gm.bleu(["a"], [])
    with pytest.raises(ValueError, match=r"references\[0\]: expected a non-empty list"):
        gm.bleu(["a"], ["a"])


def test_meteor_unavailable_is_reported_not_zero(monkeypatch):
    nltk = pytest.importorskip("nltk")

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    scores = gm.generation_metrics(["a b"], [["a b"]])
    assert scores["meteor"] is None
    assert "WordNet" in scores["meteor_unavailable"]
    with pytest.raises(RuntimeError, match="METEOR unavailable"):
        gm.meteor(["a b"], [["a b"]])


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    assert kadapt_train(cli(files, out, *RUN)) == 0
    return out, json.loads((out / "metrics.json").read_text())


# 6 steps, evaluation and a checkpoint every 2, the linear learning-rate schedule.
RUN = ("--test-file", "test.csv", "--max-steps", "6", "--eval-steps", "2", "--lr-scheduler", "linear")


def test_end_to_end_metrics(full_run):
    out, metrics = full_run
    for split in ("eval", "test"):
        for key in ("loss", "perplexity", "bleu", "rouge_l"):
            assert math.isfinite(metrics[f"{split}_{key}"]), (split, key, metrics)
        assert metrics[f"{split}_perplexity"] == pytest.approx(math.exp(metrics[f"{split}_loss"]))
        assert 0 <= metrics[f"{split}_bleu"] <= 100 and 0 <= metrics[f"{split}_rouge_l"] <= 100
        if metrics[f"{split}_meteor"] is None:
            assert metrics[f"{split}_meteor_unavailable"]
        else:
            assert math.isfinite(metrics[f"{split}_meteor"])
    assert metrics["global_step"] == 6 and metrics["pipeline"] == "nlg"
    lines = (out / "predictions_test.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 + 1 and lines[-1] == ""  # one line per test source
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curves.png").is_file()
    assert not list(out.glob("checkpoint-*/model.safetensors"))  # checkpoints hold the trainable state only


def test_resume_matches_uninterrupted_run(files, full_run, tmp_path, monkeypatch):
    """Interrupt the same 6-step run after step 4 (--stop-after-steps), resume from its checkpoint (running steps
    5 and 6 only): the same final metrics, predictions and adapter as the uninterrupted run."""
    out_full, full = full_run
    out = tmp_path / "resumed"
    assert kadapt_train(cli(files, out, *RUN, "--stop-after-steps", "4")) == 0
    assert (out / "checkpoint-4").is_dir() and not (out / "predictions_test.txt").exists()
    assert json.loads((out / "metrics.json").read_text())["stopped_at_step"] == 4
    steps = []
    step = nlg.NLGTrainer.training_step
    monkeypatch.setattr(nlg.NLGTrainer, "training_step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    assert kadapt_train(cli(files, out, *RUN, "--resume")) == 0
    assert len(steps) == 2
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("eval_loss", "eval_perplexity", "eval_bleu", "eval_rouge_l", "test_loss", "test_bleu",
                "test_rouge_l", "global_step"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    assert Path(resumed["best_checkpoint"]).name == Path(full["best_checkpoint"]).name
    assert (out / "predictions_test.txt").read_text() == (out_full / "predictions_test.txt").read_text()
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter_model.safetensors") for d in (out, out_full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_family_end_to_end(files, tmp_path):
    out = tmp_path / "llama"
    argv = cli(files, out, "--max-steps", "2", "--num-beams", "2", model="llama",
               method="kernel_adapters.nlg.pfeiffer-adapter")
    assert kadapt_train(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_bleu"]) and metrics["decoding"] == "beam search (2)"


def test_label_smoothing_keeps_the_validation_loss_a_plain_nll(files, tmp_path):
    """With --label-smoothing the training loss is smoothed but eval_loss (hence perplexity) is the NLL."""
    args = parse(cli(files, tmp_path / "ls", "--label-smoothing", "0.3", "--max-steps", "1", "--epochs", "1"))
    metrics = nlg.run(args)
    model = transformers.AutoModelForCausalLM.from_pretrained(files["gpt2"], dtype=torch.float32)
    import kadapt
    kadapt.load_adapter(model, tmp_path / "ls")
    tok = transformers.AutoTokenizer.from_pretrained(files["gpt2"])
    ds = nlg.CausalLMDataset(nlg.read_pairs(files["validation"]), nlg.DataToText(tok, tok.eos_token))
    batch = nlg.CausalLMCollator(tok.eos_token_id)(ds.rows)
    model.eval()
    with torch.no_grad():
        nll = model(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(nll, rel=1e-4)


# ------------------------------------------------------------------------------------------- bad input

def _fails(files, tmp_path, capsys, *extra, match: str, **kw) -> None:
    out = tmp_path / "bad"
    argv = cli(files, out, *extra, **kw)
    with pytest.raises(ValueError, match=match):
        nlg.run(parse(argv))
    assert kadapt_train(argv) == 2
    assert "kadapt-train nlg: error:" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.json").exists()  # nothing trained


def test_missing_column(files, tmp_path, capsys):
    bad = write_csv(tmp_path / "cols.csv", [{"meaning": "a", "text": "b"}], fields=("meaning", "text"))
    _fails(files, tmp_path, capsys, "--train-file", str(bad),
           match=r"--train-file=.*cols.csv.*no source column; expected one of mr, source, src, input .*"
                 r"its columns: meaning, text")
    _fails(files, tmp_path, capsys, "--target-column", "text",
           match=r"--target-column='text': no such column in --train-file=.*its columns: mr, ref")


def test_unreadable_file(files, tmp_path, capsys):
    _fails(files, tmp_path, capsys, "--validation-file", str(tmp_path / "missing.csv"),
           match=r"--validation-file=.*missing.csv.*cannot read the file \(FileNotFoundError")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"mr,ref\n\xff\xfe\x00bad,\x80\n")
    _fails(files, tmp_path, capsys, "--train-file", str(binary),
           match=r"--train-file=.*binary.csv.*cannot read the file \(UnicodeDecodeError")
    empty = write_csv(tmp_path / "empty.csv", [{"mr": "a", "ref": ""}])
    _fails(files, tmp_path, capsys, "--train-file", str(empty), match=r"row 1 has an empty or missing target")


def test_preset_for_another_family(files, tmp_path, capsys):
    _fails(files, tmp_path, capsys, method="kernel_adapters.nlu.inducer-lora",
           match=r"--method='kernel_adapters.nlu.inducer-lora' is a preset for the 'nlu' pipeline, not 'nlg'")
    _fails(files, tmp_path, capsys, method="compacter_paper.compacter",
           match=r"preset for the 'seq2seq' pipeline, not 'nlg'; presets for 'nlg': .*kernel_adapters.nlg")


def test_model_of_another_family(files, tmp_path, capsys):
    t5 = tmp_path / "t5"
    transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    _fails(files, tmp_path, capsys, "--model", str(t5),
           match=r"the nlg pipeline trains causal LMs of model type gpt2, llama, qwen2, mistral; got model type 't5'")


def test_bad_decoding_and_lengths(files, tmp_path, capsys):
    _fails(files, tmp_path, capsys, "--num-beams", "0", match=r"--num-beams=0: must be an integer >= 1")
    _fails(files, tmp_path, capsys, "--max-new-tokens", "500",
           match=r"--max-new-tokens=500: sequences of up to \d+ tokens exceed the model's 128 positions")


def test_missing_metric_package_fails_before_training(files, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    out = tmp_path / "nometric"
    with pytest.raises(ImportError, match=r"BLEU and ROUGE-L need sacrebleu: install with `pip install sacrebleu`"):
        nlg.run(parse(cli(files, out)))
    assert not list(out.glob("checkpoint-*"))


CONFIGS = Path(__file__).parents[2] / "examples" / "configs" / "nlg"


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_example_configs_train(files, tmp_path, config):
    """Every preset file of examples/configs/nlg runs a step on the tiny GPT-2 (the flags override its recipe)."""
    path = CONFIGS / config
    out = tmp_path / "cfg"
    assert kadapt_train(cli(files, out, "--max-steps", "1", "--max-new-tokens", "2", method=str(path))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 1 and math.isfinite(metrics["eval_perplexity"])
