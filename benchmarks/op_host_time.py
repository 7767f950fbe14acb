"""Host (Python + dispatch) time per call of kadapt's ops, on the CPU.

The Triton host functions (kadapt/ops/triton/fused_adapter.py: fused_adapter_fwd/_bwd, kron_weights,
kron_weight, kron_factor_grads) are replaced by stubs that only allocate their outputs (torch.zeros of
the right shapes), so a "triton" row times what the op itself costs around its kernels: argument
checks, backend choice, the autograd machinery (autograd.Function or torch.library custom op), the
custom-op dispatch, the small PyTorch GEMMs of the weight gradients, reshapes. Tensors are tiny
(8 tokens, D=16, m=4) so no row is dominated by arithmetic. "reference" rows run the real PyTorch
reference on the same tensors (for scale). One thread; per row the median (and the minimum) over
``--rounds`` rounds of ``--inner`` calls, after a warm-up.

Modes: ``fwd`` (inputs require grad: the autograd graph is recorded), ``fwd+bwd`` (the forward and
torch.autograd.grad of every input), ``infer`` (the forward under torch.no_grad()).

    PYTHONPATH=. .venv/bin/python benchmarks/op_host_time.py             # this checkout, one run
    git archive HEAD kadapt | tar -x -C /tmp/base                        # (any other checkout's kadapt/)
    .venv/bin/python benchmarks/op_host_time.py --baseline /tmp/base     # alternating runs, ratios

kadapt is imported from sys.path (PYTHONPATH first; an installed copy otherwise). With ``--baseline`` the
script runs itself in subprocesses, ``--pairs`` times alternating the baseline and this checkout (or
``--current``), so that both see the same machine load, and reports per row the median over runs of each
run's median and the least time of any round (noise only adds time: the least is the steadier figure on a
shared machine).
``--eager-dispatch`` sends this checkout's eager calls through the dispatcher too (what they cost without
the direct-call hot path of kadapt/ops/_common.py).
Writes ``op_host_time_cpu[_<label>|_compare].csv`` under ``--out`` (default benchmarks/results/) and prints
the table. Timings on a shared machine are noisy: compare only runs made together.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets a forced "triton" take CPU tensors (set before triton loads)

import torch  # noqa: E402

T_SHAPE, D, M, N, R = (2, 4), 16, 4, 2, 2


def install_stubs() -> None:
    """Replace the Triton host functions by allocations of their outputs."""
    from kadapt.ops.triton import fused_adapter as k

    def fused_adapter_fwd(x, residual, add_input, down_kind, down, b_down, up_kind, up, b_up, act):
        return torch.zeros_like(x), torch.zeros((x.shape[0], b_down.shape[0]), device=x.device, dtype=torch.float32)

    def fused_adapter_bwd(dy, z, down_kind, down, up_kind, up, add_input, act):
        t, m = z.shape
        return (torch.zeros_like(dy), torch.zeros((t, m), device=dy.device, dtype=dy.dtype),
                torch.zeros((t, k.augmented_width(m)), device=dy.device, dtype=dy.dtype),
                torch.zeros(m, device=dy.device, dtype=torch.float32))

    def kron_weights(weights, dtype):
        return [torch.zeros((i, o), device=ts[-1].device, dtype=dtype) for _, ts, i, o in weights]

    def kron_weight(kind, tensors, i, o, dtype):
        return torch.zeros((i, o), device=tensors[-1].device, dtype=dtype)

    def kron_factor_grads(kind, tensors, d_w):
        return [torch.zeros_like(t) for t in tensors]

    for name, fn in list(locals().items()):
        if callable(fn) and hasattr(k, name):
            setattr(k, name, fn)


def _t(*shape, grad=True):
    return (torch.randn(*shape) * 0.3).requires_grad_(grad)


def cases():
    """(name, weights, fn, leaves): fn() runs the op once on its leaves."""
    import kadapt.ops as ops
    from kadapt.ops import AdapterWeight

    x = _t(*T_SHAPE, D)
    bd, bu = _t(M), _t(D)
    dense = (AdapterWeight.dense(_t(D, M)), AdapterWeight.dense(_t(M, D)))
    rule = _t(N, N, N)
    comp = (AdapterWeight.compacter(rule, _t(N, D // N, R), _t(N, R, M // N)),
            AdapterWeight.phm(rule, _t(N, M // N, D // N)))
    out = []
    for wname, (wd, wu) in (("dense", dense), ("compacter+phm", comp)):
        leaves = [x, bd, bu, *dict.fromkeys(wd.tensors + wu.tensors)]
        out.append(("fused_adapter", wname,
                    lambda wd=wd, wu=wu: ops.fused_adapter(x, wd, bd, wu, bu, "gelu_new", add_input=True), leaves))
    s, t, bias = _t(N, D // N, R), _t(N, R, D // N), _t(D)
    out.append(("phm_linear", "compacter", lambda: ops.phm_linear(x, rule, s, t, bias), [x, rule, s, t, bias]))
    out.append(("phm_weight", "compacter", lambda: ops.phm_weight(rule, s, t), [rule, s, t]))
    return out


def _time(fn, inner: int, rounds: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        per_call.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(per_call), min(per_call)


def measure(backends: list[str], modes: list[str], inner: int, rounds: int, warmup: int) -> list[dict]:
    import kadapt

    rows = []
    for backend in backends:
        kadapt.set_backend(backend)
        for op, wname, fn, leaves in cases():
            y = fn()
            dy = torch.randn_like(y)
            runs = {
                "fwd": fn,
                "fwd+bwd": lambda fn=fn, leaves=leaves, dy=dy: torch.autograd.grad(fn(), leaves, dy),
                "infer": lambda fn=fn: _no_grad(fn),
            }
            for mode in modes:
                med, best = _time(runs[mode], inner, rounds, warmup)
                rows.append({"op": op, "weights": wname, "backend": backend, "mode": mode,
                             "us_median": f"{med:.1f}", "us_min": f"{best:.1f}", "calls": inner * rounds})
    kadapt.set_backend("auto")
    return rows


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def run_once(args) -> list[dict]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    install_stubs()
    import kadapt

    if args.eager_dispatch:  # eager calls through the dispatcher too (kadapt/ops/_common.py)
        from kadapt.ops import _common

        _common.EAGER_DISPATCH = True

    rows = measure(args.backends, args.modes, args.inner, args.rounds, args.warmup)
    meta = {"label": args.label, "kadapt": str(Path(kadapt.__file__).parent), "eager_dispatch": args.eager_dispatch,
            "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    for r in rows:
        r.update(meta)
    print(f"kadapt from {meta['kadapt']}, torch {meta['torch']}, 1 thread, stubbed Triton kernels; "
          f"median (and min) of {args.rounds} rounds x {args.inner} calls, us per call")
    print(f"{'op':14} {'weights':14} {'backend':9} {'mode':8} {'median':>8} {'min':>8}")
    for r in rows:
        print(f"{r['op']:14} {r['weights']:14} {r['backend']:9} {r['mode']:8} {r['us_median']:>8} {r['us_min']:>8}")
    return rows


def compare(args) -> list[dict]:
    """Alternate runs of the baseline checkout and of this one (subprocesses, ``--pairs`` each); per row the
    median over runs of the run's median, and the minimum over runs of the run's minimum."""
    import subprocess
    import tempfile

    current = args.current or Path(__file__).resolve().parents[1]
    passthrough = ["--backends", *args.backends, "--modes", *args.modes, "--inner", str(args.inner),
                   "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for name, root in (("baseline", args.baseline), ("current", current)):
                label = f"{name}{i}"
                env = dict(os.environ, PYTHONPATH=str(Path(root).resolve()), TRITON_INTERPRET="1")
                extra = ["--eager-dispatch"] if args.eager_dispatch and name == "current" else []
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--label", label, "--out", tmp,
                                *passthrough, *extra], env=env, check=True, capture_output=True, text=True)
                with open(Path(tmp) / f"op_host_time_cpu_{label}.csv") as f:
                    runs[name].append({(r["op"], r["weights"], r["backend"], r["mode"]): r for r in csv.DictReader(f)})
    rows = []
    for key in runs["current"][0]:
        row = dict(zip(("op", "weights", "backend", "mode"), key))
        for name in ("baseline", "current"):
            row[f"{name}_us_median"] = f"{statistics.median(float(r[key]['us_median']) for r in runs[name]):.1f}"
            row[f"{name}_us_min"] = f"{min(float(r[key]['us_min']) for r in runs[name]):.1f}"
        row["ratio_median"] = f"{float(row['current_us_median']) / float(row['baseline_us_median']):.2f}"
        row["ratio_min"] = f"{float(row['current_us_min']) / float(row['baseline_us_min']):.2f}"
        rows.append(row)
    print(f"baseline {Path(args.baseline).resolve()} vs current {Path(current).resolve()}: {args.pairs} alternating "
          f"runs each; per row the median over runs of each run's median, and the least time of any round "
          f"(us per call; machine load only adds to the latter)")
    print(f"{'op':14} {'weights':14} {'backend':9} {'mode':8} {'base med':>8} {'cur med':>8} {'ratio':>6} "
          f"{'base min':>8} {'cur min':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['op']:14} {r['weights']:14} {r['backend']:9} {r['mode']:8} {r['baseline_us_median']:>8} "
              f"{r['current_us_median']:>8} {r['ratio_median']:>6} {r['baseline_us_min']:>8} {r['current_us_min']:>8} "
              f"{r['ratio_min']:>6}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["triton", "reference"], choices=["triton", "reference"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd", "infer"], choices=["fwd", "fwd+bwd", "infer"])
    p.add_argument("--inner", type=int, default=50, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=60, help="timed rounds per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--label", default="", help="tag of this run (file name suffix and CSV column)")
    p.add_argument("--baseline", type=Path, help="a directory holding another checkout's kadapt package: "
                   "compare against it (alternating subprocess runs)")
    p.add_argument("--current", type=Path, help="with --baseline: the directory of the kadapt to compare "
                   "(default: this repository)")
    p.add_argument("--pairs", type=int, default=3, help="with --baseline: runs of each")
    p.add_argument("--eager-dispatch", action="store_true", help="eager calls go through the dispatcher too "
                   "(kadapt.ops._common.EAGER_DISPATCH; with --baseline: for the current checkout)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    rows = compare(args) if args.baseline else run_once(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "op_host_time_cpu" + ("_compare" if args.baseline else f"_{args.label}" if args.label else "")
    path = args.out / f"{stem}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
