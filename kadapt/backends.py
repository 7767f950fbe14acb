"""Backend selection: which implementation runs a fused op.

``auto`` picks per call: the CUDA extension if it was built and the tensors are on a CUDA device,
else Triton on a CUDA device, else the reference. A forced backend is honoured or refused, never
swapped for another one.
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


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def cuda_extension_built() -> bool:
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
