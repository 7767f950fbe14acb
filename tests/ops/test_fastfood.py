"""Fastfood projection (kadapt/ops/fastfood.py, METHODS.md §4, §12.5): the Triton kernels (interpreter,
fp32) against the reference, the exact transpose, the generator and the permutation, the plan, errors."""
import importlib.util
import math
import shutil
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


# ---------------------------------------------------------------------------------------------
# the CUDA kernel (csrc/fastfood.cu, csrc/fastfood.cuh)
#
# On a CPU: the kernels' block code compiled for the host (tests/ops/fastfood_host.cpp, ctypes) against the
# reference, and the op registration of kadapt._C. On a GPU: the "cuda" backend against the reference and
# Triton, through the custom ops, eager and compiled.

def _extension_ok() -> bool:
    try:
        from kadapt import _extension

        return _extension.is_built()
    except Exception:  # noqa: BLE001
        return False


HAS_CUDA_EXT = torch.cuda.is_available() and _extension_ok()
needs_cuda_ext = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a CUDA device and the built kadapt._C extension")
CXX = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """tests/ops/fastfood_host.cpp (csrc/fastfood.cuh for the host) built with the host C++ compiler."""
    import ctypes
    import subprocess

    if CXX is None:
        pytest.skip("no host C++ compiler (c++, g++ or clang++)")
    lib = tmp_path_factory.mktemp("fastfood_host") / "libfastfood_host.so"
    subprocess.run([CXX, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "ops" / "fastfood_host.cpp"), "-o", str(lib)],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def _host_run(lib, mode, src, tables, meta, compat=False):
    """The CUDA launch sequence of csrc/fastfood.cu on the host; outputs and workspaces start as NaN."""
    import ctypes

    d_z, total_out, total_ws, K, TR, TC, RO, OC, P, J = meta[:10]
    info, sigma, inner, levels = tables[0], tables[1], tables[2], tables[3:3 + J]
    out, ws1, ws2 = (torch.full((n,), float("nan")) for n in (total_out, total_ws, total_ws))
    dz = torch.full((d_z,), float("nan"))
    level_ptrs = (ctypes.c_void_p * max(J, 1))(*[t.data_ptr() for t in levels])
    level_p = torch.tensor(meta[10:10 + J] or [0], dtype=torch.int64)
    p = [ctypes.c_void_p(t.data_ptr()) for t in (src, out, ws1, ws2, dz, info, sigma, inner)]
    lib.kadapt_fastfood_host(ctypes.c_int(mode), *p, ctypes.c_int64(P), level_ptrs,
                             ctypes.c_void_p(level_p.data_ptr()), ctypes.c_int(J),
                             ctypes.c_int((TR * TC).bit_length() - 1), ctypes.c_int(OC.bit_length() - 1),
                             ctypes.c_int64(K), ctypes.c_int64(d_z), ctypes.c_int(int(compat)))
    return out if mode == 0 else dz


# (sizes, d_z, lengths, tile config): the GPU config (T = 2^13, RO = OC = 64) with one-block tensors and
# one outer level (partial radix), d_z below and above L (explicit lengths crop z), tiny configs with up
# to five outer levels
HOST_CASES = [
    pytest.param([20000, 9000, 3, 70000, 1], 3000, None, (64, 128, 64, 64), id="gpu-config-one-level"),
    pytest.param([5, 100, 8192], 20000, [8, 128, 8192], (64, 128, 64, 64), id="gpu-config-dz-above-L"),
    pytest.param([5000, 600, 77], 300, None, (16, 16, 16, 16), id="two-levels"),
    pytest.param([7, 130, 33, 17], 50, [8, 256, 64, 32], (2, 4, 2, 2), id="five-levels-crop"),
    pytest.param([1, 2, 600, 31], 9, None, (8, 16, 8, 8), id="mixed"),
]


