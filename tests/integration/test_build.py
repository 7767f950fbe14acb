"""The build: kadapt._C, its op schemas and fake kernels, _build_info.json, `python -m kadapt info`,
setup.py's CUDA decision, and (on a GPU) the ops' argument checks and opcheck. The kernels' numerics are
tested against a float64 reference in tests/ops/test_cuda_kernels.py.

Run with `.venv/bin/pytest -q tests` from the repository root (see .ci/run): that imports the
installed package, which has kadapt._C. Set KADAPT_REQUIRE_EXTENSION=1 (CI does) to turn "the
extension was not built" from a skip into a failure.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kadapt
from kadapt import _extension

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = {
    "fused_adapter_fwd": "kadapt::fused_adapter_fwd(Tensor x, Tensor? residual, bool add_input, Tensor w_down, "
                         "Tensor b_down, Tensor w_up, Tensor b_up, int activation) -> (Tensor y, Tensor z)",
    "fused_adapter_bwd": "kadapt::fused_adapter_bwd(Tensor dy, Tensor z, Tensor w_down, Tensor w_up, bool add_input, "
                         "int activation) -> (Tensor dx, Tensor g_z, Tensor h, Tensor db_up)",
    "kron_weight": "kadapt::kron_weight(Tensor A, Tensor B, Tensor? t) -> Tensor",
    "inducer_attention_fwd": "kadapt::inducer_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? A_k, Tensor? a_k, "
                             "Tensor? B_k, Tensor? b_k, Tensor? kpm, float scale, bool causal) "
                             "-> (Tensor O, Tensor LSE, Tensor w)",
    "fastfood_fwd": "kadapt::fastfood_fwd(Tensor z, Tensor[] tables, int[] meta) -> Tensor",
    "fastfood_bwd": "kadapt::fastfood_bwd(Tensor grad, Tensor[] tables, int[] meta) -> Tensor",
}


def _require_extension():
    info = _extension.build_info()
    if not info.get("cuda_extension"):
        msg = (f"kadapt._C was not built ({info.get('reason')}); kadapt imported from "
               f"{os.path.dirname(kadapt.__file__)}")
        if os.environ.get("KADAPT_REQUIRE_EXTENSION") == "1":
            pytest.fail(msg + " but KADAPT_REQUIRE_EXTENSION=1")
        pytest.skip(msg)
    assert _extension.is_built(), f"_build_info.json says built, but: {_extension.import_error()}"


# ---------------------------------------------------------------------------------------------
# extension, schema, build info


def test_extension_imports():
    _require_extension()
    import kadapt._C  # noqa: F401

    assert _extension.import_error() is None
    for op in SCHEMAS:
        assert hasattr(torch.ops.kadapt, op), op
    assert not hasattr(torch.ops.kadapt, "bottleneck_adapter_fwd"), "the old op must be gone"


def test_op_schemas_are_exact():
    _require_extension()
    assert set(_extension.OPS) == set(SCHEMAS)
    for op, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.kadapt, op).default._schema) == schema


def test_build_info_lists_archs():
    _require_extension()
    info = _extension.build_info()
    archs = _extension.built_archs()
    assert archs and all(re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a) for a in archs), archs
    assert info["archs"] == archs
    assert info["torch"] == torch.__version__, "kadapt._C was built against another torch: reinstall"
    assert info["cuda"] and info["nvcc"] and info.get("reason") is None


def test_build_info_without_extension_has_reason():
    info = _extension.build_info()
    assert isinstance(info.get("cuda_extension"), bool)
    if not info["cuda_extension"]:
        assert info.get("reason")
        assert _extension.built_archs() == []


def _fwd_args(T, D, m, dtype, residual=True, device="meta"):
    x = torch.empty(T, D, device=device, dtype=dtype)
    return (x, torch.empty_like(x) if residual else None, True,
            torch.empty(D, m, device=device, dtype=dtype), torch.empty(m, device=device, dtype=dtype),
            torch.empty(m, D, device=device, dtype=dtype), torch.empty(D, device=device, dtype=dtype))


def _bwd_args(T, D, m, dtype, device="meta"):
    return (torch.empty(T, D, device=device, dtype=dtype), torch.empty(T, m, device=device),
            torch.empty(D, m, device=device, dtype=dtype), torch.empty(m, D, device=device, dtype=dtype),
            True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_fake_impls_on_meta_tensors(T, dtype):
    _require_extension()
    D, m = 600, 24
    for residual in (True, False):
        y, z = torch.ops.kadapt.fused_adapter_fwd(*_fwd_args(T, D, m, dtype, residual), 0)
        assert y.device.type == "meta" and y.shape == (T, D) and y.dtype == dtype
        assert z.device.type == "meta" and z.shape == (T, m) and z.dtype == torch.float32
    dx, g_z, h, db = torch.ops.kadapt.fused_adapter_bwd(*_bwd_args(T, D, m, dtype), 3)
    assert dx.device.type == "meta" and dx.shape == (T, D) and dx.dtype == dtype
    assert g_z.shape == (T, m) and g_z.dtype == dtype
    assert h.shape == (T, m) and h.dtype == dtype
    assert db.shape == (D,) and db.dtype == torch.float32


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
def test_kron_weight_fake_impl(b_dtype):
    _require_extension()
    n = 4
    A = torch.empty(n, n, n, device="meta", dtype=torch.float32)
    W = torch.ops.kadapt.kron_weight(A, torch.empty(n, 192, 6, device="meta", dtype=b_dtype), None)
    assert W.device.type == "meta" and W.shape == (768, 24) and W.dtype == b_dtype
    s = torch.empty(n, 6, 3, device="meta", dtype=b_dtype)
    t = torch.empty(n, 3, 192, device="meta", dtype=b_dtype)
    W = torch.ops.kadapt.kron_weight(A, s, t)
    assert W.shape == (24, 768) and W.dtype == b_dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_mlp", [True, False])
def test_inducer_attention_fwd_fake_impl(dtype, with_mlp):
    _require_extension()
    B, H, Tq, Tk, d, m = 2, 3, 5, 7, 40, 6
    e = lambda *s: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    mlp = (e(H, d, m), e(H, m), e(H, m, d), e(H, d)) if with_mlp else (None,) * 4
    kpm = torch.empty(B, Tk, device="meta", dtype=torch.int8)
    o, lse, w = torch.ops.kadapt.inducer_attention_fwd(e(B, H, Tq, d), e(B, H, Tk, d), e(B, H, Tk, d), *mlp, kpm,
                                                       0.5, True)
    assert o.device.type == "meta" and o.shape == (B, H, Tq, d) and o.dtype == dtype
    assert lse.shape == w.shape == (B, H, Tq) and lse.dtype == w.dtype == torch.float32


def test_fake_impls_trace_symbolic_shapes():
    """make_fx in symbolic mode runs only the fake kernels (there is no CPU kernel)."""
    _require_extension()
    from torch.fx.experimental.proxy_tensor import make_fx

    ff_meta = [8, 5, 8, 1, 8, 16, 8, 8, 1, 0, 0]  # d_z, ΣN, ΣL, K, TR, TC, RO, OC, P, J, compat

    def f(x, res, wd, bd, wu, bu, dy, A, s, t, q, k, ff_z, ff_g, ff_info, ff_sigma, ff_inner):
        y, z = torch.ops.kadapt.fused_adapter_fwd(x, res, True, wd, bd, wu, bu, 1)
        dx, g_z, h, db = torch.ops.kadapt.fused_adapter_bwd(dy, z, wd, wu, False, 1)
        o, lse, w = torch.ops.kadapt.inducer_attention_fwd(q, k, k, None, None, None, None, None, 0.5, False)
        v = torch.ops.kadapt.fastfood_fwd(ff_z, [ff_info, ff_sigma, ff_inner], ff_meta)
        dz = torch.ops.kadapt.fastfood_bwd(ff_g, [ff_info, ff_sigma, ff_inner], ff_meta)
        return y, dx, g_z, h, db, torch.ops.kadapt.kron_weight(A, s, t), o, lse, w, v, dz

    D, m = 40, 6
    shapes = [(15, D), (15, D), (D, m), (m,), (m, D), (D,), (15, D), (2, 2, 2), (2, 20, 1), (2, 1, 3),
              (2, 3, 9, 16), (2, 3, 11, 16), (8,), (5,)]
    ff_tables = [torch.zeros(1, 19, dtype=torch.int64), torch.ones(1), torch.zeros(1, 2, dtype=torch.int32)]
    gm = make_fx(f, tracing_mode="symbolic")(*[torch.randn(*s) for s in shapes], *ff_tables)
    for op in SCHEMAS:
        assert f"kadapt.{op}" in gm.code, op


def test_cpu_tensors_raise_clear_error():
    _require_extension()
    D, m = 16, 4
    fwd = _fwd_args(3, D, m, torch.float32, device="cpu")
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.fused_adapter_fwd(*fwd, 0)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.fused_adapter_bwd(*_bwd_args(3, D, m, torch.float32, device="cpu"), 0)
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.inducer_attention_fwd(q, q, q, None, None, None, None, None, 0.25, False)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.kron_weight(torch.randn(2, 2, 2), torch.randn(2, 3, 4), None)
    ff_tables = [torch.zeros(1, 19, dtype=torch.int64), torch.ones(1), torch.zeros(1, 2, dtype=torch.int32)]
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.fastfood_fwd(torch.randn(8), ff_tables, [8, 5, 8, 1, 8, 16, 8, 8, 1, 0, 0])
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.fastfood_bwd(torch.randn(5), ff_tables, [8, 5, 8, 1, 8, 16, 8, 8, 1, 0, 0])


# ---------------------------------------------------------------------------------------------
# command line


def _run_cli(*argv, tmp_path):
    # Run outside the repository and point PYTHONPATH at the kadapt this test imported, so that the
    # subprocess sees the same package (installed or source tree).
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(kadapt.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "kadapt", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_info(tmp_path):
    proc = _run_cli("info", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("kadapt:", "python:", "torch:", "triton:", "transformers:", "kadapt._C:",
                 "CUDA device:", "backend:", "available:", "tuning:"):
        assert name in out, f"{name!r} missing from:\n{out}"
    assert torch.__version__ in out
    assert "reference" in out.split("available:")[1]
    if _extension.build_info().get("cuda_extension"):
        assert "built for archs" in out and "does not load" not in out, out


@pytest.mark.parametrize("argv", [(), ("bogus",)])
def test_cli_usage_errors_exit_2(argv, tmp_path):
    proc = _run_cli(*argv, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


# ---------------------------------------------------------------------------------------------
# setup.py's decision: CUDA extension or pure-Python install


@pytest.fixture(scope="module")
def setup_mod():
    path = REPO / "setup.py"
    if not path.is_file():
        pytest.skip("setup.py is not beside tests/ (not a source checkout)")
    spec = importlib.util.spec_from_file_location("kadapt_setup_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() is guarded by __name__ == "__main__"
    return mod


CUDA_TORCH = (True, "2.14.1+cu130", "13.0")


def _fs(*toolkits, scripts=None):
    files = {f"{t}/{f}" for t in toolkits for f in ("bin/nvcc", "include/cuda_runtime.h")}
    scripts = scripts or {}
    return dict(exists=lambda p: p in files or p in scripts, realpath=lambda p: p,
                read_text=lambda p: scripts[p])


def test_decision_no_cuda_env(setup_mod):
    ok, reason = setup_mod._cuda_build_decision({"KADAPT_NO_CUDA": "1"}, torch_info=CUDA_TORCH,
                                                **_fs("/usr/local/cuda"))
    assert not ok and "KADAPT_NO_CUDA" in reason


def test_decision_cpu_torch(setup_mod):
    ok, reason = setup_mod._cuda_build_decision({}, torch_info=(True, "2.13.0+cpu", None),
                                                **_fs("/usr/local/cuda"))
    assert not ok and "CPU-only" in reason


def test_decision_no_torch(setup_mod):
    ok, reason = setup_mod._cuda_build_decision({}, torch_info=(False, None, None))
    assert not ok and "no-build-isolation" in reason


def test_decision_cuda_home_env(setup_mod):
    ok, reason = setup_mod._cuda_build_decision({"CUDA_HOME": "/opt/cuda"}, torch_info=CUDA_TORCH,
                                                which=lambda *a, **k: None, **_fs("/opt/cuda"))
    assert ok and "/opt/cuda" in reason


def test_decision_bad_cuda_home(setup_mod):
    ok, reason = setup_mod._cuda_build_decision({"CUDA_HOME": "/nope"}, torch_info=CUDA_TORCH,
                                                which=lambda *a, **k: None, **_fs("/usr/local/cuda"))
    assert not ok and "CUDA_HOME" in reason


def test_decision_usr_local_cuda(setup_mod):
    fs = _fs("/usr/local/cuda")
    ok, reason = setup_mod._cuda_build_decision({}, torch_info=CUDA_TORCH, which=lambda *a, **k: None, **fs)
    assert ok and "/usr/local/cuda" in reason


def test_decision_no_toolkit(setup_mod):
    ok, reason = setup_mod._cuda_build_decision({}, torch_info=CUDA_TORCH, which=lambda *a, **k: None, **_fs())
    assert not ok and "no CUDA toolkit" in reason


def test_decision_nvcc_on_path(setup_mod):
    fs = _fs("/opt/cuda-13.0")
    ok, _ = setup_mod._cuda_build_decision({}, torch_info=CUDA_TORCH,
                                           which=lambda *a, **k: "/opt/cuda-13.0/bin/nvcc", **fs)
    assert ok
    root, _ = setup_mod._find_cuda_home({}, which=lambda *a, **k: "/opt/cuda-13.0/bin/nvcc", **fs)
    assert root == "/opt/cuda-13.0"


def test_decision_nvcc_wrapper_script(setup_mod):
    """nvcc on PATH is `exec /usr/local/cuda-13.0/bin/nvcc "$@"` in /usr/local/bin (not a toolkit)."""
    fs = _fs("/usr/local/cuda-13.0",
             scripts={"/usr/local/bin/nvcc": '#!/bin/sh\nexec /usr/local/cuda-13.0/bin/nvcc "$@"\n'})
    which = lambda *a, **k: "/usr/local/bin/nvcc"  # noqa: E731
    root, how = setup_mod._find_cuda_home({}, which=which, **fs)
    assert root == "/usr/local/cuda-13.0" and "wrapper" in how
    assert setup_mod._cuda_build_decision({}, torch_info=CUDA_TORCH, which=which, **fs)[0]


def test_decision_real_environment(setup_mod):
    """On this machine the decision must agree with what the installed build recorded."""
    info = _extension.build_info()
    if info.get("reason") == "not built (source tree)":
        pytest.skip("kadapt imported from the source tree: no build to compare with")
    env = dict(os.environ)
    env.pop("KADAPT_NO_CUDA", None)
    ok, reason = setup_mod._cuda_build_decision(env)
    if info["cuda_extension"]:
        assert ok, reason


# ---------------------------------------------------------------------------------------------
# the ops on a GPU: argument checks and opcheck (numerics: tests/ops/test_cuda_kernels.py)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_fwd_args(T=9, D=64, m=8, dtype=torch.float32, seed=5):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(dtype)  # noqa: E731
    return [r(T, D), r(T, D), True, r(D, m), r(m), r(m, D), r(D)]


@gpu
def test_cuda_fwd_argument_errors_name_the_argument():
    _require_extension()
    fwd = torch.ops.kadapt.fused_adapter_fwd
    x, res, add, wd, bd, wu, bu = _cuda_fwd_args()
    with pytest.raises(RuntimeError, match="w_up has dtype"):
        fwd(x, res, add, wd, bd, wu.half(), bu, 0)
    with pytest.raises(RuntimeError, match="b_down is on cpu"):
        fwd(x, res, add, wd, bd.cpu(), wu, bu, 0)
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        fwd(x, res[:-1], add, wd, bd, wu, bu, 0)
    with pytest.raises(RuntimeError, match="w_down must have shape"):
        fwd(x, res, add, wd[:-1], bd, wu, bu, 0)
    with pytest.raises(RuntimeError, match="b_down must have shape"):
        fwd(x, res, add, wd, bd[:-1], wu, bu, 0)
    with pytest.raises(RuntimeError, match="w_up must have shape"):
        fwd(x, res, add, wd, bd, wu[:, :-1], bu, 0)
    with pytest.raises(RuntimeError, match="b_up must have shape"):
        fwd(x, res, add, wd, bd, wu, bu[:-1], 0)
    with pytest.raises(RuntimeError, match="activation=9"):
        fwd(x, res, add, wd, bd, wu, bu, 9)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        fwd(x[None], res[None], add, wd, bd, wu, bu, 0)
    with pytest.raises(RuntimeError, match="x has dtype"):
        fwd(*[a.double() if isinstance(a, torch.Tensor) else a for a in (x, res, add, wd, bd, wu, bu)], 0)
    limit = _extension.FUSED_ADAPTER_MAX_M
    x, res, add, wd, bd, wu, bu = _cuda_fwd_args(m=limit + 1)
    with pytest.raises(RuntimeError, match=f"m={limit + 1} exceeds the kernel's limit of {limit}"):
        fwd(x, res, add, wd, bd, wu, bu, 0)


@gpu
def test_cuda_bwd_argument_errors_name_the_argument():
    _require_extension()
    bwd = torch.ops.kadapt.fused_adapter_bwd
    x, _, _, wd, _, wu, _ = _cuda_fwd_args()
    z = torch.randn(x.shape[0], wd.shape[1], device="cuda")
    with pytest.raises(RuntimeError, match="z must be float32"):
        bwd(x, z.half(), wd, wu, True, 0)
    with pytest.raises(RuntimeError, match="z must have shape"):
        bwd(x, z[:-1], wd, wu, True, 0)
    with pytest.raises(RuntimeError, match="w_down has dtype"):
        bwd(x, z, wd.bfloat16(), wu, True, 0)
    with pytest.raises(RuntimeError, match="w_up must have shape"):
        bwd(x, z, wd, wu[:-1], True, 0)
    with pytest.raises(RuntimeError, match="activation=-1"):
        bwd(x, z, wd, wu, True, -1)
    with pytest.raises(RuntimeError, match="dy must be 2-D"):
        bwd(x[None], z, wd, wu, True, 0)
    limit = _extension.FUSED_ADAPTER_MAX_M
    x, _, _, wd, _, wu, _ = _cuda_fwd_args(m=limit + 1)
    z = torch.randn(x.shape[0], limit + 1, device="cuda")
    with pytest.raises(RuntimeError, match=f"limit of {limit}"):
        bwd(x, z, wd, wu, True, 0)


@gpu
def test_cuda_kron_argument_errors_name_the_argument():
    _require_extension()
    kron = torch.ops.kadapt.kron_weight
    A = torch.randn(4, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="A must have shape"):
        kron(A[:, :2], torch.randn(4, 6, 2, device="cuda"), None)
    with pytest.raises(RuntimeError, match="B must have shape"):
        kron(A, torch.randn(3, 6, 2, device="cuda"), None)
    with pytest.raises(RuntimeError, match="t must have shape"):
        kron(A, torch.randn(4, 6, 2, device="cuda"), torch.randn(4, 3, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="t has dtype"):
        kron(A, torch.randn(4, 6, 2, device="cuda"), torch.randn(4, 2, 5, device="cuda").half())


@gpu
def test_cuda_opcheck():
    _require_extension()
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    args = _cuda_fwd_args()
    torch.library.opcheck(torch.ops.kadapt.fused_adapter_fwd.default, (*args, 0), test_utils=utils)
    torch.library.opcheck(torch.ops.kadapt.fused_adapter_fwd.default,
                          (args[0], None, False, *args[3:], 2), test_utils=utils)
    dy, wd, wu = args[0], args[3], args[5]
    z = torch.randn(dy.shape[0], wd.shape[1], device="cuda")
    torch.library.opcheck(torch.ops.kadapt.fused_adapter_bwd.default, (dy, z, wd, wu, True, 3),
                          test_utils=utils)
    A = torch.randn(2, 2, 2, device="cuda", dtype=torch.bfloat16)
    s, t = torch.randn(2, 32, 1, device="cuda"), torch.randn(2, 1, 4, device="cuda")
    torch.library.opcheck(torch.ops.kadapt.kron_weight.default, (A, s, t), test_utils=utils)
    torch.library.opcheck(torch.ops.kadapt.kron_weight.default, (A, s @ t, None), test_utils=utils)
    gen = torch.Generator(device="cuda").manual_seed(6)
    r = lambda *sh: torch.randn(*sh, generator=gen, device="cuda").half()  # noqa: E731
    q, k = r(2, 3, 9, 40), r(2, 3, 11, 40)
    kpm = (torch.rand(2, 11, generator=gen, device="cuda") < 0.7).to(torch.int8)
    torch.library.opcheck(torch.ops.kadapt.inducer_attention_fwd.default,
                          (q, k, k, r(3, 40, 5), r(3, 5), r(3, 5, 40), r(3, 40), kpm, 0.3, True), test_utils=utils)
    torch.library.opcheck(torch.ops.kadapt.inducer_attention_fwd.default,
                          (q.float(), k.float(), k.float(), None, None, None, None, None, 0.3, False),
                          test_utils=utils)


@gpu
def test_cuda_inducer_attention_argument_errors_name_the_argument():
    _require_extension()
    op = torch.ops.kadapt.inducer_attention_fwd
    q = torch.randn(2, 3, 4, 16, device="cuda")
    k = torch.randn(2, 3, 6, 16, device="cuda")
    none = (None,) * 4
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        op(q[0], k, k, *none, None, 0.5, False)
    with pytest.raises(RuntimeError, match=r"k must have shape \(B, H, Tk, d\)"):
        op(q, k[:, :2].contiguous(), k[:, :2].contiguous(), *none, None, 0.5, False)
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        op(q, k, k[:, :, :5].contiguous(), *none, None, 0.5, False)
    with pytest.raises(RuntimeError, match="k must be contiguous"):
        op(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, *none, None, 0.5, False)
    with pytest.raises(RuntimeError, match="v has dtype"):
        op(q, k, k.half(), *none, None, 0.5, False)
    with pytest.raises(RuntimeError, match="k is on cpu"):
        op(q, k.cpu(), k, *none, None, 0.5, False)
    with pytest.raises(RuntimeError, match="kpm must be an int8"):
        op(q, k, k, *none, torch.ones(2, 6, device="cuda"), 0.5, False)
    with pytest.raises(RuntimeError, match="A_k must have shape"):
        op(q, k, k, torch.randn(3, 8, 2, device="cuda"), torch.randn(3, 2, device="cuda"),
           torch.randn(3, 2, 16, device="cuda"), torch.randn(3, 16, device="cuda"), None, 0.5, False)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(q, k, k, *none, None, float("inf"), False)
    with pytest.raises(RuntimeError, match="head dim d=129"):
        op(torch.randn(1, 1, 2, 129, device="cuda"), torch.randn(1, 1, 2, 129, device="cuda"),
           torch.randn(1, 1, 2, 129, device="cuda"), *none, None, 0.5, False)
