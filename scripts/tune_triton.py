"""Choose the launch configuration (tiles, num_warps, num_stages) of kadapt's Triton kernels on this GPU and write
the table kadapt/ops/tuning.py reads (issue 12, item 3).

Each group is one kernel and one table bucket (weight kinds, dtype, tile widths), with up to 8 candidate configs,
the kernel's default first, and one or more target shapes (the issue's: bf16, fused adapter T=8192, D=1024, m=64;
inducer attention B=8, H=16, d=64, m_k=10, causal, L = 1024 and 4096):

1. check: every candidate runs through the public op (``kadapt.set_backend("triton")``, the candidate forced with
   ``tuning.OVERRIDES``, the other kernels at their defaults) on a shape that is no multiple of the tiles, forward
   and every gradient, against the fp32 reference on the same rounded inputs (tolerance 5e-2 for 16-bit dtypes,
   1e-3 for fp32; a gradient may also be off by up to twice the error of the reference formula computed in the
   kernel's dtype). A candidate that fails to compile or to match is never timed nor recorded. The checks run in
   --jobs worker processes: Triton compiles on one CPU core, ~2.5 s per specialisation, and the compiled kernels
   land in Triton's on-disk cache, where step 2 (and later runs) find them. ``--check-only`` stops here;
   ``--checks FILE`` records the results and reuses those already there (scripts/gpu_check.sh runs the checks
   during the build, filling the cache and FILE, so its ``tune`` stage mostly times).
2. time, in this process, at every target shape: the candidate's outputs are first compared with the default's
   there; then CUDA events around replays of a CUDA graph of k back-to-back kernel calls (k so a replay lasts
   ~2 ms) over rotating inputs (more than twice the L2): the median of --reps replays, divided by k.
3. record the fastest (its time and the default's) in <arch>.json, rewritten after every group, so a run cut
   short (SIGINT) keeps what it measured; ``--install`` copies it where the imported kadapt reads its table.

Under KADAPT_TUNING=0 (set here) the candidates compete with the defaults, never with an installed table.

    python scripts/tune_triton.py --out /tmp/tuning --install           # GPU: the sweep (~30-60 s on an H200)
    python scripts/tune_triton.py --check-only --jobs 4 --checks C.jsonl # GPU: step 1 only (fills Triton's cache);
                                                                         # a later run with --checks C.jsonl reuses
                                                                         # its results and only times
    python scripts/tune_triton.py --dry-run --out /tmp/tuning            # CPU: interpreter, tiny fp32 shapes,
                                                                         # one bucket per kernel, 2 candidates
"""
from __future__ import annotations

import os
import sys

# Set before kadapt and triton are imported: Triton picks interpreted or compiled kernels when they are defined.
os.environ["KADAPT_TUNING"] = "0"
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from functools import cache  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import kadapt  # noqa: E402
from kadapt.ops import (  # noqa: E402
    AdapterWeight,
    fused_adapter,
    fused_adapter_reference,
    inducer_attention,
    inducer_attention_reference,
    tuning,
)
from kadapt.ops.activations import ACTIVATION_CODES  # noqa: E402

ACT = "gelu_new"
PHM_N = 4
MLP_WIDTH = 10  # m_k of the inducer benchmark
GRAPH_US = 2000.0  # one timed graph replay lasts about this long
MAX_CALLS = 64
MAX_BUFS = 8

