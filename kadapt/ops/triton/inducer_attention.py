"""Triton kernels of inducer attention (METHODS.md §8, §12.1): FlashAttention-2 style forward and
backward with the inducer weight w = σ(s0 − LSE).

Layout: q (B, H, Tq, d), k, v (B, H_kv, Tk, d) contiguous (the op layer makes them so) with H = G·H_kv:
grouped-query attention (GQA; G = 1 is multi-head attention). Query head h of batch b (bh = b·H + h) reads KV
head h div G (transformers' repeat_kv convention) straight from k and v, row b·H_kv + h div G: no repeat_kv
copy is ever made. The head dim is padded to the constexpr BD = next_pow2(max(d, 16)) and the key-MLP width to
BMK = next_pow2(max(m_k, 16)); sequence lengths need not be multiples of the tiles.

Forward (one program per (query tile of BM rows, bh)):
  prologue  h = tanh(q A_k + a_k), φ = h B_k + b_k, s0 = c⟨q, q + φ⟩   (s0 = c‖q‖² without a key MLP)
  loop      online softmax over key tiles of BN (running max m, sum l, fp32 accumulator); with ``causal``
            the loop stops at the last key tile the query tile can see (query i sees j ≤ i + Tk − Tq)
  epilogue  O = acc / l, LSE = m + log l, w = σ(s0 − LSE); a row without any visible key gets
            O = 0, LSE = −inf, w = 1.
No Tq×Tk tensor is ever stored.

Backward (§12.1: only the FA2 delta changes):
  _bwd_preprocess  t_i = w_i(1 − w_i)·∂L/∂w_i;  ∂L/∂s0_i = t_i;  delta_i = rowsum(dO ⊙ O)_i − (dLSE_i − t_i)
  _bwd_dkdv        one program per (key tile, b·H_kv + KV head), looping over the G query heads of its KV
                   head and, for each, over the query tiles that can see the key tile:
                   P = exp(s − LSE), dV += Pᵀ dO, dS = P ⊙ (dO Vᵀ − delta), dK += c dSᵀ Q
                   (so dK, dV (B, H_kv, Tk, d) are the sums over the group, accumulated in fp32 registers:
                   no atomics, deterministic)
  _bwd_dq          one program per (query tile, bh), loop over key tiles: dQ = c dS K, then the
                   inducer-logit term dQ += c ∂L/∂s0 (2q + φ + ((q B_kᵀ) ⊙ (1 − h²)) A_kᵀ)
The key-MLP parameter gradients are O(T·d·m_k) token reductions left to the op layer.

Attention-probability dropout (``dropout_p`` > 0; standard FA2 dropout, LSE, s0 and w never affected):
  keep_ij ~ Bernoulli(1 − p), z_ij = keep_ij / (1 − p);  O_i = Σ_j P_ij z_ij v_j  (P the undropped softmax)
  backward: dV += (P ⊙ z)ᵀ dO, dS = P ⊙ (z ⊙ (dO Vᵀ) − delta) with the same delta (O there is the dropped O).
  The mask is never stored: every kernel recomputes keep_ij = tl.rand(key, i·Tk + j) ≥ p with the Philox key
  key = seed32 + 2³²·bh (key words k0 = seed32, k1 = bh; seed32 = lo32(seed) XOR hi32(seed), so a seed
  below 2³² is used as is) and the int32 counter i·Tk + j within the head: a function of (seed, bh, i, j)
  only, identical in the forward and both backward kernels and independent of tiles and program layout.
  bh is always the QUERY head's b·H + h (with GQA the G query heads sharing a KV head draw distinct masks).
  Limits: Tq·Tk < 2³¹ (checked), bh < 2³¹. ``dropout_keep_mask`` materialises the same mask (tests, and the
  PyTorch layer when it needs it). DROPOUT is a constexpr: the p = 0 kernels are the dropout-free ones.

Additive logit bias (``bias``; T5's relative position bias, METHODS.md §8.3): s_ij = c⟨q_i, k_j⟩ + bias_ij on the
real logits only (s0 never gets it). ``bias`` is a floating tensor of shape (Bb, Hb, Tq', Tk') with each dim 1 or
full (B, H, Tq, Tk) (H: the query heads, also with GQA); size-1 dims are broadcast through zero strides and any
strides are taken as they are (no copy, no expansion: T5's permuted (1, H, Tq, Tk) view of a (Tq, Tk, H) table is
read in place). Every kernel that forms s (the forward, _bwd_dkdv and _bwd_dq) loads the bias tile of the visible
entries (of the query head it is working on), converts it to fp32 and adds it before the masks, so
P = exp(s + bias − LSE) is the same in the forward and the backward. A −inf entry acts as a mask (P = 0, no NaN; a
row whose every key is −inf is a fully masked row: O = 0, LSE = −inf, w = 1); +inf or NaN entries are not supported
(NaN out), and fp64 values beyond the fp32 range become ±inf. No gradient w.r.t. the bias is computed: T5's
relative-attention table is frozen in every kadapt method (a trainable bias would need dBias = dS, a Tq×Tk
reduction these kernels do not form). HAS_BIAS is a constexpr: bias=None compiles today's kernels unchanged (the
bias pointer and strides are then dummies).

Accumulation is fp32; P and dS are cast to the input dtype before ``tl.dot`` (tensor cores); fp32 uses
input_precision="ieee" (no TF32). Causal, key-padding and key-MLP switches are runtime/constexpr as noted at
each kernel; only tile sizes, BD, BMK, HAS_MLP, DROPOUT, HAS_BIAS and the dtypes (incl. the bias's) make new
compilations (the seed, the group size G and the bias's batch/head/query strides are runtime ints and are not
specialised; its key stride is, so a unit key stride is known to the compiler).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kadapt.ops import tuning

_NO_SPEC = ["H", "G", "Tq", "Tk", "HAS_MASK", "CAUSAL", "seed", "sb_b", "sb_h", "sb_q"]
_MAX_DROPOUT_OFFSET = 2 ** 31  # the per-head Philox counter i·Tk + j is int32: Tq·Tk must stay below this


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _dropout_keep(seed, bh, offs, dropout_p):
    """keep mask (True = kept) of the counters ``offs`` = i·Tk + j (int32, any shape) of head ``bh``:
    Philox keyed by (k0, k1) = (seed32, bh), uniform r ∈ [0, 1), keep iff r ≥ p."""
    key = (seed.to(tl.int64) & 0xFFFFFFFF) | (bh.to(tl.int64) << 32)
    return tl.rand(key, offs) >= dropout_p


@triton.jit
def _bias_tile(base, r, c, sb_q, sb_k, mask):
    """fp32 bias at (query r, key c) (broadcastable int32 index tiles) of one (batch, head): base[r·sb_q + c·sb_k];
    0 outside ``mask`` (only the visible entries are read)."""
    return tl.load(base + r.to(tl.int64) * sb_q + c.to(tl.int64) * sb_k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _key_mlp(q, ak_ptr, aa_ptr, bk_ptr, bb_ptr, head, D, MK, dims, dmask,
             PREC: tl.constexpr, BMK: tl.constexpr):
    """(φ (BM, BD) fp32, h (BM, BMK) fp32) of the q tile for this head; zero in padded columns."""
    dtype = q.dtype
    cm = tl.arange(0, BMK)
    mm = cm < MK
    a_t = tl.load(ak_ptr + head * D * MK + dims[:, None] * MK + cm[None, :], mask=dmask[:, None] & mm[None, :],
                  other=0.0)
    z = tl.dot(q, a_t.to(dtype), input_precision=PREC)
    z += tl.load(aa_ptr + head * MK + cm, mask=mm, other=0.0).to(tl.float32)[None, :]
    h = _tanh(z)
    b_t = tl.load(bk_ptr + head * MK * D + cm[:, None] * D + dims[None, :], mask=mm[:, None] & dmask[None, :],
                  other=0.0)
    phi = tl.dot(h.to(dtype), b_t.to(dtype), input_precision=PREC)
    phi += tl.load(bb_ptr + head * D + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]
    return phi, h


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(q_ptr, k_ptr, v_ptr, ak_ptr, aa_ptr, bk_ptr, bb_ptr, kpm_ptr, bias_ptr, o_ptr, lse_ptr, w_ptr,
                scale, H, G, Tq, Tk, D, MK, HAS_MASK, CAUSAL, seed, dropout_p, drop_scale, sb_b, sb_h, sb_q, sb_k,
                HAS_MLP: tl.constexpr, PREC: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BMK: tl.constexpr):
    dtype = q_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)  # query head b·H + h
    b = bh // H
    head = bh % H
    kv_bh = b * (H // G) + head // G  # its KV head (GQA; = bh for G = 1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Tq
    dims = tl.arange(0, BD)
    dmask = dims < D
    q_base = q_ptr + bh.to(tl.int64) * Tq * D
    k_base = k_ptr + kv_bh.to(tl.int64) * Tk * D
    v_base = v_ptr + kv_bh.to(tl.int64) * Tk * D
    q = tl.load(q_base + rows[:, None] * D + dims[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    qf = q.to(tl.float32)
    if HAS_MLP:
        phi, h = _key_mlp(q, ak_ptr, aa_ptr, bk_ptr, bb_ptr, head, D, MK, dims, dmask, PREC, BMK)
        s0 = scale * tl.sum(qf * (qf + phi), 1)
    else:
        s0 = scale * tl.sum(qf * qf, 1)
    if HAS_BIAS:
        bias_base = bias_ptr + b.to(tl.int64) * sb_b + head.to(tl.int64) * sb_h

    off = Tk - Tq
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BM + off)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    for start_n in range(0, hi, BN):
        cols = start_n + tl.arange(0, BN)
        cmask = cols < Tk
        k_t = tl.load(k_base + cols[None, :] * D + dims[:, None], mask=dmask[:, None] & cmask[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=PREC) * scale
        valid = cmask[None, :] & rmask[:, None]
        if HAS_MASK:
            keep = tl.load(kpm_ptr + b * Tk + cols, mask=cmask, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + off)
        if HAS_BIAS:  # a −inf bias gives s = −inf: p = 0 below, like a masked key
            s += _bias_tile(bias_base, rows[:, None], cols[None, :], sb_q, sb_k, valid)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * D + dims[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if DROPOUT:  # l_i (hence LSE, w) uses the undropped p; the 1/(1 − p) goes in the epilogue
            p = tl.where(_dropout_keep(seed, bh, rows[:, None] * Tk + cols[None, :], dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PREC)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    if DROPOUT:
        o = acc * (drop_scale / l_safe)[:, None]
    else:
        o = acc / l_safe[:, None]
    lse_safe = tl.where(has, m_i + tl.log(l_safe), 0.0)
    w = tl.where(has, tl.sigmoid(s0 - lse_safe), 1.0)
    lse = tl.where(has, lse_safe, float("-inf"))
    tl.store(o_ptr + bh.to(tl.int64) * Tq * D + rows[:, None] * D + dims[None, :], o.to(dtype),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rows, lse, mask=rmask)
    tl.store(w_ptr + bh.to(tl.int64) * Tq + rows, w, mask=rmask)


@triton.jit(do_not_specialize=["Tq"])
def _bwd_preprocess(o_ptr, do_ptr, w_ptr, dw_ptr, dlse_ptr, delta_ptr, ds0_ptr, Tq, D,
                    BM: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Tq
    dims = tl.arange(0, BD)
    mask = rmask[:, None] & (dims < D)[None, :]
    off = bh * Tq * D + rows[:, None] * D + dims[None, :]
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + bh * Tq + rows, mask=rmask, other=0.0)
    dw = tl.load(dw_ptr + bh * Tq + rows, mask=rmask, other=0.0).to(tl.float32)
    dlse = tl.load(dlse_ptr + bh * Tq + rows, mask=rmask, other=0.0).to(tl.float32)
    t = w * (1.0 - w) * dw
    delta = tl.sum(o * do, 1) - (dlse - t)
    tl.store(delta_ptr + bh * Tq + rows, delta, mask=rmask)
    tl.store(ds0_ptr + bh * Tq + rows, t, mask=rmask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, kpm_ptr, bias_ptr, dk_ptr, dv_ptr,
              scale, H, G, Tq, Tk, D, HAS_MASK, CAUSAL, seed, dropout_p, drop_scale, sb_b, sb_h, sb_q, sb_k,
              PREC: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """One program per (key tile, KV head b·H_kv + g): dK, dV summed over the G query heads of the group."""
    dtype = q_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    kv_bh = tl.program_id(1)
    H_kv = H // G
    b = kv_bh // H_kv
    kv_head = kv_bh % H_kv
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < Tk
    dims = tl.arange(0, BD)
    dmask = dims < D
    kv_off = kv_bh.to(tl.int64) * Tk * D + cols[:, None] * D + dims[None, :]
    kv_mask = cmask[:, None] & dmask[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
    colvalid = cmask
    if HAS_MASK:
        keep = tl.load(kpm_ptr + b * Tk + cols, mask=cmask, other=0)
        colvalid = colvalid & (keep != 0)
    off = Tk - Tq
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BN - off, 0) // BM * BM  # first query row that can see key pid_n * BN
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    for g in range(0, G):  # the query heads h = kv_head·G + g sharing this KV head
        head = kv_head * G + g
        bh = b * H + head  # the query head's index: q, dO, LSE, delta, the dropout key, the bias
        if HAS_BIAS:
            bias_base = bias_ptr + b.to(tl.int64) * sb_b + head.to(tl.int64) * sb_h
        q_base = q_ptr + bh.to(tl.int64) * Tq * D
        do_base = do_ptr + bh.to(tl.int64) * Tq * D
        stat_base = bh.to(tl.int64) * Tq
        for start_m in range(lo, Tq, BM):
            rows = start_m + tl.arange(0, BM)
            rmask = rows < Tq
            t_mask = dmask[:, None] & rmask[None, :]
            q_t = tl.load(q_base + rows[None, :] * D + dims[:, None], mask=t_mask, other=0.0)
            s_t = tl.dot(k, q_t, input_precision=PREC) * scale  # (BN, BM) = sᵀ
            lse = tl.load(lse_ptr + stat_base + rows, mask=rmask, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            valid = colvalid[:, None] & rmask[None, :]
            if CAUSAL:
                valid = valid & (cols[:, None] <= rows[None, :] + off)
            if HAS_BIAS:  # the transposed tile: bias[i = rows, j = cols] at (j, i)
                s_t += _bias_tile(bias_base, rows[None, :], cols[:, None], sb_q, sb_k, valid)
            p_t = tl.where(valid, tl.exp(tl.where(valid, s_t - lse[None, :], 0.0)), 0.0)
            r_mask = rmask[:, None] & dmask[None, :]
            do = tl.load(do_base + rows[:, None] * D + dims[None, :], mask=r_mask, other=0.0)
            do_t = tl.load(do_base + rows[None, :] * D + dims[:, None], mask=t_mask, other=0.0)
            dp_t = tl.dot(v, do_t, input_precision=PREC)
            delta = tl.load(delta_ptr + stat_base + rows, mask=rmask, other=0.0)
            if DROPOUT:  # z = keep / (1 − p), the same counters i·Tk + j as the forward (transposed tile)
                z_t = tl.where(_dropout_keep(seed, bh, rows[None, :] * Tk + cols[:, None], dropout_p), drop_scale,
                               0.0)
                dv += tl.dot((p_t * z_t).to(dtype), do, input_precision=PREC)
                ds_t = p_t * (z_t * dp_t - delta[None, :])
            else:
                dv += tl.dot(p_t.to(dtype), do, input_precision=PREC)
                ds_t = p_t * (dp_t - delta[None, :])
            q = tl.load(q_base + rows[:, None] * D + dims[None, :], mask=r_mask, other=0.0)
            dk += tl.dot(ds_t.to(dtype), q, input_precision=PREC)
    tl.store(dk_ptr + kv_off, (dk * scale).to(dtype), mask=kv_mask)
    tl.store(dv_ptr + kv_off, dv.to(dtype), mask=kv_mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dq(q_ptr, k_ptr, v_ptr, ak_ptr, aa_ptr, bk_ptr, bb_ptr, do_ptr, lse_ptr, delta_ptr, ds0_ptr, kpm_ptr,
            bias_ptr, dq_ptr, scale, H, G, Tq, Tk, D, MK, HAS_MASK, CAUSAL, seed, dropout_p, drop_scale,
            sb_b, sb_h, sb_q, sb_k, HAS_MLP: tl.constexpr, PREC: tl.constexpr, DROPOUT: tl.constexpr,
            HAS_BIAS: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BMK: tl.constexpr):
    dtype = q_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    head = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < Tq
    dims = tl.arange(0, BD)
    dmask = dims < D
    r_off = bh.to(tl.int64) * Tq * D + rows[:, None] * D + dims[None, :]
    r_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + r_off, mask=r_mask, other=0.0)
    do = tl.load(do_ptr + r_off, mask=r_mask, other=0.0)
    stat_off = bh.to(tl.int64) * Tq + rows
    lse = tl.load(lse_ptr + stat_off, mask=rmask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(delta_ptr + stat_off, mask=rmask, other=0.0)
    kv_bh = b * (H // G) + head // G  # the query head's KV head (GQA)
    k_base = k_ptr + kv_bh.to(tl.int64) * Tk * D
    v_base = v_ptr + kv_bh.to(tl.int64) * Tk * D
    if HAS_BIAS:
        bias_base = bias_ptr + b.to(tl.int64) * sb_b + head.to(tl.int64) * sb_h
    off = Tk - Tq
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BM + off)
    dq = tl.zeros((BM, BD), tl.float32)
    for start_n in range(0, hi, BN):
        cols = start_n + tl.arange(0, BN)
        cmask = cols < Tk
        t_mask = dmask[:, None] & cmask[None, :]
        k_t = tl.load(k_base + cols[None, :] * D + dims[:, None], mask=t_mask, other=0.0)
        s = tl.dot(q, k_t, input_precision=PREC) * scale
        valid = cmask[None, :] & rmask[:, None]
        if HAS_MASK:
            keep = tl.load(kpm_ptr + b * Tk + cols, mask=cmask, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + off)
        if HAS_BIAS:
            s += _bias_tile(bias_base, rows[:, None], cols[None, :], sb_q, sb_k, valid)
        p = tl.where(valid, tl.exp(tl.where(valid, s - lse[:, None], 0.0)), 0.0)
        v_t = tl.load(v_base + cols[None, :] * D + dims[:, None], mask=t_mask, other=0.0)
        dp = tl.dot(do, v_t, input_precision=PREC)
        if DROPOUT:
            z = tl.where(_dropout_keep(seed, bh, rows[:, None] * Tk + cols[None, :], dropout_p), drop_scale, 0.0)
            ds = p * (z * dp - delta[:, None])
        else:
            ds = p * (dp - delta[:, None])
        k = tl.load(k_base + cols[:, None] * D + dims[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        dq += tl.dot(ds.to(dtype), k, input_precision=PREC)
    dq = dq * scale
    # the inducer logit s0 = c⟨q, q + φ(q)⟩: ∂s0/∂q = c(2q + φ + ((q B_kᵀ) ⊙ (1 − h²)) A_kᵀ)
    qf = q.to(tl.float32)
    ds0 = tl.load(ds0_ptr + stat_off, mask=rmask, other=0.0)
    if HAS_MLP:
        phi, h = _key_mlp(q, ak_ptr, aa_ptr, bk_ptr, bb_ptr, head, D, MK, dims, dmask, PREC, BMK)
        cm = tl.arange(0, BMK)
        mm = cm < MK
        bk_t = tl.load(bk_ptr + head * MK * D + cm[None, :] * D + dims[:, None], mask=dmask[:, None] & mm[None, :],
                       other=0.0)
        u = tl.dot(q, bk_t.to(dtype), input_precision=PREC) * (1.0 - h * h)
        ak_t = tl.load(ak_ptr + head * D * MK + dims[None, :] * MK + cm[:, None], mask=mm[:, None] & dmask[None, :],
                       other=0.0)
        grad_s0 = 2.0 * qf + phi + tl.dot(u.to(dtype), ak_t.to(dtype), input_precision=PREC)
    else:
        grad_s0 = 2.0 * qf
    dq += (scale * ds0)[:, None] * grad_s0
    tl.store(dq_ptr + r_off, dq.to(dtype), mask=r_mask)


@triton.jit(do_not_specialize=["Tq", "Tk", "seed"])
def _keep_mask_kernel(out_ptr, seed, Tq, Tk, dropout_p, BM: tl.constexpr, BN: tl.constexpr):
    """out (BH, Tq, Tk) int8: the dropout keep mask the attention kernels use (same _dropout_keep call)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    offs = rows[:, None] * Tk + cols[None, :]
    keep = _dropout_keep(seed, bh, offs, dropout_p)
    tl.store(out_ptr + bh.to(tl.int64) * Tq * Tk + offs, keep.to(tl.int8),
             mask=(rows < Tq)[:, None] & (cols < Tk)[None, :])


