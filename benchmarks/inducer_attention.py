"""Inducer-attention benchmark (issue 4): the fused inducer vs SDPA, FlexAttention + LSE, prefix via SDPA and
the eager concat-softmax reference; forward and forward+backward time and peak memory.

Op under test: ``kadapt.ops.inducer_attention(q, k, v, A_k, a_k, B_k, b_k, scale, causal=True)`` -> (O, LSE, w),
w = σ(s0 − LSE), s0 = c⟨q, q + φ(q)⟩, φ the per-head key MLP of width m_k (docs/methods.md §14, §12.1). Shapes:
q, k, v (B, H, L, d), T_q = T_k = L, causal, GPT-2 scale c = 1/√d, m_k = 10. Inputs ~ N(0, 1), key-MLP
weights and biases ~ N(0, 0.1²), so w spans (0, 1) along a row (s0 ≈ c·d, LSE ≈ log(i + 1) + ½).

Providers:
  sdpa         torch SDPA, flash backend (fp32 on CUDA: the memory-efficient one; CPU: the default), plain
               causal attention, no inducer: the speed yardstick. Loss <O, dO>.
  triton       kadapt.set_backend("triton"): the fused Triton forward (key-MLP prologue, σ epilogue) and the
               fused backward with the modified delta (§12.1).
  cuda         kadapt.set_backend("cuda"): the CUDA forward (backward may be Triton). A ``skip`` row when
               kadapt._C is not built or the device is not CUDA, an ``error`` row with the message when the op
               refuses (no CUDA kernel for this op in this build).
  flex_lse     the "library route": torch.nn.attention.flex_attention with a causal BlockMask returning the
               LSE (``return_aux=AuxRequest(lse=True)``, or ``return_lse=True`` on a torch without AuxRequest),
               then s0 and w = σ(s0 − LSE) in PyTorch (s0 in fp32); the whole function under torch.compile
               (dynamic=False, compiled once per (d, L), compile time excluded) on CUDA.
  prefix_sdpa  prefix tuning through SDPA: P = 16 trainable prefix keys/values per head concatenated in front
               of K/V every call, a bool mask (prefix columns visible to every query, causal on the real keys),
               SDPA's default dispatch (flash takes no mask). Loss <O, dO>; gradients to q, k, v and the prefix.
  eager        kadapt's ``inducer_attention_concat_reference``, the seed's eager concat softmax over
               [s0 | s] (T × (T + 1) logits, several T×T tensors saved for backward). A CUDA OOM gives an
               ``oom`` row.

Modes: ``fwd`` (the training forward: inputs require grad, autograd records) and ``fwd+bwd`` (forward, then
torch.autograd.grad of loss = <O, dO> + <w, dw> with fixed random dO, dw, so the LSE/w gradient path runs;
the inducer providers differentiate q, k, v and A_k, a_k, B_k, b_k).

Timing (medians over --reps, as benchmarks/adapter.py, whose Timer is used): ``graph`` = replays of a CUDA
graph holding k back-to-back calls (device time; when capture fails, e.g. for compiled code, the row notes
it and only ``eager`` exists), ``eager`` = back-to-back Python calls. Inputs rotate over enough (q, k, v, dO,
dw) buffers to exceed twice the L2 between two uses of one buffer (``bufs``). ``peak_mib`` =
torch.cuda.max_memory_allocated() during one call minus the memory allocated before it (inputs, buffers and
parameters excluded; the peak stats are reset before the call); for ``fwd`` the outputs and what autograd
saves count. On --device cpu: eager perf_counter timing only, no graphs, ``peak_mib`` empty (a smoke run).

Ratios: ``ratio_to_sdpa`` = time / the sdpa time of the same (d, L, mode, timing).

Correctness before timing: every provider's O (and LSE, w where it has them; and, for fwd+bwd, every
gradient) is compared with fp32 references on the same rounded inputs (kadapt's
``inducer_attention_reference`` for the inducer providers and sdpa's O; explicit fp32 softmax for the prefix;
computed over batch chunks so no fp32 (B, H, L, L) tensor is formed): ``err`` = max|O − ref| / max|ref|,
``w_err`` the same for w, ``lse_err`` = max|LSE − ref| (absolute, natural log), ``grad_err`` = the largest
‖g − ref‖ / ‖ref‖; ``check`` is WARN over tol = 5e-2 (bf16, fp16) or 2e-3 (fp32; TF32 in kernels on GPUs).

FlexAttention's LSE (checked in torch 2.14.1 on CPU; reading torch's source for the GPU path):
  - log base: natural. The kernels keep log2 statistics and flex_attention's wrapper multiplies them by ln 2
    before returning (``_finalize_outputs``, ``stats_are_log2``); the returned LSE matched torch.logsumexp of
    the fp32 logits to 5e-7 here, and was 2.3 away from the log2 value. ``lse_err`` re-checks it every run.
  - gradient: LSE is differentiable. The autograd op's backward takes grad_logsumexp (math path: dS gets
    + g·P; checked here by bypassing the CPU guard: dq, dk through LSE alone matched the explicit
    logsumexp's to 2e-7), and inductor's compiled backward subtracts g/ln2 from delta = rowsum(dO ⊙ O), i.e.
    exactly the §12.1 change delta ← D − g. On the GPU machine's torch (2.11 expected) this is re-checked by
    the fwd+bwd ``grad_err`` (a detached LSE would drop the w term and WARN) and a note if LSE has no grad_fn.
  - ``return_lse=True`` is deprecated (FutureWarning) in favour of ``return_aux=AuxRequest(lse=True)``; both
    return the same natural-log LSE; this script uses AuxRequest where torch has it.
  - CPU limits (torch 2.14): flex_attention raises NotImplementedError for inputs that require grad ("does
    not support backward on CPU"), and torch.compile's CPU flex lowering supports inference only and no LSE.
    So on --device cpu flex_lse runs uncompiled (flex's own eager path) with detached inputs in ``fwd``, and
    its ``fwd+bwd`` is an ``error`` row.

Outputs under --out (default benchmarks/results/): inducer_attention_<dtype>_<device>.csv (rewritten after
every provider), inducer_attention_<dtype>_<device>.png (time vs L per provider, one panel per d × mode, and
peak memory vs L when measured), the printed table, and the targets block (printed last and written to
inducer_attention_targets_<dtype>.md). Issue targets, for bf16 at d = 64, per fused provider:
  1. fwd+bwd ≤ 1.10× SDPA at L ≥ 1024 and ≤ 1.25× at L = 512;
  2. faster than flex_lse at every L;
  3. ≥ 20× faster than the eager reference at L = 2048;
  4. peak memory linear in L: peak(L=4096) / peak(L=2048) ≤ 2.5.
Each is PASS/FAIL, or NOT MEASURED when a row it needs is missing (error, oom, skip, not in the sweep).

    python benchmarks/inducer_attention.py --device cuda --dtype bf16      # the issue's sweep
    python benchmarks/inducer_attention.py --d 64 --L 512 2048 4096 --providers sdpa triton eager
    TRITON_INTERPRET=1 python benchmarks/inducer_attention.py --device cpu --dtype fp32 --quick --reps 2 \\
        --providers sdpa triton flex_lse prefix_sdpa eager             # CPU smoke run
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import platform
import sys
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:  # also importable from elsewhere (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapter import DTYPES, Timer, l2_bytes, norm_err, rel_err, run_meta

import kadapt
from kadapt import backends
from kadapt.ops.inducer_attention import (
    inducer_attention,
    inducer_attention_concat_reference,
    inducer_attention_reference,
    inducer_logit,
)

PROVIDERS = ("sdpa", "triton", "cuda", "flex_lse", "prefix_sdpa", "eager")
FUSED = ("triton", "cuda")
INDUCER = ("triton", "cuda", "flex_lse", "eager")  # the providers computing w (their loss has the w term)
MODES = ("fwd", "fwd+bwd")
DEFAULT_D, DEFAULT_L, DEFAULT_B, DEFAULT_H = (64, 128), (512, 1024, 2048, 4096), 8, 16
QUICK_D, QUICK_L, QUICK_B, QUICK_H = (32,), (24, 48), 1, 2
TARGET_D = 64
PREFIX_LEN = 16
MLP_STD = 0.1
TOL = {"fp32": 2e-3, "fp16": 5e-2, "bf16": 5e-2}
REF_CHUNK_BYTES = 1 << 30  # fp32 reference: batch chunks whose (H, L, L) fp32 tensors stay about this size
FIELDS = ["d", "L", "B", "H", "m_k", "provider", "mode", "timing", "us", "ratio_to_sdpa", "peak_mib", "calls",
          "bufs", "err", "w_err", "lse_err", "grad_err", "check", "note", "device", "dtype", "torch", "triton",
          "date"]
STATUS = ("error", "oom", "skip")

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    create_block_mask = flex_attention = None
try:  # torch >= 2.9: return_lse is deprecated in favour of return_aux
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover
    AuxRequest = None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


# ---------------------------------------------------------------------------------------------
# inputs

class Buf:
    """One set of per-call inputs: q, k, v (leaves requiring grad), dO and dw (fp32 and the input dtype)."""

    def __init__(self, B, H, L, d, device, dtype, gen):
        def rnd(shape, dt=dtype):
            return torch.randn(shape, device=device, dtype=torch.float32, generator=gen).to(dt)

        self.q, self.k, self.v = (rnd((B, H, L, d)).requires_grad_(True) for _ in range(3))
        self.do = rnd((B, H, L, d))
        self.dw = rnd((B, H, L), torch.float32)
        self.dw_lo = self.dw.to(dtype)

    def dw_for(self, w: torch.Tensor) -> torch.Tensor:
        return self.dw if w.dtype == self.dw.dtype else self.dw_lo


def make_params(H, d, mk, device, dtype, gen):
    """(key MLP [A_k, a_k, B_k, b_k], prefix [P_k, P_v]), all leaves requiring grad."""
    def rnd(shape, std):
        t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * std
        return t.to(dtype).requires_grad_(True)

    mlp = [rnd((H, d, mk), MLP_STD), rnd((H, mk), MLP_STD), rnd((H, mk, d), MLP_STD), rnd((H, d), MLP_STD)]
    prefix = [rnd((H, PREFIX_LEN, d), 1.0), rnd((H, PREFIX_LEN, d), 1.0)]
    return mlp, prefix


def prefix_mask(L: int, device) -> torch.Tensor:
    """(L, P + L) bool, True = visible: every prefix column, and real key j ≤ i."""
    causal = torch.ones((L, L), dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones((L, PREFIX_LEN), dtype=torch.bool, device=device), causal], 1)


def _causal(b, h, i, j):
    return j <= i


# ---------------------------------------------------------------------------------------------
# providers: fn(buf, train) -> (O, LSE or None, w or None)

def _sdpa_backends(device, dtype):
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return None, "CPU: SDPA's default backend"
    if dtype == torch.float32:
        return [SDPBackend.EFFICIENT_ATTENTION], "fp32: flash has no fp32 kernel, memory-efficient backend"
    return [SDPBackend.FLASH_ATTENTION], "flash backend"


def flex_lse_fn(q, k, v, A_k, a_k, B_k, b_k, block_mask, scale):
    """The library route: flex_attention's O and LSE, then w = σ(s0 − LSE) with s0 in fp32."""
    if AuxRequest is not None:
        o, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    else:  # pragma: no cover - torch < 2.9
        o, lse = flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    s0 = inducer_logit(q.float(), A_k.float(), a_k.float(), B_k.float(), b_k.float(), scale)
    return o, lse, torch.sigmoid(s0 - lse)


