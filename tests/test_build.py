"""The build: kadapt._C, its op schemas and fake kernels, _build_info.json, `python -m kadapt info`,
setup.py's CUDA decision, and (on a GPU) the CUDA kernels against the pure-PyTorch reference.

Run with `.venv/bin/pytest -q tests` from the repository root (see .ci/run): that imports the
installed package, which has kadapt._C. Set KADAPT_REQUIRE_EXTENSION=1 (CI does) to turn "the
extension was not built" from a skip into a failure.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kadapt
from kadapt import _extension

REPO = Path(__file__).resolve().parents[1]
SCHEMA = ("kadapt::bottleneck_adapter_fwd(Tensor x, Tensor? residual, Tensor w_down, Tensor b_down, "
          "Tensor w_up, Tensor b_up, int activation) -> (Tensor y, Tensor z)")
ACTIVATIONS = {0: "gelu_tanh", 1: "gelu", 2: "relu", 3: "swish"}


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
    assert hasattr(torch.ops.kadapt, "bottleneck_adapter_fwd")


def test_op_schema_is_exact():
    _require_extension()
    assert str(torch.ops.kadapt.bottleneck_adapter_fwd.default._schema) == SCHEMA


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


def _meta_args(shape, D, m, dtype, residual=True, device="meta"):
    x = torch.empty(*shape, D, device=device, dtype=dtype)
    return (x, torch.empty_like(x) if residual else None,
            torch.empty(D, m, device=device, dtype=dtype), torch.empty(m, device=device, dtype=dtype),
            torch.empty(m, D, device=device, dtype=dtype), torch.empty(D, device=device, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (1,), (37,), (2, 3), (2, 0, 5)])
def test_fake_impl_on_meta_tensors(shape, dtype):
    _require_extension()
    D, m = 600, 24
    for residual in (True, False):
        y, z = torch.ops.kadapt.bottleneck_adapter_fwd(*_meta_args(shape, D, m, dtype, residual), 0)
        assert y.device.type == "meta" and y.shape == (*shape, D) and y.dtype == dtype
        assert z.device.type == "meta" and z.shape == (math.prod(shape), m) and z.dtype == torch.float32


def test_fake_impl_traces_symbolic_shapes():
    """make_fx in symbolic mode runs only the fake kernel (there is no CPU kernel)."""
    _require_extension()
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, res, wd, bd, wu, bu):
        return torch.ops.kadapt.bottleneck_adapter_fwd(x, res, wd, bd, wu, bu, 1)

    D, m = 40, 6
    args = [torch.randn(*s) for s in [(3, 5, D), (3, 5, D), (D, m), (m,), (m, D), (D,)]]
    gm = make_fx(f, tracing_mode="symbolic")(*args)
    assert "kadapt.bottleneck_adapter_fwd" in gm.code


def test_cpu_tensors_raise_clear_error():
    _require_extension()
    D, m = 16, 4
    args = [torch.randn(*s) for s in [(3, D), (3, D), (D, m), (m,), (m, D), (D,)]]
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.kadapt.bottleneck_adapter_fwd(*args, 0)


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
                 "CUDA device:", "backend:", "available:"):
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
# the CUDA kernel against the reference (GPU only)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _reference(x, residual, wd, bd, wu, bu, act):
    """Pure PyTorch, float64 (the truth for the fp32-accumulating kernel)."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    x, residual, wd, bd, wu, bu = map(f, (x, residual, wd, bd, wu, bu))
    z = x.reshape(-1, x.shape[-1]) @ wd + bd
    a = {0: lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
         1: torch.nn.functional.gelu, 2: torch.relu, 3: torch.nn.functional.silu}[act](z)
    y = (a @ wu + bu).reshape(x.shape)
    if residual is not None:
        y = y + residual
    return y, z


def _inputs(T, D, m, dtype, residual, gen, lead=None):
    dev = "cuda"
    shape = (*lead, D) if lead else (T, D)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=dev) * scale).to(dtype)  # noqa: E731
    x = r(*shape)
    return (x, r(*shape) if residual else None, r(D, m, scale=max(D, 1) ** -0.5), r(m, scale=0.5),
            r(m, D, scale=max(m, 1) ** -0.5), r(D, scale=0.5))


def _check(args, act, dtype, label):
    y, z = torch.ops.kadapt.bottleneck_adapter_fwd(*args, act)
    torch.cuda.synchronize()
    y_ref, z_ref = _reference(*args, act)
    x = args[0]
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device, label
    assert z.shape == z_ref.shape and z.dtype == torch.float32, label
    assert not torch.isnan(y).any() and not torch.isnan(z).any(), f"NaN in output ({label})"
    if y.numel():
        scale = max(y_ref.abs().max().item(), 1e-6)
        err = (y.double() - y_ref).abs().max().item() / scale
        assert err <= TOL[dtype], f"y: rel err {err:.3g} > {TOL[dtype]} ({label})"
    if z.numel():
        scale = max(z_ref.abs().max().item(), 1e-6)
        err = (z.double() - z_ref).abs().max().item() / scale
        assert err <= 1e-4, f"z: rel err {err:.3g} ({label})"  # fp32 accumulate, any input dtype


@gpu
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS), ids=list(ACTIVATIONS.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernel_matches_reference(dtype, act, residual):
    _require_extension()
    gen = torch.Generator(device="cuda").manual_seed(1234 + act)
    for D in (600, 768, 1024):
        for m in (6, 24, 64, 256):
            for T in (0, 1, 37, 513):
                args = _inputs(T, D, m, dtype, residual, gen)
                _check(args, act, dtype, f"{dtype} {ACTIVATIONS[act]} D={D} m={m} T={T} res={residual}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D,m,lead", [(2500, 24, (3, 7)),      # several x chunks per token tile
                                      (1500, 3000, (5,)),      # large m: one token per CTA
                                      (33, 1, (2, 0)),         # empty leading dim
                                      (7, 0, (4,))])           # no bottleneck at all
def test_cuda_kernel_edge_shapes(D, m, lead, dtype):
    _require_extension()
    gen = torch.Generator(device="cuda").manual_seed(7)
    for residual in (True, False):
        args = _inputs(None, D, m, dtype, residual, gen, lead=lead)
        _check(args, 3, dtype, f"{dtype} D={D} m={m} lead={lead} res={residual}")


@gpu
def test_cuda_kernel_non_contiguous_and_errors():
    _require_extension()
    gen = torch.Generator(device="cuda").manual_seed(3)
    D, m = 96, 10
    x, res, wd, bd, wu, bu = _inputs(50, D, m, torch.float32, True, gen)
    xt = torch.randn(D, 50, device="cuda", generator=gen).t()  # non-contiguous view
    _check((xt, res, wd.t().contiguous().t(), bd, wu, bu), 1, torch.float32, "non-contiguous")
    with pytest.raises(RuntimeError, match="w_up"):
        torch.ops.kadapt.bottleneck_adapter_fwd(x, res, wd, bd, wu.half(), bu, 0)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.kadapt.bottleneck_adapter_fwd(x, res[:-1], wd, bd, wu, bu, 0)
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.kadapt.bottleneck_adapter_fwd(x, res, wd, bd, wu, bu, 9)


@gpu
def test_cuda_opcheck():
    _require_extension()
    gen = torch.Generator(device="cuda").manual_seed(5)
    args = _inputs(9, 64, 8, torch.float32, True, gen)
    torch.library.opcheck(torch.ops.kadapt.bottleneck_adapter_fwd.default, (*args, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
