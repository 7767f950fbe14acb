"""End-to-end training-step benchmark: one AdamW step (forward, backward, optimiser) per method.

Models are built from configs with random weights (nothing downloaded): ``--size base`` gives the
published shapes (GPT-2 small, RoBERTa-base, T5-base), ``--size tiny`` a 2-layer toy for a smoke run.
Writes a CSV and a PNG under ``--out`` (default benchmarks/results/) and prints a table with each
method's time relative to full fine-tuning, the Compacter paper's Δtime (docs/methods.md §15).

    python benchmarks/train_step.py --family t5 --size base --device cuda --dtype bf16
    python benchmarks/train_step.py --family gpt2 --size tiny --steps 3   # CPU smoke run
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

import kadapt

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FAMILIES = ("gpt2", "roberta", "bert", "t5")
DEFAULT_METHODS = ("full_finetune", "adapter", "pfeiffer", "low_rank_adapter", "phm_adapter", "compacter",
                   "compacter++", "bitfit")


def build_model(family: str, size: str) -> torch.nn.Module:
    """A random-weight model of the family; the task head is an LM / seq2seq head."""
    import transformers as tf

    tiny = size == "tiny"
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000) if tiny else tf.GPT2Config()
        return tf.GPT2LMHeadModel(cfg)
    if family in ("roberta", "bert"):
        cls_cfg = tf.RobertaConfig if family == "roberta" else tf.BertConfig
        kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=1000) if tiny else {}
        model_cls = tf.RobertaForSequenceClassification if family == "roberta" else tf.BertForSequenceClassification
        return model_cls(cls_cfg(num_labels=2, **kw))
    if family == "t5":
        kw = (dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4) if tiny else
              dict(vocab_size=32100, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12))
        return tf.T5ForConditionalGeneration(tf.T5Config(decoder_start_token_id=0, **kw))
    raise ValueError(f"family={family!r}; allowed values: {', '.join(FAMILIES)}")


def method_config(method: str, hidden: int) -> kadapt.KadaptConfig:
    """The method's default config; bottleneck widths chosen so phm_dim divides m on tiny models."""
    cls = kadapt.METHODS[method]
    if issubclass(cls, kadapt.configs.BottleneckConfig) and hidden < 256:
        return cls(bottleneck_dim=8, **({"phm_dim": 4} if method == "phm_adapter" else {}))
    return cls()


def make_batch(model: torch.nn.Module, family: str, batch: int, seq: int, device: torch.device) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), device=device)
    if family == "gpt2":
        return {"input_ids": ids, "labels": ids}
    if family in ("roberta", "bert"):
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), device=device)}
    return {"input_ids": ids, "labels": ids[:, : max(1, seq // 4)].contiguous()}


def time_method(family: str, size: str, method: str, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = build_model(family, size).to(device=device, dtype=dtype).train()
    hidden = getattr(model.config, "hidden_size", None) or model.config.d_model
    kadapt.patch(model, method_config(method, hidden))
    trainable, total = kadapt.trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(model, family, args.batch, args.seq, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    ms = statistics.median(times) * 1e3
    return {"family": family, "size": size, "method": method, "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "seq": args.seq, "trainable": trainable, "total": total,
            "ms_per_step": round(ms, 3), "tokens_per_s": round(args.batch * args.seq / (ms / 1e3), 1),
            "peak_mib": round(peak, 1), "backend": kadapt.get_backend()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["method"] for r in rows], [r["ms_per_step"] for r in rows], color="tab:blue")
    r0 = rows[0]
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"{r0['family']} {r0['size']}, {r0['device']} {r0['dtype']}, batch {r0['batch']}×{r0['seq']}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="t5")
    p.add_argument("--size", choices=("tiny", "base"), default="base")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(kadapt.METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    rows = [time_method(args.family, args.size, m, args) for m in tqdm(args.methods, desc="methods")]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_step_{args.family}_{args.size}_{args.device.split(':')[0]}_{args.dtype}"
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / f"{stem}.png")

    base = next((r["ms_per_step"] for r in rows if r["method"] == "full_finetune"), None)
    print(f"# {date.today()} {platform.node()} torch {torch.__version__}; {stem}")
    print(f"{'method':18s} {'trainable':>12s} {'ms/step':>10s} {'tokens/s':>10s} {'peak MiB':>9s} {'vs full FT':>10s}")
    for r in rows:
        ratio = f"{r['ms_per_step'] / base:.2f}x" if base else "-"
        print(f"{r['method']:18s} {r['trainable']:12,d} {r['ms_per_step']:10.2f} {r['tokens_per_s']:10.1f} "
              f"{r['peak_mib']:9.1f} {ratio:>10s}")
    print(f"wrote {args.out / (stem + '.csv')} and .png")
    return rows


if __name__ == "__main__":
    main()