def prefix_sdpa_fn(q, k, v, p_k, p_v, mask, scale):
    B = q.shape[0]
    kk = torch.cat([p_k.expand(B, -1, -1, -1), k], 2)
    vv = torch.cat([p_v.expand(B, -1, -1, -1), v], 2)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)


def skip_reason(provider: str, device: torch.device) -> str | None:
    if provider == "cuda":
        if device.type != "cuda":
            return "cuda needs --device cuda"
        if not backends.cuda_extension_built():
            return "kadapt._C not built (kadapt.backends.cuda_extension_built() is False)"
        try:
            kadapt.set_backend("cuda")
        except Exception as exc:  # noqa: BLE001
            return f"kadapt.set_backend('cuda') raised {_note(exc)}"
        finally:
            kadapt.set_backend("auto")
    if provider == "triton":
        if not backends.triton_importable():
            return "triton is not installed"
        if device.type == "cpu" and not backends.triton_interpret():
            return "triton on CPU needs TRITON_INTERPRET=1 in the environment"
    if provider == "flex_lse" and flex_attention is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None


def build_provider(name, cfg):
    """(fn(buf, train) -> (O, LSE | None, w | None), trainables besides q, k, v, backend to force, note)."""
    scale, mlp, prefix, device, dtype = cfg["scale"], cfg["mlp"], cfg["prefix"], cfg["device"], cfg["dtype"]
    if name in FUSED:
        def fn(b, train):
            return inducer_attention(b.q, b.k, b.v, *mlp, scale=scale, causal=True)

        return fn, mlp, name, ""
    if name == "sdpa":
        from torch.nn.attention import sdpa_kernel

        which, note = _sdpa_backends(device, dtype)

        def fn(b, train):
            if which is None:
                return F.scaled_dot_product_attention(b.q, b.k, b.v, is_causal=True, scale=scale), None, None
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(b.q, b.k, b.v, is_causal=True, scale=scale), None, None

        return fn, [], "reference", note
    if name == "flex_lse":
        block_mask = create_block_mask(_causal, None, None, cfg["L"], cfg["L"], device=device)
        how = "return_aux=AuxRequest(lse=True)" if AuxRequest is not None else "return_lse=True"
        if device.type == "cuda":
            compiled = torch.compile(flex_lse_fn, dynamic=False)

            def fn(b, train):
                return compiled(b.q, b.k, b.v, *mlp, block_mask, scale)

            return fn, mlp, "reference", f"torch.compile(flex_attention + σ epilogue), {how}"

        def fn(b, train):  # flex raises for CPU inputs that require grad; the fwd check/timing detaches
            args = (b.q, b.k, b.v, *mlp) if train else tuple(t.detach() for t in (b.q, b.k, b.v, *mlp))
            return flex_lse_fn(*args, block_mask, scale)

        return fn, mlp, "reference", (f"CPU: flex_attention uncompiled (compiled CPU flex: inference only, no LSE), "
                                      f"fwd on detached inputs, {how}")
    if name == "prefix_sdpa":
        mask = prefix_mask(cfg["L"], device)

        def fn(b, train):
            return prefix_sdpa_fn(b.q, b.k, b.v, *prefix, mask, scale), None, None

        return fn, prefix, "reference", f"P={PREFIX_LEN}, bool mask, SDPA default dispatch"
    if name == "eager":
        def fn(b, train):
            w, o = inducer_attention_concat_reference(b.q, b.k, b.v, *mlp, scale=scale, causal=True)
            return o, None, w

        return fn, mlp, "reference", "concat softmax over [s0 | s], T×(T+1) tensors"
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# fp32 references (batch chunks: no fp32 (B, H, L, L) tensor)