@pytest.mark.parametrize("sizes,d_z,lengths,config", HOST_CASES)
def test_cuda_block_code_on_host_matches_reference(tiles, host_kernels, sizes, d_z, lengths, config):
    """csrc/fastfood.cuh's blocks (one thread per block, the same phases) compute the reference's function."""
    tiles(config, poison=False)
    plan = fastfood_plan(sizes, 77, d_z, lengths)
    tables, meta = tf_schedule(plan)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(d_z, generator=gen)
    gamma = torch.randn(sum(sizes), generator=gen)
    ref = fastfood_reference(z, None, None, plan=plan)
    v = _host_run(host_kernels, 0, z, tables, meta)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for compat in (False, True):
        want = fastfood_transpose_reference(gamma, plan, grad_scale_compat=compat)
        dz = _host_run(host_kernels, 1, gamma, tables, [*meta, int(compat)], compat)
        assert torch.isfinite(dz).all()
        torch.testing.assert_close(dz, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def tf_schedule(plan):
    from kadapt.ops.triton import fastfood as tf

    return tf.schedule(plan, "cpu")


def test_cuda_generator_bit_identical_on_host(host_kernels):
    """The CUDA generator (csrc/fastfood.cuh) draws exactly the reference's signs and permutations, and its
    Gaussians to the last bits of fp32 (the host's logf/cosf stand in for the device's)."""
    import ctypes

    plan = fastfood_plan([100, 1000, 1 << 15], 99, 50)
    info = plan.info()
    for i, n in ((0, 7), (1, 10), (2, 15)):
        B = 1 << n
        k = torch.arange(B)
        s, g = torch.empty(B), torch.empty(B)
        p, q = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64)
        host_kernels.kadapt_fastfood_draws(ctypes.c_void_p(info.data_ptr()), ctypes.c_int64(i), ctypes.c_int64(B),
                                           *[ctypes.c_void_p(t.data_ptr()) for t in (s, g, p, q)])
        keys = plan.keys[i]
        assert torch.equal(s, signs(k, keys))
        torch.testing.assert_close(g, gaussians(k, keys), rtol=2e-6, atol=2e-6)
        assert torch.equal(p, permutation(k, n, keys))
        assert torch.equal(q, permutation(k, n, keys, inverse=True))


CUDA_SCHEMAS = {
    "fastfood_fwd": "kadapt::fastfood_fwd(Tensor z, Tensor[] tables, int[] meta) -> Tensor",
    "fastfood_bwd": "kadapt::fastfood_bwd(Tensor grad, Tensor[] tables, int[] meta) -> Tensor",
}


def test_cuda_op_registration():
    """kadapt._C registers kadapt::fastfood_fwd/_bwd (CUDA kernel only) with these schemas and fake kernels;
    the "cuda" backend of kadapt::fastfood(_backward) routes to them."""
    from kadapt import _extension

    if not _extension_ok():
        pytest.skip(f"kadapt._C is not built here: {_extension.import_error() or _extension.build_info().get('reason')}")
    import kadapt._C  # noqa: F401

    from kadapt.ops.fastfood import _fastfood_backward_op, _fastfood_op

    for op, schema in CUDA_SCHEMAS.items():
        assert op in _extension.OPS
        assert str(getattr(torch.ops.kadapt, op).default._schema) == schema
    plan = fastfood_plan([6, 40], 2, 16)
    tables, meta = plan_tables_meta(plan)
    z, gamma = torch.randn(16), torch.randn(46)
    for op, x, n in (("fastfood_fwd", z, 46), ("fastfood_bwd", gamma, 16)):
        with pytest.raises(NotImplementedError, match="CPU"):
            getattr(torch.ops.kadapt, op)(x, tables, meta + [0])
        out = getattr(torch.ops.kadapt, op)(x.to("meta"), [t.to("meta") for t in tables], meta + [0])
        assert out.device.type == "meta" and out.shape == (n,) and out.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="fastfood_fwd"):
        _fastfood_op.impl(z, tables, meta + [0], "cuda")
    with pytest.raises(NotImplementedError, match="fastfood_bwd"):
        _fastfood_backward_op.impl(gamma, tables, meta + [0], "cuda")


def plan_tables_meta(plan):
    from kadapt.ops.triton import fastfood as tf

    saved = tf.CONFIG
    tf.CONFIG = (8, 16, 8, 8)
    try:
        return tf.schedule(plan, "cpu")
    finally:
        tf.CONFIG = saved


