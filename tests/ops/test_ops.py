"""The fused adapter op: reference math, the CUDA path's autograd glue, backend dispatch.
(Fused-vs-reference sweeps of every backend are in test_fused_adapter.py.)"""
import importlib
import math
import types

import pytest
import torch
from transformers.activations import NewGELUActivation

import kadapt
from kadapt.ops import AdapterWeight, bottleneck_adapter, bottleneck_adapter_reference, fused_adapter, fused_adapter_reference
from kadapt.ops.activations import ACTIVATION_CODES, activation

op_module = importlib.import_module("kadapt.ops.fused_adapter")  # the module, not the function
ACTS = ["gelu_new", "gelu", "relu", "swish"]


@pytest.fixture(autouse=True)
def _auto_backend():
    kadapt.set_backend("auto")
    yield
    kadapt.set_backend("auto")


def _inputs(t, d, m, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(t, d), mk(d, m) / math.sqrt(d), mk(m), mk(m, d) / math.sqrt(m), mk(d)


def test_activations_match_definitions():
    z = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    kappa = math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)
    torch.testing.assert_close(activation("gelu_new", z), 0.5 * z * (1 + torch.tanh(kappa)))
    torch.testing.assert_close(activation("gelu_new", z), NewGELUActivation()(z))
    torch.testing.assert_close(activation("gelu", z), 0.5 * z * (1 + torch.erf(z / math.sqrt(2))))
    torch.testing.assert_close(activation("relu", z), z.clamp_min(0))
    torch.testing.assert_close(activation("swish", z), z * torch.sigmoid(z))
    with pytest.raises(ValueError, match="activation='tanh'.*allowed values"):
        activation("tanh", z)


@pytest.mark.parametrize("act", ACTS)
def test_reference_is_the_adapter_formula(act):
    x, wd, bd, wu, bu = _inputs(13, 20, 6)
    a = activation(act, x @ wd + bd) @ wu + bu
    torch.testing.assert_close(bottleneck_adapter_reference(x, wd, bd, wu, bu, act), a)
    torch.testing.assert_close(bottleneck_adapter_reference(x, wd, bd, wu, bu, act, residual=x), x + a)


def _cuda_stand_in(monkeypatch):
    """Replace the CUDA kernels by their math so the CUDA path's Python glue (dense weights, bias
    and factor gradients) runs on the CPU."""
    fa = importlib.import_module("kadapt.ops.fused_adapter")

    def fwd(x, residual, add_input, wd, bd, wu, bu, code):
        act = {v: k for k, v in ACTIVATION_CODES.items() if k != "gelu_tanh"}[code]
        z = (x @ wd + bd).to(torch.promote_types(x.dtype, torch.float32))
        y = activation(act, z).to(x.dtype) @ wu + bu + (x if add_input else 0)
        return (y if residual is None else y + residual), z

    def bwd(dy, z, wd, wu, add_input, code):
        act = {v: k for k, v in ACTIVATION_CODES.items() if k != "gelu_tanh"}[code]
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            h = activation(act, zz)
        (g_z,) = torch.autograd.grad(h, zz, (dy @ wu.t()).to(h.dtype))
        g_z = g_z.to(dy.dtype)  # the kernel stores g_z in the compute dtype
        dx = g_z @ wd.t() + (dy if add_input else 0)
        return dx, g_z, h.detach().to(dy.dtype), dy.sum(0)

    def kron(rule, b, t):
        return AdapterWeight.phm(rule, b).materialize() if t is None else AdapterWeight.compacter(rule, b, t).materialize()

    ops = types.SimpleNamespace(fused_adapter_fwd=fwd, fused_adapter_bwd=bwd, kron_weight=kron)
    monkeypatch.setattr(fa.torch, "ops", types.SimpleNamespace(kadapt=ops), raising=True)
    monkeypatch.setattr(fa.backends, "cuda_reason", lambda x: None)
    monkeypatch.setattr(fa, "_DTYPES", fa._DTYPES + (torch.float64,))  # fp64 makes the comparison exact


