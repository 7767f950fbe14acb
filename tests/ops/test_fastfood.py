"""Fastfood projection (kadapt/ops/fastfood.py, METHODS.md §4, §12.5): the Triton kernels (interpreter,
fp32) against the reference, the exact transpose, the generator and the permutation, the plan, errors."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import kadapt
from kadapt.ops import fastfood as ops_fastfood_fn  # the function (kadapt.ops re-exports it)
from kadapt.ops.fastfood import (
    _PLANS,
    fastfood,
    fastfood_one_reference,
    fastfood_plan,
    fastfood_reference,
    fastfood_transpose_reference,
    gaussians,
    permutation,
    signs,
    sum_g2,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend():
    """Restore the backend after a test forces one."""
    yield kadapt.set_backend
    kadapt.set_backend("auto")


@pytest.fixture
def tiles():
    """Set the Triton tile config (and poison) for one test."""
    from kadapt.ops.triton import fastfood as tf

    saved = tf.CONFIG, tf.POISON

    def set_(config, poison=True):
        tf.CONFIG, tf.POISON = config, poison

    yield set_
    tf.CONFIG, tf.POISON = saved


def _ref_grad(plan, z, gamma, compat=False):
    z = z.detach().clone().requires_grad_(True)
    v = fastfood_reference(z, None, None, plan=plan, grad_scale_compat=compat)
    (dz,) = torch.autograd.grad(v, z, gamma)
    return v.detach(), dz


# ---------------------------------------------------------------------------------------------
# Triton (interpreter) vs the reference

# (sizes, d_z, lengths, tile config): non-powers of two, d_z above and below some N_i, explicit lengths
# with L_i < d_z (ledger #4's crop: z[:L_i] only), tensors of 1 to 3 outer levels at T = 32.
CASES = [
    pytest.param([5, 64, 100, 300, 3, 1000], 40, None, (4, 8, 4, 4), id="multilevel"),
    pytest.param([7, 130, 33, 17], 50, [8, 256, 64, 32], (2, 4, 2, 2), id="lengths-crop"),
    pytest.param([1, 2, 600, 31], 9, None, (8, 16, 8, 8), id="mixed"),
]


@needs_triton
@pytest.mark.parametrize("sizes,d_z,lengths,config", CASES)
def test_triton_matches_reference(backend, tiles, sizes, d_z, lengths, config):
    tiles(config, poison=True)  # every output and workspace starts as NaN
    plan = fastfood_plan(sizes, 1234, d_z, lengths)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(d_z, generator=gen)
    gamma = torch.randn(sum(sizes), generator=gen)
    ref, dz_ref = _ref_grad(plan, z, gamma)
    backend("triton")
    zt = z.clone().requires_grad_(True)
    v = fastfood(zt, sizes, 1234, d_z, lengths)
    assert v.dtype == torch.float32 and v.shape == (sum(sizes),)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    (dz,) = torch.autograd.grad(v, zt, gamma)
    assert torch.isfinite(dz).all()
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-5 * dz_ref.abs().max().item())
    torch.testing.assert_close(fastfood_transpose_reference(gamma, plan), dz_ref, rtol=1e-5,
                               atol=1e-5 * dz_ref.abs().max().item())


@needs_triton
def test_grad_scale_compat_scales_each_share_by_inverse_length(backend, tiles):
    tiles((4, 8, 4, 4))
    sizes, d_z = [3, 70, 200], 20
    plan = fastfood_plan(sizes, 5, d_z)
    z = torch.randn(d_z)
    gamma = torch.randn(sum(sizes))
    want = torch.zeros(d_z)
    for i, L in enumerate(plan.lengths):  # tensor i's share alone, scaled by 1/L_i
        g_i = torch.zeros_like(gamma)
        sl = slice(plan.out_offsets[i], plan.out_offsets[i + 1])
        g_i[sl] = gamma[sl]
        want += _ref_grad(plan, z, g_i)[1] / L
    v_ref, dz_ref = _ref_grad(plan, z, gamma, compat=True)
    torch.testing.assert_close(dz_ref, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fastfood_transpose_reference(gamma, plan, grad_scale_compat=True), want,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v_ref, fastfood_reference(z, None, None, plan=plan))  # forward unchanged
    backend("triton")
    zt = z.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(fastfood(zt, plan=plan, grad_scale_compat=True), zt, gamma)
    torch.testing.assert_close(dz, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kadapt.ops.triton import fastfood as tf

    @triton.jit
    def _probe(keys, n, out_s, out_g, out_p, out_q, B: tl.constexpr):
        k = tl.arange(0, B)
        ku = k.to(tl.uint32)
        tl.store(out_s + k, tf._sign(ku, keys))
        tl.store(out_g + k, tf._gauss(ku, keys))
        tl.store(out_p + k, tf._perm(ku, n, keys, False).to(tl.int64))
        tl.store(out_q + k, tf._perm(ku, n, keys, True).to(tl.int64))


@needs_triton
def test_generator_and_permutation_bit_identical_in_triton():
    """The kernels' _sign/_gauss/_perm draw exactly what the torch reference draws."""
    plan = fastfood_plan([100, 1000], 99, 50)
    info = plan.info()
    for i, n in ((0, 7), (1, 10)):
        B = 1 << n
        k = torch.arange(B)
        outs = [torch.empty(B), torch.empty(B), torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64)]
        _probe[(1,)](info[i, 8:].contiguous(), n, *outs, B=B)
        keys = plan.keys[i]
        assert torch.equal(outs[0], signs(k, keys))
        torch.testing.assert_close(outs[1], gaussians(k, keys), rtol=2e-6, atol=2e-6)
        assert torch.equal(outs[2], permutation(k, n, keys))
        assert torch.equal(outs[3], permutation(k, n, keys, inverse=True))


