"""The CUDA kernels of kadapt._C (csrc/fused_adapter.cu), called directly through torch.ops.kadapt,
against a float64 PyTorch reference (GPU only; skipped without CUDA or without the extension).

- kadapt::fused_adapter_fwd(x, residual, add_input, w_down, b_down, w_up, b_up, activation) -> (y, z)
- kadapt::fused_adapter_bwd(dy, z, w_down, w_up, add_input, activation) -> (dx, g_z, h, db_up)
- kadapt::kron_weight(A, B, t) -> W
- kadapt::inducer_attention_fwd(q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal) -> (O, LSE, w)
  (csrc/inducer_attention.cu), and kadapt.ops.inducer_attention forced to "cuda" (CUDA forward, Triton
  backward); grouped-query attention (k, v with fewer heads than q) is refused by the CUDA forward

Outputs are freshly allocated by the ops, so instead of poisoning them every test checks the exact
shape, dtype and device, and that nothing is NaN (an unwritten element of torch.empty usually is,
or is far off); the inducer-attention tests also fill the caching allocator's freed blocks of the
outputs' sizes with NaN right before each call, so that the op's torch.empty most likely returns NaN.
Errors are measured relative to the largest reference magnitude.
"""
from __future__ import annotations

import importlib
import random

import pytest
import torch
import torch.nn.functional as F

import kadapt
from kadapt import _extension
from kadapt.ops import inducer_attention, inducer_attention_reference


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


# ---------------------------------------------------------------------------------------------
# inducer attention forward (csrc/inducer_attention.cu) vs the float64 reference

IA_TOL_O = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
IA_HEAD_DIMS = (32, 64, 80, 96, 128, 1, 8, 17, 50, 100)  # the compiled 32/64/96/128 and padded ones
IA_T = (1, 7, 65, 130, 257)


def _ia_cases():
    """≥ 60 random cases: every dtype × head dim, T not multiples of the 64/32 tiles, causal with Tq ≠ Tk
    (decode Tq = 1 and Tq > Tk), key padding (random and a fully padded batch row), key MLP widths."""
    rng = random.Random(4242)
    cases = []
    for i in range(3 * len(IA_HEAD_DIMS) * 3):  # 90
        dtype = DTYPES[i % 3]
        d = IA_HEAD_DIMS[(i // 3) % len(IA_HEAD_DIMS)]
        causal = rng.random() < 0.5
        Tq, Tk = rng.choice(IA_T), rng.choice(IA_T)
        if causal and i % 5 == 0:
            Tq = 1  # decoding
        B, H = rng.choice([(1, 1), (2, 3), (3, 2), (1, 4)])
        cases.append(dict(dtype=dtype, B=B, H=H, Tq=Tq, Tk=Tk, d=d, causal=causal,
                          m_k=rng.choice([0, 0, 1, 10, 33, 128]), padding=rng.choice(["none", "random", "full_row"]),
                          scale=rng.choice([None, 1.0, 0.25])))
    # fixed corner cases: Tq > Tk causal (first rows see no key), no keys at all, one key, a tile-sized T
    for dtype in DTYPES:
        cases.append(dict(dtype=dtype, B=2, H=2, Tq=130, Tk=7, d=64, causal=True, m_k=10, padding="none", scale=None))
        cases.append(dict(dtype=dtype, B=1, H=2, Tq=5, Tk=0, d=32, causal=False, m_k=0, padding="none", scale=None))
        cases.append(dict(dtype=dtype, B=2, H=1, Tq=64, Tk=1, d=128, causal=True, m_k=33, padding="random",
                          scale=0.5))
        cases.append(dict(dtype=dtype, B=1, H=3, Tq=64, Tk=128, d=96, causal=True, m_k=1, padding="full_row",
                          scale=None))
    return cases


IA_CASES = _ia_cases()


def test_inducer_attention_case_coverage():
    c = IA_CASES
    assert len(c) >= 60
    for dtype in DTYPES:
        assert {x["d"] for x in c if x["dtype"] == dtype} >= {32, 64, 80, 96, 128}
    assert {x["m_k"] for x in c} == {0, 1, 10, 33, 128}
    assert {x["padding"] for x in c} == {"none", "random", "full_row"}
    assert sum(x["causal"] and x["Tq"] == 1 and x["Tk"] > 1 for x in c) >= 5
    assert sum(x["causal"] and x["Tq"] > x["Tk"] for x in c) >= 5
    assert sum(x["causal"] and 1 < x["Tq"] < x["Tk"] for x in c) >= 5


def _ia_inputs(case, gen, device="cuda"):
    B, H, Tq, Tk, d, m, dtype = (case[n] for n in ("B", "H", "Tq", "Tk", "d", "m_k", "dtype"))
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=device) * scale).to(dtype)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, H, Tk, d), r(B, H, Tk, d)
    mlp = (None,) * 4
    if m:
        mlp = (r(H, d, m, scale=d ** -0.5), r(H, m, scale=0.5), r(H, m, d, scale=0.5), r(H, d, scale=0.3))
    kpm = None
    if case["padding"] != "none":
        kpm = torch.rand(B, Tk, generator=gen, device=device) < 0.75
        if case["padding"] == "full_row":
            kpm[B - 1] = False
    return q, k, v, mlp, kpm


