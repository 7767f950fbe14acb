"""Inducer attention: softmax attention plus the inducer weight w = σ(s0 − LSE) (METHODS.md §8, §12.1).

Per (batch, head) and query row q_i (shapes: q (B, H, Tq, d), k, v (B, H_kv, Tk, d)):

    s_ij = c⟨q_i, k_j⟩ over the *real* keys j (masked: causal, key padding)
    O_i  = Σ_j softmax_j(s_i·) v_j          (standard attention, unmodified)
    LSE_i = log Σ_j exp(s_ij)               (fp32; float64 for float64 inputs)
    s0_i = c⟨q_i, q_i + φ(q_i)⟩,  φ(q) = tanh(q A_k + a_k) B_k + b_k per head (identity key p = q when
           the key MLP is None)
    w_i  = σ(s0_i − LSE_i)  = column 0 of the softmax over [s0_i | s_i·]  (the inducer's weight)

The value MLP, dropout on w, gating and the value extension are cheap epilogue math done by the method.

Grouped-query attention (GQA: Llama, Qwen2, Mistral). k and v may have H_kv heads with H_kv dividing H
(H_kv = H is multi-head attention): query head h attends with KV head h // G, G = H / H_kv (transformers'
``repeat_kv`` convention: the result equals the call with k, v expanded by ``repeat_interleave(G, dim=1)``, and
dK, dV are that call's gradients summed over each group). Everything else stays per QUERY head: the key MLP
(H heads), s0, LSE, w, O, the attention mask / bias (broadcast to (B, H, Tq, Tk)) and the dropout mask (keyed by
b·H + h). The reference expands k and v in PyTorch; the Triton kernels read the shared KV head in place (no
repeat_kv copy): the forward and dQ kernels index KV head h // G, the dK/dV kernel loops over the G query heads
of its KV head (deterministic, no atomics). The CUDA forward takes MHA only: GQA calls go to the next backend
under "auto", and a forced "cuda" raises ValueError.

Extras. ``attn_bias`` adds to the real logits only (T5's relative position bias; s0 never gets it; the
Triton kernels read it through broadcast strides and give it no gradient). ``dropout_p`` drops attention
probabilities in O only (never LSE or w); the Triton kernels draw a Philox mask keyed by a seed from
torch's CPU generator and recompute it in the backward. ``attn_mask`` (a general 4-D bool mask) runs the
reference. The CUDA forward takes none of the three.

Masks. ``causal`` aligns the query block to the END of the keys (decoding with a cache): query i sees
keys j ≤ i + Tk − Tq. ``key_padding_mask`` (B, Tk) bool, True = keep. A query row that sees no key at
all (fully masked, e.g. all keys padded, or causal with Tq > Tk) is defined as: LSE = −inf, O = 0,
w = 1 (the concat softmax puts all its mass on the inducer column), and it passes no gradient through
O, LSE or w (w is constant 1 there).

Backends (kadapt.set_backend): ``reference`` (the PyTorch formula below, the truth); ``triton``
(kadapt/ops/triton/inducer_attention.py: a FlashAttention-2 style forward with the key-MLP prologue and
the σ epilogue, and a fused backward: a preprocessing kernel delta_i = rowsum(dO ⊙ O) − ∂L/∂LSE_i with
∂L/∂LSE_i = dLSE_i − w_i(1 − w_i) dw_i, the dK/dV and the dQ kernels (dQ also adds the s0 term of the
key-MLP prologue); the key-MLP parameter gradients are token reductions done in PyTorch from recomputed
h, O(T·d·m_k)); ``cuda`` (kadapt._C, csrc/inducer_attention.cu, op ``kadapt::inducer_attention_fwd``): a
CUDA *forward* only, computing the same (O, LSE, w) as the Triton forward (FA2-style online softmax on
tensor cores for fp16/bf16, a CUDA-core fp32 path, the key-MLP prologue and the σ epilogue; any d ≤ 128,
m_k ≤ 128). Its backward is the Triton backward above: that needs only q, k, v, the key MLP, the mask and
the saved O, LSE, w, which the CUDA forward provides, so a forced "cuda" needs Triton for gradients and
its backward raises RuntimeError where Triton cannot run (it never falls back silently). ``auto`` tries
Triton, then CUDA (``AUTO_ORDER``), then the reference: Triton runs CUDA tensors and the reference runs
everything else.

One autograd path (kadapt/ops/_common.py): the fused backends run ``_InducerAttentionFunction``, whose
forward calls the custom op ``kadapt::inducer_attention`` (its ``backend`` argument picks the Triton or the
CUDA forward) and whose backward calls ``kadapt::inducer_attention_backward`` (Triton); both are defined by
``_common.define`` (schema, CPU/CUDA kernel, fake kernel, no autograd of their own). Eager mode and
``torch.compile(fullgraph=True)`` run that same Function, so they compute the same gradients with the same
kernels (on plain eager tensors the ops' kernel function is called without the dispatcher round trip).

Autocast: when autocast is enabled for q's device type, q, k, v, the key-MLP tensors and ``attn_bias`` are
cast to the autocast dtype (float64 tensors excepted, as autocast does) before the backend is chosen; O comes
back in that dtype (LSE and w in fp32) and the gradients reach the inputs in their own dtype. Outside autocast,
q, k, v and the key MLP must share one dtype (ValueError naming the first that does not).
"""
from __future__ import annotations