def _chunks(B, H, L, device):
    if device.type != "cuda":
        return [slice(0, B)]
    per = max(1, REF_CHUNK_BYTES // (H * L * L * 4))
    return [slice(i, min(B, i + per)) for i in range(0, B, per)]


def references(buf: Buf, mlp, prefix, scale, want_grads: bool, want_prefix: bool) -> dict:
    """fp32 truths on buf's inputs: o, lse, w; grads 'inducer' (q, k, v, A_k, a_k, B_k, b_k for <O, dO> +
    <w, dw>), 'plain' (q, k, v for <O, dO>); 'prefix_o' and 'prefix' (q, k, v, P_k, P_v for <O', dO>)."""
    B, H, L, _ = buf.q.shape
    leaf = [t.detach().float().requires_grad_(want_grads) for t in (*mlp, *prefix)]
    mlp32, pre32 = leaf[:4], leaf[4:]
    mask = prefix_mask(L, buf.q.device)
    parts = {"o": [], "lse": [], "w": [], "prefix_o": []}
    g = {"inducer": [[], [], [], [torch.zeros_like(t) for t in mlp32]], "plain": [[], [], []],
         "prefix": [[], [], [], [torch.zeros_like(t) for t in pre32]]}
    for sl in _chunks(B, H, L, buf.q.device):
        q, k, v = (t[sl].detach().float().requires_grad_(want_grads) for t in (buf.q, buf.k, buf.v))
        do, dw = buf.do[sl].float(), buf.dw[sl]
        with torch.set_grad_enabled(want_grads):
            o, lse, w = inducer_attention_reference(q, k, v, *mlp32, scale=scale, causal=True)
            parts["o"].append(o.detach())
            parts["lse"].append(lse.detach())
            parts["w"].append(w.detach())
            if want_grads:
                gi = torch.autograd.grad([o, w], [q, k, v, *mlp32], [do, dw], retain_graph=True)
                gp = torch.autograd.grad(o, [q, k, v], do)
                for j in range(3):
                    g["inducer"][j].append(gi[j])
                    g["plain"][j].append(gp[j])
                g["inducer"][3] = [a + b for a, b in zip(g["inducer"][3], gi[3:])]
            del o, lse, w
            if want_prefix:
                n = q.shape[0]
                kk = torch.cat([pre32[0].expand(n, -1, -1, -1), k], 2)
                vv = torch.cat([pre32[1].expand(n, -1, -1, -1), v], 2)
                s = (scale * (q @ kk.transpose(-1, -2))).masked_fill(~mask, float("-inf"))
                o = torch.softmax(s, -1) @ vv
                parts["prefix_o"].append(o.detach())
                if want_grads:
                    gx = torch.autograd.grad(o, [q, k, v, *pre32], do)
                    for j in range(3):
                        g["prefix"][j].append(gx[j])
                    g["prefix"][3] = [a + b for a, b in zip(g["prefix"][3], gx[3:])]
                del s, o
    ref = {key: torch.cat(val) if val else None for key, val in parts.items()}
    if want_grads:
        for key, val in g.items():
            if val[0]:
                ref[key] = [torch.cat(val[0]), torch.cat(val[1]), torch.cat(val[2])] + (val[3] if len(val) > 3 else [])
    return ref


# ---------------------------------------------------------------------------------------------
# one (d, L)

def peak_mib(call, device) -> float | None:
    """Peak allocated MiB of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = call(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            _log(f"    torch.cuda.synchronize after an error raised too: {exc}")
        torch.cuda.empty_cache()


def run_config(d, L, args, device, dtype, timer, meta, l2) -> list[dict]:
    """Every (provider, mode, timing) row of one (d, L)."""
    B, H, mk = args.B, args.H, args.mk
    elem = torch.finfo(dtype).bits // 8
    nbuf = 1 if l2 == 0 else max(1, min(16, math.ceil(2 * l2 / (4 * B * H * L * d * elem))))
    gen = torch.Generator(device=device).manual_seed(7919 * d + L)
    bufs = [Buf(B, H, L, d, device, dtype, gen) for _ in range(nbuf)]
    mlp, prefix = make_params(H, d, mk, device, dtype, gen)
    scale = d ** -0.5
    cfg = {"scale": scale, "mlp": mlp, "prefix": prefix, "device": device, "dtype": dtype, "L": L}
    base = {"d": d, "L": L, "B": B, "H": H, "m_k": mk, "bufs": nbuf, **meta}
    tol = TOL[args.dtype]
    rows = []

    runnable, skipped = [], []
    for provider in args.providers:
        reason = skip_reason(provider, device)
        (skipped if reason else runnable).append((provider, reason))
    for provider, reason in skipped:
        rows += [{**base, "provider": provider, "mode": mode, "timing": "skip", "note": reason} for mode in args.modes]
    if not runnable:
        return rows
    want_grads = "fwd+bwd" in args.modes
    ref = references(bufs[0], mlp, prefix, scale, want_grads, any(p == "prefix_sdpa" for p, _ in runnable))
    _cleanup(device)

    for provider, _ in runnable:
        row0 = {**base, "provider": provider}
        backend = "reference"
        try:
            fn, extra, backend, note = build_provider(provider, cfg)
            row0["note"] = note
            kadapt.set_backend(backend)
            t0 = time.perf_counter()
            o, lse, w = fn(bufs[0], False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            o_ref = ref["prefix_o"] if provider == "prefix_sdpa" else ref["o"]
            errs = {"err": rel_err(o.detach(), o_ref)}
            if w is not None:
                errs["w_err"] = rel_err(w.detach(), ref["w"])
            if lse is not None:
                errs["lse_err"] = (lse.detach().float() - ref["lse"]).abs().max().item()
            del o, lse, w
        except Exception as exc:  # noqa: BLE001 - one failing provider must not end the sweep
            status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
            _log(f"    {provider}: {status.upper()} {_note(exc)}")
            if args.verbose:
                traceback.print_exc()
            note = "; ".join(x for x in (_note(exc), row0.get("note")) if x)[:400]
            rows += [{**row0, "mode": mode, "timing": status, "note": note} for mode in args.modes]
            kadapt.set_backend("auto")
            _cleanup(device)
            continue
        if provider == "flex_lse":
            _log(f"    flex_lse: first call (compile included) {first_s:.1f} s")

        for mode in args.modes:
            row = {**row0, "mode": mode}
            try:
                kadapt.set_backend(backend)
                train = mode == "fwd+bwd" or device.type == "cuda"
                grad_err = None
                if mode == "fwd":
                    def call(i, fn=fn, train=train):
                        return fn(bufs[i], train)
                else:
                    def call(i, fn=fn, extra=extra):
                        b = bufs[i]
                        o, _, w = fn(b, True)
                        inputs = [b.q, b.k, b.v, *extra]
                        if w is None:
                            return torch.autograd.grad(o, inputs, b.do)
                        return torch.autograd.grad([o, w], inputs, [b.do, b.dw_for(w)])

                    if provider == "flex_lse":
                        _, lse, _ = fn(bufs[0], True)
                        if lse.grad_fn is None:
                            row["note"] += "; LSE has no grad_fn (no gradient through w)"
                        del lse
                    grads = call(0)
                    g_ref = ref["prefix" if provider == "prefix_sdpa" else "inducer" if provider in INDUCER
                                else "plain"]
                    grad_err = max(norm_err(g, r) for g, r in zip(grads, g_ref))
                    del grads
                ok = all(v <= tol for v in errs.values()) and (grad_err is None or grad_err <= tol)
                row.update({k: f"{v:.2e}" for k, v in errs.items()})
                row.update(grad_err="" if grad_err is None else f"{grad_err:.2e}", check="ok" if ok else "WARN")
                mem = peak_mib(call, device)
                row["peak_mib"] = "" if mem is None else round(mem, 1)
                timings = []
                if device.type == "cuda" and not args.no_graph:
                    try:
                        timings.append(("graph",) + timer.graph(call, nbuf))
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        msg = f"graph capture failed, eager timing only: {_note(exc)}"
                        row["note"] = "; ".join(x for x in (row.get("note"), msg) if x)[:400]
                        _log(f"    {provider} {mode}: {msg}")
                        _cleanup(device)
                timings.append(("eager",) + timer.eager(call, nbuf))
                for timing, us, calls in timings:
                    rows.append({**row, "timing": timing, "us": round(us, 3), "calls": calls})
            except Exception as exc:  # noqa: BLE001
                status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
                _log(f"    {provider} {mode}: {status.upper()} {_note(exc)}")
                if args.verbose:
                    traceback.print_exc()
                rows.append({**row, "timing": status, "note": "; ".join(x for x in (_note(exc), row.get("note"))
                                                                          if x)[:400]})
            finally:
                call = None
                _cleanup(device)
        kadapt.set_backend("auto")
    return rows


# ---------------------------------------------------------------------------------------------
# ratios, reporting

def _timed(rows):
    """(d, L, mode, provider) -> {timing: row} of the timed rows."""
    out = {}
    for r in rows:
        if r["timing"] in ("graph", "eager"):
            out.setdefault((r["d"], r["L"], r["mode"], r["provider"]), {})[r["timing"]] = r
    return out


def _status(rows):
    """(d, L, mode, provider) -> the error/oom/skip row."""
    return {(r["d"], r["L"], r["mode"], r["provider"]): r for r in rows if r["timing"] in STATUS}


def best(t: dict | None) -> dict | None:
    if not t:
        return None
    return t.get("graph") or t.get("eager")


def pair(a: dict | None, b: dict | None) -> tuple[dict, dict] | None:
    """(row of a, row of b) with the same timing, graph preferred; None if there is none."""
    if not a or not b:
        return None
    for timing in ("graph", "eager"):
        if timing in a and timing in b:
            return a[timing], b[timing]
    return None


def add_ratios(rows: list[dict]) -> None:
    timed = _timed(rows)
    for r in rows:
        if r["timing"] in ("graph", "eager"):
            s = timed.get((r["d"], r["L"], r["mode"], "sdpa"), {}).get(r["timing"])
            r["ratio_to_sdpa"] = round(r["us"] / s["us"], 3) if s else ""


def write_csv(rows: list[dict], path: Path) -> None:
    add_ratios(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)


def print_table(rows: list[dict]) -> None:
    timed, status = _timed(rows), _status(rows)
    keys = sorted(set(timed) | set(status), key=lambda k: (k[0], MODES.index(k[2]), k[1], PROVIDERS.index(k[3])))
    print(f"{'d':>4s} {'L':>5s} {'mode':7s} {'provider':11s} {'graph µs':>10s} {'eager µs':>10s} {'×sdpa':>6s} "
          f"{'peak MiB':>9s} {'O err':>8s} {'w err':>8s} {'LSE err':>8s} {'grad err':>8s} check")
    for key in keys:
        d, L, mode, provider = key
        head = f"{d:4d} {L:5d} {mode:7s} {provider:11s}"
        if key not in timed:
            r = status[key]
            print(f"{head} {r['timing'].upper()} {str(r.get('note', ''))[:100]}")
            continue
        t = timed[key]
        g, e = t.get("graph"), t.get("eager")
        p = pair(t, timed.get((d, L, mode, "sdpa")))
        ratio = f"{p[0]['us'] / p[1]['us']:6.2f}" if p else f"{'-':>6s}"
        r = g or e
        mem = r.get("peak_mib", "")
        print(f"{head} {g['us'] if g else float('nan'):10.1f} {e['us'] if e else float('nan'):10.1f} {ratio} "
              f"{mem if mem != '' else '-':>9} {r.get('err') or '-':>8s} {r.get('w_err') or '-':>8s} "
              f"{r.get('lse_err') or '-':>8s} {r.get('grad_err') or '-':>8s} "
              f"{'' if r.get('check') == 'ok' else 'WARN'}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = _timed(rows)
    ds = list(dict.fromkeys(r["d"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    providers = [p for p in PROVIDERS if any(k[3] == p for k in timed)]
    has_mem = any(best(t).get("peak_mib", "") != "" for t in timed.values())
    kinds = ("time", "memory") if has_mem else ("time",)
    nrow = len(ds) * len(kinds)
    fig, axes = plt.subplots(nrow, len(modes), figsize=(6.5 * len(modes), 3.8 * nrow), squeeze=False)
    colors = dict(zip(PROVIDERS, ("black", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:red")))
    graph = any(r["timing"] == "graph" for r in rows)
    for ki, kind in enumerate(kinds):
        for di, d in enumerate(ds):
            for j, mode in enumerate(modes):
                ax = axes[ki * len(ds) + di][j]
                for p in providers:
                    pts = sorted((k[1], best(t)) for k, t in timed.items() if (k[0], k[2], k[3]) == (d, mode, p))
                    if kind == "time":
                        xs, ys = [L for L, _ in pts], [r["us"] for _, r in pts]
                    else:
                        xs = [L for L, r in pts if r.get("peak_mib", "") != ""]
                        ys = [r["peak_mib"] for _, r in pts if r.get("peak_mib", "") != ""]
                    if xs:
                        ax.plot(xs, ys, marker="o", label=p, color=colors[p],
                                linestyle="--" if p in ("sdpa", "prefix_sdpa") else "-")
                ax.set_xscale("log", base=2)
                Ls = sorted({k[1] for k in timed if k[0] == d})
                ax.set_xticks(Ls, [str(L) for L in Ls])
                ax.minorticks_off()
                ax.set_yscale("log")
                ax.set_xlabel("L (T_q = T_k, causal)")
                ax.set_ylabel("µs per call (median, " + ("CUDA graph" if graph else "eager") + ")" if kind == "time"
                              else "peak MiB above inputs")
                ax.set_title(f"{kind}: d={d}, {mode}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0] and ki == 0 and di == 0 and j == 0:
                    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets_block(rows: list[dict], args, meta) -> list[str]:
    """The issue's four targets per fused provider, at d = 64 (else the first d of the sweep)."""
    timed, status = _timed(rows), _status(rows)
    d = TARGET_D if TARGET_D in args.d else args.d[0]
    Ls = sorted(args.L)
    graph = any(r["timing"] == "graph" for r in rows)
    lines = [(f"### Inducer attention targets: {args.dtype}, d={d}, B={args.B}, H={args.H}, m_k={args.mk}, "
              f"causal ({meta['date']})"), "",
             f"- device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}",
             "- timing: " + ("CUDA-graph replays (device time, median); (eager) marks back-to-back Python calls"
                             if graph else "eager Python calls (no CUDA graphs)"),
             f"- L in the sweep: {', '.join(map(str, Ls))}; modes: {', '.join(args.modes)}"]
    if d != TARGET_D or args.dtype != "bf16":
        lines.append(f"- the issue's targets are for bf16 at d={TARGET_D}; this run: {args.dtype}, d={d}")
    lines.append("")

    def get(L, mode, p):
        return timed.get((d, L, mode, p))

    def missing(L, mode, p):
        r = status.get((d, L, mode, p))
        return f"{p} L={L} {mode}: " + (r["timing"] if r else "not in the sweep")

    def us(r):
        return f"{r['us']:.1f}" + ("" if r["timing"] == "graph" or not graph else " (eager)")

    def verdict(fails, gaps, cells):
        v = "FAIL" if fails else ("NOT MEASURED" if gaps else "PASS")
        return f"{v} — " + "; ".join(cells + gaps) if cells or gaps else "NOT MEASURED"

    fused = [p for p in FUSED if p in args.providers]
    if not fused:
        lines.append("No fused provider (triton, cuda) in this run.")
    for p in fused:
        lines += [f"**{p}**", ""]
        # 1. fwd+bwd vs sdpa
        cells, gaps, fails = [], [], 0
        need = [(L, 1.10 if L >= 1024 else 1.25) for L in Ls if L == 512 or L >= 1024]
        if "fwd+bwd" not in args.modes or not need:
            gaps.append("needs fwd+bwd at L = 512 or L ≥ 1024")
            need = []
        for L, lim in need:
            pr = pair(get(L, "fwd+bwd", p), get(L, "fwd+bwd", "sdpa"))
            if pr is None:
                gaps.append(missing(L, "fwd+bwd", p if not get(L, "fwd+bwd", p) else "sdpa"))
                continue
            ratio = pr[0]["us"] / pr[1]["us"]
            fails += ratio > lim
            cells.append(f"L={L}: {us(pr[0])} vs {us(pr[1])} µs = {ratio:.2f}× (≤ {lim:.2f})")
        lines.append("1. fused fwd+bwd ≤ 1.10× SDPA at L ≥ 1024, ≤ 1.25× at L = 512: "
                     + verdict(fails, gaps, cells))
        # 2. faster than flex_lse at every L
        cells, gaps, fails = [], [], 0
        for mode in args.modes:
            for L in Ls:
                pr = pair(get(L, mode, p), get(L, mode, "flex_lse"))
                if pr is None:
                    gaps.append(missing(L, mode, p if not get(L, mode, p) else "flex_lse"))
                    continue
                fails += pr[0]["us"] >= pr[1]["us"]
                cells.append(f"L={L} {mode}: {us(pr[0])} vs {us(pr[1])} µs = {pr[0]['us'] / pr[1]['us']:.2f}×")
        lines.append("2. faster than flex_lse at every L: " + verdict(fails, gaps, cells))
        # 3. ≥ 20× faster than eager at L = 2048
        cells, gaps, fails = [], [], 0
        for mode in args.modes:
            pr = pair(get(2048, mode, p), get(2048, mode, "eager"))
            if pr is None:
                gaps.append(missing(2048, mode, p if not get(2048, mode, p) else "eager"))
                continue
            speedup = pr[1]["us"] / pr[0]["us"]
            fails += speedup < 20
            cells.append(f"{mode}: {us(pr[0])} vs {us(pr[1])} µs (eager / fused = {speedup:.1f}×)")
        lines.append("3. ≥ 20× faster than the eager reference at L = 2048: " + verdict(fails, gaps, cells))
        # 4. memory linear in L
        cells, gaps, fails = [], [], 0
        for mode in args.modes:
            hi, lo = best(get(4096, mode, p)), best(get(2048, mode, p))
            if hi is None or lo is None:
                gaps.append(missing(4096 if hi is None else 2048, mode, p))
                continue
            if hi.get("peak_mib", "") == "" or lo.get("peak_mib", "") == "":
                gaps.append(f"{mode}: peak memory not measured (CPU run)")
                continue
            ratio = hi["peak_mib"] / lo["peak_mib"] if lo["peak_mib"] > 0 else float("inf")
            fails += ratio > 2.5
            s_hi, s_lo = best(get(4096, mode, "sdpa")), best(get(2048, mode, "sdpa"))
            ctx = ""
            if s_hi and s_lo and s_lo.get("peak_mib") not in ("", None, 0):
                ctx = f"; sdpa {s_hi['peak_mib'] / s_lo['peak_mib']:.2f}×"
            cells.append(f"{mode}: {hi['peak_mib']:.0f} / {lo['peak_mib']:.0f} MiB = {ratio:.2f}× (≤ 2.5{ctx})")
        lines.append("4. peak memory linear in L, peak(4096) / peak(2048) ≤ 2.5: " + verdict(fails, gaps, cells))
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--d", nargs="+", type=int, default=None,
                   help=f"head dims (default {' '.join(map(str, DEFAULT_D))}; --quick: {QUICK_D[0]})")
    p.add_argument("--L", nargs="+", type=int, default=None,
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_L))}; --quick: "
                        f"{' '.join(map(str, QUICK_L))})")
    p.add_argument("--B", type=int, default=None, help=f"batch (default {DEFAULT_B}; --quick: {QUICK_B})")
    p.add_argument("--H", type=int, default=None, help=f"heads (default {DEFAULT_H}; --quick: {QUICK_H})")
    p.add_argument("--mk", type=int, default=10, help="key-MLP width m_k (default 10)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--reps", type=int, default=10, help="timed repeats per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (default 3; --quick: 1)")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing (eager timing only)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes (CPU smoke run): B={QUICK_B}, H={QUICK_H}, d={QUICK_D[0]}, "
                        f"L in {{{', '.join(map(str, QUICK_L))}}}")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    args = p.parse_args(argv)
    args.d = args.d or list(QUICK_D if args.quick else DEFAULT_D)
    args.L = args.L or list(QUICK_L if args.quick else DEFAULT_L)
    args.B = args.B or (QUICK_B if args.quick else DEFAULT_B)
    args.H = args.H or (QUICK_H if args.quick else DEFAULT_H)
    args.warmup = (1 if args.quick else 3) if args.warmup is None else args.warmup
    args.providers = list(dict.fromkeys(args.providers))
    args.modes = [m for m in MODES if m in args.modes]
    if args.reps < 1 or args.warmup < 0 or args.mk < 1 or min(args.d + args.L + [args.B, args.H]) < 1:
        p.error("--reps, --mk, --d, --L, --B and --H must be >= 1 and --warmup >= 0")
    if max(args.d) > 128:
        p.error("--d: the fused kernels take head dims up to 128")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    meta = run_meta(device, args.dtype)
    dev_name = meta["device"]
    print(f"# {date.today()} {platform.node()} {dev_name}; torch {torch.__version__}, triton {meta['triton']}; "
          f"{args.dtype}; B={args.B}, H={args.H}, m_k={args.mk}, causal, scale 1/√d, prefix P={PREFIX_LEN}",
          flush=True)
    for provider in args.providers:
        reason = skip_reason(provider, device)
        if reason:
            print(f"note: provider {provider} skipped: {reason}", flush=True)

    timer = Timer(device, args.reps, args.warmup)
    l2 = l2_bytes(device)
    configs = [(d, L) for d in args.d for L in sorted(dict.fromkeys(args.L))]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"inducer_attention_{args.dtype}_{args.device}"
    csv_path, png_path = args.out / f"{stem}.csv", args.out / f"{stem}.png"
    rows, t_start = [], time.perf_counter()
    for idx, (d, L) in enumerate(configs):
        _log(f"[{idx + 1}/{len(configs)}] d={d} L={L} ({time.perf_counter() - t_start:.0f} s)")
        torch._dynamo.reset()
        rows += run_config(d, L, args, device, dtype, timer, meta, l2)
        write_csv(rows, csv_path)
        _cleanup(device)
    elapsed = time.perf_counter() - t_start
    write_csv(rows, csv_path)
    if any(r["timing"] in ("graph", "eager") for r in rows):
        plot(rows, png_path, f"inducer attention (B={args.B}, H={args.H}, m_k={args.mk}, causal), {dev_name}, "
                             f"{args.dtype}")

    print_table(rows)
    warn = sum(r.get("check") == "WARN" for r in rows if r["timing"] in ("graph", "eager"))
    counts = {s: sum(r["timing"] == s for r in rows) for s in STATUS}
    print(f"sweep: {len(configs)} configs in {elapsed:.0f} s; {counts['error']} error, {counts['oom']} oom, "
          f"{counts['skip']} skip rows, {warn} rows over the error tolerance; wrote {csv_path} and {png_path.name}")
    block = targets_block(rows, args, meta)
    md = args.out / f"inducer_attention_targets_{args.dtype}.md"
    md.write_text("\n".join(block) + "\n")
    print("\n".join(block))
    print(f"(written to {md})")
    return rows


if __name__ == "__main__":
    main()
