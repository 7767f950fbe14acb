"""The inducer-attention op (kadapt.ops.inducer_attention) against its float64 reference.

≥ 200 random tiny configurations (B·H ≤ 4, Tq, Tk ≤ 40 and rarely multiples of the tiles, d ∈ {16, 24
(padded to 32), 32}, key MLP m_k ∈ 1..6 or the identity key, causal or not with Tq ≠ Tk (incl. Tq > Tk, whose
first rows see no key), key-padding masks incl. fully padded batch rows) compare O, LSE, w and the gradient of
every input (q, k, v, A_k, a_k, B_k, b_k) under random upstream gradients on O, on w and (in most cases) on LSE
with the reference evaluated in float64. Triton's buffers are NaN-poisoned; without a GPU the kernels run in
Triton's interpreter in fp32 (tests/conftest.py sets TRITON_INTERPRET). Also: the σ(s0 − LSE) = concat-softmax
identity, a float64 gradcheck of the reference, fully masked rows, gating, dispatch, bad inputs, torch.compile,
and the "cuda" backend's Python glue (CUDA forward + Triton backward, reasons, auto's order, compile) with the
CUDA forward stood in by its math (the kernel itself: tests/ops/test_cuda_kernels.py, GPU).
"""
from __future__ import annotations

import importlib
import random
from dataclasses import dataclass

import pytest
import test_fused_adapter as fa
import torch
from _inducer_kernels import nan_poison

import kadapt
from kadapt import backends
from kadapt.ops import inducer_attention, inducer_attention_concat_reference, inducer_attention_reference