# ---------------------------------------------------------------------------------------------
# host side

def _empty(shape, *, device, dtype) -> torch.Tensor:
    """Every output buffer comes from here (tests replace it with a NaN-poisoning allocator)."""
    return torch.empty(shape, device=device, dtype=dtype)


ATTENTION_KERNELS = ("inducer_attention_fwd", "inducer_attention_bwd_preprocess", "inducer_attention_bwd_dkdv",
                     "inducer_attention_bwd_dq", "inducer_attention_keep_mask")


def tile_overrides(bm: int, bn: int, num_warps: int = 4) -> dict[str, dict[str, int]]:
    """{kernel: config} giving every attention kernel the tiles (BM, BN), for ``tuning.OVERRIDES`` (tests: the
    interpreter's tiny shapes must span several tiles in both loops)."""
    return {k: ({"BM": bm, "num_warps": num_warps} if k.endswith("preprocess")
                else {"BM": bm, "BN": bn, "num_warps": num_warps}) for k in ATTENTION_KERNELS}


def _configs(q: torch.Tensor, bd: int, Tk: int, has_mlp: bool, has_bias: bool, dropout: bool,
             kernels: tuple[str, ...]) -> list[dict[str, int]]:
    """The launch configs (kadapt/ops/tuning.py) of ``kernels`` for this call."""
    common = {"dtype": q.dtype, "bd": bd, "L": Tk, "bias": has_bias, "dropout": dropout}
    out = []
    for k in kernels:
        if k == "inducer_attention_bwd_preprocess":
            out.append(tuning.launch_config(k, q.device, dtype=q.dtype, bd=bd))
        elif k == "inducer_attention_bwd_dkdv":
            out.append(tuning.launch_config(k, q.device, **common))
        else:
            out.append(tuning.launch_config(k, q.device, mlp=has_mlp, **common))
    return out


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _seed32(seed: int) -> int:
    """The Philox key word k0 as a signed int32 kernel argument (one compiled signature for every seed):
    lo32(seed) XOR hi32(seed) of the seed taken mod 2⁶⁴ (a seed in [0, 2³²) is used as is)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    s = (s ^ (s >> 32)) & 0xFFFFFFFF
    return s - (1 << 32) if s >= (1 << 31) else s


def _dropout_args(dropout_p: float, seed: int, Tq: int, Tk: int) -> tuple[int, float, float, bool]:
    """(seed32, p, 1/(1 − p) (0 for p = 1: everything dropped), DROPOUT) of the kernels."""
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if p == 0.0:
        return 0, 0.0, 1.0, False
    if Tq * Tk >= _MAX_DROPOUT_OFFSET:
        raise ValueError(f"attention dropout needs Tq·Tk < 2^31 (int32 Philox counter i·Tk + j); got Tq={Tq}, "
                         f"Tk={Tk}")
    return _seed32(seed), p, (0.0 if p == 1.0 else 1.0 / (1.0 - p)), True


def dropout_keep_mask(seed: int, B: int, H: int, Tq: int, Tk: int, dropout_p: float, device) -> torch.Tensor:
    """bool (B, H, Tq, Tk), True = kept: the attention-probability dropout mask that ``inducer_attention_fwd`` /
    ``_bwd`` with this ``seed`` and ``dropout_p`` apply (keep_ij = tl.rand(key(seed, b·H + h), i·Tk + j) ≥ p), H the
    number of QUERY heads (also with GQA: the mask is keyed by the query head, never the KV head).
    It runs the same RNG call in a Triton kernel on ``device`` (CPU tensors need TRITON_INTERPRET=1). p = 0 keeps
    everything (the fused kernels then draw no random numbers at all)."""
    seed32, p, _, _ = _dropout_args(dropout_p, seed, Tq, Tk)
    out = torch.empty((B, H, Tq, Tk), device=device, dtype=torch.int8)
    if out.numel() == 0 or p == 0.0:
        return out.fill_(1).bool()
    cfg = tuning.launch_config("inducer_attention_keep_mask", out.device)
    _keep_mask_kernel[(triton.cdiv(Tq, cfg["BM"]), triton.cdiv(Tk, cfg["BN"]), B * H)](out, seed32, Tq, Tk, p,
                                                                                       **cfg)
    return out.bool()


def _mlp_args(q, A_k, a_k, B_k, b_k):
    if A_k is None:
        return q, q, q, q, 1, 16, False
    mk = A_k.shape[2]
    return A_k, a_k, B_k, b_k, mk, max(16, triton.next_power_of_2(mk)), True


def _group_size(q, k, v) -> int:
    """G = H / H_kv, the query heads per KV head (1: multi-head attention); ValueError unless k and v have the
    same H_kv dividing q's H (and match q's batch and head dim, v k's key count)."""
    B, H, _, D = q.shape
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"k and v must be 4-D (B, H_kv, Tk, d), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape (B, H_kv, Tk, d)")
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k, v must be (B={B}, H_kv, Tk, d={D}) for q {tuple(q.shape)}, got {tuple(k.shape)}")
    if H == 0 and Hkv == 0:
        return 1
    if Hkv < 1 or H % Hkv != 0:
        allowed = [n for n in range(1, H + 1) if H % n == 0]
        raise ValueError(f"k, v have H_kv={Hkv} heads but q has H={H}: H_kv must divide H (allowed H_kv: "
                         f"{', '.join(map(str, allowed))})")
    return H // Hkv


