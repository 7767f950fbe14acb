"""Triton kernels of the Fastfood transform (METHODS.md §12.5); the math and the generator are in
kadapt/ops/fastfood.py, whose torch formulas these kernels reproduce draw for draw.

Walsh–Hadamard transforms in blocks, H_L = H_{2^a} ⊗ H_{2^b} = (H_{2^a} ⊗ I)(I ⊗ H_{2^b}):

- **Inner pass** (``_inner_kernel``): one program transforms one contiguous tile of T = TR·TC elements
  entirely in registers, as Y = H_TR · X · H_TC (two ``tl.dot``s with ±1 matrices formed in-kernel from
  the parity of popcount(i & j); the (TR, TC) row-major view of the tile makes H_T = H_TR ⊗ H_TC). A
  tensor with L_i < T is loaded zero-padded to T and its first L_i outputs are H_{L_i} x (the first
  block column of H_{T/L} ⊗ H_L is all +1): one tile, one program.
- **Outer passes** (``_outer_kernel``): for L_i > T, the stride-T part H_{L/T} ⊗ I_T, split into levels
  of at most RO = 2^ro rows: a program loads an (RO × OC) tile (rows at stride S = T·(radices of
  earlier levels), OC contiguous columns: coalesced) and computes H_RO · X; a level of radix R < RO uses
  the top-left R×R block of H_RO (= H_R) with rows ≥ R masked to zero. In place (each program owns its
  elements). T5-base's largest L = 2^25 takes 2 outer levels with the GPU tiles (T = 2^13, RO = 2^6).
- **One ragged launch per pass for all tensors**: each pass indexes a program table of (tensor id, tile
  id[, radix bits, stride bits, last level]) built once per plan from prefix sums of per-tensor counts.

Forward: inner(b ⊙ E z → H) → outer levels → inner(gather x_{π(k)} · g_k → H) → outer levels, the
last one (or the inner pass when L_i ≤ T) storing σ_i·v[:N_i] into the output. Fusions: signs into the
first load, the π-gather and the g multiply into the load of the second Hadamard, crop and σ into the
final store. Backward (γ → ∂z): inner(σ pad γ → H) → outer → inner(gather v_{π⁻¹(k)} · g_{π⁻¹(k)} → H)
→ outer, the last store multiplying by b and keeping k < min(d_z, L_i); then ``_reduce_kernel`` sums the
K per-tensor q_i into ∂z in a fixed order (deterministic; × 1/L_i under grad_scale_compat).
Launches per call: 2 + 2·(outer levels) forward, 3 + 2·(outer levels) backward (6 and 7 on T5-base).
Workspace: two fp32 buffers of ΣL_i (3.1 GB on T5-base).

The randomness is regenerated in-kernel from the per-tensor keys of the plan (``_sign``, ``_gauss``,
``_perm``: uint32 ops, identical to the torch int64 emulation in kadapt/ops/fastfood.py).

``tl.dot`` runs with ``DOT_PRECISION`` ("ieee": exact fp32 sums of ±x; "tf32x3" would use tensor
cores at about fp32 accuracy — to be measured on a GPU, not yet validated). Tile sizes and warps: from
kadapt/ops/tuning.py (``fastfood_schedule``: TR, TC, RO, OC, by default 64, 128, 64, 64 on CUDA — tl.dot
needs every dim ≥ 16 there — and 4, 8, 4, 4 in the interpreter, so small tests exercise several outer
levels; ``fastfood_inner`` / ``_outer`` / ``_reduce``: warps); ``CONFIG`` overrides the tiles. Not validated
on a GPU yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kadapt.ops import tuning
from kadapt.ops.fastfood import INFO_COLS, N_ROUNDS, FastfoodPlan

assert N_ROUNDS == 4, "the Triton Feistel is unrolled for 4 rounds"

CONFIG: tuple[int, int, int, int] | None = None  # TR, TC (inner tile T = TR·TC), RO (outer radix), OC (outer columns)
DOT_PRECISION = "ieee"
POISON = False  # tests: outputs and workspaces start as NaN, so an unwritten element shows


# ---------------------------------------------------------------------------------------------
# generator (uint32)

@triton.jit
def _mix(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _key(keys, j):
    return tl.load(keys + j).to(tl.uint32)


@triton.jit
def _hash(k, a, b):
    return _mix(_mix(k ^ a) ^ b)


@triton.jit
def _sign(k, keys):
    h = _hash(k, _key(keys, 0), _key(keys, 1))
    return 1.0 - 2.0 * (h >> 31).to(tl.float32)


@triton.jit
def _gauss(k, keys):
    u1 = ((_hash(k, _key(keys, 2), _key(keys, 3)) >> 8).to(tl.float32) + 0.5) * 5.960464477539063e-08
    u2 = ((_hash(k, _key(keys, 4), _key(keys, 5)) >> 8).to(tl.float32) + 0.5) * 5.960464477539063e-08
    return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _perm(k, n, keys, INVERSE: tl.constexpr):
    """π(k) (π⁻¹(k) if INVERSE) for uint32 k < 2ⁿ: 4-round Feistel on ⌊n/2⌋ | ⌈n/2⌉ bits after ⊕ w."""
    nl = n // 2
    nr = n - nl
    ml = ((1 << nl) - 1).to(tl.uint32)
    mr = ((1 << nr) - 1).to(tl.uint32)
    sh = nr.to(tl.uint32)
    w = _key(keys, 6) & ((1 << n) - 1).to(tl.uint32)
    r0 = _key(keys, 7)
    r1 = _key(keys, 8)
    r2 = _key(keys, 9)
    r3 = _key(keys, 10)
    if INVERSE:
        left = k >> sh
        right = k & mr
        t = right ^ (_mix(left ^ r3) & mr)
        right = left
        left = t
        t = right ^ (_mix(left ^ r2) & ml)
        right = left
        left = t
        t = right ^ (_mix(left ^ r1) & mr)
        right = left
        left = t
        t = right ^ (_mix(left ^ r0) & ml)
        right = left
        left = t
        out = ((left << sh) | right) ^ w
    else:
        x = k ^ w
        left = x >> sh
        right = x & mr
        t = left ^ (_mix(right ^ r0) & ml)
        left = right
        right = t
        t = left ^ (_mix(right ^ r1) & mr)
        left = right
        right = t
        t = left ^ (_mix(right ^ r2) & ml)
        left = right
        right = t
        t = left ^ (_mix(right ^ r3) & mr)
        left = right
        right = t
        out = (left << sh) | right
    return out


@triton.jit
def _hadamard(R: tl.constexpr):
    """H_R (fp32 ±1), R ≤ 2^16: (−1)^popcount(i & j)."""
    i = tl.arange(0, R)
    p = i[:, None] & i[None, :]
    p = p ^ (p >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return 1.0 - 2.0 * (p & 1).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _inner_kernel(src_ptr, dst_ptr, out_ptr, info_ptr, sigma_ptr, prog_ptr,
                  MODE: tl.constexpr, STAGE: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
                  NCOL: tl.constexpr, PREC: tl.constexpr):
    """One T-tile (T = TR·TC) of Hadamard number STAGE (1 or 2) of tensor t; MODE 0 forward, 1 backward."""
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)
    tile = tl.load(prog_ptr + 2 * pid + 1).to(tl.int64)
    row = info_ptr + t.to(tl.int64) * NCOL
    N = tl.load(row)
    L = tl.load(row + 1)
    n = tl.load(row + 2)
    ws_off = tl.load(row + 3)
    out_off = tl.load(row + 4)
    m = tl.load(row + 5)
    keys = row + 8
    sigma = tl.load(sigma_ptr + t)
    r = tl.arange(0, TR)[:, None]
    c = tl.arange(0, TC)[None, :]
    k = tile * (TR * TC) + r * TC + c
    valid = k < L
    ku = k.to(tl.uint32)
    if STAGE == 1:
        if MODE == 0:  # b ⊙ E z
            x = tl.load(src_ptr + k, mask=k < m, other=0.0) * _sign(ku, keys)
        else:  # pad(σ γ)
            x = tl.load(src_ptr + out_off + k, mask=k < N, other=0.0) * sigma
    else:
        if MODE == 0:  # x'_k = g_k x_{π(k)}
            s = _perm(ku, n, keys, False)
            x = tl.load(src_ptr + ws_off + s.to(tl.int64), mask=valid, other=0.0) * _gauss(ku, keys)
        else:  # w_j = g_{π⁻¹(j)} v_{π⁻¹(j)}  (Π^T as a gather)
            s = _perm(ku, n, keys, True)
            x = tl.load(src_ptr + ws_off + s.to(tl.int64), mask=valid, other=0.0) * _gauss(s, keys)
    y = tl.dot(tl.dot(_hadamard(TR), x, input_precision=PREC), _hadamard(TC), input_precision=PREC)
    if STAGE == 1:
        tl.store(dst_ptr + ws_off + k, y, mask=valid)
    else:
        if L <= TR * TC:  # the tensor's last pass
            if MODE == 0:
                tl.store(out_ptr + out_off + k, y * sigma, mask=k < N)
            else:
                tl.store(dst_ptr + ws_off + k, y * _sign(ku, keys), mask=k < m)
        else:
            tl.store(dst_ptr + ws_off + k, y, mask=valid)


@triton.jit
def _outer_kernel(buf_ptr, out_ptr, info_ptr, sigma_ptr, prog_ptr, final_ok,
                  MODE: tl.constexpr, RO: tl.constexpr, OC: tl.constexpr, NCOL: tl.constexpr,
                  PREC: tl.constexpr):
    """One (R × OC) block of an outer level (radix R = 2^rb ≤ RO at stride 2^sb), in place on buf."""
    pid = tl.program_id(0)
    p = prog_ptr + 5 * pid
    t = tl.load(p)
    blk = tl.load(p + 1).to(tl.int64)
    rb = tl.load(p + 2).to(tl.int64)
    sb = tl.load(p + 3).to(tl.int64)
    last = tl.load(p + 4)
    row = info_ptr + t.to(tl.int64) * NCOL
    N = tl.load(row)
    ws_off = tl.load(row + 3)
    out_off = tl.load(row + 4)
    m = tl.load(row + 5)
    keys = row + 8
    R = 1 << rb
    S = 1 << sb
    ncb = S // OC
    o = blk // ncb
    s0 = (blk % ncb) * OC
    r = tl.arange(0, RO)[:, None]
    c = tl.arange(0, OC)[None, :]
    k = o * (R * S) + r * S + s0 + c
    rows = (r < R) & (c < OC)
    x = tl.load(buf_ptr + ws_off + k, mask=rows, other=0.0)
    y = tl.dot(_hadamard(RO), x, input_precision=PREC)
    if (last != 0) & (final_ok != 0):
        if MODE == 0:
            tl.store(out_ptr + out_off + k, y * tl.load(sigma_ptr + t), mask=rows & (k < N))
        else:
            tl.store(buf_ptr + ws_off + k, y * _sign(k.to(tl.uint32), keys), mask=rows & (k < m))
    else:
        tl.store(buf_ptr + ws_off + k, y, mask=rows)


@triton.jit
def _reduce_kernel(q_ptr, dz_ptr, info_ptr, K, d_z, compat, NCOL: tl.constexpr, BJ: tl.constexpr):
    """∂z[j] = Σ_i [j < min(d_z, L_i)] · s_i · q_i[j], i in order (s_i = 1/L_i under compat, else 1)."""
    j = tl.program_id(0) * BJ + tl.arange(0, BJ)
    acc = tl.zeros((BJ,), tl.float32)
    for i in range(K):
        row = info_ptr + i * NCOL
        L = tl.load(row + 1)
        off = tl.load(row + 3)
        m = tl.load(row + 5)
        scale = tl.where(compat != 0, 1.0 / L.to(tl.float32), 1.0)
        acc += tl.load(q_ptr + off + j, mask=j < m, other=0.0) * scale
    tl.store(dz_ptr + j, acc, mask=j < d_z)


# ---------------------------------------------------------------------------------------------
# schedule (built once per plan, device and config)

def _config(device: torch.device) -> tuple[int, int, int, int]:
    if CONFIG is not None:
        return CONFIG
    cfg = tuning.launch_config("fastfood_schedule", device)
    return cfg["TR"], cfg["TC"], cfg["RO"], cfg["OC"]


def levels(L: int, T: int, RO: int) -> list[tuple[int, int]]:
    """(radix bits, stride bits) of the outer levels of a tensor of length L (none when L ≤ T)."""
    n, t, ro = L.bit_length() - 1, T.bit_length() - 1, RO.bit_length() - 1
    out, s = [], t
    while s < n:
        rb = min(ro, n - s)
        out.append((rb, s))
        s += rb
    return out


def schedule(plan: FastfoodPlan, device) -> tuple[list[torch.Tensor], list[int]]:
    """(tables, meta) of the custom ops, cached on the plan per (device, config).

    tables: info (K, INFO_COLS) int64, σ (K,) fp32, the inner program table (P, 2) int32 and one
    (P_j, 5) int32 table per outer level j. meta: d_z, ΣN, ΣL, K, TR, TC, RO, OC, P, J, P_0 … P_{J−1}."""
    device = torch.device(device)
    TR, TC, RO, OC = cfg = _config(device)
    T = TR * TC
    if OC > T or min(cfg) < 1 or any(v & (v - 1) for v in cfg) or RO < 2:
        raise ValueError(f"bad Fastfood tile config {cfg}: powers of two, RO ≥ 2, OC ≤ TR·TC")
    key = (str(device), cfg)
    hit = plan._tables.get(key)
    if hit is not None:
        return hit
    lengths = torch.tensor(plan.lengths, dtype=torch.int64)
    K = len(plan.sizes)
    tiles = torch.clamp(lengths // T, min=1)
    inner = _ragged(tiles)
    per_tensor = [levels(L, T, RO) for L in plan.lengths]
    J = max(len(lv) for lv in per_tensor)
    level_tables = []
    for j in range(J):
        ids = [i for i in range(K) if len(per_tensor[i]) > j]
        counts = torch.tensor([plan.lengths[i] // ((1 << per_tensor[i][j][0]) * OC) for i in ids], dtype=torch.int64)
        tid_blk = _ragged(counts, torch.tensor(ids, dtype=torch.int64))
        extra = torch.tensor([[per_tensor[i][j][0], per_tensor[i][j][1], int(j == len(per_tensor[i]) - 1)]
                              for i in ids], dtype=torch.int32)
        rep = torch.repeat_interleave(torch.arange(len(ids)), counts)
        level_tables.append(torch.cat([tid_blk, extra[rep]], dim=1).contiguous())
    tables = [plan.info(), torch.tensor(plan.sigma, dtype=torch.float32), inner, *level_tables]
    tables = [t.to(device) for t in tables]
    meta = [plan.d_z, plan.total_out, plan.total_ws, K, TR, TC, RO, OC, inner.shape[0], J,
            *[t.shape[0] for t in level_tables]]
    plan._tables[key] = (tables, meta)
    return tables, meta


def _ragged(counts: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """(Σcounts, 2) int32 rows (id, j) for j < counts[id], from prefix sums."""
    ids = torch.arange(counts.shape[0], dtype=torch.int64) if ids is None else ids
    starts = torch.cumsum(counts, 0) - counts
    tid = torch.repeat_interleave(ids, counts)
    local = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)
    return torch.stack([tid, local], dim=1).to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# host functions (the custom ops' kernels)

def _empty(n: int, like: torch.Tensor) -> torch.Tensor:
    if POISON:
        return torch.full((n,), float("nan"), dtype=torch.float32, device=like.device)
    return torch.empty((n,), dtype=torch.float32, device=like.device)


def _unpack(tables, meta):
    d_z, total_out, total_ws, K, TR, TC, RO, OC, P, J = meta[:10]
    return (d_z, total_out, total_ws, K, TR, TC, RO, OC, P, meta[10:10 + J], tables[0], tables[1], tables[2],
            tables[3:3 + J])


def _run(mode, src, tables, meta, out=None):
    (d_z, total_out, total_ws, K, TR, TC, RO, OC, P, PJ, info, sigma, inner, level_tables) = _unpack(tables, meta)
    ws1, ws2 = _empty(total_ws, src), _empty(total_ws, src)
    out = ws2 if out is None else out
    ci = tuning.launch_config("fastfood_inner", src.device, tile=TR * TC)
    co = tuning.launch_config("fastfood_outer", src.device, tile=RO * OC)
    _inner_kernel[(P,)](src, ws1, out, info, sigma, inner, MODE=mode, STAGE=1, TR=TR, TC=TC, NCOL=INFO_COLS,
                        PREC=DOT_PRECISION, **ci)
    for pj, tab in zip(PJ, level_tables):
        _outer_kernel[(pj,)](ws1, out, info, sigma, tab, 0, MODE=mode, RO=RO, OC=OC, NCOL=INFO_COLS,
                             PREC=DOT_PRECISION, **co)
    _inner_kernel[(P,)](ws1, ws2, out, info, sigma, inner, MODE=mode, STAGE=2, TR=TR, TC=TC, NCOL=INFO_COLS,
                        PREC=DOT_PRECISION, **ci)
    for pj, tab in zip(PJ, level_tables):
        _outer_kernel[(pj,)](ws2, out, info, sigma, tab, 1, MODE=mode, RO=RO, OC=OC, NCOL=INFO_COLS,
                             PREC=DOT_PRECISION, **co)
    return ws2, out


def fastfood_fwd(z: torch.Tensor, tables, meta) -> torch.Tensor:
    """cat_i P_i z (fp32 (ΣN,)) for contiguous fp32 z (d_z,)."""
    out = _empty(meta[1], z)
    _run(0, z, tables, meta, out)
    return out


def fastfood_bwd(grad: torch.Tensor, tables, meta) -> torch.Tensor:
    """∂z = Σ_i s_i P_iᵀ γ_i (fp32 (d_z,)) for contiguous fp32 γ (ΣN,); meta[-1] = grad_scale_compat."""
    d_z, K = meta[0], meta[3]
    q, _ = _run(1, grad, tables, meta)
    dz = _empty(d_z, grad)
    info = tables[0]
    cfg = tuning.launch_config("fastfood_reduce", grad.device)
    _reduce_kernel[(triton.cdiv(d_z, cfg["BJ"]),)](q, dz, info, K, d_z, int(meta[-1]), NCOL=INFO_COLS, **cfg)
    return dz