# ---------------------------------------------------------------------------------------------
# the math (reference)

def _matrix(plan, i):
    """P_i as an (N_i, d_z) matrix (columns P_i e_j)."""
    eye = torch.eye(plan.d_z)
    return torch.stack([fastfood_one_reference(eye[j], plan, i) for j in range(plan.d_z)], dim=1)


def test_adjoint_identity():
    plan = fastfood_plan([37, 256, 5, 700], 3, 48)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(48, generator=gen)
        gamma = torch.randn(plan.total_out, generator=gen)
        lhs = torch.dot(fastfood_reference(z, None, None, plan=plan).double(), gamma.double())
        rhs = torch.dot(z.double(), fastfood_transpose_reference(gamma, plan).double())
        assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + 1e-3 * z.norm() * gamma.norm())


def test_transpose_is_the_matrix_transpose():
    plan = fastfood_plan([12, 40], 8, 16)
    gamma = torch.randn(plan.total_out)
    P = torch.cat([_matrix(plan, i) for i in range(2)])
    torch.testing.assert_close(fastfood_transpose_reference(gamma, plan), P.t() @ gamma, rtol=1e-5, atol=1e-5)


def test_column_norms():
    # N = L: ‖P e_j‖ = 1 exactly (to rounding); N < L: ≈ 1 (E‖col‖² = 1, entries ≈ N(0, 1/N))
    exact = fastfood_plan([64], 11, 32)
    P = _matrix(exact, 0)
    torch.testing.assert_close(P.norm(dim=0), torch.ones(32), rtol=1e-5, atol=1e-5)
    partial = fastfood_plan([300], 11, 64)  # L = 512
    P = _matrix(partial, 0)
    sq = P.square().sum(0)
    assert abs(sq.mean().item() - 1) < 0.05, sq.mean()
    assert sq.min() > 0.6 and sq.max() < 1.4
    entries = P.flatten() * math.sqrt(300)
    assert abs(entries.std().item() - 1) < 0.05 and abs(entries.mean().item()) < 0.05


def test_reference_matches_dense_fastfood():
    """σ S H G Π H B E z, with every factor built as a dense matrix."""
    plan = fastfood_plan([10], 4, 12, [16])
    L, keys = 16, plan.keys[0]
    k = torch.arange(L)
    H = torch.tensor([[(-1.0) ** bin(a & b).count("1") for b in range(L)] for a in range(L)])
    Pi = torch.zeros(L, L)
    Pi[k, permutation(k, 4, keys)] = 1.0  # (Π v)_k = v_{π(k)}
    E = torch.zeros(L, 12)
    E[:12, :12] = torch.eye(12)
    P = plan.sigma[0] * (H @ torch.diag(gaussians(k, keys)) @ Pi @ H @ torch.diag(signs(k, keys)) @ E)[:10]
    z = torch.randn(12)
    torch.testing.assert_close(fastfood_reference(z, None, None, plan=plan), P @ z, rtol=1e-5, atol=1e-5)
    assert abs(plan.sigma[0] - (10 * gaussians(k, keys).double().square().sum()) ** -0.5) < 1e-9


@pytest.mark.parametrize("n", range(0, 15))
def test_permutation_is_a_bijection_and_invertible(n):
    k = torch.arange(1 << n)
    for seed in (0, 1):
        keys = fastfood_plan([1 << n], seed, 1).keys[0]
        p = permutation(k, n, keys)
        assert torch.equal(torch.sort(p).values, k)
        assert torch.equal(permutation(p, n, keys, inverse=True), k)
        if n >= 4:
            assert (p != k).float().mean() > 0.5  # not (nearly) the identity


def test_generator_statistics():
    keys = fastfood_plan([1], 0, 1).keys[0]
    k = torch.arange(1 << 16)
    g, b = gaussians(k, keys).double(), signs(k, keys)
    assert abs(g.mean()) < 0.02 and abs(g.std() - 1) < 0.02
    assert abs((g ** 4).mean() - 3) < 0.15  # Gaussian kurtosis
    assert set(b.unique().tolist()) == {-1.0, 1.0} and abs(b.mean()) < 0.02
    assert abs(torch.corrcoef(torch.stack([g[:-1], g[1:]]))[0, 1]) < 0.02


