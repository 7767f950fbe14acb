"""Grouped-query attention (GQA) in the inducer-attention op: q (B, H, Tq, d), k, v (B, H_kv, Tk, d) with H_kv
dividing H; query head h uses KV head h // G, G = H / H_kv (transformers' repeat_kv convention). The Triton
kernels index the shared KV head in place (no repeat_kv copy); the dK/dV kernel loops over the G query heads of
its KV head, so dK, dV (B, H_kv, Tk, d) are the sums over each group.

Truth: the float64 formula of tests/_inducer_kernels.py (k, v expanded by repeat_interleave, an explicit
dropout multiplier z from dropout_keep_mask), and the library's inducer_attention_reference in float64.

1. Kernel level (inducer_attention_fwd / _bwd): ≥ 18 random fp32 configurations, (H, H_kv) ∈ {(4, 2), (6, 1),
   (6, 3)}, Tq, Tk off the tile multiples incl. the decode case Tq = 1 < Tk, causal or not, key padding incl. a
   fully padded batch row, with/without key MLP, dropout (keyed by the QUERY head) and additive bias (per query
   head, broadcast layouts), several interpreter tiles: O, LSE, w, dq, dk, dv, ∂L/∂s0.
2. Public op on the Triton backend vs the float64 reference: every gradient incl. the key-MLP parameters,
   gating on/off, dropout with its explicit mask, bias.
3. GQA == the same op with k, v expanded to H heads (MHA): forward, dq and the key-MLP gradients, and dk, dv ==
   the expanded call's dk, dv summed over each group; on the Triton backend and for the reference (incl.
   attn_mask, attn_bias, gating, dropout, the concat reference); a float64 gradcheck of the GQA reference.
4. Validation (H % H_kv ≠ 0, k/v head mismatch: ValueError naming the fields and the allowed values); the CUDA
   forward refuses GQA (auto goes on; a forced "cuda" raises RuntimeError); torch.compile(fullgraph=True).
5. GPU only: fp16/bf16 GQA vs the float64 reference and vs the expanded call.

Without a GPU the kernels run in Triton's interpreter in fp32 (tests/conftest.py sets TRITON_INTERPRET); every
output buffer of the Triton host functions is NaN-poisoned (``poisoned``, autouse).
"""
from __future__ import annotations

import importlib
import random
from dataclasses import dataclass

import pytest
import torch

import kadapt
from _inducer_kernels import (DEVICE, GPU, K, assert_close, poisoned, reference, reference_grads,  # noqa: F401
                              require_kernels, set_tiles)
from kadapt import backends
from kadapt.ops import inducer_attention, inducer_attention_concat_reference, inducer_attention_reference

require_kernels()

op_module = importlib.import_module("kadapt.ops.inducer_attention")
HEADS = [(4, 2), (6, 1), (6, 3)]  # (H, H_kv)


@pytest.fixture(autouse=True)
def _auto_backend():
    kadapt.set_backend("auto")
    yield
    kadapt.set_backend("auto")