import math

import torch

from kadapt import _extension, backends
from kadapt.ops._common import FLOAT_DTYPES, autocast_cast, autocast_dtype, define, log_backend, unsupported_dtype

_DTYPES = FLOAT_DTYPES
MAX_HEAD_DIM = 128
# Widest key MLP the Triton kernels take (the padded m_k tile); wider ones run the reference under "auto".
TRITON_MAX_KEY_MLP = 128
# Widest key MLP and head dim of the CUDA forward (csrc/inducer_attention.cu).
CUDA_MAX_KEY_MLP = _extension.INDUCER_ATTENTION_MAX_KEY_MLP
CUDA_MAX_HEAD_DIM = _extension.INDUCER_ATTENTION_MAX_HEAD_DIM
# Fused backends under "auto", first that can run wins. Triton first: the two forwards have not been
# measured against each other yet (and only Triton has a backward of its own).
AUTO_ORDER = ("triton", "cuda")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of LSE and w: fp32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# reference (the truth)

def key_mlp(q: torch.Tensor, A_k, a_k, B_k, b_k) -> torch.Tensor:
    """φ(q) = tanh(q A_k + a_k) B_k + b_k per head; q (B, H, T, d), A_k (H, d, m), a_k (H, m),
    B_k (H, m, d), b_k (H, d). Zero when the key MLP is None (identity key p = q)."""
    if A_k is None:
        return torch.zeros_like(q)
    h = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, A_k) + a_k[:, None, :])
    return torch.einsum("bhtm,hmd->bhtd", h, B_k) + b_k[:, None, :]


def inducer_logit(q, A_k, a_k, B_k, b_k, scale: float) -> torch.Tensor:
    """s0 = c⟨q, q + φ(q)⟩, shape (B, H, Tq)."""
    return scale * (q * (q + key_mlp(q, A_k, a_k, B_k, b_k))).sum(-1)


