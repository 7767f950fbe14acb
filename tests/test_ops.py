"""The bottleneck-adapter op: reference math, the fused op's backward formula, backend dispatch."""
import importlib
import math

import pytest
import torch
from transformers.activations import NewGELUActivation

import kadapt
from kadapt.ops import bottleneck_adapter, bottleneck_adapter_reference
from kadapt.ops.activations import ACTIVATION_CODES, activation

op_module = importlib.import_module("kadapt.ops.bottleneck_adapter")  # the module, not the function
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


def _fake_kernel(x, residual, w_down, b_down, w_up, b_up, code):
    """Stands in for the CUDA kernel on the CPU: (y, fp32-or-wider z), as the kernel returns them."""
    act = {v: k for k, v in ACTIVATION_CODES.items() if k != "gelu_tanh"}[code]
    z = x @ w_down + b_down
    y = activation(act, z) @ w_up + b_up
    return (y if residual is None else residual + y), z.to(torch.promote_types(z.dtype, torch.float32))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", [(1, 7, 3), (37, 24, 5), (2, 3, 50)])  # (T, D, m), not block multiples
def test_fused_backward_formula_matches_autograd(monkeypatch, act, with_residual, shape):
    """The CUDA op's hand-written backward, checked on the CPU with the kernel replaced by its math."""
    monkeypatch.setattr(op_module, "_fused_forward", _fake_kernel)
    t, d, m = shape
    x, wd, bd, wu, bu = _inputs(t, d, m, seed=t + d + m)
    res = torch.randn(t, d, dtype=torch.float64) if with_residual else None
    leaves = [x, wd, bd, wu, bu] + ([res] if with_residual else [])
    for p in leaves:
        p.requires_grad_(True)
    gy = torch.randn(t, d, dtype=torch.float64)

    y_ref = bottleneck_adapter_reference(x, wd, bd, wu, bu, act, res)
    g_ref = torch.autograd.grad(y_ref, leaves, gy)
    y = op_module._CudaBottleneckAdapter.apply(x, wd, bd, wu, bu, act, res)
    g = torch.autograd.grad(y, leaves, gy)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_fused_backward_handles_leading_dims(monkeypatch):
    monkeypatch.setattr(op_module, "_fused_forward", _fake_kernel)
    x, wd, bd, wu, bu = _inputs(12, 8, 4)
    x = x.view(3, 4, 8).requires_grad_(True)
    y = op_module._CudaBottleneckAdapter.apply(x, wd, bd, wu, bu, "relu", x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert y.shape == gx.shape == (3, 4, 8)


def test_backend_selection_and_refusals(monkeypatch):
    x, wd, bd, wu, bu = _inputs(5, 8, 4, dtype=torch.float32)
    ref = bottleneck_adapter_reference(x, wd, bd, wu, bu, "gelu_new", x)
    assert torch.equal(bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x), ref)  # auto on the CPU
    kadapt.set_backend("reference")
    assert kadapt.get_backend() == "reference"
    assert torch.equal(bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x), ref)
    kadapt.set_backend("triton")
    with pytest.raises(RuntimeError, match="triton"):
        bottleneck_adapter(x, wd, bd, wu, bu, "gelu_new", x)
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
