"""Fastfood-transform benchmark (Intrinsic-SAID, METHODS.md §4, §12.5): v = cat_i P_i z over every
T5-base tensor.

Sizes: the parameters of ``T5ForConditionalGeneration(T5Config(vocab_size=32100, d_model=768, d_kv=64,
d_ff=3072, num_layers=12, num_heads=12))`` built on the meta device, deduplicated by storage (tied
tensors count once: ``model.parameters()`` yields a shared Parameter once, and parameters that share a
meta storage are merged too). d_z defaults to 19,742 (the GLUE config's d_I = 20,000 minus K + 1).
``--tiny`` uses a handful of small tensors instead (a CPU smoke run in seconds).

Providers:
  reference  kadapt.set_backend("reference"): the per-tensor PyTorch reference (radix-2 FWHT from
             torch.stack, several kernels per stage), regenerating the randomness every call
  triton     kadapt.set_backend("triton"): the blocked two-level kernels, one ragged launch per pass
  peer       the original formulation written from the math: per-tensor stored state (b, g as fp32, π as
             int64: 12 B per padded element), one Triton radix-2 butterfly launch per FWHT stage per
             tensor (log₂L_i launches per Hadamard), the π-gather and g multiply as torch ops; backward
             by autograd (FWHT's backward is the same stage loop; the gather's is a scatter-add)
  copy       torch copy of a large buffer (the device copy bandwidth of this run, the yardstick)

Modes: ``fwd`` (v = f(z)) and ``fwd+bwd`` (then ∂z = autograd.grad(v, z, γ) with a fixed γ).

``gbps`` = floor bytes / time, floor = the traffic of a fully fused two-pass design, fp32: pass 1 writes
ΣL_i, pass 2 reads ΣL_i and writes ΣN_i: 4·(2ΣL + ΣN) bytes per transform (fwd), twice that for
fwd+bwd (the backward transposes the same two passes). ``ratio_to_copy`` = gbps / (the copy's GB/s,
counted as read + write). Times: CUDA events (medians of --reps repeats, after a warm-up) on CUDA;
time.perf_counter on the CPU (a smoke run, not a measurement).

Outputs under --out (default benchmarks/results/): fastfood_<device>.csv and fastfood_<device>.png.

    python benchmarks/fastfood.py --device cuda                  # the T5-base sweep (GPU)
    TRITON_INTERPRET=1 python benchmarks/fastfood.py --device cpu --tiny --reps 1     # CPU smoke run
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch

import kadapt
from kadapt.ops.fastfood import fastfood, fastfood_plan, gaussians, permutation, signs

PROVIDERS = ("reference", "triton", "peer")
MODES = ("fwd", "fwd+bwd")
TINY_SIZES = (5, 64, 300, 1000)
TINY_DZ = 32
GLUE_DZ = 19742
FIELDS = ["provider", "mode", "ms", "gbps", "ratio_to_copy", "floor_bytes", "err", "K", "sum_N", "sum_L", "d_z",
          "note", "device", "torch", "triton", "date"]


def t5_base_sizes() -> list[int]:
    """Sizes of T5-base's parameters (meta device), each storage once."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32100, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    seen, sizes = set(), []
    for p in model.parameters():  # a tied Parameter appears once
        key = id(p.untyped_storage()) if p.untyped_storage().data_ptr() else id(p)
        if key not in seen:
            seen.add(key)
            sizes.append(p.numel())
    return sizes


# ---------------------------------------------------------------------------------------------
# the peer: stored state, one radix-2 launch per stage

_BUTTERFLY = None