def _bias_args(bias, q, Tk: int) -> tuple:
    """(pointer, sb_b, sb_h, sb_q, sb_k, HAS_BIAS) kernel arguments of the additive logit bias: its own strides,
    0 along a size-1 (broadcast) dim; q stands in for the pointer when there is no bias."""
    if bias is None:
        return q, 0, 0, 0, 0, False
    B, H, Tq, _ = q.shape
    full = (B, H, Tq, Tk)
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise ValueError(f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}")
    if bias.dim() != 4 or any(n not in (1, f) for n, f in zip(bias.shape, full)):
        raise ValueError(f"bias must have shape (1 or B, 1 or H, 1 or Tq, 1 or Tk) for (B, H, Tq, Tk) = {full}, "
                         f"got {tuple(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    strides = tuple(0 if n == 1 else st for n, st in zip(bias.shape, bias.stride()))
    return (bias, *strides, True)


def inducer_attention_fwd(q, k, v, A_k, a_k, B_k, b_k, kpm, scale: float, causal: bool, *, dropout_p: float = 0.0,
                          seed: int = 0, bias=None):
    """(O (B, H, Tq, d) in q's dtype, LSE (B, H, Tq) fp32, w (B, H, Tq) fp32) for contiguous q (B, H, Tq, d) and
    k, v (B, H_kv, Tk, d) with H_kv dividing H (GQA: query head h reads KV head h div (H / H_kv) in the kernel, no
    copy); kpm is an int8 (B, Tk) keep-mask or None. ``dropout_p`` > 0 drops attention probabilities in O only
    (mask ``dropout_keep_mask(seed, ...)``; LSE and w are unaffected); the backward needs the same seed and p.
    ``bias`` (optional, any float dtype and strides, shape (1|B, 1|H, 1|Tq, 1|Tk), broadcast without a copy) is
    added to the real logits c⟨q_i, k_j⟩ (never to s0) before the masks; −inf entries mask. The backward needs the
    same bias; no gradient w.r.t. it is ever computed (see the module docstring)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    G = _group_size(q, k, v)
    bias_arg, sb_b, sb_h, sb_q, sb_k, has_bias = _bias_args(bias, q, Tk)
    o = _empty(q.shape, device=q.device, dtype=q.dtype)
    lse = _empty((B, H, Tq), device=q.device, dtype=torch.float32)
    w = _empty((B, H, Tq), device=q.device, dtype=torch.float32)
    if B * H * Tq == 0:
        return o, lse, w
    seed32, p, drop_scale, dropout = _dropout_args(dropout_p, seed, Tq, Tk)
    bd = max(16, triton.next_power_of_2(D))
    a0, a1, a2, a3, mk, bmk, has_mlp = _mlp_args(q, A_k, a_k, B_k, b_k)
    (cfg,) = _configs(q, bd, Tk, has_mlp, has_bias, dropout, ("inducer_attention_fwd",))
    _fwd_kernel[(triton.cdiv(Tq, cfg["BM"]), B * H)](
        q, k, v, a0, a1, a2, a3, kpm if kpm is not None else q, bias_arg, o, lse, w,
        scale, H, G, Tq, Tk, D, mk, int(kpm is not None), int(causal), seed32, p, drop_scale, sb_b, sb_h, sb_q,
        sb_k, HAS_MLP=has_mlp, PREC=_prec(q), DROPOUT=dropout, HAS_BIAS=has_bias, BD=bd, BMK=bmk, **cfg)
    return o, lse, w


def inducer_attention_bwd(q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, do, dlse, dw, scale: float, causal: bool, *,
                          dropout_p: float = 0.0, seed: int = 0, bias=None):
    """(dq, dk, dv, ∂L/∂s0 (B, H, Tq) fp32) for contiguous inputs and upstream gradients do, dlse, dw; with GQA
    (k, v (B, H_kv, Tk, d)) dk and dv have k's shape and are the sums over each KV head's G query heads;
    ``dropout_p``, ``seed`` and ``bias`` must be those of the forward that produced o and lse (the mask is
    recomputed, the bias re-added to the recomputed logits). There is no bias gradient (the bias is a constant)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    G = _group_size(q, k, v)
    bias_arg, sb_b, sb_h, sb_q, sb_k, has_bias = _bias_args(bias, q, Tk)
    dq = _empty(q.shape, device=q.device, dtype=q.dtype)
    dk = _empty(k.shape, device=k.device, dtype=k.dtype)
    dv = _empty(v.shape, device=v.device, dtype=v.dtype)
    delta = _empty((B, H, Tq), device=q.device, dtype=torch.float32)
    ds0 = _empty((B, H, Tq), device=q.device, dtype=torch.float32)
    if B * H * Tq == 0:  # no query row: nothing reaches k or v
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, ds0
    seed32, p, drop_scale, dropout = _dropout_args(dropout_p, seed, Tq, Tk)
    bd = max(16, triton.next_power_of_2(D))
    a0, a1, a2, a3, mk, bmk, has_mlp = _mlp_args(q, A_k, a_k, B_k, b_k)
    mask_arg = kpm if kpm is not None else q
    prec = _prec(q)
    pre, kv, qc = _configs(q, bd, Tk, has_mlp, has_bias, dropout, ("inducer_attention_bwd_preprocess",
                                                                    "inducer_attention_bwd_dkdv",
                                                                    "inducer_attention_bwd_dq"))
    _bwd_preprocess[(triton.cdiv(Tq, pre["BM"]), B * H)](o, do, w, dw, dlse, delta, ds0, Tq, D, BD=bd, **pre)
    if Tk > 0:
        _bwd_dkdv[(triton.cdiv(Tk, kv["BN"]), B * (H // G))](
            q, k, v, do, lse, delta, mask_arg, bias_arg, dk, dv, scale, H, G, Tq, Tk, D, int(kpm is not None),
            int(causal), seed32, p, drop_scale, sb_b, sb_h, sb_q, sb_k, PREC=prec, DROPOUT=dropout,
            HAS_BIAS=has_bias, BD=bd, **kv)
    _bwd_dq[(triton.cdiv(Tq, qc["BM"]), B * H)](
        q, k, v, a0, a1, a2, a3, do, lse, delta, ds0, mask_arg, bias_arg, dq, scale, H, G, Tq, Tk, D, mk,
        int(kpm is not None), int(causal), seed32, p, drop_scale, sb_b, sb_h, sb_q, sb_k,
        HAS_MLP=has_mlp, PREC=prec, DROPOUT=dropout, HAS_BIAS=has_bias, BD=bd, BMK=bmk, **qc)
    return dq, dk, dv, ds0