op_module = importlib.import_module("kadapt.ops.inducer_attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _auto_backend():
    kadapt.set_backend("auto")
    yield
    kadapt.set_backend("auto")


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every buffer the Triton host functions allocate; records the shapes."""
    return nan_poison(monkeypatch)


# ---------------------------------------------------------------------------------------------
# random configurations

@dataclass(frozen=True)
class Config:
    index: int
    B: int
    H: int
    Tq: int
    Tk: int
    d: int
    m_k: int            # 0: identity key (no key MLP)
    causal: bool
    padding: str        # none | random | full_row (one batch row fully padded)
    scale: float | None
    grad_lse: bool      # upstream gradient on LSE too (O and w always)
    q_layout: str       # contiguous | transposed ((B, T, H, d) storage viewed as (B, H, T, d))
    tiles: tuple        # (BM, BN) of the Triton kernels in the interpreter (GPU runs use the real tiles)


def draw_config(index: int) -> Config:
    rng = random.Random(104729 * index + 5)
    B, H = rng.choice([(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (1, 4), (4, 1), (3, 1)])
    causal = rng.random() < 0.5
    Tk = rng.randint(1, 40)
    if causal and rng.random() < 0.85:
        Tq = rng.randint(1, Tk)  # decoding alignment: query block at the end of the keys
    else:
        Tq = rng.randint(1, 40)
    if Tq == Tk and rng.random() < 0.7:
        Tq = max(1, Tq - rng.randint(1, 5))
    padding = rng.choice(["none", "none", "random", "random", "full_row"])
    return Config(index=index, B=B, H=H, Tq=Tq, Tk=Tk, d=rng.choice([16, 24, 32]),
                  m_k=rng.choice([0, 1, 2, 3, 4, 5, 6]), causal=causal, padding=padding,
                  scale=rng.choice([None, None, 1.0, 0.3]), grad_lse=rng.random() < 0.7,
                  q_layout=rng.choice(["contiguous", "contiguous", "transposed"]),
                  tiles=rng.choice([(16, 16), (16, 16), (32, 32), (16, 32), (32, 16)]))


N_CHUNKS, PER_CHUNK = 8, 25     # 200 configurations
CONFIGS = [draw_config(i) for i in range(N_CHUNKS * PER_CHUNK)]
MLP_NAMES = ("A_k", "a_k", "B_k", "b_k")


def make_case(cfg: Config, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(cfg.index)
    r = lambda *shape, s=1.0: fa.randn(gen, shape, s)  # noqa: E731
    B, H, d, m = cfg.B, cfg.H, cfg.d, cfg.m_k
    raw = {"q": r(B, cfg.Tq, H, d) if cfg.q_layout == "transposed" else r(B, H, cfg.Tq, d),
           "k": r(B, H, cfg.Tk, d), "v": r(B, H, cfg.Tk, d)}
    if m:
        raw.update(A_k=r(H, d, m, s=d ** -0.5), a_k=r(H, m, s=0.5), B_k=r(H, m, d, s=0.5), b_k=r(H, d, s=0.3))
    leaves = {k: v.to(device, dtype).requires_grad_() for k, v in raw.items()}
    kpm = None
    if cfg.padding != "none":
        kpm = torch.rand(B, cfg.Tk, generator=gen) < 0.75
        if cfg.padding == "full_row":
            kpm[rng_row(cfg)] = False
        kpm = kpm.to(device)
    grads_out = (r(B, H, cfg.Tq, d).to(device, dtype), r(B, H, cfg.Tq).to(device),
                 r(B, H, cfg.Tq).to(device))  # dO, dLSE, dw
    return leaves, kpm, grads_out


def rng_row(cfg: Config) -> int:
    return cfg.index % cfg.B


def call(op, cfg: Config, lv: dict, kpm):
    q = lv["q"].transpose(1, 2) if cfg.q_layout == "transposed" else lv["q"]
    mlp = [lv.get(n) for n in MLP_NAMES]
    return op(q, lv["k"], lv["v"], *mlp, scale=cfg.scale, causal=cfg.causal, key_padding_mask=kpm)


# Tolerance: fa.assert_matches' rule (TOL[dtype] × max|ref| + 2 × PyTorch's own error in the test dtype) plus an
# absolute floor ATOL[dtype]. Every input is O(1), so gradients are sums of O(1) terms; where those cancel
# (e.g. dq of a row that sees a single key: P = 1 and dS = P(dP − delta) is zero up to rounding) the exact
# result can be ~1e-3 while the fp32 rounding of the O(1) terms is ~1e-7.
ATOL = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def assert_matches(got, ref, ref_lp, dtype, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    got, ref = got.detach().to("cpu", torch.float64), ref.detach()
    bad = ~torch.isfinite(got)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite elements (unwritten output?), first at " \
                          f"{tuple(bad.nonzero()[0].tolist())}"
    lp_err = 0.0 if ref_lp is None else (ref_lp.detach().to("cpu", torch.float64) - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    allowed = fa.TOL[dtype] * ref.abs().max().item() + 2 * lp_err + ATOL[dtype]
    assert err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g}"


def assert_stat_matches(got, ref, ref_lp, dtype, what):
    """LSE may be −inf on rows that see no key: the same rows in both, the finite rest compared."""
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got).cpu(), inf.cpu()), f"{what}: −inf rows differ"
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten?)"
    if ref_lp is not None:
        ref_lp = torch.where(inf.to(ref_lp.device), 0, ref_lp)
    assert_matches(torch.where(inf.to(got.device), 0, got), torch.where(inf, 0, ref), ref_lp, dtype, what)


def run_config(cfg: Config, backend: str, dtype: torch.dtype, device: str = fa.DEVICE) -> None:
    leaves, kpm, (do, dlse, dw) = make_case(cfg, dtype, device)
    names = list(leaves)

    def run(op, lv, upstream):
        o, lse, w = call(op, cfg, lv, kpm)
        outs, gouts = [o, w], [upstream[0], upstream[2]]
        if cfg.grad_lse:
            outs.append(lse)
            gouts.append(upstream[1])
        grads = torch.autograd.grad(outs, [lv[n] for n in names], gouts)
        return (o, lse, w), grads

    label = f"{backend} {dtype} {cfg}"
    kadapt.set_backend(backend)
    kernels = importlib.import_module("kadapt.ops.triton.inducer_attention") if backend == "triton" else None
    tuning = importlib.import_module("kadapt.ops.tuning")  # not at the top: collection must work with an older kadapt
    # small tiles so that the tiny shapes span several tiles in both loops
    forced = kernels.tile_overrides(*cfg.tiles) if kernels and not fa.GPU else {}
    try:
        with tuning.override(forced):
            (o, lse, w), grads = run(inducer_attention, leaves, (do, dlse, dw))
    finally:
        kadapt.set_backend("auto")
    assert o.dtype == dtype and lse.dtype == torch.float32 and w.dtype == torch.float32, label
    up64 = tuple(t.detach().to("cpu", torch.float64) for t in (do, dlse, dw))
    (o64, lse64, w64), grads64 = run(inducer_attention_reference, fa.to64(leaves), up64)
    (o_lp, lse_lp, w_lp), grads_lp = run(inducer_attention_reference, fa.clone_leaves(leaves), (do, dlse, dw))
    assert_matches(o, o64, o_lp, dtype, f"O ({label})")
    assert_stat_matches(lse, lse64, lse_lp, dtype, f"LSE ({label})")
    assert_matches(w, w64, w_lp, dtype, f"w ({label})")
    for name, g, g64, g_lp in zip(names, grads, grads64, grads_lp):
        assert g.dtype == dtype, f"d{name}: dtype {g.dtype} ({label})"
        assert_matches(g, g64, g_lp, dtype, f"d{name} ({label})")


@pytest.mark.parametrize("chunk", range(N_CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_random_configs_match_reference(backend, dtype, chunk, poisoned):
    fa.skip_unless_runnable(backend, dtype)
    if backend == "reference" and dtype != torch.float32 and not fa.GPU:
        pytest.skip("the reference in fp16/bf16 is checked on the GPU run only (CPU time)")
    for cfg in CONFIGS[chunk * PER_CHUNK:(chunk + 1) * PER_CHUNK]:
        del poisoned[:]
        run_config(cfg, backend, dtype)
        if backend == "triton":
            assert poisoned, "the Triton kernels did not run"


def test_config_coverage():
    c = CONFIGS
    assert len(c) >= 200
    assert all(x.B * x.H <= 4 and x.Tq <= 40 and x.Tk <= 40 for x in c)
    assert {x.d for x in c} == {16, 24, 32} and {x.m_k for x in c} == set(range(7))
    assert {x.padding for x in c} == {"none", "random", "full_row"}
    assert sum(x.causal and x.Tq < x.Tk for x in c) >= 40 and sum(x.causal and x.Tq > x.Tk for x in c) >= 3
    assert sum(x.Tq != x.Tk for x in c) >= 180
    assert sum(x.Tq > 16 and x.Tk > 32 and x.tiles == (16, 16) for x in c) >= 5  # several tiles in both loops
    assert {x.grad_lse for x in c} == {True, False} and {x.q_layout for x in c} == {"contiguous", "transposed"}
    assert sum(x.causal and x.tiles[0] != x.tiles[1] and x.Tk > 20 for x in c) >= 10  # BM ≠ BN, causal bounds


# ---------------------------------------------------------------------------------------------
# reference identities and gradcheck

def _mask_case(seed=0, B=2, H=2, Tq=5, Tk=7, d=6, m=3):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in
               [(B, H, Tq, d), (B, H, Tk, d), (B, H, Tk, d)])
    mlp = (0.5 * torch.randn(H, d, m, generator=gen, dtype=torch.float64),
           torch.randn(H, m, generator=gen, dtype=torch.float64),
           0.5 * torch.randn(H, m, d, generator=gen, dtype=torch.float64),
           0.3 * torch.randn(H, d, generator=gen, dtype=torch.float64))
    kpm = torch.rand(B, Tk, generator=gen) < 0.6
    kpm[1] = False
    return q, k, v, mlp, kpm


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mlp", [False, True])
def test_sigma_identity_equals_concat_softmax(causal, with_mlp):
    for Tq, Tk in [(5, 7), (9, 4), (6, 6)]:
        q, k, v, mlp, kpm = _mask_case(Tq=Tq, Tk=Tk)
        mlp = mlp if with_mlp else (None,) * 4
        for mask in (None, kpm):
            o, lse, w = inducer_attention_reference(q, k, v, *mlp, causal=causal, key_padding_mask=mask)
            wc, oc = inducer_attention_concat_reference(q, k, v, *mlp, causal=causal, key_padding_mask=mask)
            assert (w - wc).abs().max().item() <= 1e-12
            assert (o - oc).abs().max().item() <= 1e-12
    # the fully padded batch row 1: LSE = −inf, O = 0, w = 1
    o, lse, w = inducer_attention_reference(q, k, v, *mlp, key_padding_mask=kpm)
    assert torch.isinf(lse[1]).all() and (lse[1] < 0).all() and not o[1].any() and (w[1] == 1).all()
    assert torch.isfinite(lse[0]).all()


def test_reference_gradcheck_float64():
    q, k, v, mlp, kpm = _mask_case(B=2, H=1, Tq=3, Tk=4, d=3, m=2)
    kpm[1, 0] = True  # row 1 keeps one key; a fully masked row is covered by the next call
    inputs = [t.requires_grad_() for t in (q, k, v, *mlp)]

    def f(*ts):
        o, lse, w = inducer_attention_reference(*ts, scale=0.7, causal=True, key_padding_mask=kpm)
        return o, torch.where(torch.isinf(lse), 0, lse), w

    assert torch.autograd.gradcheck(f, inputs)
    kpm[1] = False
    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------------
# fully masked rows, gating, no key MLP on the fused path

def test_fully_masked_rows_fused(poisoned):
    fa.skip_unless_runnable("triton", torch.float32)
    q, k, v, mlp, kpm = _mask_case(Tq=9, Tk=4, d=16)
    leaves = [t.float().to(fa.DEVICE).requires_grad_() for t in (q, k, v, *mlp)]
    kadapt.set_backend("triton")
    o, lse, w = inducer_attention(*leaves, causal=True, key_padding_mask=kpm.to(fa.DEVICE))
    assert poisoned
    assert torch.isneginf(lse[1]).all() and not o[1].any() and (w[1] == 1).all()
    assert torch.isneginf(lse[0, :, :5]).all() and (w[0, :, :5] == 1).all()  # causal, Tq > Tk: rows 0..4 see no key
    grads = torch.autograd.grad([o, lse, w], leaves, [torch.randn_like(o), torch.randn_like(lse), torch.randn_like(w)])
    assert all(torch.isfinite(g).all() for g in grads)
    assert not grads[1][1].any() and not grads[2][1].any()  # no key of batch row 1 is seen
    assert not grads[0][1].any()  # w ≡ 1 there: no gradient reaches q


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gating(backend, poisoned):
    fa.skip_unless_runnable(backend, torch.float32)
    q, k, v, mlp, kpm = _mask_case(Tq=6, Tk=11, d=16)
    leaves = [t.float().to(fa.DEVICE).requires_grad_() for t in (q, k, v, *mlp)]
    kadapt.set_backend(backend)
    og, lse, w = inducer_attention(*leaves, key_padding_mask=kpm.to(fa.DEVICE), gating=True)
    o, _, _ = inducer_attention(*leaves, key_padding_mask=kpm.to(fa.DEVICE))
    torch.testing.assert_close(og, (1 - w)[..., None] * o)
    dy = torch.randn_like(og)
    g = torch.autograd.grad(og, leaves, dy)
    l64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
    o64, _, _ = inducer_attention_reference(*l64, key_padding_mask=kpm, gating=True)
    g64 = torch.autograd.grad(o64, l64, dy.double().cpu())
    for a, b in zip(g, g64):
        assert_matches(a, b, None, torch.float32, "gated grad")


# ---------------------------------------------------------------------------------------------
# dispatch

def _small(device="cpu", dtype=torch.float32, m=3, d=16):
    q, k, v, mlp, kpm = _mask_case(d=d, m=m)
    return [t.to(device, dtype) for t in (q, k, v, *mlp)], kpm.to(device)


def test_auto_on_cpu_is_the_reference():
    ts, kpm = _small()
    got = inducer_attention(*ts, causal=True, key_padding_mask=kpm)
    ref = inducer_attention_reference(*ts, causal=True, key_padding_mask=kpm)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert backends.resolve("inducer_attention", ts[0]) == "reference"


def test_forced_cuda_on_cpu_tensors_raises():
    ts, kpm = _small()
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match="'cuda' is forced but cannot run inducer_attention: inputs are not CUDA"):
        inducer_attention(*ts)


# ---------------------------------------------------------------------------------------------
# the "cuda" backend's Python glue on the CPU: the call of kadapt::inducer_attention_fwd (op_module._cuda_fwd,
# one line) stood in by its math (the reference), so the dispatch, the autograd glue (CUDA forward + Triton
# backward) and the compile path run without a GPU. (Patching torch.ops.kadapt itself breaks torch internals
# that later walk the op namespaces.) The kernel: tests/ops/test_cuda_kernels.py (GPU).

def _cuda_stand_in(monkeypatch) -> list:
    """Replace the CUDA forward by the reference math; returns the list of recorded calls."""
    calls = []

    def fwd(q, k, v, mlp, kpm, scale, causal):
        calls.append(dict(contiguous=all(t.is_contiguous() for t in (q, k, v)), kpm=kpm, scale=scale,
                          causal=causal, mlp=mlp[0] is not None))
        mask = None if kpm is None else kpm.bool()
        with torch.no_grad():
            return inducer_attention_reference(q, k, v, *mlp, scale, causal, mask)

    monkeypatch.setattr(op_module, "_cuda_fwd", fwd)
    monkeypatch.setattr(backends, "cuda_reason", lambda x: None)  # "the extension is built, CUDA tensors"
    return calls


def _glue_case(with_mlp=True):
    q, k, v, mlp, kpm = _mask_case(Tq=6, Tk=11, d=16)
    ts = (q, k, v, *mlp) if with_mlp else (q, k, v)
    return [t.float().to(fa.DEVICE).requires_grad_() for t in ts], kpm.to(fa.DEVICE)


@pytest.mark.parametrize("with_mlp", [True, False])
def test_forced_cuda_runs_the_cuda_forward_and_the_triton_backward(monkeypatch, poisoned, with_mlp):
    fa.skip_unless_runnable("triton", torch.float32)  # the backward is Triton's (the interpreter on the CPU)
    calls = _cuda_stand_in(monkeypatch)
    leaves, kpm = _glue_case(with_mlp)
    kadapt.set_backend("cuda")
    o, lse, w = inducer_attention(*leaves, scale=0.7, causal=True, key_padding_mask=kpm)
    assert len(calls) == 1 and not poisoned, "the forward must be the CUDA op alone"
    assert calls[0] == dict(contiguous=True, kpm=calls[0]["kpm"], scale=0.7, causal=True, mlp=with_mlp)
    assert calls[0]["kpm"].dtype == torch.int8 and calls[0]["kpm"].is_contiguous()
    gen = torch.Generator().manual_seed(3)
    ups = [torch.randn(t.shape, generator=gen).to(t) for t in (o, lse, w)]
    grads = torch.autograd.grad([o, lse, w], leaves, ups)
    assert poisoned, "the backward must run the Triton kernels"
    l64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
    o64, lse64, w64 = inducer_attention_reference(*l64, scale=0.7, causal=True, key_padding_mask=kpm.cpu())
    g64 = torch.autograd.grad([o64, lse64, w64], l64, [u.double().cpu() for u in ups])
    assert_matches(o, o64, None, torch.float32, "O")
    assert_stat_matches(lse, lse64, None, torch.float32, "LSE")
    assert_matches(w, w64, None, torch.float32, "w")
    for g, r in zip(grads, g64):
        assert_matches(g, r, None, torch.float32, "grad")


def test_forced_cuda_backward_without_triton_raises(monkeypatch):
    calls = _cuda_stand_in(monkeypatch)
    monkeypatch.setattr(backends, "triton_reason", lambda x, forced: "triton is not installed")
    leaves, kpm = _glue_case()
    kadapt.set_backend("cuda")
    o, _, w = inducer_attention(*leaves, key_padding_mask=kpm)
    assert calls
    with pytest.raises(RuntimeError, match=r"CUDA forward only and its backward runs the Triton kernels, which "
                                           r"cannot run here \(triton is not installed\)"):
        torch.autograd.grad(o.sum() + w.sum(), leaves)


def _extra_kwargs(name, ts):
    B, H, Tq, Tk = ts[0].shape[0], ts[0].shape[1], ts[0].shape[2], ts[1].shape[2]
    return {"attn_mask": {"attn_mask": torch.ones(B, 1, Tq, Tk, dtype=torch.bool)},
            "attn_bias": {"attn_bias": torch.zeros(1, H, Tq, Tk)},
            "dropout_p": {"dropout_p": 0.1}}[name]


@pytest.mark.parametrize("case", ["m_k", "float64", "attn_mask", "attn_bias", "dropout_p"])
def test_forced_cuda_refuses_what_the_kernel_cannot_take(monkeypatch, case):
    calls = _cuda_stand_in(monkeypatch)
    if case == "m_k":
        ts, _ = _small(m=op_module.CUDA_MAX_KEY_MLP + 1)
        kwargs, match = {}, "key-MLP width m_k=129 exceeds the kernel's 128"
    elif case == "float64":
        ts, _ = _small(dtype=torch.float64)
        kwargs, match = {}, "dtype torch.float64 is not one of"
    else:
        ts, _ = _small()
        kwargs = _extra_kwargs(case, ts)
        match = {"attn_mask": "attn_mask: computed by the reference only",
                 "attn_bias": "attn_bias: the CUDA forward has no logit bias",
                 "dropout_p": "dropout_p > 0: the CUDA forward has no attention-probability dropout"}[case]
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match=f"'cuda' is forced but cannot run inducer_attention: {match}"):
        inducer_attention(*ts, **kwargs)
    assert not calls
    kadapt.set_backend("auto")  # auto: the reference, never the CUDA kernel
    ref = inducer_attention_reference(*ts, **kwargs) if case != "dropout_p" else None
    got = inducer_attention(*ts, **kwargs)
    assert not calls
    if ref is not None:
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_auto_prefers_triton_then_cuda(monkeypatch, poisoned):
    """auto's order is ("triton", "cuda"): Triton when it can run, else the CUDA forward (only where its
    Triton backward is not needed or can run), else the reference."""
    fa.skip_unless_runnable("triton", torch.float32)
    assert op_module.AUTO_ORDER == ("triton", "cuda")
    calls = _cuda_stand_in(monkeypatch)
    monkeypatch.setattr(backends, "triton_reason", lambda x, forced: None)  # both fused backends can run
    ts, kpm = _small(device=fa.DEVICE)
    ref = inducer_attention_reference(*ts, key_padding_mask=kpm)
    got = inducer_attention(*ts, key_padding_mask=kpm)
    assert poisoned and not calls, "auto must run Triton first"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Triton cannot take these inputs (here: a narrower m_k limit): the CUDA forward is next
    del poisoned[:]
    monkeypatch.setattr(op_module, "TRITON_MAX_KEY_MLP", 2)
    got = inducer_attention(*ts, key_padding_mask=kpm)
    assert len(calls) == 1 and not poisoned
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    # no triton at all: the CUDA forward without gradients, the reference when gradients are needed
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    monkeypatch.setattr(backends, "triton_reason", lambda x, forced: "triton is not installed")
    inducer_attention(*ts, key_padding_mask=kpm)
    assert len(calls) == 2
    leaves = [t.clone().requires_grad_() for t in ts]
    o = inducer_attention(*leaves, key_padding_mask=kpm)[0]
    assert len(calls) == 2 and o.grad_fn is not None  # the reference ran
    with torch.no_grad():
        inducer_attention(*leaves, key_padding_mask=kpm)
    assert len(calls) == 3


@pytest.mark.parametrize("with_mlp", [True, False])
def test_compiles_fullgraph_with_forced_cuda(monkeypatch, poisoned, with_mlp):
    """Under torch.compile the custom op kadapt::inducer_attention runs the CUDA forward (backend argument)
    and the Triton backward: same outputs and gradients as eager."""
    fa.skip_unless_runnable("triton", torch.float32)
    torch._dynamo.reset()
    calls = _cuda_stand_in(monkeypatch)
    leaves, kpm = _glue_case(with_mlp)

    def f(*xs):
        o, lse, w = inducer_attention(*xs, causal=True, key_padding_mask=kpm)
        return o, torch.where(torch.isinf(lse), 0, lse), w

    kadapt.set_backend("cuda")
    gen = torch.Generator().manual_seed(1)
    outs = f(*leaves)
    ups = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    g_eager = torch.autograd.grad(outs, leaves, ups)
    n_calls, n_triton = len(calls), len(poisoned)
    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
    outs_c = compiled(*leaves)
    assert len(calls) > n_calls, "the compiled function did not run the CUDA forward"
    g = torch.autograd.grad(outs_c, leaves, ups)
    assert len(poisoned) > n_triton, "the compiled backward did not run the Triton kernels"
    for a, b in zip(outs_c, outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_wide_key_mlp_beyond_the_kernel():
    ts, kpm = _small(device=fa.DEVICE, m=129)
    ref = inducer_attention_reference(*ts)
    if fa.GPU:  # auto falls back to the reference for CUDA tensors too
        torch.testing.assert_close(inducer_attention(*ts)[0], ref[0])
    if backends.triton_importable() and (fa.GPU or backends.triton_interpret()):
        kadapt.set_backend("triton")
        with pytest.raises(RuntimeError, match="m_k=129 exceeds"):
            inducer_attention(*ts)


def test_float64_forced_triton_raises():
    ts, _ = _small(device=fa.DEVICE, dtype=torch.float64)
    kadapt.set_backend("triton")
    if backends.triton_importable() and (fa.GPU or backends.triton_interpret()):
        with pytest.raises(RuntimeError, match="float64"):
            inducer_attention(*ts)


# ---------------------------------------------------------------------------------------------
# bad inputs: ValueError naming the argument, on every backend (checked before dispatch)

def _bad_inputs():
    (q, k, v, A, a, Bm, b), kpm = _small()
    return {
        "q 3-D": ((q[0], k, v), {}, "q must be a 4-D"),
        "d > 128": ((torch.randn(1, 2, 3, 129), torch.randn(1, 2, 4, 129), torch.randn(1, 2, 4, 129)), {},
                    "q: head dim d=129"),
        "k heads": ((q, k[:, :1], v), {}, "k has H_kv=1 heads but v has H_kv=2: k and v must have the same"),
        "v heads": ((q, k, v[:, :1]), {}, "k has H_kv=2 heads but v has H_kv=1: k and v must have the same"),
        "kv heads": ((q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), {},
                     r"k, v have H_kv=3 heads but q has H=2: .*allowed H_kv for H=2: 1, 2"),
        "k batch": ((q, k[:1], v), {}, "k has batch 1"),
        "k dim": ((q, k[..., :5], v), {}, "k has head dim 5"),
        "v keys": ((q, k, v[:, :, :3]), {}, "v has Tk=3"),
        "A_k heads": ((q, k, v, A[:1], a, Bm, b), {}, r"A_k must be \(H=2"),
        "a_k": ((q, k, v, A, a[:, :2], Bm, b), {}, r"a_k must have shape \(2, 3\)"),
        "B_k": ((q, k, v, A, a, Bm[..., :4], b), {}, r"B_k must have shape \(2, 3, 16\)"),
        "b_k": ((q, k, v, A, a, Bm, b[:1]), {}, r"b_k must have shape \(2, 16\)"),
        "partial mlp": ((q, k, v, A, a, None, b), {}, "missing B_k"),
        "mask shape": ((q, k, v), {"key_padding_mask": kpm[:, :3]}, "key_padding_mask must have shape"),
        "mask dtype": ((q, k, v), {"key_padding_mask": kpm.float()}, "key_padding_mask must be a bool"),
        "dtype": ((q, k.double(), v), {}, "k has dtype torch.float64 but q has torch.float32"),
    }


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cuda"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error(case, backend):
    args, kwargs, match = _bad_inputs()[case]
    kadapt.set_backend(backend)
    with pytest.raises(ValueError, match=match):
        inducer_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile (fullgraph) runs the custom ops: same forward and gradients as eager

@pytest.mark.parametrize("with_mlp", [True, False])
def test_compiles_fullgraph_with_triton(with_mlp, poisoned):
    fa.skip_unless_runnable("triton", torch.float32)
    torch._dynamo.reset()
    ts, kpm = _small(device=fa.DEVICE)
    if not with_mlp:
        ts = ts[:3]
    leaves = [t.requires_grad_() for t in ts]

    def f(*xs):
        o, lse, w = inducer_attention(*xs, causal=True, key_padding_mask=kpm)
        return o, torch.where(torch.isinf(lse), 0, lse), w

    kadapt.set_backend("triton")
    gen = torch.Generator().manual_seed(1)
    outs = f(*leaves)
    ups = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    g_eager = torch.autograd.grad(outs, leaves, ups)
    calls = len(poisoned)
    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
    outs_c = compiled(*leaves)
    g = torch.autograd.grad(outs_c, leaves, ups)
    assert len(poisoned) > calls, "the compiled function did not run the Triton kernels"
    for a, b in zip(outs_c, outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_forward_refuses_dropout_even_through_the_custom_op():
    """The CUDA forward has no dropout; its (Triton) backward would recompute a mask the forward never
    applied, so the custom op itself refuses rather than returning mismatched gradients later."""
    ts, _ = _small()
    seed = torch.tensor(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="the CUDA forward has no attention-probability dropout"):
        torch.ops.kadapt.inducer_attention(*ts[:3], None, None, None, None, None, 0.5, False, "cuda", 0.3, seed, None)


def test_attn_bias_runs_fused_unless_it_needs_a_gradient(monkeypatch, poisoned):
    """attn_bias (T5's relative bias) runs in the Triton kernels (no bias gradient); a bias that requires
    grad goes to the reference under auto, and a forced Triton refuses it."""
    fa.skip_unless_runnable("triton", torch.float32)
    ts, kpm = _small(device="cuda" if torch.cuda.is_available() else "cpu")
    H, Tq, Tk = ts[0].shape[1], ts[0].shape[2], ts[1].shape[2]
    bias = torch.randn(1, H, Tq, Tk, device=ts[0].device)
    kadapt.set_backend("triton")
    try:
        got = inducer_attention(*ts, key_padding_mask=kpm, attn_bias=bias)
        assert poisoned, "the Triton kernels must run"
        ref = inducer_attention_reference(*ts, key_padding_mask=kpm, attn_bias=bias)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        with pytest.raises(RuntimeError, match="attn_bias requires grad: the fused kernels give the bias no gradient"):
            inducer_attention(*ts, key_padding_mask=kpm, attn_bias=bias.requires_grad_())
    finally:
        kadapt.set_backend("auto")


# ---------------------------------------------------------------------------------------------
# autocast (kadapt/ops/_common.py: autocast_dtype / autocast_cast)

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_follows_autocast(backend, poisoned):
    """Under autocast q, k, v, the key MLP and attn_bias are cast to the autocast dtype before the backend is
    chosen (mixed dtypes are fine), O comes back in it, and the gradients reach the inputs in their own dtype;
    outside autocast mixed dtypes raise the ValueError naming the field."""
    device = "cuda" if fa.GPU else "cpu"
    dtype = torch.bfloat16
    if backend == "triton":
        if not fa.GPU:
            pytest.skip("bf16 Triton needs a GPU (the interpreter runs fp32 only)")
        fa.skip_unless_runnable("triton", dtype)
    ts, kpm = _small(device=device)
    ts[1] = ts[1].to(dtype)  # k in bf16, the rest fp32
    leaves = [t.requires_grad_() for t in ts]
    bias = torch.randn(1, ts[0].shape[1], ts[0].shape[2], ts[1].shape[2], device=device)
    with pytest.raises(ValueError, match="k has dtype torch.bfloat16 but q has torch.float32"):
        inducer_attention(*leaves, key_padding_mask=kpm)
    kadapt.set_backend(backend)
    try:
        with torch.autocast(device, dtype=dtype):
            o, lse, w = inducer_attention(*leaves, causal=True, key_padding_mask=kpm, attn_bias=bias)
        assert o.dtype == dtype and lse.dtype == torch.float32 and w.dtype == torch.float32
        if backend == "triton":
            assert poisoned, "the Triton kernels must run"
        ref = inducer_attention_reference(*[t.detach().to(dtype) for t in leaves], causal=True,
                                          key_padding_mask=kpm, attn_bias=bias.to(dtype))
        for a, b in zip((o, lse, w), ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        grads = torch.autograd.grad((o.float().sum() + w.sum()), leaves)
        assert [g.dtype for g in grads] == [t.dtype for t in leaves]
        assert all(torch.isfinite(g).all() for g in grads)
    finally:
        kadapt.set_backend("auto")
