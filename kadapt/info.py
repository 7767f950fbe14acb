"""``python -m kadapt info``: versions, the CUDA extension build and the backends usable here."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _kadapt_line() -> str:
    import kadapt

    here = os.path.realpath(os.path.dirname(os.path.abspath(kadapt.__file__)))
    line = f"{getattr(kadapt, '__version__', None) or _version('kadapt')} ({here})"
    # Running from the repository root with `python -m ...` imports the source tree (no _C) ahead
    # of the installed package: say so.
    for entry in sys.path:
        other = os.path.realpath(os.path.join(entry or os.getcwd(), "kadapt"))
        if other != here and os.path.isfile(os.path.join(other, "_build_info.json")):
            line += (f"\n              note: imported from the source tree, shadowing the installed package in "
                     f"{other}; run from outside the repository (or `.venv/bin/pytest`, not `python -m pytest`)")
            break
    return line


def _extension_lines() -> list[str]:
    from kadapt import _extension

    info = _extension.build_info()
    if not info.get("cuda_extension"):
        return [f"kadapt._C:    not built: {info.get('reason') or 'no reason recorded'}"]
    archs = ", ".join(info.get("archs") or []) or "?"
    built = (f"built for archs {archs} (torch {info.get('torch')}, CUDA {info.get('cuda')}, "
             f"nvcc {info.get('nvcc')})")
    if _extension.is_built():
        return [f"kadapt._C:    {built}"]
    return [f"kadapt._C:    {built}, but it does not load: {_extension.import_error()}"]


def _device_lines(torch) -> list[str]:
    try:
        available = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        return [f"CUDA device:  none ({exc!r})"]
    if not available:
        return ["CUDA device:  none visible"]
    lines = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"CUDA device:  {i}: {torch.cuda.get_device_name(i)} (capability {major}.{minor})")
    return lines


def _tuning_line() -> str:
    """Which table of Triton launch configurations (kadapt/ops/tuning.py) is in force on CUDA device 0."""
    try:
        from kadapt.ops import tuning

        return tuning.status()
    except Exception as exc:  # noqa: BLE001 - info reports, never fails
        return f"unknown ({exc!r})"


def info() -> str:
    """A human-readable report of the kadapt installation and what can run on this machine."""
    import torch

    from kadapt.backends import available_backends, get_backend

    lines = [
        f"kadapt:       {_kadapt_line()}",
        f"python:       {platform.python_version()} ({sys.executable})",
        f"torch:        {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
        f"triton:       {_version('triton')}",
        f"transformers: {_version('transformers')}",
    ]
    lines += _extension_lines()
    lines += _device_lines(torch)
    try:
        backend = get_backend()
    except ValueError as exc:
        backend = f"invalid ({exc})"
    env = os.environ.get("KADAPT_BACKEND")
    lines.append(f"backend:      {backend}" + (f" (KADAPT_BACKEND={env})" if env else ""))
    lines.append(f"available:    {', '.join(available_backends())}")
    lines.append(f"tuning:       {_tuning_line()}")
    return "\n".join(lines)