def test_forced_cuda_on_cpu_tensors_names_the_reason(backend):
    backend("cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is forced but cannot run fastfood: inputs are not CUDA"):
        fastfood(torch.randn(4), [3, 9], 0)


def _poison_allocator(*numels: int) -> None:
    """Leave NaN-filled freed blocks of these sizes in the caching allocator, so that the op's torch.empty
    outputs and workspaces most likely start as NaN (an unwritten element then shows)."""
    held = [torch.full((n,), float("nan"), device="cuda") for n in numels]
    del held


# (sizes, d_z, lengths, tile config or None for the GPU config): non-powers of two, one-block tensors, one
# and two outer levels at the GPU config (L up to 2^22), d_z above L (explicit lengths), several outer
# levels at 16×16 tiles
CUDA_CASES = [
    pytest.param([5, 64, 100, 300, 3, 1000], 40, None, None, id="one-block"),
    pytest.param([20000, 9000, 3, 70000, 1], 3000, None, None, id="one-level"),
    pytest.param([3_000_001, 1000, 77], 20000, None, None, id="two-levels"),
    pytest.param([7, 130, 33, 17, 9000], 5000, [8, 256, 64, 32, 16384], None, id="dz-above-L"),
    pytest.param([5000, 600, 77, 40000], 300, None, (16, 16, 16, 16), id="small-tiles"),
]


def _cuda_inputs(plan, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(plan.d_z, generator=gen, device="cuda")
    gamma = torch.randn(plan.total_out, generator=gen, device="cuda")
    return z, gamma


def _run_backend(name, plan, z, gamma, compat=False):
    kadapt.set_backend(name)
    zt = z.clone().requires_grad_(True)
    _poison_allocator(plan.total_out, plan.total_ws, plan.total_ws, plan.d_z)
    v = fastfood(zt, plan=plan, grad_scale_compat=compat)
    _poison_allocator(plan.total_ws, plan.total_ws, plan.d_z)
    (dz,) = torch.autograd.grad(v, zt, gamma)
    return v.detach(), dz


@needs_cuda_ext
@pytest.mark.parametrize("sizes,d_z,lengths,config", CUDA_CASES)
def test_cuda_matches_reference_and_triton(backend, tiles, sizes, d_z, lengths, config):
    tiles(config, poison=False)
    plan = fastfood_plan(sizes, 4321, d_z, lengths, device="cuda")
    z, gamma = _cuda_inputs(plan)
    ref = fastfood_reference(z, None, None, plan=plan)
    dz_ref = fastfood_transpose_reference(gamma, plan)
    v, dz = _run_backend("cuda", plan, z, gamma)
    assert v.shape == (plan.total_out,) and v.dtype == torch.float32 and v.is_cuda
    assert torch.isfinite(v).all() and torch.isfinite(dz).all()
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=2e-5 * ref.abs().max().item())
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=2e-5 * dz_ref.abs().max().item())
    if HAS_TRITON:
        v_t, dz_t = _run_backend("triton", plan, z, gamma)
        torch.testing.assert_close(v, v_t, rtol=1e-5, atol=2e-5 * ref.abs().max().item())
        torch.testing.assert_close(dz, dz_t, rtol=1e-5, atol=2e-5 * dz_ref.abs().max().item())


@needs_cuda_ext
@pytest.mark.parametrize("trial", range(4))
def test_cuda_random_sizes(backend, trial):
    """Random K, N_i (non-powers of two up to 2^17 > 2^13), d_z below and above the N_i; the CUDA forward
    and backward against the reference, and ⟨P z, γ⟩ = ⟨z, Pᵀγ⟩."""
    gen = torch.Generator().manual_seed(100 + trial)
    K = int(torch.randint(1, 9, (1,), generator=gen))
    sizes = [int(n) for n in torch.randint(1, 1 << 17, (K,), generator=gen)]
    d_z = int(torch.randint(1, 1 << 15, (1,), generator=gen))
    plan = fastfood_plan(sizes, trial, d_z, device="cuda")
    z, gamma = _cuda_inputs(plan, trial)
    v, dz = _run_backend("cuda", plan, z, gamma)
    ref = fastfood_reference(z, None, None, plan=plan)
    dz_ref = fastfood_transpose_reference(gamma, plan)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=2e-5 * ref.abs().max().item())
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=2e-5 * dz_ref.abs().max().item())
    lhs, rhs = torch.dot(v.double(), gamma.double()), torch.dot(z.double(), dz.double())
    assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + z.norm() * gamma.norm())