def _butterfly_kernel():
    global _BUTTERFLY
    if _BUTTERFLY is None:
        import triton
        import triton.language as tl

        @triton.jit
        def butterfly(x_ptr, half, h, BLOCK: tl.constexpr):
            p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            ok = p < half
            i = (p // h) * (2 * h) + p % h
            a = tl.load(x_ptr + i, mask=ok)
            b = tl.load(x_ptr + i + h, mask=ok)
            tl.store(x_ptr + i, a + b, mask=ok)
            tl.store(x_ptr + i + h, a - b, mask=ok)

        _BUTTERFLY = butterfly
    return _BUTTERFLY


def fwht_stages(x: torch.Tensor) -> torch.Tensor:
    """In-place radix-2 FWHT of a contiguous 1-D x, one launch per stage."""
    import triton

    kern, L, h = _butterfly_kernel(), x.shape[0], 1
    block = min(1024, max(16, L // 2))
    while h < L:
        kern[(triton.cdiv(L // 2, block),)](x, L // 2, h, BLOCK=block)
        h *= 2
    return x


class _PeerFWHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return fwht_stages(x.clone())

    @staticmethod
    def backward(ctx, g):
        return fwht_stages(g.contiguous().clone())


def peer_state(plan, device):
    """Per tensor (b, g, π) as stored tensors (what the original keeps: 12 B per padded element)."""
    state = []
    for i, L in enumerate(plan.lengths):
        k = torch.arange(L, device=device)
        keys = plan.keys[i]
        state.append((signs(k, keys), gaussians(k, keys), permutation(k, L.bit_length() - 1, keys)))
    return state


def peer_fastfood(z, plan, state):
    parts = []
    for i, (b, g, perm) in enumerate(state):
        L, n = plan.lengths[i], plan.sizes[i]
        m = min(plan.d_z, L)
        x = torch.nn.functional.pad(z[:m], (0, L - m)) * b
        x = _PeerFWHT.apply(x)
        x = _PeerFWHT.apply(x[perm] * g)
        parts.append(x[:n] * plan.sigma[i])
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_gbps(device, reps: int, tiny: bool) -> tuple[float, float]:
    n = (1 << 16) if tiny else (1 << 28)  # 1 GiB fp32 on the GPU: far above L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return ms, 2 * 4 * n / (ms * 1e-3) / 1e9


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    sizes = list(TINY_SIZES) if args.tiny else t5_base_sizes()
    d_z = args.dz if args.dz is not None else (TINY_DZ if args.tiny else GLUE_DZ)
    t0 = time.perf_counter()
    plan = fastfood_plan(sizes, args.seed, d_z, device=device)
    _log(f"K={len(sizes)} ΣN={plan.total_out:,} ΣL={plan.total_ws:,} d_z={d_z}; plan {time.perf_counter() - t0:.1f}s")
    floor = 4 * (2 * plan.total_ws + plan.total_out)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(d_z, generator=gen).to(device).requires_grad_(True)
    gamma = torch.randn(plan.total_out, generator=gen).to(device)
    copy_ms, copy_bw = copy_gbps(device, args.reps, args.tiny)
    meta = {"K": len(sizes), "sum_N": plan.total_out, "sum_L": plan.total_ws, "d_z": d_z, "device": str(device),
            "torch": torch.__version__, "date": date.today().isoformat()}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = ""
    rows = [dict(meta, provider="copy", mode="copy", ms=copy_ms, gbps=copy_bw, ratio_to_copy=1.0, floor_bytes="",
                 err="", note=f"{'2^16' if args.tiny else '2^28'} fp32 elements")]
    kadapt.set_backend("reference")
    with torch.no_grad():
        ref = fastfood(z, plan=plan)
    state = None
    for provider in args.providers:
        for mode in MODES:
            note, err, ms = "", "", float("nan")
            try:
                if provider == "peer":
                    state = state if state is not None else peer_state(plan, device)
                    kadapt.set_backend("reference")

                    def f(state=state):
                        return peer_fastfood(z, plan, state)
                else:
                    kadapt.set_backend(provider)

                    def f():
                        return fastfood(z, plan=plan)

                if mode == "fwd":
                    def call(f=f):
                        with torch.no_grad():
                            return f()
                else:
                    def call(f=f):
                        return torch.autograd.grad(f(), z, gamma)[0]
                with torch.no_grad():
                    out = f()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                ms = time_ms(call, device, args.reps, warmup=int(device.type == "cuda"))
            except Exception as exc:  # a provider that fails gets an error row; the sweep goes on
                note = f"error: {type(exc).__name__}: {exc}"[:300]
                _log(traceback.format_exc())
            finally:
                kadapt.set_backend("auto")
            bytes_ = floor * (1 if mode == "fwd" else 2)
            gbps = bytes_ / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
            rows.append(dict(meta, provider=provider, mode=mode, ms=ms, gbps=gbps, ratio_to_copy=gbps / copy_bw,
                             floor_bytes=bytes_, err=err, note=note))
            _log(f"{provider:9s} {mode:8s} {ms:10.3f} ms {gbps:8.1f} GB/s  err={err}")
    return rows


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, MODES):
        sel = [r for r in rows if r["mode"] == mode and r["ms"] == r["ms"]]
        ax.bar([r["provider"] for r in sel], [r["ms"] for r in sel], color="tab:blue")
        for i, r in enumerate(sel):
            ax.text(i, r["ms"], f"{r['ratio_to_copy']:.2f}× copy", ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(mode)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a few small tensors (CPU smoke run)")
    ap.add_argument("--dz", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--tiles", type=int, nargs=4, default=None, metavar=("TR", "TC", "RO", "OC"),
                    help="Triton tile config (default: the module's GPU config; 16 16 16 16 on the CPU)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        ap.error("the full T5-base sizes need a GPU; use --tiny on the CPU")
    tiles = args.tiles or ((16, 16, 16, 16) if args.device == "cpu" else None)
    if tiles is not None and "triton" in args.providers:
        from kadapt.ops.triton import fastfood as triton_fastfood

        triton_fastfood.CONFIG = tuple(tiles)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    stem = f"fastfood_{args.device}"
    write_csv(rows, out / f"{stem}.csv")
    plot(rows, out / f"{stem}.png", f"Fastfood, {'tiny' if args.tiny else 'T5-base'} (K={rows[0]['K']}, "
                                     f"ΣL={rows[0]['sum_L']:,}), {args.device} {platform.node()}")
    print(f"{'provider':10s} {'mode':8s} {'ms':>10s} {'GB/s':>8s} {'×copy':>6s} err")
    for r in rows:
        print(f"{r['provider']:10s} {r['mode']:8s} {r['ms']:10.3f} {r['gbps']:8.1f} {r['ratio_to_copy']:6.2f} "
              f"{r['err']}{'  ' + r['note'] if r['note'] else ''}")
    return rows


if __name__ == "__main__":
    main()
