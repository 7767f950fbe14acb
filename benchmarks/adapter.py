"""Fused-adapter microbenchmark: y = x + φ(x W_d + b_d) W_u + b_u for every weight kind and backend.

Op under test: ``kadapt.ops.fused_adapter(x, w_down, b_down, w_up, b_up, "gelu_new", add_input=True)``
(a sequential adapter, docs/methods.md §3, §12.3–§12.4) with the weights given as ``AdapterWeight``s:

  dense      Houlsby: W_d (D, m) and W_u (m, D)
  lowrank    W = l r, rank 1
  phm        W = Σ_i A_i ⊗ B_i, n = 4, full B_i, one rule A per projection
  compacter  W = Σ_i A_i ⊗ (s_i t_i), n = 4, rank 1, one rule A shared by W_d and W_u

Providers:
  reference  kadapt.set_backend("reference"): eager PyTorch, W materialised with einsum every forward
  compile    torch.compile (default mode, dynamic=False) of that reference call; compiled once per
             config (dynamo is reset between configs), compile time excluded (first call, untimed)
  triton     kadapt.set_backend("triton"): the Triton kernels forming weight tiles from the factors
  cuda       kadapt.set_backend("cuda"): the CUDA extension (skipped when kadapt._C is not built)
  peer       the AdapterHub / upstream-Compacter formulation, written here from the math: every
             forward, every projection builds W = Σ_i torch.kron(A_i, B_i) in a Python loop over i
             (B_i = s_i @ t_i for Compacter), then x @ W_d + b_d, gelu_new, @ W_u + b_u, + x.
             phm and compacter only (for dense and low-rank it is the reference).

Modes: ``fwd`` (y = f(x)) and ``fwd+bwd`` (y = f(x), then torch.autograd.grad(y, [x, factors, biases], dy)
with a fixed random dy). x requires grad in both modes, so ``fwd`` is the training forward (autograd
records; torch.compile's training graph), and both modes share one compiled graph per config.

Timing (CUDA events; medians over --reps repeats):
  graph  one CUDA graph holding k back-to-back calls (k chosen so a replay lasts >= ~200 µs), captured
         after a warm-up on a side stream; replays are timed and divided by k: device time with no
         Python launch overhead. If capture fails the row is missing and a note says so.
  eager  back-to-back Python calls (what an un-captured training loop pays, launch overhead included).
On --device cpu only ``eager`` exists, timed with time.perf_counter (a smoke run, not a measurement).

L2: no flushing between repeats. At 16384×4096 every T×D tensor is 128 MiB (bf16), far above the H100's
50 MB L2. At the smaller shapes x alone is 6–16 MiB, so back-to-back calls rotate over enough distinct
(x, dy) buffers to touch more than twice the L2 between two uses of one buffer (the ``bufs`` column).

Floors (bytes only, at --bandwidth, default 2.96e12 B/s, the H100 HBM rate the lead measured):
  fwd      read x once, write y once:              2·T·D·elem_bytes
  fwd+bwd  x, y, dy, x again, dx (five passes):    5·T·D·elem_bytes
``gbps`` = floor bytes / time and ``ratio_to_floor`` = time / floor.

Before timing, every provider's y (and, for fwd+bwd, every gradient) is checked against the reference
formula evaluated in fp32 on the same (rounded) inputs: ``err`` = max|y − ref| / max|ref| and ``grad_err``
= the largest ‖g − ref‖ / ‖ref‖ over dx and the factor and bias gradients; ``check`` says WARN when err
exceeds tol = 5e-2 (bf16/fp16) or 1e-4 (fp32), or grad_err exceeds max(tol, 2 × the grad_err of the eager
reference in the same dtype): some factor gradients are sums with cancellation (low-rank r = 1 at bf16
reaches ~0.065 in every formulation, the reference included), so the reference's own rounding sets the bar.
A provider that raises gets an ``error`` row; the sweep goes on.

Outputs under --out (default benchmarks/results/): adapter_<dtype>_<device>.csv (rewritten after every
config, so a run cut short keeps what it measured), adapter_<dtype>_<device>.png, the printed table, and
for T=8192, D=1024, m=64 (when in the sweep) the four targets with PASS/FAIL, printed last and written
to adapter_targets_<dtype>.md. Progress and per-provider errors go to stderr.

    python benchmarks/adapter.py --device cuda --dtype bf16            # the full sweep (H100: 1.5-2 min)
    python benchmarks/adapter.py --shapes 8192x1024 --m 64             # the targets only
    TRITON_INTERPRET=1 python benchmarks/adapter.py --device cpu --dtype fp32 --quick \\
        --providers reference triton peer --reps 2                     # CPU smoke run
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import kadapt
from kadapt import backends
from kadapt.ops import AdapterWeight, fused_adapter
from kadapt.ops.fused_adapter import AUTO_ORDER

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KINDS = ("dense", "lowrank", "phm", "compacter")
PROVIDERS = ("reference", "compile", "triton", "cuda", "peer")
FUSED = ("triton", "cuda")
MODES = ("fwd", "fwd+bwd")
DEFAULT_SHAPES = ("4096x768", "8192x1024", "16384x4096")
DEFAULT_M = (24, 64)
QUICK_SHAPES = ("96x48",)
QUICK_M = (8,)
TARGET = (8192, 1024, 64)  # T, D, m of the targets
PHM_N = 4
RANK = 1
W_STD = 0.02  # every kind's materialised W gets entries of about this std (the dense adapter init scale)
ACT = "gelu_new"
GRAPH_TARGET_US = 200.0  # a graph replay holds enough calls to last about this long
REP_TARGET_US = 1000.0  # one timed repeat lasts about this long
MAX_CALLS = 64
FIELDS = ["kind", "T", "D", "m", "provider", "mode", "timing", "us", "gbps", "floor_us", "ratio_to_floor",
          "calls", "bufs", "err", "grad_err", "check", "note", "device", "dtype", "torch", "triton", "date"]


# ---------------------------------------------------------------------------------------------
# inputs

def parse_shape(text: str) -> tuple[int, int]:
    try:
        t, d = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not TxD (e.g. 8192x1024)") from None
    if t <= 0 or d <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r}: T and D must be positive")
    return t, d


def _normal(shape, std, device, dtype, gen) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * std).to(dtype)


def make_weights(kind: str, D: int, m: int, device, dtype, gen) -> tuple[AdapterWeight, AdapterWeight]:
    """(w_down, w_up) with N(0, σ²) factors, σ chosen so W has entries of std ≈ W_STD (never zeros)."""
    if kind == "dense":
        return (AdapterWeight.dense(_normal((D, m), W_STD, device, dtype, gen)),
                AdapterWeight.dense(_normal((m, D), W_STD, device, dtype, gen)))
    n = PHM_N

    def rnd(shape, std):
        return _normal(shape, std, device, dtype, gen)

    if kind == "lowrank":  # W = l r: std(W) = σ_l σ_r √r
        s = (W_STD / math.sqrt(RANK)) ** 0.5
        return tuple(AdapterWeight.lowrank(rnd((a, RANK), s), rnd((RANK, b), s)) for a, b in ((D, m), (m, D)))
    if kind == "phm":  # std(W) = √n σ_A σ_B
        s = (W_STD / math.sqrt(n)) ** 0.5
        return tuple(AdapterWeight.phm(rnd((n, n, n), s), rnd((n, a // n, b // n), s)) for a, b in ((D, m), (m, D)))
    if kind == "compacter":  # std(W) = √(n r) σ_A σ_s σ_t; one rule A shared by both projections
        s = (W_STD / math.sqrt(n * RANK)) ** (1 / 3)
        rule = rnd((n, n, n), s)
        return tuple(AdapterWeight.compacter(rule, rnd((n, a // n, RANK), s), rnd((n, RANK, b // n), s))
                     for a, b in ((D, m), (m, D)))
    raise ValueError(f"kind={kind!r}; allowed values: {', '.join(KINDS)}")


def trainables(wd: AdapterWeight, wu: AdapterWeight, bd: torch.Tensor, bu: torch.Tensor) -> list[torch.Tensor]:
    """Every trainable tensor once (Compacter's shared rule appears in both weights)."""
    out, seen = [], set()
    for t in (*wd.tensors, *wu.tensors, bd, bu):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _upcast(t: torch.Tensor, cache: dict) -> torch.Tensor:
    """An fp32 leaf copy of t, one per tensor (a shared tensor stays shared)."""
    if id(t) not in cache:
        cache[id(t)] = t.detach().float().requires_grad_(True)
    return cache[id(t)]


# ---------------------------------------------------------------------------------------------
# providers

def peer_weight(w: AdapterWeight) -> torch.Tensor:
    """W = Σ_i kron(A_i, B_i), one kron per i, as AdapterHub / upstream Compacter form it every forward."""
    rule = w.tensors[0]
    total = None
    for i in range(rule.shape[0]):
        b_i = w.tensors[1][i] if w.kind == "phm" else w.tensors[1][i] @ w.tensors[2][i]
        k = torch.kron(rule[i].to(b_i.dtype), b_i)
        total = k if total is None else total + k
    return total


def peer_adapter(x, wd: AdapterWeight, bd, wu: AdapterWeight, bu) -> torch.Tensor:
    h = F.gelu(x @ peer_weight(wd) + bd, approximate="tanh")
    return x + (h @ peer_weight(wu) + bu)


def _kadapt_adapter(x, wd, bd, wu, bu):
    return fused_adapter(x, wd, bd, wu, bu, ACT, add_input=True)


def provider_fn(provider: str):
    """(backend to force, callable(x, wd, bd, wu, bu)) of a provider."""
    if provider in ("reference", "triton", "cuda"):
        return provider, _kadapt_adapter
    if provider == "compile":
        # A fresh wrapper per config; dynamo's caches are reset before each config (compile once per shape).
        return "reference", torch.compile(_kadapt_adapter, dynamic=False)
    if provider == "peer":
        return "reference", peer_adapter
    raise ValueError(provider)


def skip_reason(provider: str, kind: str, device: torch.device, args) -> str | None:
    if provider == "peer" and kind not in ("phm", "compacter"):
        return "peer = reference for dense/lowrank"
    if provider == "cuda":
        if device.type != "cuda":
            return "cuda needs --device cuda"
        if not backends.cuda_extension_built():
            return "kadapt._C not built (kadapt.backends.cuda_extension_built() is False)"
    if provider == "triton":
        if not backends.triton_importable():
            return "triton is not installed"
        if device.type == "cpu" and not backends.triton_interpret():
            return "triton on CPU needs TRITON_INTERPRET=1 in the environment"
    return None


# ---------------------------------------------------------------------------------------------
# timing

class Timer:
    """Median µs per call; CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.cuda = device.type == "cuda"
        self.reps, self.warmup = reps, warmup

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _span_us(self, body) -> float:
        """Wall time of body() in µs, device work included."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        t0 = time.perf_counter()
        body()
        return (time.perf_counter() - t0) * 1e6

    def _median_us(self, body, per_body: int, est_us: float) -> tuple[float, int]:
        """Median over reps of body() repeated so each repeat lasts ~REP_TARGET_US; µs per unit."""
        inner = max(1, min(50, math.ceil(REP_TARGET_US / max(est_us, 1e-3))))

        def rep():
            for _ in range(inner):
                body()

        times = [self._span_us(rep) / (inner * per_body) for _ in range(self.reps)]
        return statistics.median(times), inner

    def eager(self, call, nbuf: int) -> tuple[float, int]:
        """(µs per call, calls per repeat) of back-to-back Python calls cycling over the buffers."""
        state = {"i": 0}

        def one():
            call(state["i"] % nbuf)
            state["i"] += 1

        for _ in range(max(self.warmup, nbuf)):
            one()
        self._sync()
        est = min(self._span_us(one) for _ in range(2))
        us, inner = self._median_us(one, 1, est)
        return us, inner

    def graph(self, call, nbuf: int) -> tuple[float, int]:
        """(µs per call, calls per graph) from replays of a CUDA graph of k back-to-back calls."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as the CUDA-graph docs do
            for j in range(max(self.warmup, nbuf)):
                call(j % nbuf)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        def capture(k: int) -> torch.cuda.CUDAGraph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for j in range(k):
                    call(j % nbuf)  # outputs dropped: the graph's pool reuses their memory
            g.replay()
            torch.cuda.synchronize()
            return g

        g = capture(1)
        est = min(self._span_us(g.replay) for _ in range(3))
        k = max(nbuf, min(MAX_CALLS, math.ceil(GRAPH_TARGET_US / max(est, 1e-3))))
        if k > 1:
            del g
            g = capture(k)
            est = min(self._span_us(g.replay) for _ in range(2))
        us, _ = self._median_us(g.replay, k, est)
        del g
        return us, k


# ---------------------------------------------------------------------------------------------
# one config

def run_meta(device: torch.device, dtype_name: str) -> dict:
    """What a results row records about the run: device name, dtype, torch and triton versions, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": dev_name, "dtype": dtype_name, "torch": torch.__version__, "triton": triton_version,
            "date": str(date.today())}