def _weights(kind, d, m, g):
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)  # noqa: E731
    n = 2
    if kind == "dense":
        return AdapterWeight.dense(mk(d, m))
    if kind == "lowrank":
        return AdapterWeight.lowrank(mk(d, 2), mk(2, m))
    if kind == "phm":
        return AdapterWeight.phm(mk(n, n, n), mk(n, d // n, m // n))
    return AdapterWeight.compacter(mk(n, n, n), mk(n, d // n, 3), mk(n, 3, m // n))


@pytest.mark.parametrize("kind", ["dense", "lowrank", "phm", "compacter"])
@pytest.mark.parametrize("add_input,with_residual", [(True, False), (False, True), (False, False)])
def test_cuda_path_glue_matches_reference(monkeypatch, kind, add_input, with_residual):
    """The CUDA path's autograd (weights materialised for the kernel, weight, factor and bias
    gradients from the kernel outputs), with the two kernels replaced by their math."""
    g = torch.Generator().manual_seed(7)
    t, d, m = 11, 12, 6
    x = torch.randn(t, d, generator=g, dtype=torch.float64).requires_grad_(True)
    res = torch.randn(t, d, generator=g, dtype=torch.float64).requires_grad_(True) if with_residual else None
    wd, wu = _weights(kind, d, m, g), _weights(kind, m, d, g)
    bd = torch.randn(m, generator=g, dtype=torch.float64).requires_grad_(True)
    bu = torch.randn(d, generator=g, dtype=torch.float64).requires_grad_(True)
    leaves = [x, bd, bu, *wd.tensors, *wu.tensors] + ([res] if with_residual else [])
    gy = torch.randn(t, d, generator=g, dtype=torch.float64)
    y_ref = fused_adapter_reference(x, wd, bd, wu, bu, "gelu_new", res, add_input)
    g_ref = torch.autograd.grad(y_ref, leaves, gy)
    _cuda_stand_in(monkeypatch)
    kadapt.set_backend("cuda")
    y = fused_adapter(x, wd, bd, wu, bu, "gelu_new", res, add_input)
    grads = torch.autograd.grad(y, leaves, gy)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b)


def test_backend_selection_and_refusals(monkeypatch):
    x, wd, bd, wu, bu = _inputs(5, 8, 4, dtype=torch.float32)
    ref = bottleneck_adapter_reference(x, wd, bd, wu, bu, "gelu_new", x)
    assert torch.equal(bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x), ref)  # auto on the CPU
    kadapt.set_backend("reference")
    assert kadapt.get_backend() == "reference"
    assert torch.equal(bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x), ref)
    kadapt.set_backend("triton")  # the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1)
    torch.testing.assert_close(bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x), ref)
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match="'cuda' is forced.*CUDA tensors"):
        bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x)
    with pytest.raises(ValueError, match="backend='fast'.*auto, reference, triton, cuda"):
        kadapt.set_backend("fast")
    with pytest.raises(ValueError, match="act='tanh'.*allowed values"):
        kadapt.set_backend("auto") or bottleneck_adapter(x, wd, bd, wu, bu, "tanh")


def test_backend_from_environment(monkeypatch):
    import kadapt.backends as b

    monkeypatch.setattr(b, "_backend", None)
    monkeypatch.setenv("KADAPT_BACKEND", "reference")
    assert kadapt.get_backend() == "reference"
    monkeypatch.setenv("KADAPT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="KADAPT_BACKEND='gpu'.*allowed values"):
        kadapt.get_backend()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("act", ACTS)
def test_cuda_op_forward_and_gradients_match_reference(dtype, tol, act):
    """Shapes cover: D tails across the kernel's 1024-column chunks (1500), the one-token-per-CTA path
    (m > 512), T = 0, leading dims, and a residual that is not x."""
    from kadapt import _extension

    if not _extension.is_built():
        pytest.skip("kadapt._C not built")
    cases = [((1,), 600, 6, True), ((37,), 768, 24, False), ((3, 171), 1024, 64, False),
             ((100,), 4096, 256, True), ((29,), 1500, 600, False), ((0,), 768, 24, False)]
    for lead, d, m, separate_residual in cases:
        t = int(torch.tensor(lead).prod())
        x, wd, bd, wu, bu = (a.to("cuda", dtype) for a in _inputs(t, d, m, dtype=torch.float32))
        x = x.view(*lead, d)
        res = torch.randn_like(x) if separate_residual else x
        leaves = [p.requires_grad_(True) for p in ((x, wd, bd, wu, bu) + ((res,) if separate_residual else ()))]
        gy = torch.randn_like(x)
        kadapt.set_backend("reference")
        dbl = [p.double() for p in leaves]
        y_ref = bottleneck_adapter(*dbl[:5], act, dbl[5] if separate_residual else dbl[0])
        g_ref = torch.autograd.grad(y_ref, leaves, gy.double()) if t else ()
        kadapt.set_backend("cuda")
        y = bottleneck_adapter(x, wd, bd, wu, bu, act, res)
        g = torch.autograd.grad(y, leaves, gy) if t else ()
        assert y.shape == x.shape and y.dtype == dtype
        for a, b in zip((y,) + g, (y_ref,) + g_ref):
            if a.numel() == 0:
                continue
            assert torch.isfinite(a).all()
            scale = b.abs().max().clamp_min(1.0)
            assert ((a.double() - b).abs().max() / scale).item() < tol, (lead, d, m, act, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_backend_falls_back_for_bottleneck_beyond_the_kernel():
    x, wd, bd, wu, bu = (a.to("cuda", torch.float32) for a in _inputs(3, 64, op_module.CUDA_MAX_BOTTLENECK + 1))
    kadapt.set_backend("auto")
    torch.testing.assert_close(bottleneck_adapter(x, wd, bd, wu, bu, "relu", x),
                               bottleneck_adapter_reference(x, wd, bd, wu, bu, "relu", x))
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match="exceeds the kernel"):
        bottleneck_adapter(x, wd, bd, wu, bu, "relu", x)
