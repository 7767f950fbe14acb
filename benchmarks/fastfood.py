"""Fastfood-transform benchmark (Intrinsic-SAID, METHODS.md §4, §12.5): v = cat_i P_i z over every
T5-base tensor, forward (v = P z) and backward (∂z = Pᵀγ, the transpose alone: autograd.grad of a kept
graph), side by side with the copy bandwidth measured in the same run.

Sizes: the parameters of ``T5ForConditionalGeneration(T5Config(vocab_size=32100, d_model=768, d_kv=64,
d_ff=3072, num_layers=12, num_heads=12))`` built on the meta device, deduplicated by storage (tied
tensors count once: K = 257, ΣN = 222,882,048). d_z defaults to 19,742 (the GLUE config's d_I = 20,000
minus K + 1). ``--tiny`` uses a handful of small tensors instead (a CPU smoke run in seconds).

Providers:
  reference  kadapt.set_backend("reference"): the per-tensor PyTorch reference (radix-2 FWHT from
             torch.stack, several kernels per stage), regenerating the randomness every call
  triton     kadapt.set_backend("triton"): the blocked two-level kernels, one ragged launch per pass
  cuda       kadapt.set_backend("cuda"): csrc/fastfood.cu on the same schedule; skipped (the reason
             printed) where kadapt.ops.fastfood refuses it (no CUDA device, kadapt._C not built or
             without the Fastfood kernels, a tile config it cannot take)
  peer       the original formulation written from the math: per-tensor stored state (b, g as fp32, π as
             int64: 16 B per padded element), one Triton radix-2 butterfly launch per FWHT stage per
             tensor (log₂L_i launches per Hadamard), the π-gather and g multiply as torch ops; backward
             by autograd (FWHT's backward is the same stage loop; the gather's is a scatter-add)
  copy       dst.copy_(src) of ΣL_i fp32 (the yardstick: one pass over the workspace)

Floor (issue 11's target: the whole transform within 1.25× of it): the passes the transform needs ×
the time of one copy of ΣL_i fp32 measured here. A Hadamard of length L needs ⌈log₂L / 13⌉ passes over
its L fp32 (§12.5: up to 2^13 fits one block's shared memory; T5-base's L_i = 2^15 … 2^25 need two),
two Hadamards per transform: floor = copy_ms(ΣL) × Σ_i 2⌈log₂L_i/13⌉ L_i / ΣL (4 copies on T5-base),
the same for the backward. ``gbps`` = floor bytes (8 B per element per pass: read + write) / time;
``x_floor`` = time / floor. ``sched_passes``: the passes the Triton/CUDA schedule makes (2 + 2·outer
levels per tensor, L-weighted). Times: CUDA events (medians of --reps repeats, after a warm-up) on
CUDA; time.perf_counter on the CPU (a smoke run, not a measurement).

Outputs under --out (default benchmarks/results/): fastfood_<device>.csv and fastfood_<device>.png, and
a table with the targets on stdout.

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

PROVIDERS = ("reference", "triton", "cuda", "peer")
MODES = ("fwd", "bwd")
SMEM_LOG2 = 13  # §12.5: a Hadamard of length <= 2^13 is one pass (one block's shared memory), <= 2^26 two
TARGET_X_FLOOR = 1.25  # issue 11: the whole transform within 1.25x of its floor
TINY_SIZES = (5, 64, 300, 1000)
TINY_DZ = 32
GLUE_DZ = 19742
FIELDS = ["provider", "mode", "ms", "gbps", "x_floor", "floor_ms", "floor_bytes", "floor_passes", "sched_passes", "err",
          "K", "sum_N", "sum_L", "d_z", "note", "device", "torch", "triton", "date"]


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
    """Per tensor (b, g, π) as stored tensors (what the original keeps: 16 B per padded element)."""
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


def copy_ms(n: int, device: torch.device, reps: int) -> float:
    """Median time of dst.copy_(src) for n fp32 elements (one read and one write of n)."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, max(reps, 5))
    del src, dst
    return ms


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def floor_passes(L: int) -> int:
    """Passes over L fp32 one Hadamard of length L needs (§12.5): ⌈log₂L / 13⌉, at least 1."""
    return max(1, -(-(L.bit_length() - 1) // SMEM_LOG2))


def sched_passes(plan, device: torch.device) -> float:
    """L-weighted passes per transform of the Triton/CUDA schedule (1 + outer levels per Hadamard); NaN without
    triton."""
    try:
        from kadapt.ops.triton import fastfood as tf
    except ImportError:
        return float("nan")
    TR, TC, RO, _ = tf._config(device)
    return sum(2 * (1 + len(tf.levels(L, TR * TC, RO))) * L for L in plan.lengths) / plan.total_ws


def cuda_skip_reason(z: torch.Tensor, plan) -> str | None:
    """Why kadapt.ops.fastfood would refuse the "cuda" backend for z, or None when it runs."""
    from kadapt import backends
    from kadapt.ops import fastfood as ff

    reason = backends.cuda_reason(z)
    if reason is None and not hasattr(torch.ops.kadapt, "fastfood_fwd"):
        reason = "kadapt._C has no Fastfood kernels (built before csrc/fastfood.cu)"
    return reason or ff._cuda_unsupported(z, plan)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    sizes = list(TINY_SIZES) if args.tiny else t5_base_sizes()
    d_z = args.dz if args.dz is not None else (TINY_DZ if args.tiny else GLUE_DZ)
    t0 = time.perf_counter()
    plan = fastfood_plan(sizes, args.seed, d_z, device=device)
    _log(f"K={len(sizes)} ΣN={plan.total_out:,} ΣL={plan.total_ws:,} d_z={d_z}; plan {time.perf_counter() - t0:.1f}s")
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(d_z, generator=gen).to(device).requires_grad_(True)
    gamma = torch.randn(plan.total_out, generator=gen).to(device)
    # the floor: passes x one copy of ΣL fp32, timed here
    pass_elems = sum(2 * floor_passes(L) * L for L in plan.lengths)
    c_ms = copy_ms(plan.total_ws, device, args.reps)
    floor_ms = c_ms * pass_elems / plan.total_ws
    floor_bytes = 8 * pass_elems
    meta = {"K": len(sizes), "sum_N": plan.total_out, "sum_L": plan.total_ws, "d_z": d_z, "device": str(device),
            "torch": torch.__version__, "date": date.today().isoformat(), "floor_ms": floor_ms,
            "floor_bytes": floor_bytes, "floor_passes": pass_elems / plan.total_ws,
            "sched_passes": sched_passes(plan, device)}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = ""
    rows = [dict(meta, provider="copy", mode="copy", ms=c_ms, gbps=8 * plan.total_ws / (c_ms * 1e-3) / 1e9,
                 x_floor=float("nan"), err="", note="dst.copy_(src), ΣL fp32 (GB/s: read + write)")]
    kadapt.set_backend("reference")
    with torch.no_grad():
        ref = fastfood(z, plan=plan)
    ref_dz = torch.autograd.grad(fastfood(z, plan=plan), z, gamma)[0]
    state = None
    for provider in args.providers:
        skip = cuda_skip_reason(z, plan) if provider == "cuda" else None
        if skip:
            print(f"cuda: skipped: {skip}", flush=True)
        for mode in MODES:
            note, err, ms = "", "", float("nan")
            if skip:
                rows.append(dict(meta, provider=provider, mode=mode, ms=ms, gbps=ms, x_floor=ms, err="",
                                 note=f"skipped: {skip}"))
                continue
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

                    with torch.no_grad():
                        out, want = f(), ref
                else:  # the transpose alone: the graph of one forward, kept
                    v = f()

                    def call(v=v):
                        return torch.autograd.grad(v, z, gamma, retain_graph=True)[0]

                    out, want = call(), ref_dz
                err = ((out - want).abs().max() / want.abs().max()).item()
                del out
                ms = time_ms(call, device, args.reps, warmup=int(device.type == "cuda"))
            except Exception as exc:  # a provider that fails gets an error row; the sweep goes on
                note = f"error: {type(exc).__name__}: {exc}"[:300]
                _log(traceback.format_exc())
            finally:
                v = call = f = None
                kadapt.set_backend("auto")
            gbps = floor_bytes / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
            rows.append(dict(meta, provider=provider, mode=mode, ms=ms, gbps=gbps, x_floor=ms / floor_ms, err=err,
                             note=note))
            _log(f"{provider:9s} {mode:4s} {ms:10.3f} ms {gbps:8.1f} GB/s {ms / floor_ms:7.2f}x floor  err={err}")
        if provider == "peer":
            state = None
    return rows


def targets(rows: list[dict], device: str) -> list[str]:
    """Issue 11's Fastfood target per fused provider and mode: time <= 1.25x the floor."""
    out = []
    for r in rows:
        if r["provider"] not in ("triton", "cuda") or r["mode"] not in MODES:
            continue
        if r["ms"] != r["ms"]:
            out.append(f"- {r['provider']} {r['mode']}: NOT MEASURED ({r['note']})")
            continue
        verdict = (f"**{'PASS' if r['x_floor'] <= TARGET_X_FLOOR else 'FAIL'}**" if device.startswith("cuda")
                   else "no verdict (CPU smoke run, not a measurement)")
        out.append(f"- {r['provider']} {r['mode']}: {r['ms']:.3f} ms = {r['x_floor']:.2f}x the floor "
                   f"({r['floor_ms']:.3f} ms; target <= {TARGET_X_FLOOR}x): {verdict}")
    return out


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r.get(k), float) and r[k] != r[k] else r.get(k, "")) for k in FIELDS})


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, MODES):
        sel = [r for r in rows if r["mode"] == mode and r["ms"] == r["ms"]]
        ax.bar([r["provider"] for r in sel], [r["ms"] for r in sel], color="tab:blue")
        for i, r in enumerate(sel):
            ax.text(i, r["ms"], f"{r['x_floor']:.2f}× floor", ha="center", va="bottom", fontsize=8)
        if sel:
            ax.axhline(sel[0]["floor_ms"], color="tab:red", ls="--", lw=1, label="floor (passes × copy of ΣL)")
            ax.legend(fontsize=7, loc="lower right")
            ax.margins(y=0.15)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title("forward (P z)" if mode == "fwd" else "backward (Pᵀγ)")
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
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
                    help="default: all (cuda is skipped, the reason printed, where kadapt cannot run it)")
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
    r0 = rows[0]
    print(f"# fastfood {date.today()} {platform.node()} torch {torch.__version__}, {args.device}: K={r0['K']}, "
          f"ΣN={r0['sum_N']:,}, ΣL={r0['sum_L']:,}, d_z={r0['d_z']}; copy of ΣL fp32 {r0['ms']:.3f} ms "
          f"({r0['gbps']:.1f} GB/s); floor {r0['floor_passes']:.2f} passes = {r0['floor_ms']:.3f} ms per transform; "
          f"Triton/CUDA schedule {r0['sched_passes']:.2f} passes")
    print(f"{'provider':10s} {'mode':5s} {'ms':>10s} {'GB/s':>8s} {'x floor':>8s} {'rel err':>9s}")
    for r in rows:
        err = f"{r['err']:.2e}" if isinstance(r["err"], float) else "-"
        print(f"{r['provider']:10s} {r['mode']:5s} {r['ms']:10.3f} {r['gbps']:8.1f} {r['x_floor']:8.2f} {err:>9s}"
              f"{'  ' + r['note'] if r['note'] and r['provider'] != 'copy' else ''}")
    print("\nFastfood targets (issue 11):\n" + "\n".join(targets(rows, args.device)))
    return rows


if __name__ == "__main__":
    main()