def l2_bytes(device: torch.device) -> int:
    """The device's L2 size (0 on the CPU): input buffers are rotated over more than twice this."""
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out − ref| / max|ref| (the check on y)."""
    scale = ref.abs().max().item()
    return (out.float() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def norm_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (the check on gradients: a factor gradient such as d l = dW rᵀ is a sum with
    cancellation, so its largest elementwise error relative to max|ref| reaches ~0.1 in bf16 even for
    the eager reference; the norm-wise error stays ~1e-2)."""
    scale = ref.norm().item()
    return (out.float() - ref).norm().item() / (scale if scale > 0 else 1.0)


def run_config(kind, T, D, m, args, device, dtype, bufs, timer, meta) -> list[dict]:
    """Every (provider, mode, timing) row of one (kind, T, D, m)."""
    gen = torch.Generator(device=device).manual_seed(1000 * D + m + KINDS.index(kind))
    wd, wu = make_weights(kind, D, m, device, dtype, gen)
    bd = _normal((m,), 0.1, device, dtype, gen)
    bu = _normal((D,), 0.1, device, dtype, gen)
    params = trainables(wd, wu, bd, bu)
    for p in params:
        p.requires_grad_(True)
    xs, dys = bufs
    nbuf = len(xs)

    # Ground truth: the reference formula in fp32 on the same (rounded) inputs, y and every gradient.
    cache = {}
    x32 = _upcast(xs[0], cache)
    wd32, wu32 = (AdapterWeight(w.kind, tuple(_upcast(t, cache) for t in w.tensors)) for w in (wd, wu))
    kadapt.set_backend("reference")
    y_ref = _kadapt_adapter(x32, wd32, _upcast(bd, cache), wu32, _upcast(bu, cache))
    inputs32 = [x32] + [cache[id(p)] for p in params]
    g_ref = torch.autograd.grad(y_ref, inputs32, dys[0].float())
    y_ref = y_ref.detach()
    del cache, x32, wd32, wu32, inputs32
    tol = grad_tol = 1e-4 if dtype == torch.float32 else 5e-2
    if "fwd+bwd" in args.modes:  # the eager reference's own gradient error in this dtype
        y = _kadapt_adapter(xs[0], wd, bd, wu, bu)
        grads = torch.autograd.grad(y, [xs[0], *params], dys[0])
        grad_tol = max(tol, 2 * max(norm_err(g, r) for g, r in zip(grads, g_ref)))
        del y, grads
    elem = torch.finfo(dtype).bits // 8
    floors = {"fwd": 2 * T * D * elem, "fwd+bwd": 5 * T * D * elem}

    base = {"kind": kind, "T": T, "D": D, "m": m, "bufs": nbuf, **meta}
    rows = []
    for provider in args.providers:
        reason = skip_reason(provider, kind, device, args)
        if reason is not None:
            continue
        row0 = {**base, "provider": provider}
        try:
            backend, fn = provider_fn(provider)
            kadapt.set_backend(backend)
            t0 = time.perf_counter()
            y = fn(xs[0], wd, bd, wu, bu)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            err_fwd = rel_err(y.detach(), y_ref)
            del y
        except Exception as exc:  # noqa: BLE001 - one failing provider must not end the sweep
            note = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            _log(f"    {provider}: ERROR {note}")
            if args.verbose:
                traceback.print_exc()
            rows += [{**row0, "mode": mode, "timing": "error", "note": note} for mode in args.modes]
            continue
        if provider == "compile":
            _log(f"    compile: first call (dynamo + inductor) {first_s:.1f} s")

        for mode in args.modes:
            row = {**row0, "mode": mode}
            try:
                kadapt.set_backend(backend)
                grad_err = None
                if mode == "fwd":
                    def call(i, fn=fn):
                        return fn(xs[i], wd, bd, wu, bu)
                else:
                    def call(i, fn=fn):
                        y = fn(xs[i], wd, bd, wu, bu)
                        return torch.autograd.grad(y, [xs[i], *params], dys[i])

                    grads = call(0)
                    grad_err = max(norm_err(g, r) for g, r in zip(grads, g_ref))
                    del grads
                ok = err_fwd <= tol and (grad_err is None or grad_err <= grad_tol)
                row.update(err=f"{err_fwd:.2e}", grad_err="" if grad_err is None else f"{grad_err:.2e}",
                           check="ok" if ok else "WARN")
                timings = []
                if device.type == "cuda" and not args.no_graph:
                    try:
                        timings.append(("graph",) + timer.graph(call, nbuf))
                    except Exception as exc:  # noqa: BLE001
                        note = f"graph capture failed, eager timing only: {type(exc).__name__}: {exc}"
                        row["note"] = note.replace("\n", " ")[:300]
                        _log(f"    {provider} {mode}: {row['note']}")
                        torch.cuda.synchronize()
                timings.append(("eager",) + timer.eager(call, nbuf))
                for timing, us, calls in timings:
                    floor_us = floors[mode] / args.bandwidth * 1e6
                    rows.append({**row, "timing": timing, "us": round(us, 3), "calls": calls,
                                 "gbps": round(floors[mode] / (us * 1e-6) / 1e9, 1),
                                 "floor_us": round(floor_us, 3), "ratio_to_floor": round(us / floor_us, 3)})
            except Exception as exc:  # noqa: BLE001
                note = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                _log(f"    {provider} {mode}: ERROR {note}")
                if args.verbose:
                    traceback.print_exc()
                rows.append({**row, "timing": "error", "note": note})
                if device.type == "cuda":
                    try:
                        torch.cuda.synchronize()
                    except Exception as sync_exc:  # noqa: BLE001
                        _log(f"    torch.cuda.synchronize after the error raised too: {sync_exc}")
        kadapt.set_backend("reference")
    kadapt.set_backend("auto")
    return rows