def attention_mask(B: int, Tq: int, Tk: int, causal: bool, key_padding_mask: torch.Tensor | None,
                   device) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool, True where query i may see key j."""
    keep = torch.ones((B, 1, Tq, Tk), dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        keep = keep & (j <= i + (Tk - Tq))
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].to(torch.bool)
    return keep


def expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, H, T, d) view of a (B, H_kv, T, d) key or value tensor for H query heads (GQA; H_kv divides H):
    query head h gets KV head h // (H / H_kv), transformers' ``repeat_kv``. Itself when H_kv = H. A copy (the
    reference's clarity; the fused kernels index the shared head instead); its backward sums over the groups."""
    G = H // t.shape[1] if t.shape[1] else 1
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def _real_logits(q, k, scale, causal, key_padding_mask, attn_mask=None, attn_bias=None):
    """(s with −inf where masked, keep mask). ``attn_mask`` (bool, True = keep) and ``attn_bias``
    (additive) broadcast to (B, H, Tq, Tk); k may have H_kv heads (GQA, expanded here)."""
    keep = attention_mask(q.shape[0], q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if attn_mask is not None:
        keep = keep & attn_mask
    s = scale * (q @ expand_kv(k, q.shape[1]).transpose(-1, -2))
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    return s.masked_fill(~keep, float("-inf")), keep


def inducer_attention_reference(q, k, v, A_k=None, a_k=None, B_k=None, b_k=None, scale: float | None = None,
                                causal: bool = False, key_padding_mask: torch.Tensor | None = None,
                                gating: bool = False, attn_mask: torch.Tensor | None = None,
                                attn_bias: torch.Tensor | None = None, dropout_p: float = 0.0):
    """(O, LSE, w): standard attention over the real keys, its log-sum-exp and σ(s0 − LSE).

    k, v may have H_kv heads dividing q's H (GQA: query head h uses KV head h // (H / H_kv); expanded here).
    Fully masked rows give LSE = −inf, O = 0, w = 1 with finite (zero) gradients. With ``gating``,
    O is replaced by (1 − w)·O. ``attn_mask`` / ``attn_bias`` (e.g. T5's relative position bias) enter
    the real logits only (s0 gets neither); ``dropout_p`` drops attention probabilities (O only, never
    LSE or w).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, keep = _real_logits(q, k, scale, causal, key_padding_mask, attn_mask, attn_bias)
    any_key = keep.any(-1)  # (B, 1 or H, Tq)
    s_safe = torch.where(any_key[..., None], s, torch.zeros((), dtype=s.dtype, device=s.device))
    lse_safe = torch.logsumexp(s_safe, -1)
    p = torch.exp(s_safe - lse_safe[..., None]) * keep
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    o = p @ expand_kv(v, q.shape[1])
    s0 = inducer_logit(q, A_k, a_k, B_k, b_k, scale)
    w = torch.where(any_key, torch.sigmoid(s0 - lse_safe), torch.ones((), dtype=s0.dtype, device=s0.device))
    lse = torch.where(any_key, lse_safe, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
    if gating:
        o = (1 - w)[..., None].to(o.dtype) * o
    st = _stats_dtype(q.dtype)
    return o, lse.to(st), w.to(st)


def inducer_attention_concat_reference(q, k, v, A_k=None, a_k=None, B_k=None, b_k=None, scale: float | None = None,
                                       causal: bool = False, key_padding_mask: torch.Tensor | None = None):
    """The concat-softmax formulation (METHODS.md §12.1): logits [s0 | s] (Tq × (Tk + 1)), −inf where
    masked (s0 never), softmax over the concatenation. Returns (w, O) with w = column 0 and O the real
    columns renormalised (= standard attention; 0 on a fully masked row). k, v may have H_kv heads (GQA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, keep = _real_logits(q, k, scale, causal, key_padding_mask)
    s0 = inducer_logit(q, A_k, a_k, B_k, b_k, scale)
    full = torch.cat([s0[..., None], s.expand(*s0.shape, s.shape[-1])], -1)
    probs = torch.softmax(full, -1)
    w = probs[..., 0]
    real = probs[..., 1:]
    mass = real.sum(-1, keepdim=True)
    o = torch.where(mass > 0, real / torch.where(mass > 0, mass, 1), 0) @ expand_kv(v, q.shape[1])
    return w, o


# ---------------------------------------------------------------------------------------------
# fused path (Triton)

def _mlp_grads(q, ds0, A_k, a_k, B_k, scale):
    """Key-MLP parameter gradients from ∂L/∂s0 (fp32 token reductions over recomputed h):
    with g = c·ds0, u = (q B_kᵀ) ⊙ (1 − h²):  dB = hᵀ(g q), db = Σ g q, dA = qᵀ(g u), da = Σ g u."""
    acc = _stats_dtype(q.dtype)
    qf = q.to(acc)
    A, a, Bm = A_k.to(acc), a_k.to(acc), B_k.to(acc)
    h = torch.tanh(torch.einsum("bhtd,hdm->bhtm", qf, A) + a[:, None, :])
    g = (scale * ds0.to(acc))[..., None]
    gq = g * qf
    u = g * torch.einsum("bhtd,hmd->bhtm", qf, Bm) * (1 - h * h)
    dB = torch.einsum("bhtm,bhtd->hmd", h, gq)
    db = gq.sum((0, 2))
    dA = torch.einsum("bhtd,bhtm->hdm", qf, u)
    da = u.sum((0, 2))
    return dA.to(A_k.dtype), da.to(a_k.dtype), dB.to(B_k.dtype), db


def _cuda_fwd(q, k, v, mlp, kpm, scale, causal):
    """kadapt::inducer_attention_fwd (kadapt._C). The CPU tests of the "cuda" glue stand this in by its math."""
    return torch.ops.kadapt.inducer_attention_fwd(q, k, v, *mlp, kpm, scale, causal)


def _triton_extras(dropout_p, seed, bias) -> dict:
    extra = {"dropout_p": dropout_p, "seed": int(seed)} if dropout_p > 0 else {}
    if bias is not None:
        extra["bias"] = bias
    return extra


def _fwd(q, k, v, mlp, kpm, scale, causal, backend, dropout_p=0.0, seed=None, bias=None):
    """(O, LSE, w) from the Triton forward or (backend "cuda") the CUDA one; same function, same outputs.
    ``seed`` (an int64 CPU tensor) keys the Philox dropout mask when ``dropout_p`` > 0 and ``bias`` is an
    additive logit bias (both Triton only)."""
    if backend == "cuda":
        if dropout_p > 0 or bias is not None:  # the Triton backward would assume what this forward never did
            raise RuntimeError("inducer_attention: the CUDA forward has no attention-probability dropout and no "
                               "logit bias; dropout_p > 0 or attn_bias need the 'triton' or 'reference' backend")
        if k.shape[1] != q.shape[1]:
            raise RuntimeError(f"inducer_attention: {_CUDA_GQA_REASON} (q has H={q.shape[1]}, k, v H_kv={k.shape[1]})")
        return _cuda_fwd(q, k, v, mlp, kpm, scale, causal)
    from kadapt.ops.triton import inducer_attention as kernels

    return kernels.inducer_attention_fwd(q, k, v, *mlp, kpm, scale, causal, **_triton_extras(dropout_p, seed, bias))


def _check_backward_runs(q, backend) -> None:
    """Every backend's backward is the Triton one (_bwd): refuse clearly where Triton cannot run."""
    if backend != "cuda":
        return
    reason = backends.triton_reason(q, forced=True)
    if reason is not None:
        raise RuntimeError(f"inducer_attention: the 'cuda' backend has a CUDA forward only and its backward runs "
                           f"the Triton kernels, which cannot run here ({reason}); use kadapt.set_backend('auto') "
                           f"or 'reference' to train")


def _bwd(q, k, v, mlp, kpm, o, lse, w, do, dlse, dw, scale, causal, dropout_p=0.0, seed=None, bias=None):
    """(dq, dk, dv, dA, da, dB, db) (MLP grads None without a key MLP); the dropout mask is recomputed from
    the forward's seed; the bias gets no gradient (T5's relative-bias table is frozen)."""
    from kadapt.ops.triton import inducer_attention as kernels

    dq, dk, dv, ds0 = kernels.inducer_attention_bwd(q, k, v, *mlp, kpm, o, lse, w, do, dlse, dw, scale, causal,
                                                    **_triton_extras(dropout_p, seed, bias))
    if mlp[0] is None:
        return dq, dk, dv, None, None, None, None
    dA, da, dB, db = _mlp_grads(q, ds0, mlp[0], mlp[1], mlp[2], scale)
    return dq, dk, dv, dA, da, dB, db.to(mlp[3].dtype)


def _zeros_or(g, like):
    return torch.zeros_like(like, dtype=_stats_dtype(like.dtype)) if g is None else g.contiguous()


# ---------------------------------------------------------------------------------------------
# the kernel boundary: custom ops (no autograd of their own; _InducerAttentionFunction is their autograd)

def _forward_impl(q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal, backend, dropout_p, seed, bias):
    return _fwd(q, k, v, (A_k, a_k, B_k, b_k), kpm, scale, causal, backend, dropout_p, seed, bias)


def _forward_fake(q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal, backend, dropout_p, seed, bias):
    st = _stats_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=st), q.new_empty(q.shape[:-1], dtype=st)


# (O, LSE, w) for contiguous q (B, H, Tq, d) and k, v (B, H_kv, Tk, d) (H_kv divides H: GQA); kpm is the int8
# (B, Tk) key padding mask or None; ``backend`` ("triton" | "cuda") picks the forward kernel (the backward is
# Triton's either way); ``seed`` (int64 CPU scalar tensor) keys the attention-probability dropout when
# ``dropout_p`` > 0; ``bias`` is an additive logit bias broadcasting to (B, H, Tq, Tk) (no gradient).
_inducer_attention_op = define(
    "inducer_attention(Tensor q, Tensor k, Tensor v, Tensor? A_k, Tensor? a_k, Tensor? B_k, Tensor? b_k, "
    "Tensor? kpm, float scale, bool causal, str backend, float dropout_p, Tensor? seed, Tensor? bias) "
    "-> (Tensor, Tensor, Tensor)", _forward_impl, _forward_fake)


def _backward_impl(q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, do, dlse, dw, scale, causal, dropout_p, seed, bias):
    grads = _bwd(q, k, v, (A_k, a_k, B_k, b_k), kpm, o, lse, w, do, dlse, dw, scale, causal, dropout_p, seed, bias)
    return [g for g in grads if g is not None]


def _backward_fake(q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, do, dlse, dw, scale, causal, dropout_p, seed,
                   bias):
    out = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    if A_k is not None:
        out += [torch.empty_like(A_k), torch.empty_like(a_k), torch.empty_like(B_k), torch.empty_like(b_k)]
    return out


# [dq, dk, dv] (+ [dA_k, da_k, dB_k, db_k] with a key MLP) (Triton); dk, dv have k's (B, H_kv, Tk, d) shape
# (GQA: summed over each KV head's query heads); do, dlse, dw contiguous (zeros for an output without gradient);
# dropout_p, seed and bias those of the forward.
_inducer_attention_backward_op = define(
    "inducer_attention_backward(Tensor q, Tensor k, Tensor v, Tensor? A_k, Tensor? a_k, Tensor? B_k, Tensor? b_k, "
    "Tensor? kpm, Tensor o, Tensor lse, Tensor w, Tensor do, Tensor dlse, Tensor dw, float scale, bool causal, "
    "float dropout_p, Tensor? seed, Tensor? bias) -> Tensor[]", _backward_impl, _backward_fake)


class _InducerAttentionFunction(torch.autograd.Function):
    """The autograd of the fused backends, in eager mode and under torch.compile alike: forward calls
    kadapt::inducer_attention (the Triton or the CUDA forward), backward kadapt::inducer_attention_backward
    (Triton)."""

    @staticmethod
    def forward(ctx, q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal, backend, dropout_p, seed, bias):
        o, lse, w = _inducer_attention_op(q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal, backend, dropout_p, seed,
                                          bias)
        ctx.save_for_backward(q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, seed, bias)
        ctx.meta = (scale, causal, backend, dropout_p)
        ctx.set_materialize_grads(False)
        return o, lse, w

    @staticmethod
    def backward(ctx, do, dlse, dw):
        q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, seed, bias = ctx.saved_tensors
        scale, causal, backend, dropout_p = ctx.meta
        _check_backward_runs(q, backend)
        do = torch.zeros_like(o) if do is None else do.contiguous()
        grads = _inducer_attention_backward_op(q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, do, _zeros_or(dlse, lse),
                                               _zeros_or(dw, w), scale, causal, dropout_p, seed, bias)
        if A_k is None:
            grads = [*grads, None, None, None, None]
        return (*grads, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# dispatch

def _check(q, k, v, mlp, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, T, d) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, H, Tq, d = q.shape
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim d={d} must be in 1..{MAX_HEAD_DIM}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise ValueError(f"{name} has batch {t.shape[0]} but q has {B}")
        if t.shape[3] != d:
            raise ValueError(f"{name} has head dim {t.shape[3]} but q has d={d}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has H_kv={k.shape[1]} heads but v has H_kv={v.shape[1]}: k and v must have the same "
                         f"number of heads")
    H_kv = k.shape[1]
    if (H_kv == 0) != (H == 0) or (H_kv and H % H_kv):
        allowed = [n for n in range(1, H + 1) if H % n == 0] or [0]
        raise ValueError(f"k, v have H_kv={H_kv} heads but q has H={H}: the number of KV heads must divide the "
                         f"number of query heads (grouped-query attention); allowed H_kv for H={H}: "
                         f"{', '.join(map(str, allowed))}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has Tk={v.shape[2]} keys but k has Tk={k.shape[2]}")
    Tk = k.shape[2]
    names = ("A_k", "a_k", "B_k", "b_k")
    given = [t is not None for t in mlp]
    if any(given) and not all(given):
        missing = [n for n, g in zip(names, given) if not g]
        raise ValueError(f"the key MLP needs all of A_k, a_k, B_k, b_k (or none for the identity key); "
                         f"missing {', '.join(missing)}")
    if all(given):
        A_k = mlp[0]
        if A_k.dim() != 3 or A_k.shape[0] != H or A_k.shape[1] != d or A_k.shape[2] < 1:
            raise ValueError(f"A_k must be (H={H}, d={d}, m_k≥1), got {tuple(A_k.shape)}")
        m = A_k.shape[2]
        for name, t, shape in (("a_k", mlp[1], (H, m)), ("B_k", mlp[2], (H, m, d)), ("b_k", mlp[3], (H, d))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"key_padding_mask must have shape (B, Tk) = {(B, Tk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    for name, t in (("k", k), ("v", v)) + tuple(zip(names, mlp)):
        if t is not None and t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v and the key MLP must "
                             f"share one dtype")


def _triton_unsupported(q, mlp) -> str | None:
    if q.dtype not in _DTYPES:
        return unsupported_dtype(q.dtype)
    if mlp[0] is not None and mlp[0].shape[2] > TRITON_MAX_KEY_MLP:
        return f"key-MLP width m_k={mlp[0].shape[2]} exceeds the kernel's {TRITON_MAX_KEY_MLP}"
    return None


# Why the CUDA forward refuses grouped-query attention (auto goes on to the next backend; a forced "cuda" raises).
_CUDA_GQA_REASON = ("grouped-query attention (k, v with fewer heads than q): the CUDA forward takes k, v with H "
                    "heads only; GQA runs on the 'triton' or 'reference' backend")


def _cuda_unsupported(q, mlp) -> str | None:
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the CUDA kernel needs compute capability ≥ 8.0 (mma.sync bf16, cp.async)"
    if q.dtype not in _DTYPES:
        return unsupported_dtype(q.dtype)
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        return f"head dim d={q.shape[-1]} exceeds the kernel's {CUDA_MAX_HEAD_DIM}"
    if mlp[0] is not None and mlp[0].shape[2] > CUDA_MAX_KEY_MLP:
        return f"key-MLP width m_k={mlp[0].shape[2]} exceeds the kernel's {CUDA_MAX_KEY_MLP}"
    return None


def _check_extras(q, k, attn_mask, attn_bias, dropout_p) -> None:
    B, H, Tq, _ = q.shape
    full = (B, H, Tq, k.shape[2])
    for name, t in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if t is None:
            continue
        if t.dim() != 4 or any(s not in (1, f) for s, f in zip(t.shape, full)):
            raise ValueError(f"{name} must broadcast to (B, H, Tq, Tk) = {full}, got {tuple(t.shape)}")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be a bool tensor (True = keep), got {attn_mask.dtype}")
    if attn_bias is not None and not attn_bias.dtype.is_floating_point:
        raise ValueError(f"attn_bias must be a floating-point tensor, got {attn_bias.dtype}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p={dropout_p!r} must be a number in [0, 1)")


def inducer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, A_k: torch.Tensor | None = None,
                      a_k: torch.Tensor | None = None, B_k: torch.Tensor | None = None,
                      b_k: torch.Tensor | None = None, scale: float | None = None, causal: bool = False,
                      key_padding_mask: torch.Tensor | None = None, gating: bool = False,
                      attn_mask: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None,
                      dropout_p: float = 0.0):
    """(O, LSE, w) on the backend in force; see the module docstring. ``scale`` defaults to 1/√d.

    q is (B, H, Tq, d); k and v are (B, H_kv, Tk, d) with H_kv dividing H (H_kv < H: grouped-query attention,
    query head h uses KV head h // (H / H_kv); dk, dv come back with k's H_kv heads). The key MLP
    (A_k (H, d, m_k), ...) is per query head. The CUDA forward takes H_kv = H only (a forced "cuda" raises
    ValueError on GQA inputs; "auto" runs Triton or the reference).

    With ``gating`` O is (1 − w)·O (applied to the kernel's output by PyTorch; gradients flow through both).
    ``dropout_p`` > 0 drops attention probabilities (O only; never LSE or w): the Triton kernels draw a
    Philox mask keyed by a seed taken from torch's CPU generator (so ``torch.manual_seed`` makes it
    reproducible) and recompute it in the backward; the reference uses torch's dropout (same distribution,
    another sample); the CUDA forward has no dropout. ``attn_bias`` (an additive logit bias broadcasting to
    (B, H, Tq, Tk), such as T5's relative position bias; s0 never gets it) runs in the Triton kernels, which
    give it no gradient: a bias that requires grad goes to the reference. ``attn_mask`` (a general bool
    keep-mask) is computed by the reference only. Under "auto" such calls run the next backend that can;
    a forced backend that cannot refuses them.
    """
    dtype = autocast_dtype(q) if isinstance(q, torch.Tensor) else None
    if dtype is not None:  # compute in the autocast dtype, as autocast casts a matmul's operands
        q, k, v, A_k, a_k, B_k, b_k, attn_bias = (autocast_cast(t, dtype) if isinstance(t, torch.Tensor) else t
                                                  for t in (q, k, v, A_k, a_k, B_k, b_k, attn_bias))
    mlp = (A_k, a_k, B_k, b_k)
    _check(q, k, v, mlp, key_padding_mask)
    _check_extras(q, k, attn_mask, attn_bias, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    mask_reason = None if attn_mask is None else "attn_mask: computed by the reference only (general masks)"
    if mask_reason is None and attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled():
        mask_reason = "attn_bias requires grad: the fused kernels give the bias no gradient (the reference does)"
    triton_reason = _triton_unsupported(q, mlp) or mask_reason
    gqa = f"{_CUDA_GQA_REASON} (q has H={q.shape[1]}, k, v H_kv={k.shape[1]})" if k.shape[1] != q.shape[1] else None
    cuda_reason = _cuda_unsupported(q, mlp) or mask_reason or gqa
    if cuda_reason is None and attn_bias is not None:
        cuda_reason = "attn_bias: the CUDA forward has no logit bias (Triton has)"
    if cuda_reason is None and dropout_p > 0:
        cuda_reason = "dropout_p > 0: the CUDA forward has no attention-probability dropout (Triton has)"
    if (cuda_reason is None and backends.get_backend() == "auto" and not backends.triton_importable()
            and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, *mlp))):
        # "auto" never picks a forward whose backward cannot run (a forced "cuda" raises in backward)
        cuda_reason = "its backward runs the Triton kernels and triton is not installed"
    backend = backends.resolve("inducer_attention", q, cuda_unsupported=cuda_reason,
                               triton_unsupported=triton_reason, order=AUTO_ORDER)
    log_backend("inducer_attention", backend)
    if backend == "reference":
        return inducer_attention_reference(q, k, v, A_k, a_k, B_k, b_k, scale, causal, key_padding_mask, gating,
                                           attn_mask, attn_bias, float(dropout_p))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mlp = tuple(None if t is None else t.contiguous() for t in mlp)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    dropout_p = float(dropout_p)
    # A CPU scalar from torch's default generator: reproducible under torch.manual_seed, no device sync.
    seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64) if dropout_p > 0 else None
    bias = attn_bias  # needs no gradient here (checked above): the T5 relative-bias table is frozen
    o, lse, w = _InducerAttentionFunction.apply(q, k, v, *mlp, kpm, scale, bool(causal), backend, dropout_p, seed,
                                                bias)
    if gating:
        o = (1 - w)[..., None].to(o.dtype) * o
    return o, lse, w
