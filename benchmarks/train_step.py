"""End-to-end training-step benchmark: one AdamW step (forward, backward, optimiser) per method and model.

Models are built from configs with random weights on the target device (nothing downloaded), parameters in
fp32, the step under bf16 autocast (``--dtype``; fp32 = no autocast), AdamW (fused on CUDA):

  gpt2-medium   GPT2LMHeadModel (1024, 24 layers, 16 heads)         batch 8  x 512
  roberta-base  RobertaForSequenceClassification (2 labels)         batch 32 x 128
  t5-base       T5ForConditionalGeneration (V 32,100, tied)          batch 32 x 128 source, 8 target
  llama-3.2-1b  LlamaForCausalLM (2048, 16 layers, 32/8 heads, V 128,256, tied)  batch 8 x 512
  gpt2          GPT-2 small (not in the default set)                batch 8  x 512

Methods, one run each, in the order given (default: all, the order of ``ALL_METHODS``): ``floor`` (every weight frozen; one trainable bias added to the
input-embedding output, so the backward crosses every layer but forms no weight gradient: the cheapest step
any method can have), ``full_finetune``, every kadapt method (``kadapt.METHODS``, each with its default
config; PHM n = 4 where the default n = 12 does not divide the widths), and peft's ``peft:lora``,
``peft:prefix_tuning``, ``peft:prompt_tuning`` at kadapt's default shapes (LoRA r = 8 on q, v — GPT-2's
fused c_attn —; prefix P = 30 through a 512-wide MLP; 100 prompt vectors) when peft is importable (else
skipped, the reason printed). ``--tiny`` shrinks every model to 2 layers, width 64 (a CPU smoke run).

``--said`` is the Intrinsic-SAID comparison of issue 11 (T5-base, B = 32, source 128, target 8: floor,
full fine-tuning, LoRA and SAID with d_I = 20,000) with its targets: SAID step <= 1.3x the LoRA step, SAID
peak memory <= full fine-tuning's.

Per run: the median of ``--steps`` timed steps (after ``--warmup``; wall clock around a synchronised step,
so host overhead counts) and the peak allocated CUDA memory over the timed steps (weights, optimiser state
and activations). Ratios: time and peak memory to the floor and to full fine-tuning of the same model.
Outputs under ``--out``: train_step_<device>_<dtype>[_tiny][_said].csv (rewritten after every run, so an
interrupted run keeps what finished) and .png (bar charts per model), and a markdown table on stdout.

    python benchmarks/train_step.py --device cuda                           # every model and method
    python benchmarks/train_step.py --models gpt2-medium --methods floor full_finetune lora peft:lora
    python benchmarks/train_step.py --said --device cuda                    # SAID vs LoRA vs full, T5-base
    python benchmarks/train_step.py --tiny --device cpu --dtype fp32 --steps 1 --warmup 0   # CPU smoke run
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import kadapt

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR, FULL = "floor", "full_finetune"
PEFT_METHODS = ("peft:lora", "peft:prefix_tuning", "peft:prompt_tuning")
KADAPT_METHODS = tuple(sorted(m for m in kadapt.METHODS if m != FULL))
# each peft peer right after kadapt's method: a run cut short by a timeout still holds the comparisons
_PAIRED = ("lora", "peft:lora", "prefix_tuning", "peft:prefix_tuning", "prompt_tuning", "peft:prompt_tuning")
ALL_METHODS = (FLOOR, FULL, *_PAIRED, *(m for m in KADAPT_METHODS if m not in _PAIRED))
SAID_METHODS = (FLOOR, FULL, "lora", "intrinsic_said")
SAID_TARGETS = {"time_vs_lora": 1.3, "mem_vs_full": 1.0}  # issue 11
FIELDS = ["model", "method", "provider", "status", "trainable", "total", "batch", "seq", "target_len", "ms_per_step",
          "tokens_per_s", "peak_mib", "time_vs_floor", "mem_vs_floor", "time_vs_full", "mem_vs_full", "note",
          "device", "dtype", "torch", "transformers", "peft", "date"]


class ModelSpec(NamedTuple):
    """A model shape: its transformers classes, config kwargs (base and tiny) and default batch shape."""

    family: str
    config_cls: str
    model_cls: str
    base: dict
    tiny: dict
    batch: int
    seq: int
    target_len: int | None = None


_TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000)
_TINY_ENC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
MODELS: dict[str, ModelSpec] = {
    "gpt2-medium": ModelSpec("gpt2", "GPT2Config", "GPT2LMHeadModel", dict(n_embd=1024, n_layer=24, n_head=16),
                             _TINY_GPT2, 8, 512),
    "gpt2": ModelSpec("gpt2", "GPT2Config", "GPT2LMHeadModel", {}, _TINY_GPT2, 8, 512),
    "roberta-base": ModelSpec("roberta", "RobertaConfig", "RobertaForSequenceClassification",
                              dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2),
                              dict(_TINY_ENC, num_labels=2), 32, 128),
    "t5-base": ModelSpec("t5", "T5Config", "T5ForConditionalGeneration",
                         dict(vocab_size=32100, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                              feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0),
                         dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              decoder_start_token_id=0), 32, 128, 8),
    "llama-3.2-1b": ModelSpec("llama", "LlamaConfig", "LlamaForCausalLM",
                              dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True),
                              dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                              8, 512),
}
DEFAULT_MODELS = ("gpt2-medium", "roberta-base", "t5-base", "llama-3.2-1b")


def build_model(name: str, tiny: bool, device: torch.device) -> nn.Module:
    """Random-weight model ``name`` (fp32, train mode), initialised directly on ``device``."""
    import transformers as tf

    spec = MODELS[name]
    cfg = getattr(tf, spec.config_cls)(**(spec.tiny if tiny else spec.base))
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(tf, spec.model_cls)(cfg)
    return model.train()


def hidden_size(model: nn.Module) -> int:
    c = model.config
    return getattr(c, "d_model", None) or getattr(c, "n_embd", None) or c.hidden_size


def method_config(method: str, model: nn.Module, tiny: bool) -> tuple[kadapt.KadaptConfig, str]:
    """kadapt's default config of ``method`` (scaled down for tiny models) and a note on any change."""
    cls = kadapt.METHODS[method]
    hidden = hidden_size(model)
    if tiny:
        small = {"prompt_tuning": dict(prompt_length=4), "prefix_tuning": dict(prefix_length=4, hidden_size=16),
                 "intrinsic_said": dict(intrinsic_dim=500),
                 "mam": dict(prefix=kadapt.PrefixTuningConfig(prefix_length=4, hidden_size=16),
                             parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8))}
        if method in small:
            return cls(**small[method]), "tiny config"
        if issubclass(cls, kadapt.configs.BottleneckConfig) or method == "parallel_adapter":
            return cls(bottleneck_dim=8, **({"phm_dim": 4} if method == "phm_adapter" else {})), "tiny config"
        return cls(), ""
    cfg = cls()
    if method == "phm_adapter":
        m = cfg.bottleneck_size(hidden)
        if hidden % cfg.phm_dim or m % cfg.phm_dim:
            return cls(phm_dim=4), f"phm_dim 4 (12 does not divide D={hidden}, m={m})"
    return cfg, ""


