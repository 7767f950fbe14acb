"""The PHM ops (kadapt.ops.phm_linear, phm_weight) against their references.

phm_linear: ≥ 200 random configurations per backend (triton, cuda; reference too), forward and the
gradients of x, A, B (or s and t) and the bias against the float64 reference, Triton's buffers
NaN-poisoned. phm_weight: the built W and its factor gradients for a random upstream dW. One rule A
shared by several calls gets the summed gradient. Plus dispatch, bad inputs and torch.compile.
The tolerance rule, the poisoning and the backend handling are those of tests/ops/test_fused_adapter.py.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import test_fused_adapter as fa
import torch

import kadapt
from kadapt.ops import phm_linear, phm_linear_reference, phm_weight, phm_weight_reference

DEVICE, DTYPES, FUSED_BACKENDS, GPU = fa.DEVICE, fa.DTYPES, fa.FUSED_BACKENDS, fa.GPU
base_shape, check_grads, randn, skip_unless_runnable, view = (
    fa.base_shape, fa.check_grads, fa.randn, fa.skip_unless_runnable, fa.view)
_auto_backend, poisoned = fa._auto_backend, fa.poisoned  # fixtures: NaN-poisoned Triton buffers, backend "auto"

DTYPE_IDS = ["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class PhmConfig:
    index: int
    lead: tuple        # leading dims of x ((), (T,), (B, T), (B, S, T))
    n: int
    d_in: int
    d_out: int
    kind: str          # phm: B given; compacter: B_i = s_i t_i
    r: int
    bias: bool
    x_layout: str
    freeze: tuple      # "rule" (learn_phm=False) and/or "x"
    rule_fp32: bool    # with fp16/bf16 compute, A stored in fp32


def _lead(rng: random.Random) -> tuple:
    if rng.random() < 0.03:
        return ()
    while True:
        lead = rng.choice([(rng.randint(1, 90),), (rng.randint(1, 4), rng.randint(1, 23)),
                           (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 8))])
        if math.prod(lead) % 16:
            return lead


def draw_config(index: int) -> PhmConfig:
    rng = random.Random(104729 * index + 3)
    n = rng.choice([1, 2, 3, 4])
    ki = rng.choice([1, rng.randint(1, 6), rng.randint(1, 96 // n)])
    ko = rng.choice([1, rng.randint(1, 6), rng.randint(1, 96 // n)])
    lead = _lead(rng)
    layout = rng.choice(["contiguous", "contiguous", "transposed", "sliced", "strided"])
    freeze = tuple(f for f, p in (("rule", 0.15), ("x", 0.1)) if rng.random() < p)
    return PhmConfig(index=index, lead=lead, n=n, d_in=n * ki, d_out=n * ko, kind=rng.choice(["phm", "compacter"]),
                     r=rng.randint(1, 3), bias=rng.random() < 0.6,
                     x_layout="sliced" if not lead and layout == "transposed" else layout,
                     freeze=freeze, rule_fp32=rng.random() < 0.35)


N_CHUNKS, PER_CHUNK = 10, 24  # 240 phm_linear configurations per backend and dtype
CONFIGS = [draw_config(i) for i in range(N_CHUNKS * PER_CHUNK)]


def factor_leaves(gen, n: int, d_in: int, d_out: int, kind: str, r: int) -> dict:
    """A, and B or (s, t), scaled so that W's entries have variance 1/d_in."""
    out = {"A": randn(gen, (n, n, n), n ** -0.5)}
    if kind == "phm":
        out["B"] = randn(gen, (n, d_in // n, d_out // n), d_in ** -0.5)
    else:
        out["s"] = randn(gen, (n, d_in // n, r), d_in ** -0.5)
        out["t"] = randn(gen, (n, r, d_out // n), r ** -0.5)
    return out


def cast(raw: dict, dtype: torch.dtype, rule_fp32: bool, frozen=()) -> dict:
    low = dtype != torch.float32
    return {k: v.to(DEVICE, torch.float32 if (k.endswith("A") and rule_fp32 and low) else dtype)
            .requires_grad_(k not in frozen) for k, v in raw.items()}


def factors(lv: dict, prefix: str = "") -> tuple:
    """(rule, b, t) as phm_linear / phm_weight take them."""
    if prefix + "B" in lv:
        return lv[prefix + "A"] if prefix + "A" in lv else lv["A"], lv[prefix + "B"], None
    return lv[prefix + "A"] if prefix + "A" in lv else lv["A"], lv[prefix + "s"], lv[prefix + "t"]


def run_linear(cfg: PhmConfig, backend: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(cfg.index)
    x_shape = (*cfg.lead, cfg.d_in)
    raw = {"x": randn(gen, base_shape(x_shape, cfg.x_layout))}
    raw.update(factor_leaves(gen, cfg.n, cfg.d_in, cfg.d_out, cfg.kind, cfg.r))
    if cfg.bias:
        raw["bias"] = randn(gen, (cfg.d_out,), 0.5)
    frozen = {"rule": "A", "x": "x"}
    leaves = cast(raw, dtype, cfg.rule_fp32, {frozen[f] for f in cfg.freeze})
    dy = randn(gen, (*cfg.lead, cfg.d_out)).to(DEVICE, dtype)

    def call(op):
        def f(lv):
            rule, b, t = factors(lv)
            return op(view(lv["x"], cfg.x_layout), rule, b, t, lv.get("bias"))
        return f

    kadapt.set_backend(backend)
    try:
        check_grads(call(phm_linear), call(phm_linear_reference), leaves, dy, dtype, f"{backend} {dtype} {cfg}")
    finally:
        kadapt.set_backend("auto")


@pytest.mark.parametrize("chunk", range(N_CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_phm_linear_random_configs_match_reference(backend, dtype, chunk, poisoned):
    skip_unless_runnable(backend, dtype)
    for cfg in CONFIGS[chunk * PER_CHUNK:(chunk + 1) * PER_CHUNK]:
        del poisoned[:]
        run_linear(cfg, backend, dtype)
        if backend == "triton":
            assert poisoned, "the Triton kernels did not run"


def test_config_coverage():
    assert len(CONFIGS) >= 200
    tokens = {math.prod(c.lead) for c in CONFIGS}
    assert not any(t % 16 == 0 for t in tokens) and min(tokens) == 1 and max(tokens) > 64
    assert {len(c.lead) for c in CONFIGS} == {0, 1, 2, 3}
    assert {(c.n, c.kind) for c in CONFIGS} == {(n, k) for n in (1, 2, 3, 4) for k in ("phm", "compacter")}
    assert {c.r for c in CONFIGS if c.kind == "compacter"} == {1, 2, 3}
    assert {c.bias for c in CONFIGS} == {True, False}
    assert {c.x_layout for c in CONFIGS} == {"contiguous", "transposed", "sliced", "strided"}
    assert {f for c in CONFIGS for f in c.freeze} == {"rule", "x"}
    assert max(c.d_in for c in CONFIGS) > 64 and max(c.d_out for c in CONFIGS) > 64
    assert any(c.d_in == c.n for c in CONFIGS) and any(c.d_out == c.n for c in CONFIGS)


# ---------------------------------------------------------------------------------------------
# phm_weight: W and its factor gradients

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_phm_weight_matches_reference(backend, dtype, poisoned):
    skip_unless_runnable(backend, dtype)
    for cfg in CONFIGS[:60]:
        gen = torch.Generator().manual_seed(10_000 + cfg.index)
        leaves = cast(factor_leaves(gen, cfg.n, cfg.d_in, cfg.d_out, cfg.kind, cfg.r), dtype, cfg.rule_fp32,
                      {"A"} if "rule" in cfg.freeze else set())
        d_w = randn(gen, (cfg.d_in, cfg.d_out)).to(DEVICE, dtype)
        del poisoned[:]
        kadapt.set_backend(backend)
        try:
            check_grads(lambda lv: phm_weight(*factors(lv)), lambda lv: phm_weight_reference(*factors(lv)),
                        leaves, d_w, dtype, f"{backend} {dtype} {cfg}")
        finally:
            kadapt.set_backend("auto")
        if backend == "triton":
            assert poisoned, "the Triton kernels did not run"


# ---------------------------------------------------------------------------------------------
# one rule A shared by several layers: its gradient is the sum over them

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_shared_rule_gradient_sums_over_calls(backend, dtype, poisoned):
    skip_unless_runnable(backend, dtype)
    n, d, h = 3, 27, 12
    gen = torch.Generator().manual_seed(5)
    raw = {"x": randn(gen, (5, 7, d)), "A": randn(gen, (n, n, n), n ** -0.5),
           "1.bias": randn(gen, (h,), 0.5), "2.bias": randn(gen, (d,), 0.5)}
    raw.update({"1." + k: v for k, v in factor_leaves(gen, n, d, h, "compacter", 2).items() if k != "A"})
    raw.update({"2." + k: v for k, v in factor_leaves(gen, n, h, d, "phm", 1).items() if k != "A"})
    raw.update({"3." + k: v for k, v in factor_leaves(gen, n, d, d, "compacter", 1).items() if k != "A"})
    leaves = cast(raw, dtype, False)
    dy = randn(gen, (5, 7, d)).to(DEVICE, dtype)

    def model(lv, linear, weight):
        hid = torch.nn.functional.gelu(linear(lv["x"], *factors(lv, "1."), lv["1.bias"]))
        out = linear(hid, *factors(lv, "2."), lv["2.bias"])
        return out + lv["x"] @ weight(*factors(lv, "3."))  # a third use of A, through phm_weight

    kadapt.set_backend(backend)
    try:
        check_grads(lambda lv: model(lv, phm_linear, phm_weight),
                    lambda lv: model(lv, phm_linear_reference, phm_weight_reference), leaves, dy, dtype,
                    f"{backend} {dtype}")
    finally:
        kadapt.set_backend("auto")
    if backend == "triton":
        assert poisoned


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_no_tokens(backend, lead, poisoned):
    skip_unless_runnable(backend, torch.float32)
    gen = torch.Generator().manual_seed(2)
    raw = {"x": randn(gen, (*lead, 8)), "bias": randn(gen, (6,))}
    raw.update(factor_leaves(gen, 2, 8, 6, "compacter", 2))
    lv = cast(raw, torch.float32, False)
    kadapt.set_backend(backend)
    y = phm_linear(lv["x"], *factors(lv), lv["bias"])
    assert y.shape == (*lead, 6)
    grads = torch.autograd.grad(y, list(lv.values()), torch.ones_like(y))
    for (name, leaf), g in zip(lv.items(), grads):
        assert g.shape == leaf.shape and not g.any(), name


# ---------------------------------------------------------------------------------------------
# dispatch and bad inputs

def _small(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: randn(gen, s, 0.5).to(device, dtype)
    return mk(3, 4, 8), mk(2, 2, 2), mk(2, 4, 1), mk(2, 1, 3), mk(6)  # x, A, s, t, bias (8 -> 6)


def test_auto_on_cpu_tensors_is_the_reference():
    x, A, s, t, bias = _small()
    B = s @ t
    assert torch.equal(phm_linear(x, A, s, t, bias), phm_linear_reference(x, A, s, t, bias))
    assert torch.equal(phm_linear(x, A, B), phm_linear_reference(x, A, B))
    assert torch.equal(phm_weight(A, s, t), phm_weight_reference(A, s, t))
    assert torch.equal(phm_weight(A, B), phm_weight_reference(A, B))


def test_forced_cuda_on_cpu_tensors_raises():
    x, A, s, t, bias = _small()
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match="'cuda' is forced but cannot run phm_linear.*not CUDA tensors"):
        phm_linear(x, A, s, t, bias)
    with pytest.raises(RuntimeError, match="'cuda' is forced but cannot run phm_weight.*not CUDA tensors"):
        phm_weight(A, s, t)


def test_mixed_dtypes_raise_naming_the_field():
    x, A, s, t, bias = _small(device=DEVICE)
    args = (x, A, s.double(), t.double(), bias)  # factors fp64, x fp32
    for backend in ["auto", "reference"] + fa.forced_backends_here():
        kadapt.set_backend(backend)
        with pytest.raises(ValueError, match="has dtype torch.float64 but x has torch.float32"):
            phm_linear(*args)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (tensors on two devices)")
def test_tensors_on_two_devices():
    x, A, s, t, bias = _small(device="cuda")
    with pytest.raises(ValueError, match="every tensor must be on x's device"):
        phm_linear(x, A.cpu(), s, t, bias)


def _bad_inputs():
    x, A, s, t, bias = _small()
    return {
        "x width": (lambda: phm_linear(x[..., :7], A, s, t, bias), r"x must be \(…, 8\)"),
        "x 0-D": (lambda: phm_linear(torch.tensor(1.0), A, s, t), r"x must be \(…, 8\)"),
        "bias": (lambda: phm_linear(x, A, s, t, bias[:5]), r"bias must have shape \(6,\)"),
        "rule shape": (lambda: phm_linear(x, torch.randn(2, 2, 3), s, t), r"weight: the PHM rule A must be"),
        "factor n": (lambda: phm_linear(x, A, torch.randn(3, 4, 1), t), "every factor's first dim must be n=2"),
        "ranks": (lambda: phm_weight(A, s, torch.randn(2, 2, 3)), "compacter factors s .* differ in rank"),
        "B dims": (lambda: phm_weight(A, torch.randn(2, 4)), r"weight.tensors\[1\] of a phm weight must be a 3-D"),
    }


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cuda"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error(case, backend):
    call, match = _bad_inputs()[case]
    kadapt.set_backend(backend)
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# torch.compile (fullgraph) of the Triton-backed ops: same forward and gradients as eager

def test_compiles_fullgraph_with_triton(poisoned):
    skip_unless_runnable("triton", torch.float32)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    raw = {"x": randn(gen, (2, 5, 8)), "bias": randn(gen, (6,)), "B": randn(gen, (2, 3, 2), 0.4)}
    raw.update(factor_leaves(gen, 2, 8, 6, "compacter", 2))
    lv = cast(raw, torch.float32, False)
    names = list(lv)
    dy = randn(gen, (2, 5, 6)).to(DEVICE, torch.float32)

    def f(x, bias, B, A, s, t):
        h = phm_linear(x.transpose(0, 1), A, s, t, bias)
        return h + phm_linear(h, A, B).sum(-1, keepdim=True) * phm_weight(A, s, t).sum()

    kadapt.set_backend("triton")
    y_eager = f(*lv.values())
    g_eager = torch.autograd.grad(y_eager, list(lv.values()), dy.transpose(0, 1))
    calls = len(poisoned)
    y = torch.compile(f, fullgraph=True, dynamic=False)(*lv.values())
    g = torch.autograd.grad(y, list(lv.values()), dy.transpose(0, 1))
    assert len(poisoned) > calls, "the compiled function did not run the Triton kernels"
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
