"""Autocast through kadapt's fused ops (what HF Trainer(bf16=True) / Trainer(fp16=True) do).

Under ``torch.autocast`` for x's device type, fused_adapter, phm_linear and phm_weight cast x, every weight
factor (a PHM rule A too), the biases and the residual to the autocast dtype, as autocast casts a matmul's
operands; they compute in that dtype on whichever backend runs, return it, and the gradients reach fp32
parameters in fp32. Outside autocast, mixed dtypes stay a ValueError naming the field.

Checked here, forward and backward: the reference backend in bf16 and fp16; Triton in its interpreter on the
CPU with fp16 autocast (CPU autocast takes fp16; bf16 x bf16 tl.dot is wrong in the interpreter), bf16 too on a
GPU; the CUDA path's Python glue on the CPU with its kernels replaced by their math (tests/ops/test_ops.py), the
CUDA kernels themselves on a GPU; fp16 with torch.amp.GradScaler; torch.compile(fullgraph=True) under
autocast. Values are compared with the reference computed in fp32 from the same fp32 parameters, by the
tolerance rule of tests/ops/test_fused_adapter.py (TOL[dtype] x max|ref| + twice PyTorch's own error in that
dtype). What only a GPU can check is skipped with a reason that says "needs a GPU".
"""
from __future__ import annotations

import pytest
import test_fused_adapter as fa
import torch
import torch.nn.functional as F

import kadapt
from kadapt import backends
from kadapt.ops import (
    AdapterWeight,
    fused_adapter,
    fused_adapter_reference,
    phm_linear,
    phm_linear_reference,
    phm_weight,
    phm_weight_reference,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
_auto_backend, poisoned = fa._auto_backend, fa.poisoned  # fixtures: backend "auto" around each test, NaN buffers


def skip_unless_runnable(backend: str, dtype: torch.dtype) -> None:
    if backend == "cuda" and not (GPU and backends.cuda_extension_built()):
        pytest.skip("needs a GPU: the cuda backend runs CUDA tensors through the built kadapt._C")
    if backend == "triton":
        if not backends.triton_importable():
            pytest.skip("triton is not installed")
        if not GPU and not backends.triton_interpret():
            pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set by tests/conftest.py)")
        if not GPU and dtype == torch.bfloat16:
            pytest.skip("needs a GPU: bf16 x bf16 tl.dot is wrong in Triton's interpreter")