def _poison_outputs(q, Tq):
    """NaN-fill freed allocator blocks of the outputs' sizes, in the op's allocation order (O, LSE, w)."""
    B, H, _, d = q.shape
    bufs = [torch.full((B, H, Tq, d), float("nan"), device="cuda", dtype=q.dtype),
            torch.full((B, H, Tq), float("nan"), device="cuda"), torch.full((B, H, Tq), float("nan"), device="cuda")]
    del bufs


def _ia_check(q, k, v, mlp, kpm, scale, causal, label, o_tol=None):
    dtype = q.dtype
    B, H, Tq, d = q.shape
    _poison_outputs(q, Tq)
    kpm8 = None if kpm is None else kpm.to(torch.int8)
    o, lse, w = torch.ops.kadapt.inducer_attention_fwd(q, k, v, *mlp, kpm8, scale, causal)
    torch.cuda.synchronize()
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    o_ref, lse_ref, w_ref = inducer_attention_reference(q.double(), k.double(), v.double(), *map(f64, mlp),
                                                         scale=scale, causal=causal, key_padding_mask=kpm)
    assert o.shape == (B, H, Tq, d) and o.dtype == dtype and o.device == q.device, label
    assert lse.shape == w.shape == (B, H, Tq) and lse.dtype == w.dtype == torch.float32, label
    assert not torch.isnan(o).any() and not torch.isnan(lse).any() and not torch.isnan(w).any(), f"{label}: NaN"
    none = torch.isinf(lse_ref)
    assert torch.equal(torch.isneginf(lse), none), f"{label}: rows without a visible key differ"
    assert torch.isfinite(lse[~none]).all(), label
    assert (w[none] == 1).all() and not o[none].any(), f"{label}: a row without keys must give w = 1, O = 0"
    if (~none).any():
        lse_err = ((lse.double() - lse_ref).abs() / lse_ref.abs().clamp_min(1.0))[~none].max().item()
        assert lse_err <= 1e-4, f"{label}: LSE error {lse_err:.3g}"
    w_err = (w.double() - w_ref).abs().max().item() if w.numel() else 0.0
    assert w_err <= 1e-4, f"{label}: w error {w_err:.3g}"
    err = _rel_err(o, o_ref)
    tol = o_tol or IA_TOL_O[dtype]
    assert err <= tol, f"{label}: O relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("index", range(0, len(IA_CASES), 6))
