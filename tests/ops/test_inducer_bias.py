"""Additive logit bias (T5's relative position bias) inside the Triton inducer-attention kernels
(kadapt/ops/triton/inducer_attention.py: the ``bias`` keyword of inducer_attention_fwd / _bwd).

Truth: the float64 reference below, the explicit formula with the bias on the real logits only,
    s_ij = c⟨q_i, k_j⟩ + bias_ij over the visible keys (causal, key padding; a −inf bias entry hides the key),
    P_ij = exp(s_ij − LSE_i), O_i = Σ_j P_ij z_ij v_j (z: an explicit dropout multiplier, 1 without dropout),
    s0_i = c⟨q_i, q_i + φ(q_i)⟩ (no bias), w_i = σ(s0_i − LSE_i); a row without any visible key: O = 0, LSE = −inf,
    w = 1,
and its autograd gradients (dq incl. the inducer-logit path, dk, dv, ∂L/∂s0) under random dO, dLSE, dw. The bias
is a constant: the kernels return no gradient for it.

1. ≥ 30 random configurations (B ∈ {1, 2}, H ∈ {1, 3}, d ∈ {16, 32, 40}, Tq, Tk ∈ {1, 5, 17, 33, 70}, causal incl.
   Tq ≠ Tk, int8 key padding incl. a fully padded batch row, with/without key MLP, bias layouts (1, H, Tq, Tk),
   (B, 1, Tq, Tk), (B, H, Tq, Tk), T5's permuted (1, H, Tq, Tk) view of a (Tq, Tk, H) table and a strided
   (B, H, Tq, Tk) view, bias dtypes fp32, fp64, fp16, bf16, several interpreter tiles): forward and backward.
2. bias=None is the old call bit for bit; an all-zero bias (any broadcast shape) equals no bias.
3. −inf bias entries mask: equal to the same logits masked through the key padding mask; rows whose every key
   is −inf are fully masked rows; scattered −inf entries vs the reference.
4. bias with attention-probability dropout vs the reference with the mask of dropout_keep_mask.
5. Broadcast over the query or key dim, zero-stride expanded views, bad bias arguments.

Without a GPU the kernels run in Triton's interpreter in fp32 (tests/conftest.py sets TRITON_INTERPRET); every
output buffer is NaN-poisoned through the module's ``_empty`` hook.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from _inducer_kernels import (  # noqa: F401
    DEVICE, GPU, LENGTHS, NEG_INF, K, assert_close, draw_shape, poisoned, reference_grads, require_kernels,
    set_tiles, visible)

require_kernels()


def run_fused(q, k, v, mlp, kpm, ups, scale, causal, **kw):
    """((O, LSE, w), (dq, dk, dv, ds0)) of the Triton forward and backward with the same keywords."""
    mlp_args = mlp if mlp is not None else (None,) * 4
    o, lse, w = K.inducer_attention_fwd(q, k, v, *mlp_args, kpm, scale, causal, **kw)
    grads = K.inducer_attention_bwd(q, k, v, *mlp_args, kpm, o, lse, w, *ups, scale, causal, **kw)
    return (o, lse, w), grads


def check_against_reference(fused, ref, label):
    (o, lse, w), (dq, dk, dv, ds0) = fused
    (o64, lse64, w64), (dq64, dk64, dv64, ds064) = ref
    for name, got, want in (("O", o, o64), ("LSE", lse, lse64), ("w", w, w64), ("dq", dq, dq64), ("dk", dk, dk64),
                            ("dv", dv, dv64), ("ds0", ds0, ds064)):
        assert_close(got, want, f"{name} {label}")


# ---------------------------------------------------------------------------------------------
# 1. random configurations

LAYOUTS = ["1H", "B1", "BH", "t5", "strided"]
BIAS_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Config:
    index: int
    B: int
    H: int
    Tq: int
    Tk: int
    d: int
    m_k: int            # 0: no key MLP
    causal: bool
    padding: str        # none | random | full_row
    layout: str         # LAYOUTS
    bias_dtype: torch.dtype
    tiles: tuple        # interpreter (BM, BN)


def draw_config(index: int) -> Config:
    """causal (period 2), padding (period 3) and bias layout (period 5) cycle, so every combination of the three
    occurs; key MLP and bias dtype cycle with index div 2 and index div 3; lengths, sizes and tiles are drawn."""
    rng = random.Random(104729 * index + 3)
    padding = ["none", "random", "full_row"][index % 3]
    B, H, Tq, Tk = draw_shape(rng, padding)
    return Config(index=index, B=B, H=H, Tq=Tq, Tk=Tk, d=rng.choice([16, 32, 40]),
                  m_k=rng.choice([3, 5]) if index // 2 % 2 else 0, causal=index % 2 == 0, padding=padding,
                  layout=LAYOUTS[index % len(LAYOUTS)], bias_dtype=BIAS_DTYPES[index // 3 % len(BIAS_DTYPES)],
                  tiles=rng.choice([(16, 16), (16, 16), (32, 16), (16, 32)]))


CONFIGS = [draw_config(i) for i in range(33)]


def make_bias(layout, B, H, Tq, Tk, dtype, gen, scale=2.0):
    """A random bias of the layout (a view of fresh storage, never copied to (B, H, Tq, Tk))."""
    def r(*shape):
        return (scale * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)

    if layout == "1H":
        return r(1, H, Tq, Tk)
    if layout == "B1":
        return r(B, 1, Tq, Tk)
    if layout == "BH":
        return r(B, H, Tq, Tk)
    if layout == "t5":  # T5: values[relative_position_bucket] (Tq, Tk, H) .permute([2, 0, 1]).unsqueeze(0)
        return r(Tq, Tk, H).permute(2, 0, 1).unsqueeze(0)
    if layout == "strided":  # a (B, H, Tq, Tk) view of an (H, B, Tk, 2·Tq) tensor: no stride is the contiguous one
        return r(H, B, Tk, 2 * Tq).permute(1, 0, 3, 2)[:, :, ::2, :]
    raise ValueError(layout)


def make_case(cfg: Config):
    gen = torch.Generator().manual_seed(cfg.index)
    r = lambda *shape, s=1.0: (s * torch.randn(shape, generator=gen)).to(DEVICE)  # noqa: E731
    B, H, d, m = cfg.B, cfg.H, cfg.d, cfg.m_k
    q, k, v = r(B, H, cfg.Tq, d), r(B, H, cfg.Tk, d), r(B, H, cfg.Tk, d)
    mlp = (r(H, d, m, s=d ** -0.5), r(H, m, s=0.5), r(H, m, d, s=0.5), r(H, d, s=0.3)) if m else None
    kpm = None
    if cfg.padding != "none":
        kpm = torch.rand(B, cfg.Tk, generator=gen) < 0.7
        if cfg.padding == "full_row":
            kpm[cfg.index % B] = False
        kpm = kpm.to(torch.int8).to(DEVICE)
    bias = make_bias(cfg.layout, B, H, cfg.Tq, cfg.Tk, cfg.bias_dtype, gen)
    ups = (r(B, H, cfg.Tq, d), r(B, H, cfg.Tq), r(B, H, cfg.Tq))
    return q, k, v, mlp, kpm, bias, ups


def test_config_coverage():
    c = CONFIGS
    assert len(c) >= 30
    assert {x.B for x in c} == {1, 2} and {x.H for x in c} == {1, 3} and {x.d for x in c} == {16, 32, 40}
    assert {x.padding for x in c} == {"none", "random", "full_row"}
    assert {x.m_k > 0 for x in c} == {True, False} and {x.causal for x in c} == {True, False}
    assert sum(x.causal and x.Tq < x.Tk for x in c) >= 3 and sum(x.causal and x.Tq > x.Tk for x in c) >= 3
    assert {x.Tq for x in c} == set(LENGTHS) and {x.Tk for x in c} == set(LENGTHS)
    assert sum(x.Tq > 32 and x.Tk > 32 for x in c) >= 3  # several tiles in both loops
    assert {x.layout for x in c} == set(LAYOUTS) and {x.bias_dtype for x in c} == set(BIAS_DTYPES)
    assert {(x.causal, x.padding, x.layout) for x in c[:30]} == {
        (cz, p, lay) for cz in (True, False) for p in ("none", "random", "full_row") for lay in LAYOUTS}
    assert len({x.tiles for x in c}) == 3 and sum(x.B * x.H > 1 for x in c) >= 10
    # the broadcast layouts really broadcast somewhere
    assert any(x.layout in ("1H", "t5") and x.B > 1 for x in c) and any(x.layout == "B1" and x.H > 1 for x in c)


def test_bias_layouts_are_views():
    gen = torch.Generator().manual_seed(0)
    t5 = make_bias("t5", 2, 3, 5, 7, torch.float32, gen)
    assert t5.shape == (1, 3, 5, 7) and not t5.is_contiguous() and t5.stride() == (3, 1, 21, 3)
    st = make_bias("strided", 2, 3, 5, 7, torch.float32, gen)
    assert st.shape == (2, 3, 5, 7) and not st.is_contiguous() and st.stride() == (70, 140, 2, 10)


@pytest.mark.parametrize("chunk", range(3))
def test_random_configs_match_reference(chunk, monkeypatch, poisoned):
    for cfg in CONFIGS[chunk::3]:
        set_tiles(monkeypatch, cfg.tiles)
        q, k, v, mlp, kpm, bias, ups = make_case(cfg)
        scale = cfg.d ** -0.5
        del poisoned[:]
        fused = run_fused(q, k, v, mlp, kpm, ups, scale, cfg.causal, bias=bias)
        assert len(poisoned) >= 8, "the outputs did not come from the poisoned allocator"
        ref = reference_grads(q, k, v, mlp, kpm, scale, cfg.causal, bias, ups)
        check_against_reference(fused, ref, str(cfg))
        # the bias matters: without it the reference is another one (unless the row sees ≤ 1 key everywhere)
        (o_nb, lse_nb, _), _ = reference_grads(q, k, v, mlp, kpm, scale, cfg.causal, None, ups)
        if cfg.Tk > 1 and torch.isfinite(lse_nb).any():
            assert not torch.allclose(torch.where(torch.isfinite(lse_nb), lse_nb, 0),
                                      torch.where(torch.isfinite(ref[0][1]), ref[0][1], 0), atol=1e-3)
        (o, lse, w), (dq, dk, dv, ds0) = fused
        if cfg.padding == "full_row":  # the fully padded batch row: O = 0, LSE = −inf, w = 1, no k/v gradient
            row = cfg.index % cfg.B
            assert not o[row].any() and torch.isneginf(lse[row]).all() and (w[row] == 1).all()
            assert not dk[row].any() and not dv[row].any()


# ---------------------------------------------------------------------------------------------
# 2. bias=None is the old call; a zero bias is no bias

def _case(B=2, H=3, Tq=21, Tk=34, d=40, m=4, seed=5, full_row=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (s * torch.randn(shape, generator=gen)).to(DEVICE)  # noqa: E731
    q, k, v = r(B, H, Tq, d), r(B, H, Tk, d), r(B, H, Tk, d)
    mlp = (r(H, d, m, s=d ** -0.5), r(H, m, s=0.5), r(H, m, d, s=0.5), r(H, d, s=0.3)) if m else None
    kpm = (torch.rand(B, Tk, generator=gen) < 0.7)
    if full_row:
        kpm[B - 1] = False
    kpm = kpm.to(torch.int8).to(DEVICE)
    ups = (r(B, H, Tq, d), r(B, H, Tq), r(B, H, Tq))
    return q, k, v, mlp, kpm, ups, gen


def _assert_all_equal(a, b, what):
    for x, y, name in zip((*a[0], *a[1]), (*b[0], *b[1]), ("O", "LSE", "w", "dq", "dk", "dv", "ds0")):
        if GPU:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, equal_nan=False, msg=f"{name} {what}")
        else:
            assert torch.equal(x, y), f"{name} {what}"


@pytest.mark.parametrize("with_mlp", [False, True])
def test_bias_none_is_the_old_call_and_zero_bias_is_no_bias(with_mlp, monkeypatch):
    set_tiles(monkeypatch, (16, 32))
    q, k, v, mlp, kpm, ups, gen = _case(m=4 if with_mlp else 0)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    for causal, drop in ((True, {}), (False, {"dropout_p": 0.3, "seed": 77})):
        old = run_fused(q, k, v, mlp, kpm, ups, 0.2, causal, **drop)
        new = run_fused(q, k, v, mlp, kpm, ups, 0.2, causal, bias=None, **drop)
        for a, b in zip((*old[0], *old[1]), (*new[0], *new[1])):
            assert torch.equal(a, b)  # the same kernels (HAS_BIAS = False)
        shapes = [((B, H, Tq, Tk), torch.float32), ((1, 1, 1, 1), torch.float16)] if causal else \
            [((1, H, Tq, Tk), torch.bfloat16)]
        for shape, dtype in shapes:
            zero = torch.zeros(shape, dtype=dtype, device=DEVICE)
            _assert_all_equal(old, run_fused(q, k, v, mlp, kpm, ups, 0.2, causal, bias=zero, **drop),
                              f"zero bias {shape} {dtype} causal={causal} {drop}")


def test_bias_gets_no_gradient_and_is_not_modified():
    q, k, v, mlp, kpm, ups, gen = _case(B=1, H=2, Tq=9, Tk=12, d=16, m=0, full_row=False)
    bias = torch.randn(1, 2, 9, 12, generator=gen).to(DEVICE).requires_grad_()
    before = bias.detach().clone()
    (o, lse, w), grads = run_fused(q, k, v, None, kpm, ups, 0.25, False, bias=bias)
    assert len(grads) == 4 and bias.grad is None and torch.equal(bias.detach(), before)
    ref = reference_grads(q, k, v, None, kpm, 0.25, False, bias, ups)
    check_against_reference(((o, lse, w), grads), ref, "requires_grad bias")


# ---------------------------------------------------------------------------------------------
# 3. −inf entries are masks

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mlp", [False, True])
def test_neg_inf_bias_equals_key_padding(causal, with_mlp, monkeypatch):
    """−inf on the padded keys with no kpm == the same finite bias with the kpm (incl. a fully padded batch row)."""
    set_tiles(monkeypatch, (16, 16))
    q, k, v, mlp, kpm, ups, gen = _case(B=2, H=3, Tq=19, Tk=37, d=32, m=3 if with_mlp else 0, seed=11)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    bias = (2 * torch.randn(B, 1, Tq, Tk, generator=gen)).to(DEVICE)
    masked = bias.masked_fill(kpm[:, None, None, :] == 0, NEG_INF)
    via_kpm = run_fused(q, k, v, mlp, kpm, ups, 0.3, causal, bias=bias)
    via_bias = run_fused(q, k, v, mlp, None, ups, 0.3, causal, bias=masked)
    for x, y, name in zip((*via_kpm[0], *via_kpm[1]), (*via_bias[0], *via_bias[1]),
                          ("O", "LSE", "w", "dq", "dk", "dv", "ds0")):
        assert_close(y, x, f"{name} (−inf bias vs kpm)", rtol=1e-6, atol=1e-6)
    (o, lse, w), (dq, dk, dv, ds0) = via_bias
    assert not o[B - 1].any() and torch.isneginf(lse[B - 1]).all() and (w[B - 1] == 1).all()
    assert not dk[B - 1].any() and not dv[B - 1].any() and not ds0[B - 1].any()
    check_against_reference(via_bias, reference_grads(q, k, v, mlp, None, 0.3, causal, masked, ups), "−inf bias")


def test_neg_inf_rows_and_scattered_entries(monkeypatch):
    """Rows whose every key is −inf (per head and query: not expressible by a kpm) are fully masked rows; scattered
    −inf entries hide single keys; with causal, key padding and Tq > Tk (rows with no key at all) on top."""
    set_tiles(monkeypatch, (16, 16))
    q, k, v, mlp, kpm, ups, gen = _case(B=2, H=3, Tq=40, Tk=23, d=16, m=5, seed=12, full_row=False)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    bias = (2 * torch.randn(B, H, Tq, Tk, generator=gen)).double()
    bias[torch.rand(B, H, Tq, Tk, generator=gen) < 0.3] = NEG_INF
    dead = [(0, 1, 30), (1, 2, 39), (1, 0, 20), (0, 0, 25)]
    for b, h, i in dead:
        bias[b, h, i] = NEG_INF
    bias = bias.to(DEVICE)
    for causal in (False, True):
        fused = run_fused(q, k, v, mlp, kpm, ups, 0.25, causal, bias=bias)
        check_against_reference(fused, reference_grads(q, k, v, mlp, kpm, 0.25, causal, bias, ups),
                                f"scattered −inf causal={causal}")
        (o, lse, w), (dq, dk, dv, ds0) = fused
        for b, h, i in dead:
            assert not o[b, h, i].any() and torch.isneginf(lse[b, h, i]) and w[b, h, i] == 1
            assert ds0[b, h, i] == 0 and not dq[b, h, i].any()
        assert torch.isfinite(lse).sum() > B * H * Tq // 3  # most rows still see keys


# ---------------------------------------------------------------------------------------------
# 4. bias and dropout

@pytest.mark.parametrize("p, causal, layout", [(0.1, True, "t5"), (0.5, False, "B1"), (0.3, True, "strided")])
def test_bias_with_dropout_matches_explicit_mask(p, causal, layout, monkeypatch):
    set_tiles(monkeypatch, (16, 32))
    q, k, v, mlp, kpm, ups, gen = _case(B=2, H=3, Tq=26, Tk=35, d=32, m=3, seed=int(p * 100))
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    bias = make_bias(layout, B, H, Tq, Tk, torch.float32, gen)
    seed = 2 ** 33 + int(p * 1000)
    fused = run_fused(q, k, v, mlp, kpm, ups, 0.3, causal, bias=bias, dropout_p=p, seed=seed)
    z = K.dropout_keep_mask(seed, B, H, Tq, Tk, p, DEVICE).double() / (1 - p)
    check_against_reference(fused, reference_grads(q, k, v, mlp, kpm, 0.3, causal, bias, ups, z=z),
                            f"dropout p={p} {layout}")
    # LSE and w are those of the undropped biased softmax
    undropped = K.inducer_attention_fwd(q, k, v, *mlp, kpm, 0.3, causal, bias=bias)
    assert torch.equal(fused[0][1], undropped[1]) and torch.equal(fused[0][2], undropped[2])


# ---------------------------------------------------------------------------------------------
# 5. broadcast over the sequence dims, expanded views, bad arguments

@pytest.mark.parametrize("shape", ["B11k", "1Hq1", "expanded"])
def test_other_broadcasts(shape, monkeypatch):
    set_tiles(monkeypatch, (16, 16))
    q, k, v, mlp, kpm, ups, gen = _case(B=2, H=3, Tq=18, Tk=20, d=16, m=0, seed=13)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if shape == "B11k":  # e.g. an additive padding mask
        bias = torch.randn(B, 1, 1, Tk, generator=gen).to(DEVICE)
    elif shape == "1Hq1":
        bias = torch.randn(1, H, Tq, 1, generator=gen).to(DEVICE)
    else:  # zero batch stride of a full-size view
        bias = torch.randn(1, H, Tq, Tk, generator=gen).to(DEVICE).expand(B, H, Tq, Tk)
        assert bias.stride(0) == 0
    fused = run_fused(q, k, v, mlp, kpm, ups, 0.25, True, bias=bias)
    check_against_reference(fused, reference_grads(q, k, v, mlp, kpm, 0.25, True, bias, ups), shape)


def test_bad_bias_raises():
    q = torch.randn(2, 3, 5, 16, device=DEVICE)
    k = torch.randn(2, 3, 7, 16, device=DEVICE)
    args = (q, k, k, None, None, None, None, None, 0.25, False)
    for bad, match in [(torch.zeros(2, 3, 5, 6, device=DEVICE), "shape"),
                       (torch.zeros(3, 3, 5, 7, device=DEVICE), "shape"),
                       (torch.zeros(3, 5, 7, device=DEVICE), "shape"),
                       (torch.zeros(2, 3, 5, 7, device=DEVICE, dtype=torch.int32), "floating"),
                       (torch.zeros(2, 3, 5, 7, device=DEVICE, dtype=torch.bool), "floating")]:
        with pytest.raises(ValueError, match=match):
            K.inducer_attention_fwd(*args, bias=bad)
        o, lse, w = K.inducer_attention_fwd(*args)
        with pytest.raises(ValueError, match=match):
            K.inducer_attention_bwd(*args[:8], o, lse, w, torch.ones_like(o), torch.zeros_like(lse),
                                    torch.zeros_like(w), 0.25, False, bias=bad)