# Candidates besides the default (which is always first): at most 7 each, so a sweep stays ~1 minute.
CANDIDATES: dict[str, list[dict[str, int]]] = {
    "fused_adapter_fwd": [
        {"BT": 32, "BK": 128, "num_warps": 4, "num_stages": 2}, {"BT": 32, "BK": 128, "num_warps": 4, "num_stages": 4},
        {"BT": 64, "BK": 64, "num_warps": 4}, {"BT": 64, "BK": 128, "num_warps": 4},
        {"BT": 64, "BK": 128, "num_warps": 8}, {"BT": 16, "BK": 256, "num_warps": 4},
        {"BT": 128, "BK": 64, "num_warps": 8}],
    "fused_adapter_bwd": [
        {"BT": 32, "BK": 128, "num_warps": 4, "num_stages": 2}, {"BT": 32, "BK": 128, "num_warps": 4, "num_stages": 4},
        {"BT": 64, "BK": 64, "num_warps": 4}, {"BT": 64, "BK": 128, "num_warps": 4},
        {"BT": 64, "BK": 128, "num_warps": 8}, {"BT": 16, "BK": 256, "num_warps": 4},
        {"BT": 128, "BK": 64, "num_warps": 8}],
    "kron_weight": [{"BR": 64, "BC": 64, "num_warps": 4}, {"BR": 32, "BC": 64, "num_warps": 4},
                    {"BR": 16, "BC": 64, "num_warps": 2}],
    "kron_factor_grads": [{"BC": 64, "num_warps": 8}, {"BC": 128, "num_warps": 8}, {"BC": 32, "num_warps": 4},
                          {"BC": 128, "num_warps": 4}],
    "inducer_attention_fwd": [
        {"BM": 128, "BN": 64, "num_warps": 4}, {"BM": 128, "BN": 64, "num_warps": 8},
        {"BM": 128, "BN": 128, "num_warps": 8}, {"BM": 64, "BN": 128, "num_warps": 4},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 4}, {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 2},
        {"BM": 128, "BN": 32, "num_warps": 4}],
    "inducer_attention_bwd_dkdv": [  # BN keys per program, BM queries per step
        {"BM": 32, "BN": 128, "num_warps": 4}, {"BM": 32, "BN": 128, "num_warps": 8},
        {"BM": 32, "BN": 64, "num_warps": 4}, {"BM": 64, "BN": 128, "num_warps": 8},
        {"BM": 16, "BN": 128, "num_warps": 4}, {"BM": 64, "BN": 64, "num_warps": 8},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2}],
    "inducer_attention_bwd_dq": [  # BM queries per program, BN keys per step
        {"BM": 128, "BN": 32, "num_warps": 4}, {"BM": 128, "BN": 32, "num_warps": 8},
        {"BM": 128, "BN": 64, "num_warps": 8}, {"BM": 64, "BN": 32, "num_warps": 4},
        {"BM": 128, "BN": 64, "num_warps": 4}, {"BM": 64, "BN": 128, "num_warps": 4},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2}],
}


@dataclass(frozen=True)
class Sizes:
    """The shapes of one run: GPU targets or the dry run's tiny ones."""

    dtype: torch.dtype
    T: int  # fused adapter tokens (target)
    T_check: int
    D: int
    m: int
    B: int  # attention batch, heads, head dim, sequence lengths (targets)
    H: int
    d: int
    mk: int
    L: tuple[int, ...]
    L_check: int
    adapter_kinds: tuple[str, ...]
    factored_kinds: tuple[str, ...]
    candidates: int  # per group, the default included


GPU_SIZES = Sizes(torch.bfloat16, T=8192, T_check=1000, D=1024, m=64, B=8, H=16, d=64, mk=MLP_WIDTH, L=(1024, 4096),
                  L_check=200, adapter_kinds=("dense", "lowrank"), factored_kinds=("phm", "compacter"), candidates=8)
DRY_SIZES = Sizes(torch.float32, T=40, T_check=40, D=32, m=16, B=1, H=2, d=16, mk=4, L=(24,), L_check=24,
                  adapter_kinds=("dense",), factored_kinds=("phm",), candidates=2)


# ---------------------------------------------------------------------------------------------
# inputs and error measures

def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rnd(shape, std, dtype, device, gen) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * std).to(dtype)