@needs_cuda_ext
def test_cuda_grad_scale_compat(backend):
    plan = fastfood_plan([3, 70, 20000], 5, 2000, device="cuda")
    z, gamma = _cuda_inputs(plan, 1)
    want = fastfood_transpose_reference(gamma, plan, grad_scale_compat=True)
    v, dz = _run_backend("cuda", plan, z, gamma, compat=True)
    torch.testing.assert_close(v, fastfood_reference(z, None, None, plan=plan), rtol=1e-5,
                               atol=2e-5 * v.abs().max().item())  # the forward is unchanged
    torch.testing.assert_close(dz, want, rtol=1e-5, atol=2e-5 * want.abs().max().item())


@needs_cuda_ext
def test_cuda_compile_fullgraph_and_opcheck(backend):
    backend("cuda")
    plan = fastfood_plan([6, 40, 9000], 2, 100, device="cuda")
    z, gamma = _cuda_inputs(plan, 2)
    fastfood(z, plan=plan)  # the schedule tables exist before tracing
    zt = z.clone().requires_grad_(True)
    fn = torch.compile(lambda z: fastfood(z, plan=plan), fullgraph=True, backend="aot_eager")
    v = fn(zt)
    (dz,) = torch.autograd.grad(v, zt, gamma)
    ref = fastfood_reference(z, None, None, plan=plan)
    dz_ref = fastfood_transpose_reference(gamma, plan)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=2e-5 * ref.abs().max().item())
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=2e-5 * dz_ref.abs().max().item())
    from kadapt.ops.triton import fastfood as tf

    tables, meta = tf.schedule(plan, z.device)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.kadapt.fastfood_fwd.default, (z, tables, meta + [0]), test_utils=utils)
    torch.library.opcheck(torch.ops.kadapt.fastfood_bwd.default, (gamma, tables, meta + [1]), test_utils=utils)
    torch.library.opcheck(torch.ops.kadapt.fastfood.default, (z, tables, meta + [0], "cuda"), test_utils=utils)
    torch.library.opcheck(torch.ops.kadapt.fastfood_backward.default, (gamma, tables, meta + [1], "cuda"),
                          test_utils=utils)


@needs_cuda_ext
def test_cuda_argument_errors_name_the_argument(backend, tiles):
    plan = fastfood_plan([6, 40], 2, 16, device="cuda")
    from kadapt.ops.triton import fastfood as tf

    tables, meta = tf.schedule(plan, "cuda")
    z, gamma = _cuda_inputs(plan)
    fwd, bwd = torch.ops.kadapt.fastfood_fwd, torch.ops.kadapt.fastfood_bwd
    with pytest.raises(RuntimeError, match="z has dtype"):
        fwd(z.double(), tables, meta + [0])
    with pytest.raises(RuntimeError, match=r"z must have shape \(d_z,\)"):
        fwd(z[:-1], tables, meta + [0])
    with pytest.raises(RuntimeError, match=r"grad must have shape"):
        bwd(gamma[:-1], tables, meta + [0])
    with pytest.raises(RuntimeError, match="grad_scale_compat"):
        bwd(gamma, tables, meta)
    with pytest.raises(RuntimeError, match=r"tables\[0\] \(info\) is on cpu"):
        fwd(z, [tables[0].cpu(), *tables[1:]], meta + [0])
    with pytest.raises(RuntimeError, match=r"tables\[2\] \(inner programs\) has shape"):
        fwd(z, [*tables[:2], tables[2][:-1], *tables[3:]], meta + [0])
    tiles((128, 128, 16, 16), poison=False)  # T = 2^14: more than one CUDA block transforms
    backend("cuda")
    with pytest.raises(RuntimeError, match="tile config"):
        fastfood(z, plan=plan)