def expand(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, H, T, d) from (B, H_kv, T, d): transformers' repeat_kv."""
    return t.repeat_interleave(H // t.shape[1], dim=1)


def group_sum(t: torch.Tensor, H_kv: int) -> torch.Tensor:
    """(B, H_kv, T, d) sums over the groups of an (B, H, T, d) gradient."""
    B, H, T, d = t.shape
    return t.reshape(B, H_kv, H // H_kv, T, d).sum(2)


# ---------------------------------------------------------------------------------------------
# 1. kernel level: random configurations vs the float64 formula

LENGTHS = [1, 5, 17, 33]
BIAS_LAYOUTS = [None, "1H", "B1", "BH"]


@dataclass(frozen=True)
class Config:
    index: int
    B: int
    H: int
    H_kv: int
    Tq: int
    Tk: int
    d: int
    m_k: int            # 0: no key MLP
    causal: bool
    padding: str        # none | random | full_row
    p: float            # attention dropout (0: none)
    bias: str | None    # None | 1H | B1 | BH
    tiles: tuple        # interpreter (BM, BN)


def draw_config(index: int) -> Config:
    """(H, H_kv) cycles with period 3, causal with 2, padding with 3 (offset), dropout with index div 2, bias layout
    with index div 3, key MLP with index div 4; every 6th configuration is the decode case Tq = 1 < Tk."""
    rng = random.Random(15485863 * index + 7)
    H, H_kv = HEADS[index % 3]
    B = rng.choice([1, 2])
    Tq, Tk = rng.choice(LENGTHS), rng.choice(LENGTHS)
    if index % 6 == 5:
        Tq, Tk = 1, rng.choice([17, 33])
    elif Tq == Tk:
        Tq = max(1, Tq - 3)
    padding = ["none", "random", "full_row"][(index + index // 3) % 3]
    if padding == "full_row":
        B = 2
    if B * H * max(Tq, 16) * max(Tk, 16) > 6000:  # CPU time of the interpreter
        Tq = min(Tq, 17)
    return Config(index=index, B=B, H=H, H_kv=H_kv, Tq=Tq, Tk=Tk, d=rng.choice([16, 24, 32]),
                  m_k=rng.choice([2, 5]) if index // 4 % 2 else 0, causal=index % 2 == 0, padding=padding,
                  p=[0.0, 0.3][index // 2 % 2], bias=BIAS_LAYOUTS[index // 3 % 4],
                  tiles=rng.choice([(16, 16), (16, 16), (32, 16), (16, 32)]))


CONFIGS = [draw_config(i) for i in range(18)]


def make_bias(layout, B, H, Tq, Tk, gen):
    if layout is None:
        return None
    shape = {"1H": (1, H, Tq, Tk), "B1": (B, 1, Tq, Tk), "BH": (B, H, Tq, Tk)}[layout]
    return (2.0 * torch.randn(shape, generator=gen)).to(DEVICE)


def make_case(cfg: Config):
    gen = torch.Generator().manual_seed(cfg.index)
    r = lambda *shape, s=1.0: (s * torch.randn(shape, generator=gen)).to(DEVICE)  # noqa: E731
    B, H, Hkv, d, m = cfg.B, cfg.H, cfg.H_kv, cfg.d, cfg.m_k
    q, k, v = r(B, H, cfg.Tq, d), r(B, Hkv, cfg.Tk, d), r(B, Hkv, cfg.Tk, d)
    mlp = (r(H, d, m, s=d ** -0.5), r(H, m, s=0.5), r(H, m, d, s=0.5), r(H, d, s=0.3)) if m else None
    kpm = None
    if cfg.padding != "none":
        kpm = torch.rand(B, cfg.Tk, generator=gen) < 0.7
        if cfg.padding == "full_row":
            kpm[cfg.index % B] = False
        kpm = kpm.to(torch.int8).to(DEVICE)
    bias = make_bias(cfg.bias, B, H, cfg.Tq, cfg.Tk, gen)
    ups = (r(B, H, cfg.Tq, d), r(B, H, cfg.Tq), r(B, H, cfg.Tq))
    return q, k, v, mlp, kpm, bias, ups


def test_config_coverage():
    c = CONFIGS
    assert {(x.H, x.H_kv) for x in c} == set(HEADS)
    assert {x.causal for x in c} == {True, False} and {x.padding for x in c} == {"none", "random", "full_row"}
    assert {x.m_k > 0 for x in c} == {True, False} and {x.p for x in c} == {0.0, 0.3}
    assert set(x.bias for x in c) == set(BIAS_LAYOUTS)
    assert sum(x.Tq == 1 and x.Tk > 16 for x in c) >= 3  # decode
    assert sum(x.causal and x.Tq < x.Tk for x in c) >= 3 and sum(x.causal and x.Tq > x.Tk for x in c) >= 1
    assert sum(x.Tq > 16 and x.Tk > 16 for x in c) >= 3  # several tiles in both loops
    assert all(x.Tq != x.Tk for x in c) and len({x.tiles for x in c}) >= 3
    # each (H, H_kv) meets dropout, bias and the key MLP
    for heads in HEADS:
        sub = [x for x in c if (x.H, x.H_kv) == heads]
        assert any(x.p > 0 for x in sub) and any(x.bias for x in sub) and any(x.m_k for x in sub), heads


@pytest.mark.parametrize("chunk", range(3))
def test_kernels_match_reference(chunk, monkeypatch, poisoned):
    for cfg in CONFIGS[chunk::3]:
        set_tiles(monkeypatch, cfg.tiles)
        q, k, v, mlp, kpm, bias, ups = make_case(cfg)
        scale = cfg.d ** -0.5
        kw = {"bias": bias}
        z = None
        if cfg.p > 0:
            seed = 2 ** 35 + cfg.index
            kw.update(dropout_p=cfg.p, seed=seed)
            # keyed by the QUERY head b·H + h: (B, H, Tq, Tk), never the KV head
            z = K.dropout_keep_mask(seed, cfg.B, cfg.H, cfg.Tq, cfg.Tk, cfg.p, DEVICE).double() / (1 - cfg.p)
        mlp_args = mlp if mlp is not None else (None,) * 4
        del poisoned[:]
        o, lse, w = K.inducer_attention_fwd(q, k, v, *mlp_args, kpm, scale, cfg.causal, **kw)
        dq, dk, dv, ds0 = K.inducer_attention_bwd(q, k, v, *mlp_args, kpm, o, lse, w, *ups, scale, cfg.causal, **kw)
        assert len(poisoned) >= 8, "the outputs did not come from the poisoned allocator"
        assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape
        (o64, lse64, w64), (dq64, dk64, dv64, ds064) = reference_grads(q, k, v, mlp, kpm, scale, cfg.causal, bias,
                                                                       ups, z)
        label = str(cfg)
        for name, got, want in (("O", o, o64), ("LSE", lse, lse64), ("w", w, w64), ("dq", dq, dq64),
                                ("dk", dk, dk64), ("dv", dv, dv64), ("ds0", ds0, ds064)):
            assert_close(got, want, f"{name} {label}")
        if cfg.padding == "full_row":
            row = cfg.index % cfg.B
            assert not o[row].any() and torch.isneginf(lse[row]).all() and (w[row] == 1).all()
            assert not dk[row].any() and not dv[row].any()


def test_dropout_masks_differ_within_a_group(monkeypatch):
    """The query heads sharing a KV head draw their own masks (keyed by b·H + h): with v = identity, O_ij = P_ij z_ij
    shows the mask each query head applied; heads of one group disagree where their masks do."""
    set_tiles(monkeypatch, (16, 16))
    B, H, Hkv, Tq, Tk, d, p, seed = 1, 4, 2, 9, 16, 16, 0.5, 31
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, d, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, Tk, d, generator=gen).to(DEVICE)
    v = torch.eye(Tk, d).expand(B, Hkv, Tk, d).contiguous().to(DEVICE)
    o, _, _ = K.inducer_attention_fwd(q, k, v, None, None, None, None, None, 0.25, False, dropout_p=p, seed=seed)
    keep = K.dropout_keep_mask(seed, B, H, Tq, Tk, p, DEVICE).cpu()
    assert torch.equal(o[..., :Tk].cpu() != 0, keep)
    assert not torch.equal(keep[:, 0], keep[:, 1]) and not torch.equal(keep[:, 2], keep[:, 3])


# ---------------------------------------------------------------------------------------------
# 2. and 3. the public op: vs the float64 reference, and GQA == expanded MHA

def op_case(H=4, Hkv=2, B=2, Tq=7, Tk=19, d=16, m=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: s * torch.randn(shape, generator=gen)  # noqa: E731
    leaves = {"q": r(B, H, Tq, d), "k": r(B, Hkv, Tk, d), "v": r(B, Hkv, Tk, d)}
    if m:
        leaves.update(A_k=r(H, d, m, s=0.3), a_k=r(H, m, s=0.5), B_k=r(H, m, d, s=0.5), b_k=r(H, d, s=0.3))
    kpm = torch.rand(B, Tk, generator=gen) < 0.75
    kpm[-1, :4] = False
    ups = (r(B, H, Tq, d), r(B, H, Tq), r(B, H, Tq))
    bias = 2.0 * r(1, H, Tq, Tk)
    return leaves, kpm, ups, bias


def mlp_of(lv):
    return [lv.get(n) for n in ("A_k", "a_k", "B_k", "b_k")]


def loss_of(o, lse, w, ups):
    return (o * ups[0]).sum() + (torch.where(torch.isfinite(lse), lse, 0) * ups[1]).sum() + (w * ups[2]).sum()


def run_op(lv, ups, kpm, device=DEVICE, dtype=torch.float32, **kw):
    """((O, LSE, w), {name: grad}) of the public op on the backend in force, leaves copied to device/dtype."""
    leaves = {n: t.detach().to(device, dtype).requires_grad_() for n, t in lv.items()}
    o, lse, w = inducer_attention(leaves["q"], leaves["k"], leaves["v"], *mlp_of(leaves),
                                  key_padding_mask=kpm.to(device), **kw)
    grads = torch.autograd.grad(loss_of(o, lse, w, [u.to(device, o.dtype if i == 0 else lse.dtype)
                                                    for i, u in enumerate(ups)]), list(leaves.values()))
    return (o, lse, w), dict(zip(leaves, grads))


def ref64(lv, ups, kpm, scale, causal, gating, bias=None, z=None):
    """float64 ((O, LSE, w), {name: grad}) of the explicit formula (z: an explicit dropout multiplier)."""
    leaves = {n: t.detach().cpu().double().requires_grad_() for n, t in lv.items()}
    m = mlp_of(leaves)
    o, lse, w, _, _ = reference(leaves["q"], leaves["k"], leaves["v"], None if m[0] is None else m, kpm, scale,
                                causal, None if bias is None else bias.detach().cpu().double(), z)
    if gating:
        o = (1 - w)[..., None] * o
    grads = torch.autograd.grad(loss_of(o, lse, w, [u.double() for u in ups]), list(leaves.values()))
    return (o, lse, w), dict(zip(leaves, grads))


def check_all(got, want, label, rtol=1e-4, atol=1e-5):
    (o, lse, w), g = got
    (o64, lse64, w64), g64 = want
    assert_close(o, o64, f"O {label}", rtol, atol)
    assert_close(lse, lse64, f"LSE {label}", rtol, atol)
    assert_close(w, w64, f"w {label}", rtol, atol)
    assert set(g) == set(g64)
    for n in g:
        assert g[n].shape == g64[n].shape, f"d{n} shape {label}"
        assert_close(g[n], g64[n], f"d{n} {label}", rtol, max(atol, 1e-4))


@pytest.mark.parametrize("H, Hkv", HEADS)
@pytest.mark.parametrize("variant", ["plain", "gating+bias", "dropout"])
def test_public_op_triton_matches_reference(H, Hkv, variant, monkeypatch, poisoned):
    set_tiles(monkeypatch, (16, 16))
    causal = variant != "plain"
    lv, kpm, ups, bias = op_case(H=H, Hkv=Hkv, m=0 if (variant == "dropout" and H == 6 and Hkv == 1) else 3,
                                 Tq=7 if variant != "dropout" else 1, seed=H * 10 + Hkv)
    kw = dict(scale=0.3, causal=causal)
    gating = variant == "gating+bias"
    if gating:
        kw.update(gating=True, attn_bias=bias.to(DEVICE))
    z = None
    if variant == "dropout":
        p = 0.3
        kw["dropout_p"] = p
        torch.manual_seed(17)
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))  # the op's first draw after manual_seed
        z = K.dropout_keep_mask(seed, 2, H, 1, 19, p, DEVICE).cpu().double() / (1 - p)
        torch.manual_seed(17)
    kadapt.set_backend("triton")
    got = run_op(lv, ups, kpm, **kw)
    assert poisoned, "the Triton kernels did not run"
    kpm8 = kpm.to(torch.int8)
    check_all(got, ref64(lv, ups, kpm8, 0.3, causal, gating, bias if gating else None, z), f"{H}/{Hkv} {variant}")
    if z is None:  # the library's reference (float64) is the same truth
        kadapt.set_backend("reference")
        lib = run_op(lv, ups, kpm, device="cpu", dtype=torch.float64, **{**kw, **(
            {"attn_bias": bias.double()} if gating else {})})
        check_all(got, lib, f"{H}/{Hkv} {variant} vs the library reference")


def _assert_same(a, b, what, exact):
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("H, Hkv", HEADS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gqa_equals_expanded_mha(H, Hkv, backend, monkeypatch, poisoned):
    """The GQA call == the same op with k, v expanded by repeat_interleave (MHA): the forward and dq, d(key MLP) (bit
    for bit in the interpreter), and dk, dv == the expanded call's dk, dv summed over each group. With causal, key
    padding, key MLP, gating, bias and dropout (the same torch seed gives the same query-head-keyed mask)."""
    set_tiles(monkeypatch, (16, 32))
    lv, kpm, ups, bias = op_case(H=H, Hkv=Hkv, Tq=9, Tk=21, seed=H + Hkv)
    kw = dict(scale=0.4, causal=True, gating=True, attn_bias=bias.to(DEVICE), dropout_p=0.2)
    device = DEVICE if backend == "triton" else "cpu"
    kadapt.set_backend(backend)
    torch.manual_seed(5)
    (o, lse, w), g = run_op(lv, ups, kpm, device=device, **kw)
    if backend == "triton":
        assert poisoned
    exp_lv = dict(lv, k=expand(lv["k"], H), v=expand(lv["v"], H))
    torch.manual_seed(5)
    (oe, lsee, we), ge = run_op(exp_lv, ups, kpm, device=device, **kw)
    exact = not GPU or backend == "reference"
    for name, a, b in (("O", o, oe), ("LSE", lse, lsee), ("w", w, we)):
        _assert_same(a, b, f"{name} {backend} {H}/{Hkv}", exact)
    for n in g:
        if n in ("k", "v"):
            assert g[n].shape == lv[n].shape
            torch.testing.assert_close(g[n], group_sum(ge[n], Hkv), rtol=1e-5, atol=1e-5,
                                       msg=f"d{n} {backend} {H}/{Hkv}")
        else:
            _assert_same(g[n], ge[n], f"d{n} {backend} {H}/{Hkv}", exact)


def test_reference_gqa_extras_and_concat_reference():
    """The library reference with GQA == with k, v expanded, under attn_mask (per query head), attn_bias, gating and
    dropout (same torch seed); the concat-softmax reference too; the σ identity holds with GQA."""
    lv, kpm, _, bias = op_case(H=6, Hkv=3, Tq=6, Tk=9, seed=3)
    q, k, v = (lv[n].double() for n in ("q", "k", "v"))
    mlp = [t.double() for t in mlp_of(lv)]
    ke, ve = expand(k, 6), expand(v, 6)
    gen = torch.Generator().manual_seed(1)
    attn_mask = torch.rand(2, 6, 6, 9, generator=gen) < 0.8
    for kw in ({}, {"causal": True, "key_padding_mask": kpm}, {"attn_mask": attn_mask, "gating": True},
               {"attn_bias": bias.double(), "key_padding_mask": kpm}, {"dropout_p": 0.3, "causal": True}):
        torch.manual_seed(9)
        a = inducer_attention_reference(q, k, v, *mlp, **kw)
        torch.manual_seed(9)
        b = inducer_attention_reference(q, ke, ve, *mlp, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y), kw
    for causal in (False, True):
        wc, oc = inducer_attention_concat_reference(q, k, v, *mlp, causal=causal, key_padding_mask=kpm)
        wce, oce = inducer_attention_concat_reference(q, ke, ve, *mlp, causal=causal, key_padding_mask=kpm)
        assert torch.equal(wc, wce) and torch.equal(oc, oce)
        o, _, w = inducer_attention_reference(q, k, v, *mlp, causal=causal, key_padding_mask=kpm)
        assert (w - wc).abs().max() <= 1e-12 and (o - oc).abs().max() <= 1e-12


def test_reference_gqa_gradcheck_float64():
    lv, kpm, _, _ = op_case(H=4, Hkv=2, B=1, Tq=3, Tk=4, d=3, m=2, seed=4)
    kpm[:] = True
    kpm[0, 0] = False
    inputs = [t.double().requires_grad_() for t in lv.values()]

    def f(*ts):
        o, lse, w = inducer_attention_reference(*ts, scale=0.7, causal=True, key_padding_mask=kpm, gating=True)
        return o, torch.where(torch.isinf(lse), 0, lse), w

    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------------
# 4. validation, the CUDA backend's refusal, torch.compile

def _bad_cases():
    q = torch.randn(1, 4, 3, 16)
    k2, k3 = torch.randn(1, 2, 5, 16), torch.randn(1, 3, 5, 16)
    return {
        "H_kv not dividing H": ((q, k3, k3), r"k, v have H_kv=3 heads but q has H=4: the number of KV heads must "
                                             r"divide the number of query heads .*allowed H_kv for H=4: 1, 2, 4"),
        "k/v heads differ": ((q, k2, torch.randn(1, 1, 5, 16)), r"k has H_kv=2 heads but v has H_kv=1: k and v "
                                                               r"must have the same number of heads"),
        "more KV than query heads": ((q, torch.randn(1, 8, 5, 16), torch.randn(1, 8, 5, 16)),
                                     r"H_kv=8 heads but q has H=4.*allowed H_kv for H=4: 1, 2, 4"),
    }


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cuda"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_heads_raise_value_error(case, backend):
    args, match = _bad_cases()[case]
    kadapt.set_backend(backend)
    with pytest.raises(ValueError, match=match):
        inducer_attention(*args)


def test_triton_host_functions_validate_heads():
    q = torch.randn(1, 4, 3, 16, device=DEVICE)
    k3 = torch.randn(1, 3, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"H_kv=3 heads but q has H=4: H_kv must divide H \(allowed H_kv: 1, 2, 4\)"):
        K.inducer_attention_fwd(q, k3, k3, None, None, None, None, None, 0.25, False)
    k2 = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must have the same shape"):
        K.inducer_attention_fwd(q, k2, k2[:, :1], None, None, None, None, None, 0.25, False)


def _cuda_stand_in(monkeypatch) -> list:
    """The CUDA forward (op_module._cuda_fwd) stood in by the reference; "the extension is built, CUDA tensors"."""
    calls = []

    def fwd(q, k, v, mlp, kpm, scale, causal):
        calls.append(tuple(k.shape))
        with torch.no_grad():
            return inducer_attention_reference(q, k, v, *mlp, scale, causal, None if kpm is None else kpm.bool())

    monkeypatch.setattr(op_module, "_cuda_fwd", fwd)
    monkeypatch.setattr(backends, "cuda_reason", lambda x: None)
    return calls


def test_cuda_refuses_gqa_auto_goes_on(monkeypatch, poisoned):
    calls = _cuda_stand_in(monkeypatch)
    lv, kpm, _, _ = op_case(H=4, Hkv=2)
    ts = [t.to(DEVICE) for t in lv.values()]
    mha = [ts[0], expand(ts[1], 4), expand(ts[2], 4), *ts[3:]]
    # forced "cuda": RuntimeError naming the reason (as every forced backend that cannot run), for GQA only
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is forced but cannot run inducer_attention: grouped-query "
                                         r"attention .*the CUDA forward takes k, v with H heads only.*H=4, k, v "
                                         r"H_kv=2"):
        inducer_attention(*ts)
    assert not calls
    inducer_attention(*mha)
    assert calls == [tuple(mha[1].shape)]
    # auto, Triton unavailable: MHA runs the CUDA forward, GQA the reference
    kadapt.set_backend("auto")
    monkeypatch.setattr(backends, "triton_reason", lambda x, forced: "pretend Triton cannot run")
    inducer_attention(*mha)
    assert len(calls) == 2
    got = inducer_attention(*ts, key_padding_mask=kpm.to(DEVICE))
    assert len(calls) == 2 and not poisoned
    ref = inducer_attention_reference(*ts, key_padding_mask=kpm.to(DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # auto, Triton available: Triton runs GQA
    monkeypatch.setattr(backends, "triton_reason", lambda x, forced: None)
    got = inducer_attention(*ts, key_padding_mask=kpm.to(DEVICE))
    assert len(calls) == 2 and poisoned
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the custom op itself refuses a CUDA forward of GQA inputs
    with pytest.raises(RuntimeError, match="grouped-query attention"):
        torch.ops.kadapt.inducer_attention(*ts[:3], None, None, None, None, None, 0.25, False, "cuda", 0.0, None,
                                           None)
    assert len(calls) == 2


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_compiles_fullgraph_with_triton(dropout_p, monkeypatch, poisoned):
    set_tiles(monkeypatch, (16, 16))
    torch._dynamo.reset()
    lv, kpm, ups, _ = op_case(H=6, Hkv=2, Tq=5, Tk=13)
    leaves = [t.to(DEVICE).requires_grad_() for t in lv.values()]
    kpm = kpm.to(DEVICE)

    def f(*xs):
        o, lse, w = inducer_attention(*xs, causal=True, key_padding_mask=kpm, gating=True, dropout_p=dropout_p)
        return o, torch.where(torch.isinf(lse), 0, lse), w

    kadapt.set_backend("triton")
    torch.manual_seed(3)
    outs = f(*leaves)
    up = [u.to(DEVICE) for u in ups]
    g_eager = torch.autograd.grad(outs, leaves, up)
    n = len(poisoned)
    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.manual_seed(3)
    outs_c = compiled(*leaves)
    g = torch.autograd.grad(outs_c, leaves, up)
    assert len(poisoned) > n, "the compiled function did not run the Triton kernels"
    assert g[1].shape == lv["k"].shape and g[2].shape == lv["v"].shape
    for a, b in zip(outs_c, outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. GPU: fp16 / bf16

@pytest.mark.skipif(not GPU, reason="fp16/bf16 tl.dot is checked on the GPU (the interpreter runs fp32)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_gpu_low_precision(dtype, H, Hkv):
    lv, kpm, ups, bias = op_case(H=H, Hkv=Hkv, Tq=70, Tk=133, d=64, seed=7)
    kw = dict(scale=0.125, causal=True, gating=True, attn_bias=bias.cuda())
    kadapt.set_backend("triton")
    got = run_op(lv, ups, kpm, device="cuda", dtype=dtype, **kw)
    exp = run_op(dict(lv, k=expand(lv["k"], H), v=expand(lv["v"], H)), ups, kpm, device="cuda", dtype=dtype, **kw)
    kadapt.set_backend("reference")
    lp = run_op(lv, ups, kpm, device="cuda", dtype=dtype, **kw)
    want = ref64(lv, ups, kpm.to(torch.int8), 0.125, True, True, bias)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]

    def close(a, ref, ref_lp, what):
        a, ref, ref_lp = (x.detach().cpu().double() for x in (a, ref, ref_lp))
        a, ref, ref_lp = (torch.where(torch.isinf(x), 0, x) for x in (a, ref, ref_lp))
        assert not torch.isnan(a).any(), what
        allowed = tol * ref.abs().max().item() + 2 * (ref_lp - ref).abs().max().item() + 1e-3
        assert (a - ref).abs().max().item() <= allowed, what

    for i, name in enumerate(("O", "LSE", "w")):
        close(got[0][i], want[0][i], lp[0][i], f"{name} {dtype} {H}/{Hkv}")
        torch.testing.assert_close(got[0][i], exp[0][i], msg=f"{name} vs expanded")
    for n in got[1]:
        close(got[1][n], want[1][n], lp[1][n], f"d{n} {dtype} {H}/{Hkv}")
        e = group_sum(exp[1][n].float(), Hkv) if n in ("k", "v") else exp[1][n].float()
        torch.testing.assert_close(got[1][n].float(), e, rtol=tol, atol=tol * e.abs().max().item(),
                                   msg=f"d{n} vs expanded")
