"""Backend selection: which implementation runs a fused op.

``auto`` picks per call, on CUDA tensors, the fused backends in the op's own order (``resolve``'s
``order``: the fused adapter and the inducer attention try Triton first, measured faster on a GPU; the PHM
ops keep the default, the CUDA extension first), skipping one that cannot take the inputs; on CPU tensors,
the reference. A forced backend is honoured or refused,
never swapped for another one.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
logger = logging.getLogger("kadapt")

_backend: str | None = None


def _validate(name: str, field: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{field}={name!r} is not a backend; allowed values: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Force the backend of every fused op: "auto" | "reference" | "triton" | "cuda"."""
    global _backend
    _backend = _validate(name, "backend")


def get_backend() -> str:
    """The backend in force: set_backend's value, else $KADAPT_BACKEND, else "auto"."""
    if _backend is not None:
        return _backend
    return _validate(os.environ.get("KADAPT_BACKEND", "auto"), "KADAPT_BACKEND")


# The three probes below run while torch.compile traces an op's dispatch: Dynamo calls them once
# and treats the result as a constant (torch 2.11's Dynamo refuses to trace importlib's find_spec).
@torch.compiler.assume_constant_result
def triton_importable() -> bool:
    return _triton_spec_found()


@functools.cache
def _triton_spec_found() -> bool:
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def cuda_extension_built() -> bool:
    return _cuda_extension_built()


@functools.cache
def _cuda_extension_built() -> bool:
    """Whether kadapt._C loads with its ops (checked once per process: it is on every op call)."""
    from kadapt import _extension

    return _extension.is_built()


def available_backends() -> list[str]:
    """Backends that can run on this machine, in preference order."""
    out = []
    if cuda_extension_built() and torch.cuda.is_available():
        out.append("cuda")
    if triton_importable() and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    out.append("reference")
    return out


def triton_reason(x: torch.Tensor, forced: bool) -> str | None:
    """None if Triton can run on x's device, else why not. Under ``auto`` Triton runs on CUDA
    tensors only; a forced "triton" also runs CPU tensors in the interpreter (TRITON_INTERPRET=1)."""
    if not triton_importable():
        return "triton is not installed"
    if x.is_cuda:
        return None
    if forced and triton_interpret() and x.device.type == "cpu":
        return None
    return ("inputs are not CUDA tensors" if not forced else
            "inputs are not CUDA tensors (CPU tensors run in Triton's interpreter only with TRITON_INTERPRET=1 "
            "set before kadapt's Triton kernels are first imported)")


def cuda_reason(x: torch.Tensor) -> str | None:
    """None if the CUDA extension can run on x's device, else why not."""
    if not x.is_cuda:
        return "inputs are not CUDA tensors"
    if not cuda_extension_built():
        return "the CUDA extension kadapt._C was not built (see `python -m kadapt info`)"
    return None


def resolve(op: str, x: torch.Tensor, cuda_unsupported: str | None = None,
            triton_unsupported: str | None = None, order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The backend that runs ``op`` on x: "reference", "triton" or "cuda".

    ``*_unsupported`` say why a kernel cannot take these inputs (dtype, shape), or None. A forced
    backend that cannot run raises RuntimeError naming the reason; ``auto`` goes down ``order``
    (the op's fused backends, fastest measured first), then the reference, and never changes the
    function computed.
    """
    backend = get_backend()
    if backend == "reference":
        return "reference"
    forced = backend != "auto"
    reasons = {
        "cuda": cuda_reason(x) or cuda_unsupported,
        "triton": triton_reason(x, forced and backend == "triton") or triton_unsupported,
    }
    if forced:
        if reasons[backend] is not None:
            raise RuntimeError(f"backend {backend!r} is forced but cannot run {op}: {reasons[backend]}; "
                               f"use kadapt.set_backend('auto') or 'reference'")
        return backend
    for name in order:
        if reasons[name] is None:
            return name
    return "reference"