# ---------------------------------------------------------------------------------------------
# reporting

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)


def _best_timing(rows: list[dict]) -> dict:
    """(kind, T, D, m, provider, mode) -> the row to report: graph if measured, else eager."""
    best = {}
    for r in rows:
        if r["timing"] in ("graph", "eager"):
            key = (r["kind"], r["T"], r["D"], r["m"], r["provider"], r["mode"])
            if key not in best or r["timing"] == "graph":
                best[key] = r
    return best


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_timing(rows)
    shapes = list(dict.fromkeys((r["T"], r["D"]) for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in best.values())]
    fig, axes = plt.subplots(len(shapes), len(modes), figsize=(7 * len(modes), 3.6 * len(shapes)), squeeze=False)
    colors = dict(zip(PROVIDERS, ("tab:gray", "tab:purple", "tab:blue", "tab:green", "tab:red")))
    for i, (T, D) in enumerate(shapes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            groups = [(k, m) for k in KINDS for m in dict.fromkeys(r["m"] for r in rows if (r["T"], r["D"]) == (T, D))
                      if any(key[:4] == (k, T, D, m) for key in best)]
            width = 0.8 / max(1, len(providers))
            floor = None
            for pi, p in enumerate(providers):
                xs, ys = [], []
                for gi, (k, m) in enumerate(groups):
                    r = best.get((k, T, D, m, p, mode))
                    if r is not None:
                        xs.append(gi + (pi - (len(providers) - 1) / 2) * width)
                        ys.append(r["us"])
                        floor = r["floor_us"]
                ax.bar(xs, ys, width, label=p, color=colors[p])
            if floor is not None:
                ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="bytes floor")
            ax.set_xticks(range(len(groups)), [f"{k}\nm={m}" for k, m in groups], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("µs per call (median, " + ("CUDA graph" if any(r["timing"] == "graph" for r in rows)
                                                       else "eager") + ")")
            ax.set_title(f"T×D = {T}×{D}, {mode}", fontsize=10)
            if i == 0 and j == 0:
                ax.legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["T"], r["D"], r["m"], r["provider"], r["mode"]), {})[r["timing"]] = r
    print(f"{'kind':10s} {'T×D':>10s} {'m':>3s} {'provider':9s} {'mode':7s} {'graph µs':>9s} {'eager µs':>9s} "
          f"{'GB/s':>7s} {'×floor':>7s} {'floor µs':>8s} {'y err':>8s} {'grad err':>8s} check")
    for key in sorted(by, key=lambda k: (k[1], k[2], k[3], KINDS.index(k[0]), k[5], PROVIDERS.index(k[4]))):
        kind, T, D, m, provider, mode = key
        t = by[key]
        if "error" in t:
            print(f"{kind:10s} {f'{T}×{D}':>10s} {m:3d} {provider:9s} {mode:7s} ERROR {t['error']['note'][:80]}")
            continue
        g, e = t.get("graph"), t.get("eager")
        ref = g or e
        print(f"{kind:10s} {f'{T}×{D}':>10s} {m:3d} {provider:9s} {mode:7s} "
              f"{g['us'] if g else float('nan'):9.1f} {e['us'] if e else float('nan'):9.1f} "
              f"{ref['gbps']:7.0f} {ref['ratio_to_floor']:7.2f} {ref['floor_us']:8.1f} {ref['err']:>8s} "
              f"{ref['grad_err'] or '-':>8s} {'' if ref['check'] == 'ok' else 'WARN'}")