def test_inducer_attention_fwd_matches_reference(index):
    for case in IA_CASES[index:index + 6]:
        gen = torch.Generator(device="cuda").manual_seed(1000 + IA_CASES.index(case))
        q, k, v, mlp, kpm = _ia_inputs(case, gen)
        scale = case["d"] ** -0.5 if case["scale"] is None else case["scale"]
        _ia_check(q, k, v, mlp, kpm, scale, case["causal"], f"case {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inducer_attention_fwd_large_and_many_heads(dtype):
    """Long sequences (many key tiles, the causal early stop), and B·H > 65,535 (grid.y loop)."""
    gen = torch.Generator(device="cuda").manual_seed(31)
    for case in (dict(B=2, H=4, Tq=1000, Tk=1000, d=128, m_k=10, causal=True, padding="random"),
                 dict(B=1, H=2, Tq=300, Tk=2049, d=64, m_k=0, causal=True, padding="none"),
                 dict(B=33000, H=2, Tq=3, Tk=5, d=32, m_k=0, causal=False, padding="random"),
                 dict(B=1, H=66000, Tq=2, Tk=3, d=16, m_k=0, causal=True, padding="none")):
        case.update(dtype=dtype)
        q, k, v, mlp, kpm = _ia_inputs(case, gen)
        _ia_check(q, k, v, mlp, kpm, case["d"] ** -0.5, case["causal"], f"{dtype} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inducer_attention_fwd_misaligned_inputs(dtype):
    """Pointers that are not 16-byte aligned take the element-wise copy path."""
    gen = torch.Generator(device="cuda").manual_seed(37)
    B, H, Tq, Tk, d = 2, 2, 70, 90, 64

    def misaligned(*shape):
        n = 1
        for sz in shape:
            n *= sz
        return (torch.randn(n + 1, generator=gen, device="cuda").to(dtype))[1:].view(*shape)

    q, k, v = misaligned(B, H, Tq, d), misaligned(B, H, Tk, d), misaligned(B, H, Tk, d)
    assert q.data_ptr() % 16 != 0
    _ia_check(q, k, v, (None,) * 4, None, 0.125, True, f"{dtype} misaligned")


def test_inducer_attention_fwd_argument_checks():
    gen = torch.Generator(device="cuda").manual_seed(41)
    case = dict(dtype=torch.float16, B=2, H=2, Tq=5, Tk=6, d=32, m_k=3, padding="random")
    q, k, v, mlp, kpm = _ia_inputs(case, gen)
    op = torch.ops.kadapt.inducer_attention_fwd
    kpm8 = kpm.to(torch.int8)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        op(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, *mlp, kpm8, 0.5, False)
    with pytest.raises(RuntimeError, match="k has dtype"):
        op(q, k.float(), v, *mlp, kpm8, 0.5, False)
    with pytest.raises(RuntimeError, match=r"kpm must have shape \(B, Tk\)"):
        op(q, k, v, *mlp, kpm8[:, :3].contiguous(), 0.5, False)
    with pytest.raises(RuntimeError, match="key MLP needs all of"):
        op(q, k, v, mlp[0], None, mlp[2], mlp[3], kpm8, 0.5, False)
    wide = (torch.randn(2, 32, 129, device="cuda", dtype=torch.float16), torch.randn(2, 129, device="cuda").half(),
            torch.randn(2, 129, 32, device="cuda").half(), torch.randn(2, 32, device="cuda").half())
    with pytest.raises(RuntimeError, match="m_k=129 exceeds the kernel's limit of 128"):
        op(q, k, v, *wide, None, 0.5, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q.double(), k.double(), v.double(), None, None, None, None, None, 0.5, False)
    with pytest.raises(NotImplementedError, match="CPU"):
        op(q.cpu(), k.cpu(), v.cpu(), None, None, None, None, None, 0.5, False)
    assert _extension.INDUCER_ATTENTION_MAX_KEY_MLP == 128


IA_GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inducer_attention_forced_cuda_gradients(monkeypatch, dtype):
    """kadapt.ops.inducer_attention with the backend forced to "cuda": the CUDA forward runs, its autograd
    backward (the Triton kernels) gives every input gradient as in the float64 reference, and forward and
    gradients agree with the forced-"triton" path."""
    op_module = importlib.import_module("kadapt.ops.inducer_attention")
    calls = []
    real = op_module._cuda_fwd  # calls torch.ops.kadapt.inducer_attention_fwd

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(op_module, "_cuda_fwd", spy)
    gen = torch.Generator(device="cuda").manual_seed(43)
    for case in (dict(B=2, H=3, Tq=70, Tk=130, d=64, m_k=10, causal=True, padding="full_row"),
                 dict(B=1, H=2, Tq=33, Tk=33, d=80, m_k=0, causal=False, padding="random"),
                 dict(B=2, H=1, Tq=1, Tk=65, d=128, m_k=33, causal=True, padding="none")):
        case.update(dtype=dtype)
        q, k, v, mlp, kpm = _ia_inputs(case, gen)
        leaves = [t.requires_grad_(True) for t in (q, k, v, *mlp) if t is not None]
        ups = [torch.randn(q.shape, generator=gen, device="cuda").to(dtype),
               torch.randn(q.shape[:-1], generator=gen, device="cuda"),
               torch.randn(q.shape[:-1], generator=gen, device="cuda")]
        results = {}
        for backend in ("cuda", "triton"):
            kadapt.set_backend(backend)
            try:
                n = len(calls)
                o, lse, w = inducer_attention(*leaves[:3], *(leaves[3:] or [None] * 4), causal=case["causal"],
                                              key_padding_mask=kpm)
                assert (len(calls) > n) == (backend == "cuda"), f"{backend}: the CUDA forward ran {len(calls) - n}x"
                lse0 = torch.where(torch.isinf(lse), 0, lse)
                grads = torch.autograd.grad([o, lse0, w], leaves, ups)
            finally:
                kadapt.set_backend("auto")
            results[backend] = (o, lse0, w, grads)
        def reference(dt, leaves, causal, kpm, ups):
            ls = [t.detach().to(dt).requires_grad_(True) for t in leaves]
            o_r, lse_r, w_r = inducer_attention_reference(*ls[:3], *(ls[3:] or [None] * 4), causal=causal,
                                                          key_padding_mask=kpm)
            lse_r = torch.where(torch.isinf(lse_r), 0, lse_r)
            return o_r, lse_r, w_r, torch.autograd.grad([o_r, lse_r, w_r], ls, [u.to(dt) for u in ups])

        o64, lse64, w64, g64 = reference(torch.float64, leaves, case["causal"], kpm, ups)
        # the reference's own error in the test dtype widens the tolerance
        g_lp = reference(dtype, leaves, case["causal"], kpm, ups)[3]
        label = f"{dtype} {case}"
        o, lse0, w, grads = results["cuda"]
        assert _rel_err(o, o64) <= IA_TOL_O[dtype], f"O {label}"
        assert (lse0.double() - lse64).abs().max().item() <= 1e-3, f"LSE {label}"
        assert (w.double() - w64).abs().max().item() <= 1e-4, f"w {label}"
        names = ["q", "k", "v", "A_k", "a_k", "B_k", "b_k"]
        for name, g, g_ref, g_r_lp, g_tri in zip(names, grads, g64, g_lp, results["triton"][3]):
            assert g.dtype == dtype and torch.isfinite(g).all(), f"d{name} {label}"
            allowed = IA_GRAD_TOL[dtype] + 2 * _rel_err(g_r_lp, g_ref)
            assert _rel_err(g, g_ref) <= allowed, f"d{name} {label}: {_rel_err(g, g_ref):.3g} > {allowed:.3g}"
            assert _rel_err(g, g_tri.double()) <= allowed, f"d{name} {label}: CUDA-forward vs Triton-forward grads"


def test_inducer_attention_gqa_is_refused_by_the_cuda_forward(monkeypatch):
    """Grouped-query attention (k, v with H_kv < H heads): the CUDA forward takes MHA only, so a forced "cuda"
    raises ValueError naming the reason and "auto" runs Triton (never the CUDA op) with the reference's result."""
    op_module = importlib.import_module("kadapt.ops.inducer_attention")
    calls = []

    def spy(*args):
        calls.append(args)
        raise AssertionError("the CUDA forward ran on GQA inputs")

    monkeypatch.setattr(op_module, "_cuda_fwd", spy)
    gen = torch.Generator(device="cuda").manual_seed(44)
    q = torch.randn(2, 6, 9, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 40, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kadapt.set_backend("cuda")
    try:
        with pytest.raises(RuntimeError, match="cannot run inducer_attention: grouped-query attention"):
            inducer_attention(q, k, v, causal=True)
    finally:
        kadapt.set_backend("auto")
    o, lse, w = inducer_attention(q, k, v, causal=True)
    assert not calls
    o_r, lse_r, w_r = inducer_attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert _rel_err(o, o_r) <= 5e-2 and (lse.double() - lse_r).abs().max().item() <= 1e-2
    assert (w.double() - w_r).abs().max().item() <= 1e-3