def _factors(kind: str, d_in: int, d_out: int, dtype, device, gen) -> list[torch.Tensor]:
    """Factor tensors of one in×out weight with entries of W about 0.02 (the dense adapter init scale)."""
    if kind == "dense":
        return [_rnd((d_in, d_out), 0.02, dtype, device, gen)]
    if kind == "lowrank":
        return [_rnd((d_in, 1), 0.14, dtype, device, gen), _rnd((1, d_out), 0.14, dtype, device, gen)]
    n = PHM_N
    if kind == "phm":
        return [_rnd((n, n, n), 0.1, dtype, device, gen), _rnd((n, d_in // n, d_out // n), 0.1, dtype, device, gen)]
    return [_rnd((n, n, n), 0.2, dtype, device, gen), _rnd((n, d_in // n, 1), 0.2, dtype, device, gen),
            _rnd((n, 1, d_out // n), 0.2, dtype, device, gen)]


def _weight(kind: str, tensors: list[torch.Tensor]) -> AdapterWeight:
    return getattr(AdapterWeight, kind)(*tensors)


def _rel_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _rel_norm(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


@dataclass
class Reference:
    """The fp32 truth of a check and the bar per output: max(tol, 2 × the error of the low-precision formula)."""

    outputs: list[torch.Tensor]
    bars: list[float]


def _compare(got: list[torch.Tensor], ref: Reference, names: list[str]) -> str | None:
    for name, g, r, bar in zip(names, got, ref.outputs, ref.bars):
        if g.shape != r.shape:
            return f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        if not torch.isfinite(g).all():
            return f"{name}: non-finite values (an unwritten or overflowing tile?)"
        err = _rel_norm(g, r) if name.startswith("d") else _rel_max(g, r)
        if err > bar:
            return f"{name}: error {err:.3g} > {bar:.3g}"
    return None


# ---------------------------------------------------------------------------------------------
# groups

@dataclass
class Target:
    """One timed shape: ``make()`` builds its inputs and returns (call(i) -> outputs on buffer set i, sets)."""

    label: str
    numeric: dict[str, int]  # the bucket's numeric fields at this shape (attention: L)
    make: Callable[[], tuple[Callable[[int], Any], int]]


@dataclass
class Group:
    name: str
    kernel: str
    bucket: dict[str, Any]  # without the numeric fields
    candidates: list[dict[str, int]]
    check: Callable[[], tuple[Callable[[], list[torch.Tensor]], Reference, list[str]]]
    targets: list[Target] = field(default_factory=list)


def _candidates(kernel: str, device: torch.device, bucket: dict[str, Any], n: int) -> list[dict[str, int]]:
    """The default for this bucket first, then CANDIDATES[kernel] without repeats, n in all."""
    spec = tuning.SPECS[kernel]
    default = spec.default(device.type == "cuda", **bucket)
    out = [default]
    for c in CANDIDATES[kernel]:
        c = tuning.check_config(kernel, c, f"CANDIDATES[{kernel!r}]")
        if c not in out:
            out.append(c)
    return out[:n]


def _bufs(bytes_per_set: int, device: torch.device) -> int:
    """Input sets to rotate over so two uses of one set are more than twice the L2 apart."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(MAX_BUFS, math.ceil(2 * l2 / max(bytes_per_set, 1)) + 1))


def _adapter_check(kind: str, s: Sizes, device) -> Callable:
    """The fused adapter op (forward and every gradient) on (T_check, D) with ``kind`` weights."""
    def build():
        g = _gen(device, 1)
        x = _rnd((s.T_check, s.D), 1.0, s.dtype, device, g)
        down, up = _factors(kind, s.D, s.m, s.dtype, device, g), _factors(kind, s.m, s.D, s.dtype, device, g)
        bd, bu = _rnd((s.m,), 0.02, s.dtype, device, g), _rnd((s.D,), 0.02, s.dtype, device, g)
        dy = _rnd((s.T_check, s.D), 1.0, s.dtype, device, g)
        names = ["y", "dx", *[f"d_down{i}" for i in range(len(down))], *[f"d_up{i}" for i in range(len(up))],
                 "db_down", "db_up"]

        def run(leaves: list[torch.Tensor], fn) -> list[torch.Tensor]:
            leaves = [t.detach().clone().requires_grad_() for t in leaves]
            xx, nd = leaves[0], len(down)
            wd, wu = _weight(kind, leaves[1:1 + nd]), _weight(kind, leaves[1 + nd:1 + nd + len(up)])
            y = fn(xx, wd, leaves[-2], wu, leaves[-1], ACT, add_input=True)
            return [y.detach(), *torch.autograd.grad(y, leaves, dy.to(y.dtype))]

        leaves = [x, *down, *up, bd, bu]
        truth = run([t.float() for t in leaves], fused_adapter_reference)
        lowp = run(leaves, fused_adapter_reference)
        tol = _tol(s.dtype)
        bars = [tol] + [max(tol, 2 * _rel_norm(lp, t)) for lp, t in zip(lowp[1:], truth[1:])]

        def candidate():
            kadapt.set_backend("triton")
            try:
                return run(leaves, fused_adapter)
            finally:
                kadapt.set_backend("auto")

        return candidate, Reference(truth, bars), names
    return build


def _adapter_groups(s: Sizes, device) -> list[Group]:
    from kadapt.ops.triton import fused_adapter as K

    groups = []
    bm = max(16, 1 << (s.m - 1).bit_length())
    act = ACTIVATION_CODES[ACT]
    for kind in s.adapter_kinds:
        code = K.KINDS[kind]
        for kernel in ("fused_adapter_fwd", "fused_adapter_bwd"):
            bucket = {"down": kind, "up": kind, "bm": bm, "dtype": tuning.dtype_class(s.dtype)}

            def make(kind=kind, code=code, kernel=kernel):
                g = _gen(device, 2)
                nb = _bufs(2 * s.T * s.D * s.dtype.itemsize, device)
                xs = [_rnd((s.T, s.D), 1.0, s.dtype, device, g) for _ in range(nb)]
                down, up = _factors(kind, s.D, s.m, s.dtype, device, g), _factors(kind, s.m, s.D, s.dtype, device, g)
                bd, bu = _rnd((s.m,), 0.02, s.dtype, device, g), _rnd((s.D,), 0.02, s.dtype, device, g)
                if kernel == "fused_adapter_fwd":
                    return (lambda i: K.fused_adapter_fwd(xs[i], None, True, code, down, bd, code, up, bu, act)), nb
                zs = [K.fused_adapter_fwd(x, None, True, code, down, bd, code, up, bu, act)[1] for x in xs]
                return (lambda i: K.fused_adapter_bwd(xs[i], zs[i], code, down, code, up, True, act)), nb

            groups.append(Group(f"{kernel}/{kind}", kernel, bucket, _candidates(kernel, device, bucket, s.candidates),
                                _adapter_check(kind, s, device), [Target(f"T={s.T} D={s.D} m={s.m}", {}, make)]))
    for kind in s.factored_kinds:
        code = K.KINDS[kind]
        ko = min(s.D, s.m) // PHM_N  # the short side of a block: the factor-gradient kernel's BF
        for kernel in ("kron_weight", "kron_factor_grads"):
            bucket = {"kind": kind, "dtype": tuning.dtype_class(s.dtype)}
            if kernel == "kron_factor_grads":
                bucket["bf"] = max(16, 1 << (ko - 1).bit_length())

            def make(kind=kind, code=code, kernel=kernel):
                g = _gen(device, 3)
                down, up = _factors(kind, s.D, s.m, s.dtype, device, g), _factors(kind, s.m, s.D, s.dtype, device, g)
                if kernel == "kron_weight":
                    return (lambda i: K.kron_weights([(code, down, s.D, s.m), (code, up, s.m, s.D)], s.dtype)), 1
                dwd, dwu = _rnd((s.D, s.m), 1.0, s.dtype, device, g), _rnd((s.m, s.D), 1.0, s.dtype, device, g)
                return (lambda i: [*K.kron_factor_grads(code, down, dwd), *K.kron_factor_grads(code, up, dwu)]), 1

            groups.append(Group(f"{kernel}/{kind}", kernel, bucket, _candidates(kernel, device, bucket, s.candidates),
                                _adapter_check(kind, s, device), [Target(f"D={s.D} m={s.m} n={PHM_N}", {}, make)]))
    return groups


def _attention_inputs(B, H, L, s: Sizes, device, seed: int) -> list[torch.Tensor]:
    """q, k, v (B, H, L, d) ~ N(0, 1); key MLP A_k, a_k, B_k, b_k ~ N(0, 0.1²)."""
    g = _gen(device, seed)
    qkv = [_rnd((B, H, L, s.d), 1.0, s.dtype, device, g) for _ in range(3)]
    mlp = [_rnd(shape, 0.1, s.dtype, device, g) for shape in ((H, s.d, s.mk), (H, s.mk), (H, s.mk, s.d), (H, s.d))]
    return qkv + mlp


def _attention_check(s: Sizes, device) -> Callable:
    """The inducer attention op (causal, key MLP; O, LSE, w and every gradient) at L_check."""
    def build():
        leaves = _attention_inputs(1, s.H, s.L_check, s, device, 4)
        g = _gen(device, 5)
        do = _rnd((1, s.H, s.L_check, s.d), 1.0, s.dtype, device, g)
        dlse, dw = (_rnd((1, s.H, s.L_check), 1.0, torch.float32, device, g) for _ in range(2))
        names = ["o", "lse", "w", "dq", "dk", "dv", "dA_k", "da_k", "dB_k", "db_k"]

        def run(ls, fn):
            ls = [t.detach().clone().requires_grad_() for t in ls]
            o, lse, w = fn(*ls, causal=True)
            grads = torch.autograd.grad([o, lse, w], ls, [do.to(o.dtype), dlse.to(lse.dtype), dw.to(w.dtype)])
            return [o.detach(), lse.detach(), w.detach(), *grads]

        truth = run([t.float() for t in leaves], inducer_attention_reference)
        lowp = run(leaves, inducer_attention_reference)
        tol = _tol(s.dtype)
        bars = [tol, tol, tol] + [max(tol, 2 * _rel_norm(lp, t)) for lp, t in zip(lowp[3:], truth[3:])]

        def candidate():
            kadapt.set_backend("triton")
            try:
                return run(leaves, inducer_attention)
            finally:
                kadapt.set_backend("auto")

        return candidate, Reference(truth, bars), names
    return build


def _attention_groups(s: Sizes, device) -> list[Group]:
    from kadapt.ops.triton import inducer_attention as A

    groups = []
    bd = max(16, 1 << (s.d - 1).bit_length())
    for kernel in ("inducer_attention_fwd", "inducer_attention_bwd_dkdv", "inducer_attention_bwd_dq"):
        bucket = {"dtype": tuning.dtype_class(s.dtype), "bd": bd, "bias": False, "dropout": False}
        if kernel != "inducer_attention_bwd_dkdv":
            bucket["mlp"] = True
        cands = _candidates(kernel, device, {**bucket, "L": s.L[0]}, s.candidates)
        targets = []
        for L in s.L:
            def make(L=L, kernel=kernel):
                nb = _bufs(4 * s.B * s.H * L * s.d * s.dtype.itemsize, device)
                sets = [_attention_inputs(s.B, s.H, L, s, device, 10 + i) for i in range(nb)]
                scale = s.d ** -0.5
                if kernel == "inducer_attention_fwd":
                    return (lambda i: A.inducer_attention_fwd(*sets[i], None, scale, True)), nb
                g = _gen(device, 6)
                ups = [(_rnd((s.B, s.H, L, s.d), 1.0, s.dtype, device, g),
                        _rnd((s.B, s.H, L), 1.0, torch.float32, device, g),
                        _rnd((s.B, s.H, L), 1.0, torch.float32, device, g)) for _ in range(nb)]
                fwd = [A.inducer_attention_fwd(*sets[i], None, scale, True) for i in range(nb)]
                return (lambda i: A.inducer_attention_bwd(*sets[i], None, *fwd[i], *ups[i], scale, True)), nb
            targets.append(Target(f"B={s.B} H={s.H} d={s.d} L={L}", {"L": L}, make))
        groups.append(Group(kernel, kernel, bucket, cands, _attention_check(s, device), targets))
    return groups


def build_groups(dry: bool) -> list[Group]:
    s = DRY_SIZES if dry else GPU_SIZES
    device = torch.device("cpu" if dry else "cuda")
    # attention first: its targets are the hardest, and a run cut at its deadline keeps the groups it finished
    return _attention_groups(s, device) + _adapter_groups(s, device)


# ---------------------------------------------------------------------------------------------
# step 1: checks (in worker processes)

@cache
def _groups(dry: bool) -> dict[str, Group]:
    return {g.name: g for g in build_groups(dry)}


_references: dict[str, tuple] = {}


def check_candidate(task: tuple[str, int, bool]) -> tuple[str, int, str | None, float]:
    """(group, candidate index, None if it matched the reference else why not, seconds)."""
    name, i, dry = task
    group = _groups(dry)[name]
    t0 = time.perf_counter()
    try:
        if name not in _references:
            _references[name] = group.check()
        candidate, ref, names = _references[name]
        with tuning.override({group.kernel: group.candidates[i]}):
            problem = _compare(candidate(), ref, names)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile or run is a failed candidate
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return name, i, problem, time.perf_counter() - t0


def _worker_init() -> None:
    torch.set_num_threads(1)  # the workers compile on one core each; the GPU does the arithmetic


def _check_key(name: str, cfg: dict[str, int], dry: bool) -> str:
    return json.dumps([name, cfg, dry], sort_keys=True)


def _known_checks(path: Path | None) -> dict[str, str | None]:
    """Check results recorded in ``path`` (JSON lines; a line cut short by an interrupted run is skipped)."""
    known = {}
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                known[rec["key"]] = rec["problem"]
            except (ValueError, KeyError, TypeError):
                continue
    return known


def run_checks(groups: list[Group], jobs: int, dry: bool, record: Path | None) -> dict[tuple[str, int], str | None]:
    """{(group, candidate index): None if it matched the reference, else why not}. Results already in ``record``
    (same group, config and mode: e.g. from gpu_check.sh's prewarm during the build) are reused; new ones are
    appended to it as they come."""
    known = _known_checks(record)
    results, tasks = {}, []
    for g in groups:
        for i, cfg in enumerate(g.candidates):
            key = _check_key(g.name, cfg, dry)
            if key in known:
                results[(g.name, i)] = known[key]
            else:
                tasks.append((g.name, i, dry))
    if results:
        print(f"  {len(results)} check results reused from {record}", flush=True)
    # interleave the groups so the workers do not all compile variants of one kernel first
    tasks.sort(key=lambda t: t[1])
    if not tasks:
        return results
    if jobs <= 1:
        done = map(check_candidate, tasks)
    else:
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=get_context("spawn"),
                                   initializer=_worker_init)
        done = pool.map(check_candidate, tasks)
    log = record.open("a") if record is not None else None
    try:
        for name, i, problem, secs in done:
            results[(name, i)] = problem
            cfg = _groups(dry)[name].candidates[i]
            if log is not None:
                log.write(json.dumps({"key": _check_key(name, cfg, dry), "problem": problem}) + "\n")
                log.flush()
            status = "ok" if problem is None else f"FAILED: {problem}"
            print(f"  check {name} #{i} {_fmt(cfg)}: {status} ({secs:.1f} s)", flush=True)
    finally:
        if log is not None:
            log.close()
        if jobs > 1:
            pool.shutdown(wait=False, cancel_futures=True)
    return results


# ---------------------------------------------------------------------------------------------
# step 2: timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (list, tuple)) else []


def time_us(call: Callable[[int], Any], nbufs: int, reps: int, device: torch.device) -> tuple[float, str]:
    """(median µs per call, how it was timed) of already-compiled ``call`` over buffer sets 0..nbufs-1."""
    if device.type != "cuda":
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            call(r % nbufs)
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times), "eager (CPU)"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(device)
    start.record()
    for i in range(3):
        call(i % nbufs)
    end.record()
    end.synchronize()
    k = max(1, min(MAX_CALLS, math.ceil(GRAPH_US / (start.elapsed_time(end) * 1e3 / 3))))
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for i in range(nbufs):
                call(i)
        torch.cuda.current_stream(device).wait_stream(side)
        graph, keep = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            for j in range(k):
                keep.append(call(j % nbufs))  # kept: every call writes fresh memory, as in a training step
        graph.replay()
        times = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / k)
        del graph, keep
        return statistics.median(times), f"graph of {k}"
    except RuntimeError as exc:  # capture refused: back-to-back eager calls (host launch cost included)
        _sync(device)
        times = []
        for _ in range(reps):
            start.record()
            for j in range(k):
                call(j % nbufs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / k)
        return statistics.median(times), f"eager x{k} (graph capture failed: {str(exc)[:80]})"


@dataclass
class Row:
    group: Group
    target: Target
    checked: int
    passed: int
    default_us: float | None = None
    best: dict[str, int] | None = None
    best_us: float | None = None
    note: str = ""


def _fmt(cfg: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def tune_target(group: Group, target: Target, ok: list[int], reps: int, device: torch.device) -> Row:
    row = Row(group, target, len(group.candidates), len(ok))
    if not ok:
        row.note = "no candidate passed the check"
        return row
    call, nbufs = target.make()
    default = [t.clone() for t in _flat(call(0))]  # OVERRIDES empty: the defaults
    timed = {}
    for i in ok:
        cfg = group.candidates[i]
        with tuning.override({group.kernel: cfg}):
            try:
                got = _flat(call(0))
                bad = next((f"output {j}: {e:.3g}" for j, (a, b) in enumerate(zip(got, default))
                            if (e := _rel_max(a, b)) > _tol(a.dtype)), None)
                us, how = (0.0, "") if bad else time_us(call, nbufs, reps, device)
            except RuntimeError as exc:  # e.g. out of resources at this shape: not recorded
                bad = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if bad:
                print(f"  {group.name} {target.label} #{i} {_fmt(cfg)}: not recorded: differs from the default "
                      f"here or fails ({bad})", flush=True)
                continue
        timed[i] = us
        print(f"  {group.name} {target.label} #{i} {_fmt(cfg)}: {us:.1f} us ({how})", flush=True)
    if not timed:
        row.note = "every candidate differed from the default at the target shape"
        return row
    best = min(timed, key=timed.get)
    row.best, row.best_us = group.candidates[best], timed[best]
    row.default_us = timed.get(0)
    if 0 not in ok:
        row.note = "DEFAULT FAILED its check"
    return row


# ---------------------------------------------------------------------------------------------
# output

def table_json(rows: list[Row], arch: str, device: torch.device, commit: str) -> dict[str, Any]:
    import triton

    kernels: dict[str, list] = {}
    for r in rows:
        if r.best is None:
            continue
        entry = {"bucket": {**r.group.bucket, **r.target.numeric}, "config": r.best, "us": round(r.best_us, 2)}
        if r.default_us is not None:
            entry["default_us"] = round(r.default_us, 2)
        kernels.setdefault(r.group.kernel, []).append(entry)
    return {"format": tuning.FORMAT, "arch": arch,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
            "triton": triton.__version__, "torch": torch.__version__, "commit": commit,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", *sys.argv]), "kernels": kernels}


def write_table(data: dict[str, Any], path: Path, install: Path | None) -> None:
    tuning.parse_table(data, path.with_name(f"{data['arch']}.json"))  # never write a table the library refuses
    # one line per header field and per entry: a re-tuned table's diff shows what changed
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k != "kernels"]
    kernels = [f"  {json.dumps(k)}: [\n" + ",\n".join(f"   {json.dumps(e)}" for e in entries) + "\n  ]"
               for k, entries in data["kernels"].items()]
    text = "{\n" + ",\n".join(head + [' "kernels": {\n' + ",\n".join(kernels) + "\n }"]) + "\n}\n"
    for p in [path] + ([install] if install else []):
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(p)


def summary(rows: list[Row], checks: dict, groups: list[Group]) -> str:
    lines = ["| kernel | bucket | shape | passed | default us | best us | gain | best config | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = " ".join(f"{k}={v}" for k, v in r.group.bucket.items())
        d = f"{r.default_us:.1f}" if r.default_us is not None else "-"
        best = f"{r.best_us:.1f}" if r.best_us is not None else "-"
        gain = f"{r.default_us / r.best_us:.2f}x" if r.default_us and r.best_us else "-"
        lines.append(f"| {r.group.kernel} | {b} | {r.target.label} | {r.passed}/{r.checked} | {d} | {best} | {gain} | "
                     f"{_fmt(r.best) if r.best else '-'} | {r.note} |")
    failed = [(g.name, i, checks[(g.name, i)]) for g in groups for i in range(len(g.candidates))
              if checks.get((g.name, i))]
    if failed:
        lines += ["", "Candidates that failed their check (never timed nor recorded):"]
        lines += [f"- {n} #{i}: {p}" for n, i, p in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."),
                    help="the table's path (*.json), or a directory to hold <arch>.json (default: .)")
    ap.add_argument("--install", action="store_true",
                    help="also write the table where the imported kadapt reads it (kadapt/ops/tuning_tables/)")
    ap.add_argument("--kernels", nargs="+", metavar="NAME",
                    help=f"only these kernels (default: all of {', '.join(CANDIDATES)})")
    ap.add_argument("--jobs", type=int, default=None,
                    help="check (compile) in this many worker processes (default: min(8, CPUs); dry run 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed replays per candidate (default 10; dry run 1)")
    ap.add_argument("--check-only", action="store_true", help="step 1 only: compile and check, write no table")
    ap.add_argument("--checks", type=Path, metavar="FILE",
                    help="reuse the check results recorded in FILE and record new ones there (JSON lines)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: Triton's interpreter, tiny fp32 shapes, one bucket per kernel, 2 candidates")
    ap.add_argument("--commit", default=os.environ.get("KADAPT_COMMIT", "unknown"),
                    help="the source commit recorded in the table (default: $KADAPT_COMMIT)")
    ap.add_argument("--summary", type=Path, help="also write the summary table (markdown) here")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run needs TRITON_INTERPRET=1 before triton is imported (run this file as a script)")
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --dry-run")
    if dry and args.install:
        ap.error("--install writes the GPU's table; a dry run measures nothing")
    unknown = set(args.kernels or ()) - set(CANDIDATES)
    if unknown:
        ap.error(f"unknown kernel(s) {', '.join(sorted(unknown))}; tuned kernels: {', '.join(CANDIDATES)}")
    jobs = args.jobs if args.jobs is not None else (1 if dry else min(8, os.cpu_count() or 1))
    reps = args.reps if args.reps is not None else (1 if dry else 10)
    device = torch.device("cpu" if dry else "cuda")
    arch = tuning.device_arch(device) or "cpu"
    path = args.out if args.out.suffix == ".json" else args.out / f"{arch}.json"
    install = tuning.table_path(arch) if args.install else None

    groups = [g for g in _groups(dry).values() if not args.kernels or g.kernel in args.kernels]
    n = sum(len(g.candidates) for g in groups)
    t0 = time.perf_counter()
    print(f"tune_triton: {arch} ({torch.cuda.get_device_name() if not dry else 'dry run, interpreter'}), "
          f"{len(groups)} groups, {n} candidates; checking in {jobs} process(es)", flush=True)
    if args.checks is not None:
        args.checks.parent.mkdir(parents=True, exist_ok=True)
    try:
        checks = run_checks(groups, jobs, dry, args.checks)
    except KeyboardInterrupt:  # the caller's deadline (gpu_check.sh stops its prewarm this way): results so far kept
        print("checks interrupted", flush=True)
        return 130
    bad_default = [g.name for g in groups if checks.get((g.name, 0))]
    print(f"checks: {sum(p is None for p in checks.values())}/{n} passed in {time.perf_counter() - t0:.0f} s"
          + (f"; DEFAULT FAILED: {', '.join(bad_default)}" if bad_default else ""), flush=True)
    if args.check_only:
        return 1 if bad_default else 0

    rows: list[Row] = []
    interrupted = False
    try:
        for g in groups:
            ok = [i for i in range(len(g.candidates)) if checks.get((g.name, i), "not checked") is None]
            for target in g.targets:
                rows.append(tune_target(g, target, ok, reps, device))
            write_table(table_json(rows, arch, device, args.commit), path, install)
    except KeyboardInterrupt:  # the caller's deadline: keep the table of the finished groups
        interrupted = True
    text = summary(rows, checks, groups)
    print(f"\ntable: {path}" + (f" (installed as {install})" if install else "")
          + f"; {sum(r.best is not None for r in rows)} entries, {time.perf_counter() - t0:.0f} s"
          + ("; INTERRUPTED" if interrupted else "") + "\n\n" + text, flush=True)
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(text + "\n")
    if interrupted:
        return 130
    complete = all(r.best is not None for r in rows) and len(rows) == sum(len(g.targets) for g in groups)
    return 0 if complete and not bad_default else 1


if __name__ == "__main__":
    sys.exit(main())