def targets_block(rows: list[dict], args, dtype_name: str) -> list[str] | None:
    """The four targets at T=8192, D=1024, m=64 for each fused provider measured there, or None."""
    T, D, m = TARGET
    best = _best_timing([r for r in rows if (r["T"], r["D"], r["m"]) == TARGET])
    if not best:
        return None
    def get(k, p, mode):
        return best.get((k, T, D, m, p, mode))

    kinds = [k for k in KINDS if any(key[0] == k for key in best)]
    fused = [p for p in FUSED if any(key[4] == p for key in best)]
    built = backends.cuda_extension_built()
    runnable = {"triton": backends.triton_importable(), "cuda": built}
    auto = next((b for b in AUTO_ORDER if runnable[b]), "reference")  # what "auto" runs on CUDA tensors
    elem = torch.finfo(DTYPES[dtype_name]).bits // 8
    floor_fwd, floor_fb = (c * T * D * elem / args.bandwidth * 1e6 for c in (2, 5))
    timing = ("CUDA-graph replays (device time, median); values marked (eager) are back-to-back Python calls"
              if any(r["timing"] == "graph" for r in best.values()) else "eager Python calls (no CUDA graphs)")
    lines = [f"### Fused adapter targets: {dtype_name}, T={T}, D={D}, m={m} ({date.today()})", "",
             (f"- device: {rows[0]['device']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}; "
              f"bandwidth for the floors {args.bandwidth / 1e12:.3g} TB/s"),
             f"- floors: fwd {floor_fwd:.2f} µs (2·T·D·bytes), fwd+bwd {floor_fb:.2f} µs (5·T·D·bytes)",
             f"- timing: {timing}",
             (f"- `auto` backend here: {auto} (order {', '.join(AUTO_ORDER)}, the first that can run; kadapt._C "
              f"built: {built})"), ""]
    if not fused:
        lines.append("No fused provider (triton, cuda) was measured at this shape.")
        return lines

    def us(r):
        return f"{r['us']:.1f} µs" + ("" if r["timing"] == "graph" else " (eager)")

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    for p in fused:
        lines.append(f"**{p}**" + (" (what auto runs)" if p == auto else ""))
        lines.append("")
        for num, mode, limit, label in ((1, "fwd", 2.0, "fused forward ≤ 2× the forward floor"),
                                        (2, "fwd+bwd", 3.0, "fused forward+backward ≤ 3× its floor (5 passes)")):
            if mode not in args.modes:
                continue
            cells, ok = [], True
            for k in kinds:
                r = get(k, p, mode)
                if r is None:
                    cells.append(f"{k} n/a")
                    ok = False
                    continue
                ok &= r["ratio_to_floor"] <= limit
                cells.append(f"{k} {us(r)} = {r['ratio_to_floor']:.2f}×")
            lines.append(f"{num}. {label}: {verdict(ok)} — " + "; ".join(cells))
        cells, ok = [], True
        for mode in args.modes:
            c, d = get("compacter", p, mode), get("dense", p, mode)
            if c is None or d is None:
                cells.append(f"{mode} n/a")
                ok = False
                continue
            ok &= c["us"] <= 1.1 * d["us"]
            cells.append(f"{mode}: compacter {us(c)} vs dense {us(d)} = {c['us'] / d['us']:.2f}×")
        lines.append(f"3. Compacter fused ≤ 1.1× Houlsby (dense) fused: {verdict(ok)} — " + "; ".join(cells))
        cells, ok = [], True
        for mode in args.modes:
            for k in kinds:
                f, c = get(k, p, mode), get(k, "compile", mode)
                if f is None or c is None:
                    cells.append(f"{k} {mode} n/a")
                    ok = False
                    continue
                ok &= f["us"] < c["us"]
                cells.append(f"{k} {mode} {f['us']:.1f} vs {c['us']:.1f} ({c['us'] / f['us']:.2f}× faster)")
        lines.append(f"4. every fused path faster than the same formulation under torch.compile: {verdict(ok)} — "
                     + "; ".join(cells))
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                   help=f"T×D list (default {' '.join(DEFAULT_SHAPES)}; --quick: {' '.join(QUICK_SHAPES)})")
    p.add_argument("--m", nargs="+", type=int, default=None,
                   help=f"bottleneck widths (default {' '.join(map(str, DEFAULT_M))}; --quick: "
                        f"{' '.join(map(str, QUICK_M))})")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--reps", type=int, default=15, help="timed repeats per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (compilation happens here)")
    p.add_argument("--bandwidth", type=float, default=2.96e12, help="HBM bytes/s for the floors (default 2.96e12)")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing (eager timing only)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    args = p.parse_args(argv)
    args.shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    args.m = args.m or list(QUICK_M if args.quick else DEFAULT_M)
    if args.reps < 1 or args.warmup < 0 or args.bandwidth <= 0:
        p.error("--reps must be >= 1, --warmup >= 0 and --bandwidth > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    meta = run_meta(device, args.dtype)
    dev_name = meta["device"]
    print(f"# {date.today()} {platform.node()} {dev_name}; torch {torch.__version__}, triton {meta['triton']}; "
          f"{args.dtype}; bandwidth for the floors {args.bandwidth / 1e12:.3g} TB/s ({args.bandwidth:.4g} B/s)",
          flush=True)
    for provider in args.providers:
        reason = skip_reason(provider, "phm", device, args)
        if reason:
            print(f"note: provider {provider} skipped: {reason}", flush=True)
    if "peer" in args.providers and {"dense", "lowrank"} & set(args.kinds):
        print("note: peer runs for phm and compacter only (for dense and lowrank it is the reference)", flush=True)

    timer = Timer(device, args.reps, args.warmup)
    l2 = l2_bytes(device)
    elem = torch.finfo(dtype).bits // 8
    # The target shape first, so a run cut short still has the targets.
    shapes = sorted(dict.fromkeys(args.shapes), key=lambda s: s != TARGET[:2])
    configs = []
    for T, D in shapes:
        for m in args.m:
            for kind in args.kinds:
                if kind in ("phm", "compacter") and (D % PHM_N or m % PHM_N):
                    print(f"note: {kind} skipped at D={D}, m={m}: n={PHM_N} must divide D and m", flush=True)
                    continue
                configs.append((T, D, m, kind))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"adapter_{args.dtype}_{args.device}"
    csv_path, png_path = args.out / f"{stem}.csv", args.out / f"{stem}.png"
    rows, t_start, bufs, buf_shape = [], time.perf_counter(), None, None
    for idx, (T, D, m, kind) in enumerate(configs):
        if buf_shape != (T, D):
            bufs = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # Enough distinct (x, dy) pairs that a buffer is out of L2 when its turn comes again.
            nbuf = 1 if l2 == 0 else max(1, min(16, math.ceil(2 * l2 / (T * D * elem))))
            gen = torch.Generator(device=device).manual_seed(T * 7 + D)
            bufs = ([torch.randn((T, D), device=device, dtype=dtype, generator=gen).requires_grad_(True)
                     for _ in range(nbuf)],
                    [torch.randn((T, D), device=device, dtype=dtype, generator=gen) for _ in range(nbuf)])
            buf_shape = (T, D)
        _log(f"[{idx + 1}/{len(configs)}] {kind} T×D={T}×{D} m={m} ({time.perf_counter() - t_start:.0f} s)")
        torch._dynamo.reset()
        rows += run_config(kind, T, D, m, args, device, dtype, bufs, timer, meta)
        write_csv(rows, csv_path)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bufs = None
    elapsed = time.perf_counter() - t_start
    write_csv(rows, csv_path)
    if any(r["timing"] != "error" for r in rows):
        plot(rows, png_path, f"fused adapter y = x + φ(xW_d+b_d)W_u+b_u, {dev_name}, {args.dtype}")

    print_table(rows)
    warn = sum(r.get("check") == "WARN" for r in rows if r["timing"] != "error")
    errors = sum(r["timing"] == "error" for r in rows)
    print(f"sweep: {len(configs)} configs in {elapsed:.0f} s; {errors} error rows, {warn} rows over the error "
          f"tolerance; wrote {csv_path} and {png_path.name}")
    block = targets_block(rows, args, args.dtype)
    if block is None:
        print(f"targets: T={TARGET[0]}, D={TARGET[1]}, m={TARGET[2]} is not in this sweep")
    else:
        md = args.out / f"adapter_targets_{args.dtype}.md"
        md.write_text("\n".join(block) + "\n")
        print("\n".join(block))
        print(f"(written to {md})")
    return rows


if __name__ == "__main__":
    main()