def make_batch(name: str, model: nn.Module, batch: int, seq: int, target_len: int | None,
               device: torch.device) -> dict:
    family, vocab = MODELS[name].family, model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "roberta":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g).to(device)
    elif family == "t5":
        out["labels"] = torch.randint(3, vocab, (batch, target_len or max(1, seq // 16)), generator=g).to(device)
    else:
        out["labels"] = ids
    return out


# ---------------------------------------------------------------------------------------------------------
# attaching a method: returns (the model to call, its trainable parameters, provider, note)

def attach_floor(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter], str, str]:
    """Freeze everything; a trainable bias added to the input-embedding output keeps the backward alive."""
    model.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    bias = nn.Parameter(torch.zeros(weight.shape[1], device=weight.device))
    for m in model.modules():  # T5's encoder and decoder hold their own Embedding modules on the shared weight
        if isinstance(m, nn.Embedding) and m.weight is weight:
            m.register_forward_hook(lambda module, args, output: output + bias)
    return model, [bias], "floor", "all weights frozen, one bias on the embedding output"


def peft_available() -> str | None:
    """None when peft imports, else why not."""
    if importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    try:
        import peft  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return f"peft does not import: {type(exc).__name__}: {exc}"
    return None


def attach_peft(method: str, name: str, model: nn.Module, tiny: bool) -> tuple[nn.Module, list[nn.Parameter], str, str]:
    """peft's LoRA / prefix / prompt tuning at the shapes of kadapt's defaults (tiny: kadapt's tiny configs)."""
    import peft

    family = MODELS[name].family
    task = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "roberta": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}[family]
    kind = method.split(":", 1)[1]
    if kind == "lora":
        lora = kadapt.LoRAConfig()
        targets = {"gpt2": ["c_attn"], "roberta": ["query", "value"], "t5": ["q", "v"],
                   "llama": ["q_proj", "v_proj"]}[family]
        cfg = peft.LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=targets, fan_in_fan_out=family == "gpt2")  # GPT-2's Conv1D
        note = f"r={lora.r} on {','.join(targets)}"
    elif kind == "prefix_tuning":
        pre = kadapt.PrefixTuningConfig(**({"prefix_length": 4, "hidden_size": 16} if tiny else {}))
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=pre.prefix_length, prefix_projection=True,
                                      encoder_hidden_size=pre.hidden_size)
        note = f"P={pre.prefix_length}, MLP {pre.hidden_size}"
    else:
        pt = kadapt.PromptTuningConfig(**({"prompt_length": 4} if tiny else {}))
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=pt.prompt_length)
        note = f"P={pt.prompt_length}"
    wrapped = peft.get_peft_model(model, cfg)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], "peft", note


