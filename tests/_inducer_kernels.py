"""Shared helpers of the Triton inducer-kernel tests (test_inducer_dropout.py, test_inducer_bias.py).

Importing this module skips the importing test module when the kernels cannot run (no triton, or no GPU
and no interpreter). On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET); ``poisoned`` NaN-fills every float buffer the host functions allocate.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from kadapt import backends

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NEG_INF = float("-inf")

if not backends.triton_importable():
    pytest.skip("triton is not installed", allow_module_level=True)
if not GPU and not backends.triton_interpret():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set by tests/conftest.py)", allow_module_level=True)

K = importlib.import_module("kadapt.ops.triton.inducer_attention")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """NaN-fill every float buffer the host functions allocate (records the shapes)."""
    calls: list[tuple] = []
    if hasattr(K, "_empty"):
        def nan_empty(shape, *, device, dtype):
            calls.append(tuple(shape))
            return torch.full(shape, float("nan"), device=device, dtype=dtype)

        monkeypatch.setattr(K, "_empty", nan_empty)
    return calls


def set_tiles(monkeypatch, tiles):
    """Interpreter tiles (BM, BN); on a GPU the real tiles are kept."""
    if tiles is not None and not GPU:
        monkeypatch.setattr(K, "_tiles", lambda d, on_gpu: (*tiles, 4))


def visible(B, Tq, Tk, causal, kpm):
    """(B, 1, Tq, Tk) bool: query i may see key j through the causal and key-padding masks."""
    vis = torch.ones((B, 1, Tq, Tk), dtype=torch.bool)
    if causal:
        vis = vis & (torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq))
    if kpm is not None:
        vis = vis & kpm.bool()[:, None, None, :]
    return vis


def assert_close(got, ref, what, rtol=1e-4, atol=1e-5):
    """max |got − ref| ≤ rtol·max|ref| + atol; −inf entries must coincide; no NaN (unwritten output)."""
    got = got.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten output?)"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf), f"{what}: infinite entries differ"
    got, ref = torch.where(inf, 0, got), torch.where(inf, 0, ref)
    if got.numel() == 0:
        return
    err = (got - ref).abs().max().item()
    allowed = rtol * ref.abs().max().item() + atol
    assert err <= allowed, f"{what}: max error {err:.3g} > {allowed:.3g}"