def test_plan():
    plan = fastfood_plan([5, 100, 1025], 3, 200)
    assert plan.lengths == (256, 256, 2048)  # 2^⌈log₂ max(N, d_z)⌉
    assert plan.out_offsets == (0, 5, 105, 1130) and plan.ws_offsets == (0, 256, 512, 2560)
    for n, L, keys, s in zip(plan.sizes, plan.lengths, plan.keys, plan.sigma):
        assert s == pytest.approx((n * sum_g2(L, keys)) ** -0.5, rel=1e-12)
    assert fastfood_plan([5, 100, 1025], 3, 200) is plan  # cached
    assert fastfood_plan([5, 100, 1025], 3, 200, [8, 128, 2048]).lengths == (8, 128, 2048)


def test_seed_determines_the_function():
    z = torch.randn(30)
    sizes = [20, 77]
    a = fastfood_reference(z, sizes, 1, 30)
    _PLANS.clear()  # rebuild the plan from scratch
    b = fastfood_reference(z, sizes, 1, 30)
    assert torch.equal(a, b)
    c = fastfood_reference(z, sizes, 2, 30)
    assert (a - c).abs().max() > 0.1 * a.abs().max()
    assert ops_fastfood_fn is fastfood


def test_auto_runs_reference_on_cpu(backend):
    plan = fastfood_plan([9, 33], 0, 8)
    z = torch.randn(8)
    backend("auto")
    assert torch.equal(fastfood(z, plan=plan), fastfood_reference(z, None, None, plan=plan))


def test_compile_fullgraph_reference(backend):
    backend("reference")
    plan = fastfood_plan([6, 40], 2, 16)
    z = torch.randn(16, requires_grad=True)
    gamma = torch.randn(46)
    fn = torch.compile(lambda z: fastfood(z, plan=plan), fullgraph=True, backend="aot_eager")
    v = fn(z)
    ref, dz_ref = _ref_grad(plan, z, gamma)
    torch.testing.assert_close(v, ref)
    (dz,) = torch.autograd.grad(v, z, gamma)
    torch.testing.assert_close(dz, dz_ref)


@needs_triton
def test_compile_fullgraph_triton_and_opcheck(backend, tiles):
    """The Triton path under torch.compile (the custom ops as graph nodes) and opcheck of both ops."""
    from kadapt.ops.triton import fastfood as tf

    tiles((8, 16, 8, 8), poison=False)
    backend("triton")
    plan = fastfood_plan([6, 40], 2, 16)
    z = torch.randn(16, requires_grad=True)
    gamma = torch.randn(46)
    fn = torch.compile(lambda z: fastfood(z, plan=plan), fullgraph=True, backend="aot_eager")
    v = fn(z)
    ref, dz_ref = _ref_grad(plan, z, gamma)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
    (dz,) = torch.autograd.grad(v, z, gamma)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-5)
    tables, meta = tf.schedule(plan, "cpu")
    torch.library.opcheck(torch.ops.kadapt.fastfood.default, (z.detach(), tables, meta + [0]),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.kadapt.fastfood_backward.default, (gamma, tables, meta + [1]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("call,field", [
    (lambda: fastfood(torch.zeros(4), [3, -1], 0), "sizes"),
    (lambda: fastfood(torch.zeros(4), [3, 0], 0), "sizes"),
    (lambda: fastfood(torch.zeros(4, 1), [3], 0), "z"),
    (lambda: fastfood(torch.zeros(4, dtype=torch.int64), [3], 0), "z"),
    (lambda: fastfood(torch.zeros(4), [3], 0, d_z=5), "d_z"),
    (lambda: fastfood(torch.zeros(4), [3], 0, lengths=[6]), "lengths"),
    (lambda: fastfood(torch.zeros(4), [9], 0, lengths=[8]), "lengths"),
    (lambda: fastfood(torch.zeros(4), [3], 0.5), "seed"),
    (lambda: fastfood(torch.zeros(4), [3], None), "seed"),
])
def test_bad_inputs(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_forced_cuda_is_refused(backend):
    backend("cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        fastfood(torch.zeros(4), [3], 0)


@needs_triton
def test_benchmark_cpu_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_fastfood", ROOT / "benchmarks" / "fastfood.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--tiny", "--reps", "1", "--out", str(tmp_path)])
    assert {r["provider"] for r in rows} >= {"reference", "triton", "peer", "copy"}
    assert not [r for r in rows if r.get("note", "").startswith("error")]
    assert (tmp_path / "fastfood_cpu.csv").exists() and (tmp_path / "fastfood_cpu.png").exists()