def attach(method: str, name: str, model: nn.Module, tiny: bool) -> tuple[nn.Module, list[nn.Parameter], str, str]:
    if method == FLOOR:
        return attach_floor(model)
    if method.startswith("peft:"):
        return attach_peft(method, name, model, tiny)
    cfg, note = method_config(method, model, tiny)
    kadapt.patch(model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad], "kadapt", note


# ---------------------------------------------------------------------------------------------------------
# measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, method: str, args: argparse.Namespace) -> dict:
    """One row: build, attach, warm up, time ``args.steps`` AdamW steps, peak memory; errors become rows."""
    device, spec = torch.device(args.device), MODELS[name]
    batch_size = args.batch or spec.batch
    seq = args.seq or spec.seq
    target = (args.target_len or spec.target_len) if spec.family == "t5" else None
    if args.tiny:
        batch_size, seq, target = min(batch_size, 2), min(seq, 8), (min(target or 2, 2) if target else None)
    row = {"model": name, "method": method, "provider": "kadapt", "status": "ok", "batch": batch_size, "seq": seq,
           "target_len": target or "", "ms_per_step": math.nan, "tokens_per_s": math.nan, "peak_mib": math.nan,
           "note": ""}
    if method.startswith("peft:"):
        row["provider"] = "peft"
        reason = peft_available()
        if reason:
            return dict(row, status="skip", note=reason)
    model = opt = None
    try:
        model = build_model(name, args.tiny, device)
        total = sum(p.numel() for p in model.parameters())
        model, params, row["provider"], row["note"] = attach(method, name, model, args.tiny)
        row.update(trainable=sum(p.numel() for p in params), total=total)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        batch = make_batch(name, model, batch_size, seq, target, device)
        autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

        def step() -> None:
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        tokens = batch_size * (seq + (target or 0))
        row.update(ms_per_step=ms, tokens_per_s=tokens / (ms / 1e3))
        if device.type == "cuda":
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    except torch.OutOfMemoryError as exc:
        row.update(status="oom", note=f"{row['note']}; {str(exc).splitlines()[0][:160]}".lstrip("; "))
    except Exception as exc:  # noqa: BLE001 - a method that fails is a row; the sweep goes on
        row.update(status="error", note=f"{row['note']}; {type(exc).__name__}: {exc}".lstrip("; ")[:300])
    finally:
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """time_vs_floor, mem_vs_floor, time_vs_full, mem_vs_full per model (NaN where a reference is missing)."""
    def ref(model: str, method: str, key: str) -> float:
        hit = [r[key] for r in rows if r["model"] == model and r["method"] == method and r["status"] == "ok"]
        return hit[0] if hit else math.nan

    for r in rows:
        for col, method, key in (("time_vs_floor", FLOOR, "ms_per_step"), ("mem_vs_floor", FLOOR, "peak_mib"),
                                 ("time_vs_full", FULL, "ms_per_step"), ("mem_vs_full", FULL, "peak_mib")):
            r[col] = r[key] / ref(r["model"], method, key)


