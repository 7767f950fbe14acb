"""Shared helpers of the Triton inducer-kernel tests (test_inducer_dropout.py, test_inducer_bias.py,
test_inducer_gqa.py; the NaN poisoning also serves test_inducer_attention.py).

Modules that need the kernels call ``require_kernels()`` at their top level (it skips them when the kernels
cannot run: no triton, or no GPU and no interpreter); importing this module never skips. On the CPU the
kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET); ``poisoned`` NaN-fills every
float buffer the host functions allocate.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from kadapt import backends

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NEG_INF = float("-inf")


LENGTHS = [1, 5, 17, 33, 70]  # off the tile multiples


def draw_shape(rng, padding: str) -> tuple[int, int, int, int]:
    """(B, H, Tq, Tk) of a random kernel-test configuration: a fully padded row needs B = 2, and large shapes
    drop to H = 1 (CPU time of the interpreter)."""
    B, H = rng.choice([1, 2]), rng.choice([1, 3])
    Tq, Tk = rng.choice(LENGTHS), rng.choice(LENGTHS)
    if padding == "full_row":
        B = 2
    if B * H * max(Tq, 16) * max(Tk, 16) > 3000:
        H = 1
        if padding != "full_row":
            B = rng.choice([1, 2])
    return B, H, Tq, Tk



def nan_poison(monkeypatch) -> list[tuple]:
    """Make the Triton inducer host functions allocate NaN-filled buffers; returns the list of their shapes
    (stays empty, and nothing is patched, without triton)."""
    calls: list[tuple] = []
    if not backends.triton_importable():
        return calls
    kernels = importlib.import_module("kadapt.ops.triton.inducer_attention")

    def nan_empty(shape, *, device, dtype):
        calls.append(tuple(shape))
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kernels, "_empty", nan_empty)
    return calls


def require_kernels() -> None:
    """Skip the calling test module (at its top level) when the Triton kernels cannot run here."""
    if not backends.triton_importable():
        pytest.skip("triton is not installed", allow_module_level=True)
    if not GPU and not backends.triton_interpret():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set by tests/conftest.py)", allow_module_level=True)


# The Triton kernel module (None without triton: modules using it call require_kernels first).
K = importlib.import_module("kadapt.ops.triton.inducer_attention") if backends.triton_importable() else None


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """NaN-fill every float buffer the host functions allocate (records the shapes)."""
    return nan_poison(monkeypatch)


def set_tiles(monkeypatch, tiles):
    """Interpreter tiles (BM, BN) for every attention kernel; on a GPU the real tiles are kept."""
    if tiles is not None and not GPU:
        from kadapt.ops import tuning  # here, not at the top: collection must work against an older installed kadapt

        for kernel, cfg in K.tile_overrides(*tiles).items():
            monkeypatch.setitem(tuning.OVERRIDES, kernel, cfg)


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


def reference(q, k, v, mlp, kpm, scale, causal, bias=None, z=None):
    """float64 (O, LSE, w, s0, P): the explicit formula. ``bias`` (broadcasting to (B, H, Tq, Tk)) enters the
    real logits only, −inf entries hide the key; ``z`` multiplies the probabilities in O only (None: no
    dropout); P is the undropped probability matrix. A row without a visible key: O = 0, LSE = −inf, w = 1.
    k, v may have H_kv heads dividing H (GQA): query head h uses KV head h // (H / H_kv), expanded here by
    repeat_interleave (whose gradient sums over the group)."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    s = scale * q @ k.transpose(-1, -2)
    vis = visible(B, Tq, Tk, causal, kpm)
    if bias is not None:
        vis = vis & (bias != NEG_INF)
        s = s + torch.where(bias == NEG_INF, torch.zeros((), dtype=bias.dtype), bias)
    vis = vis.expand(B, H, Tq, Tk)
    any_key = vis.any(-1)
    s = torch.where(vis, s, NEG_INF)
    s = torch.where(any_key[..., None], s, torch.zeros((), dtype=s.dtype))
    lse_safe = torch.logsumexp(s, -1)
    p = torch.exp(s - lse_safe[..., None]) * vis
    o = (p if z is None else p * z) @ v
    if mlp is None:
        phi = torch.zeros_like(q)
    else:
        A, a, Bm, b = mlp
        h = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, A) + a[:, None, :])
        phi = torch.einsum("bhtm,hmd->bhtd", h, Bm) + b[:, None, :]
    s0 = scale * (q * (q + phi)).sum(-1)
    w = torch.where(any_key, torch.sigmoid(s0 - lse_safe), torch.ones((), dtype=s0.dtype))
    lse = torch.where(any_key, lse_safe, torch.full((), NEG_INF, dtype=s.dtype))
    return o, lse, w, s0, p


def reference_grads(q, k, v, mlp, kpm, scale, causal, bias, ups, z=None):
    """float64 (O, LSE, w) and (dq, dk, dv, ∂L/∂s0) of L = ⟨dO, O⟩ + ⟨dLSE, LSE⟩ + ⟨dw, w⟩ (finite LSE);
    ``ups`` = (dO, dLSE, dw). With GQA dk, dv have k's H_kv heads."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    mlp64 = None if mlp is None else [t.detach().cpu().double() for t in mlp]
    bias64 = None if bias is None else bias.detach().cpu().double()
    z64 = None if z is None else z.detach().cpu().double()
    o, lse, w, s0, _ = reference(*leaves, mlp64, None if kpm is None else kpm.cpu(), scale, causal, bias64, z64)
    do, dlse, dw = (t.detach().cpu().double() for t in ups)
    loss = (o * do).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum() + (w * dw).sum()
    grads = torch.autograd.grad(loss, [*leaves, s0])
    return (o.detach(), lse.detach(), w.detach()), grads