def _p(gen, *shape, scale=1.0):
    """An fp32 parameter on DEVICE."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float().to(DEVICE).requires_grad_()


def _weight(gen, kind, d_in, d_out, rule=None):
    s = d_in ** -0.5
    if kind == "dense":
        return AdapterWeight.dense(_p(gen, d_in, d_out, scale=s))
    if kind == "lowrank":
        return AdapterWeight.lowrank(_p(gen, d_in, 2, scale=s), _p(gen, 2, d_out, scale=0.7))
    n = rule.shape[0]
    if kind == "phm":
        return AdapterWeight.phm(rule, _p(gen, n, d_in // n, d_out // n, scale=s))
    return AdapterWeight.compacter(rule, _p(gen, n, d_in // n, 2, scale=s), _p(gen, n, 2, d_out // n, scale=0.7))


def _check(got: torch.Tensor, ref: torch.Tensor, ref_lp: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    fa.assert_matches(got, ref.detach().to("cpu", torch.float64), ref_lp, dtype, what)


def _compare(run, leaves: list[torch.Tensor], dtype: torch.dtype, label: str) -> None:
    """``run(mode)`` builds the output from ``leaves`` (fp32 parameters): "autocast" under autocast on the
    backend in force, "fp32" the reference in fp32 without autocast, "cast" the reference on inputs cast to
    ``dtype`` by hand (PyTorch's own error in that dtype, for the tolerance). The autocast run must return
    ``dtype``, give fp32 gradients, and match the fp32 reference in value and gradient."""
    with torch.autocast(DEVICE, dtype=dtype):
        y = run("autocast")
    assert y.dtype == dtype, f"{label}: output dtype {y.dtype}, autocast dtype {dtype}"
    gen = torch.Generator().manual_seed(99)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    kadapt.set_backend("reference")
    y32 = run("fp32")
    grads32 = torch.autograd.grad(y32, leaves, dy.float())
    y_lp = run("cast")
    grads_lp = torch.autograd.grad(y_lp, leaves, dy.to(dtype))
    _check(y, y32, y_lp, dtype, f"forward ({label})")
    for i, (g, g32, g_lp, leaf) in enumerate(zip(grads, grads32, grads_lp, leaves)):
        assert g.dtype == leaf.dtype == torch.float32, f"grad {i} ({label}): {g.dtype}"
        _check(g, g32, g_lp, dtype, f"grad {i} of {tuple(leaf.shape)} ({label})")


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def _cast_weight(w: AdapterWeight, dtype) -> AdapterWeight:
    return AdapterWeight(w.kind, tuple(_cast(dtype, *w.tensors)))


# ---------------------------------------------------------------------------------------------
# fused_adapter

ADAPTERS = {  # (down kind, up kind, residual, add_input, x from an autocast linear)
    "houlsby": ("dense", "dense", False, True, True),
    "compacter-phm-shared-A": ("compacter", "phm", True, False, True),
    "lowrank-compacter-fp32-x": ("lowrank", "compacter", False, False, False),
}


def _adapter_case(name: str):
    dk, uk, with_residual, add_input, from_linear = ADAPTERS[name]
    gen = torch.Generator().manual_seed(len(name))
    d_model, D, m = 10, 12, 6
    h = _p(gen, 3, 5, d_model if from_linear else D).detach()
    lin = _p(gen, D, d_model, scale=d_model ** -0.5)  # the frozen-model linear feeding the adapter
    rule = _p(gen, 2, 2, 2, scale=0.7)
    wd, wu = _weight(gen, dk, D, m, rule), _weight(gen, uk, m, D, rule)
    bd, bu = _p(gen, m, scale=0.5), _p(gen, D, scale=0.5)
    res = _p(gen, 3, 5, D) if with_residual else None
    leaves = list(dict.fromkeys([lin, *wd.tensors, *wu.tensors, bd, bu] + ([res] if with_residual else [])))
    if not from_linear:
        leaves = leaves[1:]

    def run(mode):
        if mode == "cast":
            dt = CAST_DTYPE[0]
            x = F.linear(h.to(dt), lin.to(dt)) if from_linear else h.to(dt)
            return fused_adapter_reference(x, _cast_weight(wd, dt), *_cast(dt, bd), _cast_weight(wu, dt),
                                           *_cast(dt, bu), "gelu_new", *_cast(dt, res), add_input)
        x = F.linear(h, lin) if from_linear else h
        op = fused_adapter if mode == "autocast" else fused_adapter_reference
        return op(x, wd, bd, wu, bu, "gelu_new", residual=res, add_input=add_input)

    return run, leaves


CAST_DTYPE = [torch.float16]  # the dtype the "cast" runs use (set per test)


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("dtype", list(LOW), ids=list(LOW))
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_fused_adapter_follows_autocast(backend, dtype, name, poisoned):
    dtype = LOW[dtype]
    skip_unless_runnable(backend, dtype)
    CAST_DTYPE[0] = dtype
    run, leaves = _adapter_case(name)
    kadapt.set_backend(backend)
    _compare(run, leaves, dtype, f"{backend} {dtype} {name}")
    if backend == "triton":
        assert poisoned, "the Triton kernels did not run"


# ---------------------------------------------------------------------------------------------
# phm_linear, phm_weight

def _phm_case(op: str):
    gen = torch.Generator().manual_seed(5 if op == "linear" else 6)
    h, lin = _p(gen, 2, 7, 8).detach(), _p(gen, 12, 8, scale=8 ** -0.5)
    rule, s, t = _p(gen, 3, 3, 3, scale=0.6), _p(gen, 3, 4, 2, scale=0.3), _p(gen, 3, 2, 3, scale=0.7)
    b, bias = _p(gen, 3, 4, 3, scale=0.3), _p(gen, 9, scale=0.5)
    if op == "linear":
        def run(mode):
            if mode == "cast":
                dt = CAST_DTYPE[0]
                return phm_linear_reference(F.linear(h.to(dt), lin.to(dt)), *_cast(dt, rule, s, t, bias))
            fn = phm_linear if mode == "autocast" else phm_linear_reference
            return fn(F.linear(h, lin), rule, s, t, bias)
        return run, [lin, rule, s, t, bias]

    def run(mode):
        if mode == "cast":
            return phm_weight_reference(*_cast(CAST_DTYPE[0], rule, b))
        return (phm_weight if mode == "autocast" else phm_weight_reference)(rule, b)
    return run, [rule, b]


@pytest.mark.parametrize("op", ["linear", "weight"])
@pytest.mark.parametrize("dtype", list(LOW), ids=list(LOW))
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_phm_ops_follow_autocast(backend, dtype, op, poisoned):
    dtype = LOW[dtype]
    skip_unless_runnable(backend, dtype)
    CAST_DTYPE[0] = dtype
    run, leaves = _phm_case(op)
    kadapt.set_backend(backend)
    _compare(run, leaves, dtype, f"phm_{op} {backend} {dtype}")
    if backend == "triton":
        assert poisoned, "the Triton kernels did not run"


# ---------------------------------------------------------------------------------------------
# the CUDA path's glue (weights materialised for the kernels, bias and factor gradients) on the CPU

@pytest.mark.skipif(GPU, reason="on a GPU the cuda backend itself runs in the tests above")
@pytest.mark.parametrize("case", ["houlsby", "compacter-phm-shared-A", "phm_linear", "phm_weight"])
def test_cuda_path_glue_follows_autocast(monkeypatch, case):
    """The cuda backend with its kernels replaced by their math (tests/ops/test_ops.py), under fp16 CPU
    autocast: the casts happen before the backend runs, so its glue sees one dtype and its gradients
    reach the fp32 parameters."""
    import test_ops

    test_ops._cuda_stand_in(monkeypatch)
    CAST_DTYPE[0] = torch.float16
    run, leaves = _adapter_case(case) if case in ADAPTERS else _phm_case(case[4:])
    kadapt.set_backend("cuda")
    _compare(run, leaves, torch.float16, f"cuda glue {case}")


# ---------------------------------------------------------------------------------------------
# fp16 with a GradScaler, one optimizer step

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_grad_scaler_step(backend, poisoned):
    skip_unless_runnable(backend, torch.float16)
    CAST_DTYPE[0] = torch.float16
    run, leaves = _adapter_case("compacter-phm-shared-A")
    kadapt.set_backend("reference")
    grads32 = torch.autograd.grad(run("fp32").float().square().mean(), leaves)
    kadapt.set_backend(backend)
    opt = torch.optim.SGD(leaves, lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12)
    before = [p.detach().clone() for p in leaves]
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = run("autocast")
        loss = y.float().square().mean()
    assert y.dtype == torch.float16
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    for p, g32 in zip(leaves, grads32):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        err = (p.grad - g32).abs().max().item()
        assert err <= 2e-2 * g32.abs().max().item() + 1e-4, (tuple(p.shape), err)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 12  # no inf/NaN gradient was found
    for p, b in zip(leaves, before):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), b)
    if backend == "triton":
        assert poisoned


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) under autocast

@pytest.mark.parametrize("backend,dtype", [("reference", "bf16"), ("triton", "fp16"), ("triton", "bf16")])
def test_compiled_fullgraph_under_autocast(backend, dtype, poisoned):
    dtype = LOW[dtype]
    skip_unless_runnable(backend, dtype)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    h, lin = _p(gen, 2, 5, 8).detach(), _p(gen, 12, 8, scale=8 ** -0.5)
    rule = _p(gen, 2, 2, 2, scale=0.7)
    wd, wu = _weight(gen, "compacter", 12, 4, rule), _weight(gen, "phm", 4, 12, rule)
    bd, bu, bias = _p(gen, 4, scale=0.5), _p(gen, 12, scale=0.5), _p(gen, 6, scale=0.5)
    b2 = _p(gen, 2, 6, 3, scale=0.3)
    leaves = [lin, rule, *wd.tensors[1:], wu.tensors[1], bd, bu, b2, bias]

    def f(h, lin, rule, s, t, b, bd, bu, b2, bias):
        x = F.linear(h, lin)
        a = fused_adapter(x, AdapterWeight.compacter(rule, s, t), bd, AdapterWeight.phm(rule, b), bu, "gelu_new",
                          add_input=True)
        return phm_linear(a, rule, b2, None, bias) * phm_weight(rule, b2).mean()

    kadapt.set_backend(backend)
    with torch.autocast(DEVICE, dtype=dtype):
        y_eager = f(h, *leaves)
    dy = torch.randn(y_eager.shape, generator=gen).to(DEVICE, dtype)
    g_eager = torch.autograd.grad(y_eager, leaves, dy)
    calls = len(poisoned)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    with torch.autocast(DEVICE, dtype=dtype):
        y = compiled(h, *leaves)
    g = torch.autograd.grad(y, leaves, dy)
    assert y.dtype == y_eager.dtype == dtype
    if backend == "triton":
        assert len(poisoned) > calls, "the compiled function did not run the Triton kernels"
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(y, y_eager, rtol=tol, atol=tol)
    for leaf, a, b in zip(leaves, g, g_eager):
        assert a.dtype == leaf.dtype == torch.float32
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= tol * max(scale, 1.0), tuple(leaf.shape)


# ---------------------------------------------------------------------------------------------
# outside autocast (and for what autocast leaves alone) the dtype rule holds

def test_mixed_dtypes_outside_autocast_raise_naming_the_field():
    gen = torch.Generator().manual_seed(1)
    h, lin = _p(gen, 3, 8).detach(), _p(gen, 12, 8)
    wd, bd, wu, bu = _p(gen, 12, 6), _p(gen, 6), _p(gen, 6, 12), _p(gen, 12)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        x = F.linear(h, lin)  # the output of an autocast linear: bf16
        assert fused_adapter(x, wd, bd, wu, bu).dtype == torch.bfloat16
    for backend in ["auto", "reference"] + fa.forced_backends_here():
        kadapt.set_backend(backend)
        with pytest.raises(ValueError, match="b_down has dtype torch.float32 but x has torch.bfloat16"):
            fused_adapter(x, wd, bd, wu, bu)
        with pytest.raises(ValueError, match="b has dtype torch.float32 but x has torch.bfloat16"):
            phm_linear(x, _p(gen, 2, 2, 2), _p(gen, 2, 6, 3))
    kadapt.set_backend("auto")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast leaves float64 alone, as it does for matmuls
        y = fused_adapter(x.double(), wd.double(), bd.double(), wu.double(), bu.double())
        assert y.dtype == torch.float64
        with pytest.raises(ValueError, match="b_down has dtype torch.bfloat16 but x has torch.float64"):
            fused_adapter(x.double(), wd, bd, wu, bu)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=False):
        with pytest.raises(ValueError, match="b_down has dtype torch.float32"):
            fused_adapter(x, wd, bd, wu, bu)


@pytest.mark.skipif(not GPU, reason="needs a GPU: autocast for another device type than x's")
def test_autocast_of_another_device_type_is_ignored():
    gen = torch.Generator().manual_seed(2)
    x, wd, bd, wu, bu = (torch.randn(*s, generator=gen) for s in ((3, 12), (12, 6), (6,), (6, 12), (12,)))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused_adapter(x, wd, bd, wu, bu).dtype == torch.float32  # CPU tensors, CUDA autocast
        with pytest.raises(ValueError, match="b_down has dtype torch.float32 but x has torch.bfloat16"):
            fused_adapter(x.bfloat16(), wd, bd, wu, bu)