def said_targets(rows: list[dict], device: str) -> list[str]:
    """Issue 11's SAID targets, one line each, for every model with SAID, LoRA and full fine-tuning rows."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        got = {r["method"]: r for r in rows if r["model"] == model and r["status"] == "ok"}
        if not {"intrinsic_said", "lora", FULL} <= set(got):
            continue
        said, lora, full = got["intrinsic_said"], got["lora"], got[FULL]
        t = said["ms_per_step"] / lora["ms_per_step"]
        m = said["peak_mib"] / full["peak_mib"]
        verdict = (f"**{'PASS' if t <= SAID_TARGETS['time_vs_lora'] else 'FAIL'}**" if device.startswith("cuda")
                   else "no verdict (CPU smoke run, not a measurement)")
        lines.append(f"- {model}: SAID step / LoRA step = {t:.2f}x ({said['ms_per_step']:.1f} / "
                     f"{lora['ms_per_step']:.1f} ms; target <= {SAID_TARGETS['time_vs_lora']}x): {verdict}")
        lines.append(f"- {model}: SAID peak / full fine-tuning peak = " + (
            "NOT MEASURED (no CUDA memory statistics on this device)" if math.isnan(m) else
            f"{m:.2f}x ({said['peak_mib']:.0f} / {full['peak_mib']:.0f} MiB; target <= "
            f"{SAID_TARGETS['mem_vs_full']}x): **{'PASS' if m <= SAID_TARGETS['mem_vs_full'] else 'FAIL'}**"))
    return lines


# ---------------------------------------------------------------------------------------------------------
# output

def _fmt(x, spec: str) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def write_csv(rows: list[dict], path: Path, meta: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in {**meta, **r}.items() if k in FIELDS})


def table(rows: list[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model]
        r0 = sel[0]
        shape = f"{r0['batch']} x {r0['seq']}" + (f" -> {r0['target_len']}" if r0["target_len"] else "")
        out += [f"\n### {model}, batch {shape}\n",
                "| method | provider | trainable | ms/step | x floor | peak MiB | mem x floor | x full (time) | "
                "x full (mem) | tokens/s | status | note |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            out.append(f"| {r['method']} | {r['provider']} | {_fmt(r.get('trainable', math.nan), ',')} | "
                       f"{_fmt(r['ms_per_step'], '.2f')} | {_fmt(r['time_vs_floor'], '.2f')} | "
                       f"{_fmt(r['peak_mib'], '.0f')} | {_fmt(r['mem_vs_floor'], '.2f')} | "
                       f"{_fmt(r['time_vs_full'], '.2f')} | {_fmt(r['mem_vs_full'], '.2f')} | "
                       f"{_fmt(r['tokens_per_s'], ',.0f')} | {r['status']} | {r['note'].replace('|', '/')} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per model: ms per step and peak memory per method (bars), labelled with the ratio to the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = [("ms_per_step", "time_vs_floor", "ms per step")]
    if any(not math.isnan(r["peak_mib"]) for r in rows):  # no memory statistics on the CPU
        panels.append(("peak_mib", "mem_vs_floor", "peak MiB"))
    fig, axes = plt.subplots(len(models), len(panels), figsize=(7.0 * len(panels), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        sel = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        colors = ["tab:gray" if r["method"] == FLOOR else "tab:orange" if r["provider"] == "peft" else "tab:blue"
                  for r in sel]
        for j, (key, ratio, label) in enumerate(panels):
            ax = axes[i][j]
            ax.bar(range(len(sel)), [0 if math.isnan(r[key]) else r[key] for r in sel], color=colors)
            for k, r in enumerate(sel):
                if not math.isnan(r[ratio]):
                    ax.text(k, r[key], f"{r[ratio]:.2f}", ha="center", va="bottom", fontsize=6)
            ax.set_xticks(range(len(sel)), [r["method"] for r in sel], rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{model}: {label} (labels: x floor)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict:
    import transformers

    peft_version = ""
    if peft_available() is None:
        import peft

        peft_version = peft.__version__
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
            "date": date.today().isoformat()}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, metavar="MODEL",
                   help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None, metavar="METHOD",
                   help=f"default: all ({' '.join(ALL_METHODS)})")
    p.add_argument("--said", action="store_true", help="issue 11's SAID comparison on T5-base (with its targets)")
    p.add_argument("--tiny", action="store_true", help="2-layer, width-64 models, batch <= 2 x 8 (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    p.add_argument("--batch", type=int, default=None, help="default: per model (see above)")
    p.add_argument("--seq", type=int, default=None, help="default: per model (T5: the source length)")
    p.add_argument("--target-len", type=int, default=None, help="T5 target length (default 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    models = args.models or (["t5-base"] if args.said else list(DEFAULT_MODELS))
    methods = args.methods or list(SAID_METHODS if args.said else ALL_METHODS)
    if args.device.startswith("cpu") and not args.tiny:
        p.error("the full-size models need a GPU; use --tiny on the CPU")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    reason = peft_available()
    if reason and any(m.startswith("peft:") for m in methods):
        print(f"skipping {', '.join(m for m in methods if m.startswith('peft:'))}: {reason}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = (f"train_step_{args.device.split(':')[0]}_{args.dtype}{'_tiny' if args.tiny else ''}"
            f"{'_said' if args.said else ''}")
    meta = {"device": args.device, "dtype": args.dtype, **_versions()}
    rows: list[dict] = []
    interrupted = False
    try:
        for name in models:
            for method in methods:
                row = measure(name, method, args)
                rows.append(row)
                add_ratios(rows)
                write_csv(rows, args.out / f"{stem}.csv", meta)
                print(f"{name:13s} {method:20s} {row['status']:5s} {_fmt(row['ms_per_step'], '10.2f')} ms "
                      f"{_fmt(row['peak_mib'], '8.0f')} MiB  {row['note']}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # the GPU check's timeout: keep and report what finished
        interrupted = True
        print("interrupted: the table holds the runs that finished", flush=True)
    precision = "fp32" if args.dtype == "fp32" else f"{args.dtype} autocast"
    if rows:
        plot(rows, args.out / f"{stem}.png", f"one AdamW step, {args.device} {precision}"
                                              f"{', tiny models' if args.tiny else ''} ({platform.node()})")
    print(f"# train_step {date.today()} {platform.node()} torch {torch.__version__}, {args.device}, {precision}, "
          f"warmup {args.warmup}, median of {args.steps} steps{' (tiny models)' if args.tiny else ''}")
    print(table(rows))
    targets = said_targets(rows, args.device)
    if targets:
        print("\nIntrinsic-SAID targets (issue 11):\n" + "\n".join(targets))
    missing = [f"{r['model']}/{r['method']} ({r['status']}: {r['note']})" for r in rows if r["status"] != "ok"]
    if missing:
        print("\nnot measured: " + "; ".join(missing))
    print(f"\nwrote {args.out / stem}.csv and .png")
    if interrupted:
        sys.exit(130)
    return rows


if __name__ == "__main__":
    # a kadapt method, the floor or full fine-tuning that failed fails the run; a peft peer's failure is reported only
    sys.exit(1 if any(r["status"] in ("error", "oom") and r["provider"] != "peft" for r in main()) else 0)
