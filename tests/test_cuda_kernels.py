"""The CUDA kernels of kadapt._C (csrc/fused_adapter.cu), called directly through torch.ops.kadapt,
against a float64 PyTorch reference (GPU only; skipped without CUDA or without the extension).

- kadapt::fused_adapter_fwd(x, residual, add_input, w_down, b_down, w_up, b_up, activation) -> (y, z)
- kadapt::fused_adapter_bwd(dy, z, w_down, w_up, add_input, activation) -> (dx, g_z, h, db_up)
- kadapt::kron_weight(A, B, t) -> W

Outputs are freshly allocated by the ops, so instead of poisoning them every test checks the exact
shape, dtype and device, and that nothing is NaN (an unwritten element of torch.empty usually is,
or is far off). Errors are measured relative to the largest reference magnitude.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kadapt import _extension


def _extension_ok() -> bool:
    try:
        return _extension.is_built()
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not _extension_ok(),
                                reason="needs a CUDA device and the built kadapt._C extension")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
ACTS = {0: "gelu_tanh", 1: "gelu", 2: "relu", 3: "swish"}
D_VALUES = (37, 600, 768, 1024, 4096)
M_VALUES = (1, 6, 24, 64, 100, 256)
T_VALUES = (0, 1, 63, 130, 1000)


def _phi(act: int, z: torch.Tensor) -> torch.Tensor:
    if act == 0:
        return F.gelu(z, approximate="tanh")
    if act == 1:
        return F.gelu(z)
    if act == 2:
        return F.relu(z)
    return F.silu(z)


def _dphi(act: int, z: torch.Tensor) -> torch.Tensor:
    zz = z.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(_phi(act, zz).sum(), zz)
    return g


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    scale = max(ref.abs().max().item(), 1e-6)
    return (out.double() - ref).abs().max().item() / scale


def _check(out, ref, shape, dtype, tol, what):
    assert out.shape == shape, f"{what}: shape {tuple(out.shape)} != {shape}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.is_cuda and out.is_contiguous(), what
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = _rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _weights(D, m, dtype, gen):
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device="cuda") * scale).to(dtype)  # noqa: E731
    return r(D, m, scale=D ** -0.5), r(m, scale=0.5), r(m, D, scale=m ** -0.5), r(D, scale=0.5)


def _fwd_reference(x, residual, add_input, wd, bd, wu, bu, act):
    f = lambda t: None if t is None else t.double()  # noqa: E731
    x, residual, wd, bd, wu, bu = map(f, (x, residual, wd, bd, wu, bu))
    z = x @ wd + bd
    y = _phi(act, z) @ wu + bu
    if add_input:
        y = y + x
    if residual is not None:
        y = y + residual
    return y, z


def _bwd_reference(dy, z, wd, wu, add_input, act):
    dy, wd, wu = dy.double(), wd.double(), wu.double()
    g_z = (dy @ wu.t()) * _dphi(act, z)
    dx = g_z @ wd.t()
    if add_input:
        dx = dx + dy
    return dx, g_z, _phi(act, z.double()), dy.sum(0)


def _run_fwd(T, D, m, dtype, act, add_input, with_res, gen, label, x=None, res=None):
    wd, bd, wu, bu = _weights(D, m, dtype, gen)
    if x is None:
        x = torch.randn(T, D, generator=gen, device="cuda").to(dtype)
    if with_res and res is None:
        res = torch.randn(T, D, generator=gen, device="cuda").to(dtype)
    res = res if with_res else None
    y, z = torch.ops.kadapt.fused_adapter_fwd(x, res, add_input, wd, bd, wu, bu, act)
    torch.cuda.synchronize()
    y_ref, z_ref = _fwd_reference(x, res, add_input, wd, bd, wu, bu, act)
    _check(y, y_ref, (T, D), dtype, TOL[dtype], f"y {label}")
    # z accumulates in fp32 whatever the input dtype
    _check(z, z_ref, (T, m), torch.float32, 1e-4, f"z {label}")
    return z


def _run_bwd(T, D, m, dtype, act, add_input, gen, label, dy=None):
    wd, _, wu, _ = _weights(D, m, dtype, gen)
    if dy is None:
        dy = torch.randn(T, D, generator=gen, device="cuda").to(dtype)
    z = torch.randn(T, m, generator=gen, device="cuda") * 2.0
    dx, g_z, h, db = torch.ops.kadapt.fused_adapter_bwd(dy, z, wd, wu, add_input, act)
    torch.cuda.synchronize()
    dx_ref, gz_ref, h_ref, db_ref = _bwd_reference(dy, z, wd, wu, add_input, act)
    tol = TOL[dtype]
    _check(dx, dx_ref, (T, D), dtype, tol, f"dx {label}")
    _check(g_z, gz_ref, (T, m), dtype, tol, f"g_z {label}")
    _check(h, h_ref, (T, m), dtype, tol, f"h {label}")
    _check(db, db_ref, (D,), torch.float32, 1e-4, f"db_up {label}")
    if T == 0:
        assert (db == 0).all(), f"db_up {label}: not zero for T = 0"


# ---------------------------------------------------------------------------------------------
# fused adapter forward / backward over the whole shape grid


@pytest.mark.parametrize("act", sorted(ACTS), ids=list(ACTS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_adapter_fwd_matches_reference(dtype, act):
    gen = torch.Generator(device="cuda").manual_seed(100 + act)
    for D in D_VALUES:
        for m in M_VALUES:
            for T in T_VALUES:
                for add_input in (True, False):
                    for with_res in (True, False):
                        _run_fwd(T, D, m, dtype, act, add_input, with_res, gen,
                                 f"{dtype} {ACTS[act]} T={T} D={D} m={m} add={add_input} res={with_res}")


@pytest.mark.parametrize("act", sorted(ACTS), ids=list(ACTS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_adapter_bwd_matches_reference(dtype, act):
    gen = torch.Generator(device="cuda").manual_seed(200 + act)
    for D in D_VALUES:
        for m in M_VALUES:
            for T in T_VALUES:
                for add_input in (True, False):
                    _run_bwd(T, D, m, dtype, act, add_input, gen,
                             f"{dtype} {ACTS[act]} T={T} D={D} m={m} add={add_input}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_bottleneck_size_up_to_the_limit(dtype):
    """Every m in 1..256 (each padding of the bottleneck, every alignment case)."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    for m in range(1, _extension.FUSED_ADAPTER_MAX_M + 1):
        _run_fwd(67, 136, m, dtype, m % 4, m % 2 == 0, m % 3 == 0, gen, f"{dtype} m={m}")
        _run_bwd(67, 136, m, dtype, m % 4, m % 2 == 1, gen, f"{dtype} m={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_and_non_contiguous_inputs(dtype):
    """Pointers that are not 16-byte aligned take the element-wise load path; non-contiguous
    weights are made contiguous by the op."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    T, D, m = 130, 1024, 64

    def misaligned(*shape):
        n = 1
        for s in shape:
            n *= s
        buf = torch.randn(n + 1, generator=gen, device="cuda").to(dtype)
        return buf[1:].view(*shape)

    x, res = misaligned(T, D), misaligned(T, D)
    assert x.data_ptr() % 16 != 0
    _run_fwd(T, D, m, dtype, 0, True, True, gen, f"{dtype} misaligned x", x=x, res=res)
    _run_bwd(T, D, m, dtype, 1, True, gen, f"{dtype} misaligned dy", dy=misaligned(T, D))

    wd, bd, wu, bu = _weights(D, m, dtype, gen)
    wd_t = wd.t().contiguous().t()  # same values, column-major storage
    x = torch.randn(T, D, generator=gen, device="cuda").to(dtype)
    y, z = torch.ops.kadapt.fused_adapter_fwd(x, None, False, wd_t, bd, wu, bu, 2)
    y2, z2 = torch.ops.kadapt.fused_adapter_fwd(x, None, False, wd, bd, wu, bu, 2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(z, z2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_tiles_and_large_inputs(dtype):
    """More CTAs than SMs, D not a multiple of the chunk, the benchmark shape."""
    gen = torch.Generator(device="cuda").manual_seed(13)
    for T, D, m in [(8192, 1024, 64), (5000, 1000, 24), (20000, 72, 16)]:
        _run_fwd(T, D, m, dtype, 0, True, False, gen, f"{dtype} T={T} D={D} m={m}")
        _run_bwd(T, D, m, dtype, 0, True, gen, f"{dtype} T={T} D={D} m={m}")


def test_fwd_then_bwd_compose_to_autograd():
    """fwd + bwd + the torch.mm weight gradients reproduce autograd of the reference (fp32)."""
    gen = torch.Generator(device="cuda").manual_seed(17)
    T, D, m, act = 77, 600, 24, 0
    x = torch.randn(T, D, generator=gen, device="cuda")
    wd, bd, wu, bu = _weights(D, m, torch.float32, gen)
    dy = torch.randn(T, D, generator=gen, device="cuda")
    y, z = torch.ops.kadapt.fused_adapter_fwd(x, None, True, wd, bd, wu, bu, act)
    dx, g_z, h, db_up = torch.ops.kadapt.fused_adapter_bwd(dy, z, wd, wu, True, act)
    grads = (dx, x.t() @ g_z, g_z.sum(0), h.t() @ dy, db_up)

    leaves = [t.double().requires_grad_(True) for t in (x, wd, bd, wu, bu)]
    y_ref, _ = _fwd_reference(*leaves[:1], None, True, *leaves[1:], act)
    refs = torch.autograd.grad(y_ref, leaves, dy.double())
    assert _rel_err(y, y_ref.detach()) < 1e-4
    for name, g, r in zip(("dx", "dW_d", "db_d", "dW_u", "db_u"), grads, refs):
        assert _rel_err(g, r) < 1e-4, name


# ---------------------------------------------------------------------------------------------
# kron_weight


def _kron_reference(A, B, t):
    A, B = A.double(), B.double()
    if t is not None:
        B = B @ t.double()  # (n, in/n, r) @ (n, r, out/n)
    n, P, Q = B.shape
    return torch.einsum("ica,ikp->ckap", A, B).reshape(n * P, n * Q)


KRON_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("a_dtype", DTYPES, ids=lambda d: f"A_{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kron_weight_matches_reference(dtype, a_dtype):
    gen = torch.Generator(device="cuda").manual_seed(19)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    for n, d_in, d_out in [(1, 5, 3), (2, 6, 4), (4, 768, 24), (4, 24, 768), (12, 36, 12), (3, 0, 6)]:
        A = r(n, n, n).to(a_dtype)
        for rank in (None, 1, 3):
            if rank is None:
                B, t = r(n, d_in // n, d_out // n).to(dtype), None
            else:
                B, t = r(n, d_in // n, rank).to(dtype), r(n, rank, d_out // n).to(dtype)
            W = torch.ops.kadapt.kron_weight(A, B, t)
            torch.cuda.synchronize()
            ref = _kron_reference(A, B, t)
            _check(W, ref, (d_in, d_out), dtype, KRON_TOL[dtype],
                   f"kron {dtype} A {a_dtype} n={n} {d_in}x{d_out} r={rank}")


def test_kron_weight_non_contiguous_inputs():
    gen = torch.Generator(device="cuda").manual_seed(23)
    A = torch.randn(4, 4, 4, generator=gen, device="cuda").transpose(1, 2)
    s = torch.randn(4, 2, 192, generator=gen, device="cuda").transpose(1, 2)  # (4, 192, 2)
    t = torch.randn(4, 2, 6, generator=gen, device="cuda")
    W = torch.ops.kadapt.kron_weight(A, s, t)
    assert _rel_err(W, _kron_reference(A, s, t)) < 1e-5
