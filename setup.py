"""Build script for kadapt.

Metadata lives in pyproject.toml; this file only decides whether to compile the CUDA extension
``kadapt._C`` (csrc/) and writes ``kadapt/_build_info.json`` into the built package.

The extension is compiled with nvcc whenever the installed torch is a CUDA build and a CUDA toolkit
is found; otherwise (CPU torch, no nvcc, or KADAPT_NO_CUDA=1) a pure-Python package is installed.
No GPU is needed to build. Install with ``pip install --no-build-isolation .`` (with build
isolation the build cannot import the installed torch, and the package is built without ``_C``).

Environment:
  KADAPT_NO_CUDA=1          skip the extension
  CUDA_HOME / CUDA_PATH     the toolkit (else /usr/local/cuda, else derived from nvcc on PATH)
  TORCH_CUDA_ARCH_LIST      target archs, default "8.0;9.0" (A100, H100/H200)
  MAX_JOBS                  parallel compile jobs, default: the CPUs available (at most 8)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
CSRC = ["csrc/ops.cpp", "csrc/fused_adapter.cu", "csrc/inducer_attention.cu", "csrc/fastfood.cu"]
_UNSET = object()


def _torch_cuda_version():
    """(importable, torch.__version__, torch.version.cuda) without failing."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure means "no torch here"
        return False, None, None
    return True, torch.__version__, torch.version.cuda


def _is_toolkit(root: str | None, exists=os.path.exists) -> bool:
    return bool(root) and exists(os.path.join(root, "bin", "nvcc")) and exists(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def _find_cuda_home(env, which=shutil.which, exists=os.path.exists, realpath=os.path.realpath,
                    read_text=None) -> tuple[str | None, str]:
    """Locate the CUDA toolkit: (root or None, how it was found / why not).

    Order: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then nvcc on PATH. nvcc on PATH may be a
    wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``): its realpath is the script
    itself, whose grandparent (/usr/local) is no toolkit; then the script is read for the real
    path.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = env.get(var)
        if root:
            if _is_toolkit(root, exists):
                return root, f"${var}"
            return None, f"${var}={root} has no bin/nvcc and include/cuda_runtime.h"
    if _is_toolkit("/usr/local/cuda", exists):
        return "/usr/local/cuda", "/usr/local/cuda"
    nvcc = which("nvcc", path=env.get("PATH"))
    if not nvcc:
        return None, "no CUDA toolkit: CUDA_HOME unset, no /usr/local/cuda, no nvcc on PATH"
    nvcc = realpath(nvcc)
    root = os.path.dirname(os.path.dirname(nvcc))
    if _is_toolkit(root, exists):
        return root, f"nvcc on PATH ({nvcc})"
    try:  # wrapper script: look for an absolute .../bin/nvcc in it
        text = read_text(nvcc) if read_text else open(nvcc, "rb").read(65536).decode("utf-8", "replace")
    except OSError:
        text = ""
    for match in re.finditer(r"(/[^\s\"']+)/bin/nvcc\b", text):
        if _is_toolkit(match.group(1), exists):
            return match.group(1), f"nvcc wrapper {nvcc}"
    return None, f"nvcc on PATH ({nvcc}) is not inside a CUDA toolkit; set CUDA_HOME"


def _cuda_build_decision(env, torch_info=_UNSET, **find_kwargs) -> tuple[bool, str]:
    """Whether to compile kadapt._C, and why (or why not).

    ``env`` is an os.environ-like mapping; ``torch_info`` is (importable, version, cuda_version)
    (default: the torch importable here); ``find_kwargs`` go to _find_cuda_home (tests fake the
    file system with them).
    """
    if env.get("KADAPT_NO_CUDA", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "KADAPT_NO_CUDA is set"
    importable, torch_version, torch_cuda = _torch_cuda_version() if torch_info is _UNSET else torch_info
    if not importable:
        return False, ("torch is not importable at build time (install torch first and build with "
                       "pip install --no-build-isolation)")
    if not torch_cuda:
        return False, f"torch {torch_version} is a CPU-only build (torch.version.cuda is None)"
    root, how = _find_cuda_home(env, **find_kwargs)
    if root is None:
        return False, how
    return True, f"torch {torch_version} (CUDA {torch_cuda}), CUDA_HOME={root} from {how}"


def _arch_list(spec: str) -> list[str]:
    return [a for a in re.split(r"[;\s,]+", spec.strip()) if a]


def _default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _nvcc_version(cuda_home: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _configure():
    """Returns (ext_modules, cmdclass, build_info)."""
    build, reason = _cuda_build_decision(os.environ)
    _, torch_version, torch_cuda = _torch_cuda_version()
    info = {
        "cuda_extension": False,
        "archs": [],
        "torch": torch_version,
        "torch_cuda": torch_cuda,
        "cuda": None,
        "nvcc": None,
        "reason": reason,
    }
    if not build:
        print(f"kadapt: building without the CUDA extension: {reason}", file=sys.stderr)
        return [], {}, info

    cuda_home, _ = _find_cuda_home(os.environ)
    # torch.utils.cpp_extension reads these at import time: set them first. CUDA_HOME must be the
    # real toolkit (torch otherwise guesses /usr/local from a wrapper nvcc and the link fails with
    # "cannot find -lcudart"); with no GPU and no TORCH_CUDA_ARCH_LIST torch's build crashes.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include_dirs = [os.path.join(HERE, "csrc")]
    # Headers the local toolkit may lack (cuBLAS/cuSPARSE, pulled in by ATen/cuda headers) ship in
    # torch's nvidia wheels. Appended after the toolkit's own include dir by -isystem semantics.
    extra_sys = []
    for sub in ("cu13", "cu12"):
        d = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", sub, "include")
        if os.path.isdir(d):
            extra_sys.append(d)
    common = ["-O3"]
    ext = CUDAExtension(
        name="kadapt._C",
        sources=CSRC,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": common + [f"-idirafter{d}" for d in extra_sys],
            # No --use_fast_math: it swaps tanhf/erff/expf for approximate intrinsics and flushes
            # denormals, so the fused kernels would no longer match the fp32 reference to ~1e-6
            # (the tests compare kernel and reference with tight tolerances).
            "nvcc": common + ["-lineinfo"]
                    + [f"-Xcompiler=-idirafter{d}" for d in extra_sys],
        },
    )
    info.update(
        cuda_extension=True,
        archs=_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"]),
        cuda=_nvcc_version(cuda_home) or torch_cuda,
        nvcc=os.path.join(cuda_home, "bin", "nvcc"),
        cuda_home=cuda_home,
        reason=None,
    )
    print(f"kadapt: building kadapt._C for archs {info['archs']} with MAX_JOBS="
          f"{os.environ['MAX_JOBS']}: {reason}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, info


def _build_py_with_info(info):
    class BuildPyWithInfo(build_py):
        """build_py that also writes kadapt/_build_info.json (into the source tree when editable)."""

        def run(self):
            super().run()
            target = HERE if getattr(self, "editable_mode", False) else self.build_lib
            path = os.path.join(target, "kadapt", "_build_info.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(info, f, indent=2, sort_keys=True)
                f.write("\n")

    return BuildPyWithInfo


def main():
    ext_modules, cmdclass, info = _configure()
    cmdclass["build_py"] = _build_py_with_info(info)
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":
    main()
