"""Attention-probability dropout inside the Triton inducer-attention kernels
(kadapt/ops/triton/inducer_attention.py: ``dropout_p`` / ``seed`` of inducer_attention_fwd / _bwd, and
``dropout_keep_mask``).

Truth: the float64 reference below with an explicit multiplicative mask z = keep / (1 − p):
    P_ij = exp(s_ij − LSE_i) over the visible keys, O_i = Σ_j P_ij z_ij v_j, LSE and w = σ(s0 − LSE) undropped,
and its autograd gradients (dq incl. the inducer-logit path, dk, dv, ∂L/∂s0) under random dO, dLSE, dw.

1. ≥ 30 random configurations (B ∈ {1, 2}, H ∈ {1, 3}, d ∈ {16, 32, 40}, Tq, Tk off the tile multiples, causal
   incl. Tq ≠ Tk, int8 key padding incl. a fully padded batch row, with/without key MLP, p ∈ {0.1, 0.5}, several
   interpreter tile shapes): mask from dropout_keep_mask, fused forward and backward vs the reference.
2. The mask of dropout_keep_mask is the one the forward applied: v = identity (v_j = e_j) gives O_ij = P_ij z_ij.
3. Mask statistics and determinism: keep rate ≈ 1 − p, seeds, heads and batch rows differ, same seed repeats,
   independence of the tile sizes and of (B, H) vs (B·H) layout and of Tq, seeds ≥ 2³¹.
4. p = 0 through the new arguments is bit-identical to the old call; p > 0 leaves LSE and w bit-identical;
   p = 1 drops everything; bad p raises.

Without a GPU the kernels run in Triton's interpreter in fp32 (tests/conftest.py sets TRITON_INTERPRET); every
output buffer is NaN-poisoned through the module's ``_empty`` hook.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from _inducer_kernels import (  # noqa: F401
    DEVICE, GPU, LENGTHS, NEG_INF, K, assert_close, draw_shape, poisoned, reference, reference_grads,
    require_kernels, set_tiles, visible)

require_kernels()


# ---------------------------------------------------------------------------------------------
# 1. random configurations vs the reference with the explicit mask

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
    p: float
    seed: int
    tiles: tuple        # interpreter (BM, BN)




def draw_config(index: int) -> Config:
    """Switches cycle (causal: index mod 2, p: index div 2 mod 2, key MLP: index div 4 mod 2, padding: index mod
    3); lengths, sizes, seed and tiles are drawn."""
    rng = random.Random(7919 * index + 11)
    padding = ["none", "random", "full_row"][index % 3]
    B, H, Tq, Tk = draw_shape(rng, padding)
    return Config(index=index, B=B, H=H, Tq=Tq, Tk=Tk, d=rng.choice([16, 32, 40]),
                  m_k=rng.choice([3, 5]) if index // 4 % 2 else 0, causal=index % 2 == 0, padding=padding,
                  p=[0.1, 0.5][index // 2 % 2], seed=rng.randrange(2 ** 40),
                  tiles=rng.choice([(16, 16), (16, 16), (32, 16), (16, 32)]))


CONFIGS = [draw_config(i) for i in range(32)]


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
    ups = (r(B, H, cfg.Tq, d), r(B, H, cfg.Tq), r(B, H, cfg.Tq))
    return q, k, v, mlp, kpm, ups


def run_fused(cfg, q, k, v, mlp, kpm, ups, scale, **drop):
    mlp_args = mlp if mlp is not None else (None,) * 4
    o, lse, w = K.inducer_attention_fwd(q, k, v, *mlp_args, kpm, scale, cfg.causal, **drop)
    grads = K.inducer_attention_bwd(q, k, v, *mlp_args, kpm, o, lse, w, *ups, scale, cfg.causal, **drop)
    return (o, lse, w), grads


def test_config_coverage():
    c = CONFIGS
    assert len(c) >= 30
    assert {x.B for x in c} == {1, 2} and {x.H for x in c} == {1, 3} and {x.d for x in c} == {16, 32, 40}
    assert {x.p for x in c} == {0.1, 0.5} and {x.padding for x in c} == {"none", "random", "full_row"}
    assert {x.m_k > 0 for x in c} == {True, False} and {x.causal for x in c} == {True, False}
    assert sum(x.causal and x.Tq < x.Tk for x in c) >= 3 and sum(x.causal and x.Tq > x.Tk for x in c) >= 3
    assert {x.Tq for x in c} == set(LENGTHS) and {x.Tk for x in c} == set(LENGTHS)
    assert sum(x.Tq > 32 and x.Tk > 32 for x in c) >= 3  # several tiles in both loops
    assert len({x.tiles for x in c}) == 3 and sum(x.B * x.H > 1 for x in c) >= 10


@pytest.mark.parametrize("chunk", range(3))
def test_random_configs_match_reference(chunk, monkeypatch, poisoned):
    for cfg in CONFIGS[chunk::3]:
        set_tiles(monkeypatch, cfg.tiles)
        q, k, v, mlp, kpm, ups = make_case(cfg)
        scale = cfg.d ** -0.5
        keep = K.dropout_keep_mask(cfg.seed, cfg.B, cfg.H, cfg.Tq, cfg.Tk, cfg.p, DEVICE)
        assert keep.dtype == torch.bool and keep.shape == (cfg.B, cfg.H, cfg.Tq, cfg.Tk)
        z = keep.double() / (1 - cfg.p)
        del poisoned[:]
        (o, lse, w), (dq, dk, dv, ds0) = run_fused(cfg, q, k, v, mlp, kpm, ups, scale,
                                                   dropout_p=cfg.p, seed=cfg.seed)
        assert len(poisoned) >= 8, "the outputs did not come from the poisoned allocator"
        (o64, lse64, w64), (dq64, dk64, dv64, ds064) = reference_grads(q, k, v, mlp, kpm, scale, cfg.causal, None,
                                                                       ups, z)
        label = str(cfg)
        assert_close(o, o64, f"O {label}")
        assert_close(lse, lse64, f"LSE {label}")
        assert_close(w, w64, f"w {label}")
        assert_close(dq, dq64, f"dq {label}")
        assert_close(dk, dk64, f"dk {label}")
        assert_close(dv, dv64, f"dv {label}")
        assert_close(ds0, ds064, f"ds0 {label}")
        if cfg.padding == "full_row":  # the fully padded batch row: O = 0, LSE = −inf, w = 1, no k/v gradient
            row = cfg.index % cfg.B
            assert not o[row].any() and torch.isneginf(lse[row]).all() and (w[row] == 1).all()
            assert not dk[row].any() and not dv[row].any()


# ---------------------------------------------------------------------------------------------
# 2. the mask of dropout_keep_mask is the one the forward applied (v = identity)

@pytest.mark.parametrize("tiles", [(16, 16), (32, 16)])
@pytest.mark.parametrize("causal, padded", [(False, False), (True, True)])
def test_forward_applies_the_returned_mask(tiles, causal, padded, monkeypatch):
    set_tiles(monkeypatch, tiles)
    B, H, Tq, Tk, d, p, seed = 2, 3, 37, 29, 32, 0.5, 2024
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, Tq, d, generator=gen).to(DEVICE)
    k = torch.randn(B, H, Tk, d, generator=gen).to(DEVICE)
    v = torch.zeros(B, H, Tk, d)
    v[..., torch.arange(Tk), torch.arange(Tk)] = 1.0  # v_j = e_j: O_ij = P_ij z_ij
    v = v.to(DEVICE)
    kpm = None
    if padded:
        kpm = (torch.rand(B, Tk, generator=gen) < 0.8).to(torch.int8)
        kpm[1, :3] = 0
        kpm = kpm.to(DEVICE)
    scale = d ** -0.5
    o, lse, w = K.inducer_attention_fwd(q, k, v, None, None, None, None, kpm, scale, causal, dropout_p=p, seed=seed)
    keep = K.dropout_keep_mask(seed, B, H, Tq, Tk, p, DEVICE).cpu()
    _, _, _, _, prob = reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), None,
                                 None if kpm is None else kpm.cpu(), scale, causal)
    vis = prob > 0
    assert vis.sum() > 1000 and (~vis).sum() > (100 if causal else -1)
    got = o[..., :Tk].cpu().double()
    assert not o[..., Tk:].any()
    # exact zeros exactly where a visible key was dropped (or the key is invisible)
    assert torch.equal(got != 0, keep & vis)
    torch.testing.assert_close(got, prob * keep / (1 - p), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 3. mask statistics and determinism

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_seeds(p, monkeypatch):
    set_tiles(monkeypatch, (64, 64))  # fewer interpreter programs
    B, H, Tq, Tk = 2, 4, 64, 96
    n = B * H * Tq * Tk
    keep = K.dropout_keep_mask(7, B, H, Tq, Tk, p, DEVICE).cpu()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # per (batch, head) rates too (n/8 samples each)
    rates = keep.float().mean((2, 3))
    assert ((rates - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (Tq * Tk))).all()
    assert torch.equal(keep, K.dropout_keep_mask(7, B, H, Tq, Tk, p, DEVICE).cpu())  # same seed, same mask
    agree = p * p + (1 - p) ** 2  # of two independent masks
    sig_agree = math.sqrt(agree * (1 - agree) / n)
    for other in (8, 2 ** 31 + 7, 2 ** 40 + 7):  # different seeds (incl. the int32 sign bit)
        k2 = K.dropout_keep_mask(other, B, H, Tq, Tk, p, DEVICE).cpu()
        assert abs((k2 == keep).float().mean().item() - agree) < 6 * sig_agree, other
    # heads and batch rows are distinct streams
    flat = keep.reshape(B * H, Tq * Tk)
    for a, b in [(0, 1), (0, H), (1, B * H - 1)]:
        assert abs((flat[a] == flat[b]).float().mean().item() - agree) < 6 * math.sqrt(agree * (1 - agree) / (Tq * Tk))
    # a neighbouring (i, j) is no copy either: the rows of one head are not shifted versions of each other
    shifted = keep[..., 1:, :] == keep[..., :-1, :]
    assert abs(shifted.float().mean().item() - agree) < 6 * math.sqrt(agree * (1 - agree) / shifted.numel())


def test_mask_is_a_function_of_seed_bh_i_j(monkeypatch):
    seed, p = 123456789, 0.3
    set_tiles(monkeypatch, (16, 16))
    ref = K.dropout_keep_mask(seed, 2, 3, 45, 38, p, DEVICE).cpu()
    for tiles in [(32, 64), (64, 16)]:  # tile sizes / program layout
        set_tiles(monkeypatch, tiles)
        assert torch.equal(K.dropout_keep_mask(seed, 2, 3, 45, 38, p, DEVICE).cpu(), ref), tiles
    set_tiles(monkeypatch, (16, 16))
    # (B, H) only through bh = b·H + h
    assert torch.equal(K.dropout_keep_mask(seed, 1, 6, 45, 38, p, DEVICE).cpu().reshape(2, 3, 45, 38), ref)
    # more query rows with the same Tk: the first rows unchanged (counter i·Tk + j)
    assert torch.equal(K.dropout_keep_mask(seed, 2, 3, 60, 38, p, DEVICE).cpu()[:, :, :45], ref)
    # p only sets the threshold: a smaller p keeps a superset
    loose = K.dropout_keep_mask(seed, 2, 3, 45, 38, 0.1, DEVICE).cpu()
    assert (loose | ~ref).all() and (loose & ~ref).any()


def test_backward_uses_the_same_mask_under_other_tiles(monkeypatch):
    """Forward and backward under different tiles (and BM ≠ BN) still agree with the reference: the mask does
    not depend on the program layout of any kernel."""
    cfg = Config(index=999, B=2, H=1, Tq=33, Tk=40, d=16, m_k=3, causal=True, padding="random", p=0.5,
                 seed=99, tiles=(16, 16))
    q, k, v, mlp, kpm, ups = make_case(cfg)
    scale = 0.3
    z = K.dropout_keep_mask(cfg.seed, cfg.B, cfg.H, cfg.Tq, cfg.Tk, cfg.p, DEVICE).double() / (1 - cfg.p)
    set_tiles(monkeypatch, (32, 16))
    mlp_args = mlp
    o, lse, w = K.inducer_attention_fwd(q, k, v, *mlp_args, kpm, scale, True, dropout_p=cfg.p, seed=cfg.seed)
    set_tiles(monkeypatch, (16, 32))
    grads = K.inducer_attention_bwd(q, k, v, *mlp_args, kpm, o, lse, w, *ups, scale, True, dropout_p=cfg.p,
                                    seed=cfg.seed)
    (o64, _, _), grads64 = reference_grads(q, k, v, mlp, kpm, scale, True, None, ups, z)
    assert_close(o, o64, "O")
    for name, g, g64 in zip(("dq", "dk", "dv", "ds0"), grads, grads64):
        assert_close(g, g64, name)
    # a different seed in the backward is a different mask: dv no longer matches
    wrong = K.inducer_attention_bwd(q, k, v, *mlp_args, kpm, o, lse, w, *ups, scale, True, dropout_p=cfg.p,
                                    seed=cfg.seed + 1)
    assert (wrong[2].cpu().double() - grads64[2]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 4. p = 0 is the old path bit for bit; LSE and w never change; p = 1; bad arguments

@pytest.mark.parametrize("with_mlp", [False, True])
def test_p0_bit_identical_and_lse_w_untouched(with_mlp, monkeypatch):
    cfg = Config(index=5, B=2, H=2, Tq=21, Tk=34, d=40, m_k=4 if with_mlp else 0, causal=True, padding="full_row",
                 p=0.0, seed=0, tiles=(16, 32))
    set_tiles(monkeypatch, cfg.tiles)
    q, k, v, mlp, kpm, ups = make_case(cfg)
    old = run_fused(cfg, q, k, v, mlp, kpm, ups, 0.2)
    for drop in ({"dropout_p": 0.0, "seed": 12345}, {"seed": 2 ** 31 + 3}):
        new = run_fused(cfg, q, k, v, mlp, kpm, ups, 0.2, **drop)
        for a, b in zip((*old[0], *old[1]), (*new[0], *new[1])):
            assert torch.equal(a, b), drop
    (o, lse, w), (dq, dk, dv, ds0) = run_fused(cfg, q, k, v, mlp, kpm, ups, 0.2, dropout_p=0.5, seed=1)
    assert torch.equal(lse, old[0][1]) and torch.equal(w, old[0][2])  # the softmax statistics are undropped
    assert not torch.equal(o, old[0][0])
    # p = 1: everything dropped (z = 0): O = 0, dv = 0, LSE and w unchanged
    (o1, lse1, w1), (_, _, dv1, _) = run_fused(cfg, q, k, v, mlp, kpm, ups, 0.2, dropout_p=1.0, seed=1)
    assert not o1.any() and not dv1.any() and torch.equal(lse1, lse) and torch.equal(w1, w)
    assert not K.dropout_keep_mask(1, 2, 2, 21, 34, 1.0, DEVICE).any()
    assert K.dropout_keep_mask(1, 2, 2, 21, 34, 0.0, DEVICE).all()


def test_bad_dropout_p_raises():
    q = torch.randn(1, 1, 3, 16, device=DEVICE)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            K.inducer_attention_fwd(q, q, q, None, None, None, None, None, 0.25, False, dropout_p=p)
        with pytest.raises(ValueError, match="dropout_p"):
            K.dropout_keep_mask(0, 1, 1, 3, 3, p, DEVICE)
    with pytest.raises(ValueError, match="Tq·Tk < 2"):
        K.dropout_keep_mask(0, 1, 1, 2 ** 16, 2 ** 15, 0.1, DEVICE)


# ---------------------------------------------------------------------------------------------
# the public op: kadapt.ops.inducer_attention(..., dropout_p) on the Triton backend

def _seeded_mask(torch_seed, B, H, Tq, Tk, p):
    """The mask the op draws after torch.manual_seed(torch_seed): its seed is the first draw of torch's
    CPU generator (torch.randint(0, 2**62, ()))."""
    torch.manual_seed(torch_seed)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    return K.dropout_keep_mask(seed, B, H, Tq, Tk, p, DEVICE).cpu()


@pytest.mark.parametrize("compiled", [False, True])
def test_public_op_dropout_matches_the_explicit_mask_reference(compiled):
    import kadapt
    from kadapt.ops import inducer_attention

    torch.manual_seed(0)
    B, H, Tq, Tk, d, m, p = 2, 2, 7, 19, 16, 3, 0.3
    q, k, v = (torch.randn(B, H, T, d, device=DEVICE) for T in (Tq, Tk, Tk))
    mlp = [torch.randn(H, d, m, device=DEVICE) * 0.3, torch.randn(H, m, device=DEVICE) * 0.3,
           torch.randn(H, m, d, device=DEVICE) * 0.3, torch.randn(H, d, device=DEVICE) * 0.3]
    kpm = torch.ones(B, Tk, dtype=torch.bool, device=DEVICE)
    kpm[1, :5] = False
    leaves = [t.requires_grad_() for t in (q, k, v)]
    ups = [torch.randn(B, H, Tq, d, device=DEVICE), torch.randn(B, H, Tq, device=DEVICE),
           torch.randn(B, H, Tq, device=DEVICE)]
    keep = _seeded_mask(11, B, H, Tq, Tk, p)
    z = keep.double() / (1 - p)

    def run(*ts):
        return inducer_attention(*ts, *mlp, scale=0.4, causal=True, key_padding_mask=kpm, dropout_p=p)

    fn = torch.compile(run, fullgraph=True, backend="inductor" if GPU else "aot_eager") if compiled else run
    kadapt.set_backend("triton")
    try:
        torch._dynamo.reset()
        torch.manual_seed(11)
        o, lse, w = fn(*leaves)
        loss = (o * ups[0]).sum() + (torch.where(torch.isfinite(lse), lse, 0) * ups[1]).sum() + (w * ups[2]).sum()
        grads = torch.autograd.grad(loss, leaves)
    finally:
        kadapt.set_backend("auto")
    (o_r, lse_r, w_r), (dq, dk, dv, _) = reference_grads(q, k, v, mlp, kpm.to(torch.int8).cpu(), 0.4, True, None,
                                                         ups, z)
    assert_close(o, o_r, "O")
    assert_close(lse, lse_r, "LSE")
    assert_close(w, w_r, "w")
    for g, r, name in zip(grads, (dq, dk, dv), ("dq", "dk", "dv")):
        assert_close(g, r, name, rtol=1e-4, atol=1e-4)


def test_public_op_dropout_follows_torch_manual_seed():
    import kadapt
    from kadapt.ops import inducer_attention

    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(3))
    kadapt.set_backend("triton")
    try:
        outs = []
        for s in (1, 1, 2):
            torch.manual_seed(s)
            outs.append(inducer_attention(q, k, v, dropout_p=0.5)[0])
    finally:
        kadapt.set_backend("auto")
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
