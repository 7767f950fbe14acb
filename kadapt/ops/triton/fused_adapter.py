"""Triton kernels of the fused bottleneck adapter (METHODS.md §12.3–§12.4) and of the Kronecker
weight build W = Σ_i A_i ⊗ B_i.

Weights are never materialised here: every kernel forms the (rows × cols) tile of W it needs from
the factors, so a PHM, Compacter or low-rank adapter reads its few factor elements (cached in L1/L2)
instead of a D×m matrix. Weight kinds (the ``KIND`` constexpr):

  0 dense      [W]          W (in, out)
  1 phm        [A, B]       W = Σ_i A_i ⊗ B_i,         A (n, n, n), B (n, in/n, out/n)
  2 compacter  [A, s, t]    W = Σ_i A_i ⊗ (s_i t_i),   s (n, in/n, r), t (n, r, out/n)
  3 lowrank    [l, r]       W = l r,                   l (in, r), r (r, out)

Block convention: W[(c,κ),(a,p)] = Σ_i A_i[c,a] B_i[κ,p]. Accumulation is fp32 throughout; tiles
are cast to the compute dtype right before ``tl.dot`` (tensor cores on the GPU).

The activation, residual and add-input switches are runtime arguments (uniform branches cost
nothing): only weight kinds, tile sizes and the dtype make new compilations.

The host functions take 2-D row-major (T, D) activations (the op layer flattens and makes them
contiguous) and contiguous factors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kadapt.ops import tuning

KINDS = {"dense": 0, "phm": 1, "compacter": 2, "lowrank": 3}
KIND_NAMES = {code: name for name, code in KINDS.items()}

# Constants are literals inside the kernels (compiled Triton rejects plain float globals and the
# interpreter mishandles constexpr ones): √(2/π) = 0.7978845608028654, 1/√2 = 0.7071067811865476,
# 1/√(2π) = 0.3989422804014327.


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _act(z, ACT):
    """φ(z) in fp32: 0 gelu_tanh, 1 gelu (erf), 2 relu, 3 swish."""
    if ACT == 0:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        out = tl.maximum(z, 0.0)
    else:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _dact(z, ACT):
    """φ'(z) in fp32 (METHODS.md §12.4)."""
    if ACT == 0:
        th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        out = tl.where(z > 0.0, 1.0, 0.0)
    else:
        sg = tl.sigmoid(z)
        out = sg * (1.0 + z * (1.0 - sg))
    return out


@triton.jit
def _weight_tile(p0, p1, p2, rows, cols, IN, OUT, N, R,
                 KIND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The fp32 tile W[rows, cols] of the in×out weight given by its factors (zeros outside)."""
    rmask = rows < IN
    cmask = cols < OUT
    mask = rmask[:, None] & cmask[None, :]
    if KIND == 0:
        tile = tl.load(p0 + rows[:, None] * OUT + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    elif KIND == 3:
        tile = tl.zeros((BR, BC), tl.float32)
        for rho in range(R):
            lv = tl.load(p0 + rows * R + rho, mask=rmask, other=0.0).to(tl.float32)
            rv = tl.load(p1 + rho * OUT + cols, mask=cmask, other=0.0).to(tl.float32)
            tile += lv[:, None] * rv[None, :]
    else:
        ki = IN // N
        ko = OUT // N
        c = rows // ki
        kap = rows - c * ki
        a = cols // ko
        p = cols - a * ko
        tile = tl.zeros((BR, BC), tl.float32)
        for i in range(N):
            rule = tl.load(p0 + i * N * N + c[:, None] * N + a[None, :], mask=mask, other=0.0).to(tl.float32)
            if KIND == 1:
                b = tl.load(p1 + i * ki * ko + kap[:, None] * ko + p[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                b = tl.zeros((BR, BC), tl.float32)
                for rho in range(R):
                    sv = tl.load(p1 + (i * ki + kap) * R + rho, mask=rmask, other=0.0).to(tl.float32)
                    tv = tl.load(p2 + (i * R + rho) * ko + p, mask=cmask, other=0.0).to(tl.float32)
                    b += sv[:, None] * tv[None, :]
            tile += rule * b
    return tile


@triton.jit
def _weight_tile_t(p0, p1, p2, rows, cols, IN, OUT, N, R,
                   KIND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """W[rows, cols]ᵀ as a (BC, BR) fp32 tile, loaded transposed (no register transpose) for the
    dense and low-rank kinds."""
    rmask = rows < IN
    cmask = cols < OUT
    if KIND == 0:
        tile = tl.load(p0 + cols[:, None] + rows[None, :] * OUT, mask=cmask[:, None] & rmask[None, :],
                       other=0.0).to(tl.float32)
    elif KIND == 3:
        tile = tl.zeros((BC, BR), tl.float32)
        for rho in range(R):
            lv = tl.load(p0 + rows * R + rho, mask=rmask, other=0.0).to(tl.float32)
            rv = tl.load(p1 + rho * OUT + cols, mask=cmask, other=0.0).to(tl.float32)
            tile += rv[:, None] * lv[None, :]
    else:
        tile = tl.trans(_weight_tile(p0, p1, p2, rows, cols, IN, OUT, N, R, KIND, BR, BC))
    return tile


# Integer arguments that are 1 or divisible by 16 make Triton compile a new specialisation; only D
# and M (alignment of the row strides) are worth one. The rest would multiply compilations.
_NO_SPEC = ["T", "DN", "DR", "UN", "UR", "ADD_INPUT", "ACT"]


@triton.jit(do_not_specialize=_NO_SPEC + ["HAS_RES"])
def _fused_adapter_fwd_kernel(
        x_ptr, res_ptr, y_ptr, z_ptr,
        d0, d1, d2, bd_ptr, u0, u1, u2, bu_ptr,
        T, D, M, DN, DR, UN, UR,
        HAS_RES, ADD_INPUT, ACT,
        DKIND: tl.constexpr, UKIND: tl.constexpr, PREC: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    """One program per BT tokens: z = x W_d + b_d (fp32, stored), h = φ(z) kept in registers,
    then y = h W_u + b_u (+ x) (+ residual) streamed over D in BK-wide chunks."""
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    rmask = rows < T
    cm = tl.arange(0, BM)
    mmask = cm < M
    z = tl.zeros((BT, BM), tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        xt = tl.load(x_ptr + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = _weight_tile(d0, d1, d2, ks, cm, D, M, DN, DR, DKIND, BK, BM)
        z = tl.dot(xt, wt.to(dtype), z, input_precision=PREC)
    z += tl.load(bd_ptr + cm, mask=mmask, other=0.0).to(tl.float32)[None, :]
    zmask = rmask[:, None] & mmask[None, :]
    tl.store(z_ptr + rows[:, None] * M + cm[None, :], z, mask=zmask)
    h = tl.where(zmask, _act(z, ACT), 0.0).to(dtype)
    for n0 in range(0, D, BK):
        ns = n0 + tl.arange(0, BK)
        nmask = ns < D
        omask = rmask[:, None] & nmask[None, :]
        off = rows[:, None] * D + ns[None, :]
        wu = _weight_tile(u0, u1, u2, cm, ns, M, D, UN, UR, UKIND, BM, BK)
        out = tl.dot(h, wu.to(dtype), input_precision=PREC)
        out += tl.load(bu_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if ADD_INPUT:
            out += tl.load(x_ptr + off, mask=omask, other=0.0).to(tl.float32)
        if HAS_RES:
            out += tl.load(res_ptr + off, mask=omask, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, out.to(dtype), mask=omask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _fused_adapter_bwd_kernel(
        dy_ptr, z_ptr, dx_ptr, gz_ptr, h_ptr, dbd_ptr,
        d0, d1, d2, u0, u1, u2,
        T, D, M, MH, DN, DR, UN, UR,
        ADD_INPUT, ACT,
        DKIND: tl.constexpr, UKIND: tl.constexpr, PREC: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    """One program per BT tokens: g_h = dy W_uᵀ, g_z = g_h ⊙ φ'(z), dx = g_z W_dᵀ (+ dy); also
    g_z and h_aug = [φ(z) | 1 | 0…] (row stride MH) for the weight-gradient GEMMs: the ones column
    makes hᵀdy carry db_u = Σ_t dy_t for free. db_d = Σ_t g_z is added atomically (m addresses)."""
    dtype = dy_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    rmask = rows < T
    cm = tl.arange(0, BM)
    mmask = cm < M
    g_h = tl.zeros((BT, BM), tl.float32)
    for n0 in range(0, D, BK):
        ns = n0 + tl.arange(0, BK)
        nmask = ns < D
        dyt = tl.load(dy_ptr + rows[:, None] * D + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        wut = _weight_tile_t(u0, u1, u2, cm, ns, M, D, UN, UR, UKIND, BM, BK)
        g_h = tl.dot(dyt, wut.to(dtype), g_h, input_precision=PREC)
    zmask = rmask[:, None] & mmask[None, :]
    z = tl.load(z_ptr + rows[:, None] * M + cm[None, :], mask=zmask, other=0.0)
    g_z = tl.where(zmask, g_h * _dact(z, ACT), 0.0).to(dtype)
    tl.store(gz_ptr + rows[:, None] * M + cm[None, :], g_z, mask=zmask)
    tl.atomic_add(dbd_ptr + cm, tl.sum(g_z.to(tl.float32), axis=0), mask=mmask)
    tl.store(h_ptr + rows[:, None] * MH + cm[None, :], _act(z, ACT).to(dtype), mask=zmask)
    pc = tl.arange(0, 8)
    tl.store(h_ptr + rows[:, None] * MH + M + pc[None, :], tl.where(pc[None, :] == 0, 1.0, 0.0).to(dtype),
             mask=rmask[:, None] & (M + pc < MH)[None, :])
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        omask = rmask[:, None] & kmask[None, :]
        off = rows[:, None] * D + ks[None, :]
        wdt = _weight_tile_t(d0, d1, d2, ks, cm, D, M, DN, DR, DKIND, BK, BM)
        dx = tl.dot(g_z, wdt.to(dtype), input_precision=PREC)
        if ADD_INPUT:
            dx += tl.load(dy_ptr + off, mask=omask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dtype), mask=omask)


@triton.jit
def _store_weight_tile(p0, p1, p2, w_ptr, tile_id, IN, OUT, N, R,
                       KIND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    col_tiles = tl.cdiv(OUT, BC)
    rows = (tile_id // col_tiles) * BR + tl.arange(0, BR)
    cols = (tile_id % col_tiles) * BC + tl.arange(0, BC)
    tile = _weight_tile(p0, p1, p2, rows, cols, IN, OUT, N, R, KIND, BR, BC)
    mask = (rows < IN)[:, None] & (cols < OUT)[None, :]
    tl.store(w_ptr + rows[:, None] * OUT + cols[None, :], tile.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["IN", "OUT", "N", "R", "IN2", "OUT2", "N2", "R2", "TILES"])
def _kron_weight_kernel(p0, p1, p2, w_ptr, IN, OUT, N, R, q0, q1, q2, v_ptr, IN2, OUT2, N2, R2, TILES,
                        KIND: tl.constexpr, KIND2: tl.constexpr, TWO: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
    """Materialise W (and, with TWO, a second weight V) in one launch: programs [0, TILES) build
    the tiles of W, the rest those of V."""
    pid = tl.program_id(0)
    if pid < TILES:
        _store_weight_tile(p0, p1, p2, w_ptr, pid, IN, OUT, N, R, KIND, BR, BC)
    elif TWO:
        _store_weight_tile(q0, q1, q2, v_ptr, pid - TILES, IN2, OUT2, N2, R2, KIND2, BR, BC)


# ---------------------------------------------------------------------------------------------
# host side

def _empty(shape, *, device, dtype) -> torch.Tensor:
    """Every output buffer comes from here (tests replace it with a NaN-poisoning allocator)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _factor_args(kind: int, tensors: list[torch.Tensor]) -> tuple:
    """(p0, p1, p2, N, R) kernel arguments of one weight."""
    if kind == 0:
        (w,) = tensors
        return w, w, w, 1, 1
    if kind == 1:
        a, b = tensors
        return a, b, b, a.shape[0], 1
    if kind == 2:
        a, s, t = tensors
        return a, s, t, a.shape[0], s.shape[-1]
    left, right = tensors
    return left, right, right, 1, left.shape[-1]


def _bm(m: int) -> int:
    """BM: the bottleneck m padded to a power of two (>= 16 for tl.dot); the h tile is BT × BM."""
    return max(16, triton.next_power_of_2(m))


def _config(kernel: str, x: torch.Tensor, down_kind: int, up_kind: int, bm: int) -> dict[str, int]:
    """BT, BK, num_warps (and maybe num_stages) of the forward or backward kernel (kadapt/ops/tuning.py)."""
    return tuning.launch_config(kernel, x.device, down=KIND_NAMES[down_kind], up=KIND_NAMES[up_kind], bm=bm,
                                dtype=x.dtype)


def _prec(x: torch.Tensor) -> str:
    # fp32 stays fp32 (no TF32): the fused op must compute the reference's function.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def fused_adapter_fwd(x: torch.Tensor, residual: torch.Tensor | None, add_input: bool,
                      down_kind: int, down: list[torch.Tensor], b_down: torch.Tensor,
                      up_kind: int, up: list[torch.Tensor], b_up: torch.Tensor,
                      act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for 2-D contiguous x (T, D); z is the fp32 pre-activation (T, m)."""
    T, D = x.shape
    m = b_down.shape[0]
    y = _empty(x.shape, device=x.device, dtype=x.dtype)
    z = _empty((T, m), device=x.device, dtype=torch.float32)
    if T == 0:
        return y, z
    bm = _bm(m)
    cfg = _config("fused_adapter_fwd", x, down_kind, up_kind, bm)
    d0, d1, d2, dn, dr = _factor_args(down_kind, down)
    u0, u1, u2, un, ur = _factor_args(up_kind, up)
    _fused_adapter_fwd_kernel[(triton.cdiv(T, cfg["BT"]),)](
        x, residual if residual is not None else x, y, z,
        d0, d1, d2, b_down, u0, u1, u2, b_up,
        T, D, m, dn, dr, un, ur,
        HAS_RES=int(residual is not None), ADD_INPUT=int(add_input), ACT=act,
        DKIND=down_kind, UKIND=up_kind, PREC=_prec(x), BM=bm, **cfg)
    return y, z


def augmented_width(m: int) -> int:
    """Row stride of h_aug = [φ(z) | 1 | 0…]: m + 1 rounded up to 8 (16-byte rows for the GEMM)."""
    return (m + 1 + 7) // 8 * 8


def fused_adapter_bwd(dy: torch.Tensor, z: torch.Tensor, down_kind: int, down: list[torch.Tensor],
                      up_kind: int, up: list[torch.Tensor], add_input: bool,
                      act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, g_z, h_aug, db_down) for 2-D contiguous dy (T, D) and the saved fp32 z (T, m).

    h_aug (T, augmented_width(m)) is [φ(z) | 1 | 0…]: h_augᵀ dy gives dW_u in its first m rows and
    db_u in row m. db_down is fp32."""
    T, D = dy.shape
    m = z.shape[1]
    mh = augmented_width(m)
    dx = _empty(dy.shape, device=dy.device, dtype=dy.dtype)
    g_z = _empty((T, m), device=dy.device, dtype=dy.dtype)
    h_aug = _empty((T, mh), device=dy.device, dtype=dy.dtype)
    db_down = torch.zeros(m, device=dy.device, dtype=torch.float32)
    if T == 0:
        return dx, g_z, h_aug, db_down
    bm = _bm(m)
    cfg = _config("fused_adapter_bwd", dy, down_kind, up_kind, bm)
    d0, d1, d2, dn, dr = _factor_args(down_kind, down)
    u0, u1, u2, un, ur = _factor_args(up_kind, up)
    _fused_adapter_bwd_kernel[(triton.cdiv(T, cfg["BT"]),)](
        dy, z, dx, g_z, h_aug, db_down,
        d0, d1, d2, u0, u1, u2,
        T, D, m, mh, dn, dr, un, ur,
        ADD_INPUT=int(add_input), ACT=act, DKIND=down_kind, UKIND=up_kind, PREC=_prec(dy), BM=bm, **cfg)
    return dx, g_z, h_aug, db_down


def kron_weights(weights: list[tuple[int, list[torch.Tensor], int, int]],
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """Materialise one or two factored weights, each given as (kind, tensors, in, out), in one
    launch; returns the (in, out) matrices in ``dtype``."""
    out, args = [], []
    cfg = tuning.launch_config("kron_weight", weights[0][1][-1].device, kind=KIND_NAMES[weights[0][0]], dtype=dtype)
    br, bc = cfg["BR"], cfg["BC"]
    for kind, tensors, d_in, d_out in weights:
        w = _empty((d_in, d_out), device=tensors[-1].device, dtype=dtype)
        p0, p1, p2, n, r = _factor_args(kind, tensors)
        out.append(w)
        args.append(((p0, p1, p2, w, d_in, d_out, n, r), kind, triton.cdiv(d_in, br) * triton.cdiv(d_out, bc)))
    two = len(args) == 2
    first, kind, tiles = args[0]
    second, kind2, tiles2 = args[1] if two else (first, kind, 0)
    if tiles + tiles2 > 0:
        _kron_weight_kernel[(tiles + tiles2,)](*first, *second, tiles, KIND=kind, KIND2=kind2, TWO=two, **cfg)
    return out


def kron_weight(kind: int, tensors: list[torch.Tensor], in_features: int, out_features: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Materialise W (in, out) of a factored weight in one launch."""
    return kron_weights([(kind, tensors, in_features, out_features)], dtype)[0]


# ---------------------------------------------------------------------------------------------
# factor gradients of a Kronecker-sum weight (METHODS.md §12.3, materialised backward)

@triton.jit(do_not_specialize=["KI", "KO", "N", "R"])
def _kron_factor_grads_kernel(
        dw_ptr, sdw_r, sdw_c, a_ptr, sa_c, sa_a, s_ptr, ss_k, ss_r, t_ptr, st_r, st_p,
        da_ptr, sda_c, sda_a, ds_ptr, sds_k, sds_r, dt_ptr, sdt_r, sdt_p,
        KI, KO, N, R,
        KIND: tl.constexpr, BF: tl.constexpr, BC: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr):
    """One program per rule slice i, for W = Σ_i A_i ⊗ B_i with blocks of KI × KO and KO ≤ BF:
    dA_i[c,a] = ⟨dW_(c,a), B_i⟩, dB_i = Σ_{c,a} A_i[c,a] dW_(c,a), and for Compacter
    (B_i = s_i t_i) ds_i = dB_i t_iᵀ, dt_i = s_iᵀ dB_i. Every output element is written once, in
    its tensor's dtype. Strided: the host passes the transposed problem when KO is the long side.
    For PHM (KIND 1) s is B and ds is dB."""
    i = tl.program_id(0)
    nn = tl.arange(0, NP)
    rr = tl.arange(0, RP)
    ps = tl.arange(0, BF)
    pmask = ps < KO
    d_rule = tl.zeros((NP, NP), tl.float32)
    d_t = tl.zeros((RP, BF), tl.float32)
    a_base = a_ptr + i * N * N  # A is (n, n, n) contiguous in its leading dim; sa_* stride (c, a)
    for k0 in range(0, KI, BC):
        ks = k0 + tl.arange(0, BC)
        kmask = ks < KI
        m2 = kmask[:, None] & pmask[None, :]
        if KIND == 1:
            b = tl.load(s_ptr + i * KI * KO + ks[:, None] * ss_k + ps[None, :] * ss_r, mask=m2,
                        other=0.0).to(tl.float32)
        else:
            b = tl.zeros((BC, BF), tl.float32)
            for rho in range(R):
                sv = tl.load(s_ptr + i * KI * R + ks * ss_k + rho * ss_r, mask=kmask, other=0.0).to(tl.float32)
                tv = tl.load(t_ptr + i * R * KO + rho * st_r + ps * st_p, mask=pmask, other=0.0).to(tl.float32)
                b += sv[:, None] * tv[None, :]
        d_b = tl.zeros((BC, BF), tl.float32)
        for c in range(N):
            for a in range(N):
                tile = tl.load(dw_ptr + (c * KI + ks)[:, None] * sdw_r + (a * KO + ps)[None, :] * sdw_c,
                               mask=m2, other=0.0).to(tl.float32)
                d_b += tl.load(a_base + c * sa_c + a * sa_a).to(tl.float32) * tile
                d_rule = tl.where((nn[:, None] == c) & (nn[None, :] == a), d_rule + tl.sum(tile * b), d_rule)
        if KIND == 1:
            tl.store(ds_ptr + i * KI * KO + ks[:, None] * sds_k + ps[None, :] * sds_r,
                     d_b.to(ds_ptr.dtype.element_ty), mask=m2)
        else:
            for rho in range(R):
                tv = tl.load(t_ptr + i * R * KO + rho * st_r + ps * st_p, mask=pmask, other=0.0).to(tl.float32)
                tl.store(ds_ptr + i * KI * R + ks * sds_k + rho * sds_r,
                         tl.sum(d_b * tv[None, :], axis=1).to(ds_ptr.dtype.element_ty), mask=kmask)
                sv = tl.load(s_ptr + i * KI * R + ks * ss_k + rho * ss_r, mask=kmask, other=0.0).to(tl.float32)
                d_t = tl.where(rr[:, None] == rho, d_t + tl.sum(sv[:, None] * d_b, axis=0)[None, :], d_t)
    if KIND == 2:
        tl.store(dt_ptr + i * R * KO + rr[:, None] * sdt_r + ps[None, :] * sdt_p, d_t.to(dt_ptr.dtype.element_ty),
                 mask=(rr < R)[:, None] & pmask[None, :])
    tl.store(da_ptr + i * N * N + nn[:, None] * sda_c + nn[None, :] * sda_a, d_rule.to(da_ptr.dtype.element_ty),
             mask=(nn < N)[:, None] & (nn < N)[None, :])


FACTOR_GRADS_MAX_SHORT_SIDE = 256  # the short side of a block (in/n or out/n) held whole in registers
FACTOR_GRADS_MAX_RANK = 16


def kron_factor_grads(kind: int, tensors: list[torch.Tensor], d_w: torch.Tensor) -> list[torch.Tensor] | None:
    """[dA, dB] (PHM, kind 1) or [dA, ds, dt] (Compacter, kind 2) from dL/dW in one launch, or None
    when the shapes are outside this kernel (the caller then uses the PyTorch formulas)."""
    rule = tensors[0]
    n = rule.shape[0]
    d_in, d_out = d_w.shape
    ki, ko = d_in // n, d_out // n
    r = tensors[1].shape[2] if kind == 2 else 1
    if min(ki, ko) > FACTOR_GRADS_MAX_SHORT_SIDE or r > FACTOR_GRADS_MAX_RANK or n > 16:
        return None
    grads = [_empty(t.shape, device=t.device, dtype=t.dtype) for t in tensors]
    d_rule, d_s = grads[0], grads[1]
    s, t = tensors[1], tensors[2] if kind == 2 else tensors[1]
    d_t = grads[2] if kind == 2 else d_s
    # Strides of the (κ, ρ)/(ρ, p) views (PHM: B and dB as (κ, p)); transposed problem when KO > KI:
    # Wᵀ = Σ A_iᵀ ⊗ B_iᵀ with B_iᵀ = t_iᵀ s_iᵀ, so s ↔ tᵀ, dA ↔ dAᵀ, ds ↔ dtᵀ.
    if kind == 2:
        views = [(s, s.stride(1), s.stride(2)), (t, t.stride(1), t.stride(2)),
                 (d_s, d_s.stride(1), d_s.stride(2)), (d_t, d_t.stride(1), d_t.stride(2))]
    else:
        views = [(s, s.stride(1), s.stride(2)), (s, s.stride(1), s.stride(2)),
                 (d_s, d_s.stride(1), d_s.stride(2)), (d_s, d_s.stride(1), d_s.stride(2))]
    dw = (d_w, d_w.stride(0), d_w.stride(1))
    ra = (rule, rule.stride(1), rule.stride(2))
    da = (d_rule, d_rule.stride(1), d_rule.stride(2))
    if ko > ki:  # make KO the short side
        ki, ko = ko, ki
        dw = (d_w, d_w.stride(1), d_w.stride(0))
        ra = (rule, rule.stride(2), rule.stride(1))
        da = (d_rule, d_rule.stride(2), d_rule.stride(1))
        if kind == 2:
            (s_, s_k, s_r), (t_, t_r, t_p), (ds_, ds_k, ds_r), (dt_, dt_r, dt_p) = views
            views = [(t_, t_p, t_r), (s_, s_r, s_k), (dt_, dt_p, dt_r), (ds_, ds_r, ds_k)]
        else:
            (b_, b_k, b_p), _, (db_, db_k, db_p), _ = views
            views = [(b_, b_p, b_k), (b_, b_p, b_k), (db_, db_p, db_k), (db_, db_p, db_k)]
    (sp, s_k, s_r), (tp, t_r, t_p), (dsp, ds_k, ds_r), (dtp, dt_r, dt_p) = views
    bf = max(16, triton.next_power_of_2(ko))
    cfg = tuning.launch_config("kron_factor_grads", d_w.device, kind=KIND_NAMES[kind], bf=bf, dtype=d_w.dtype)
    _kron_factor_grads_kernel[(n,)](
        dw[0], dw[1], dw[2], ra[0], ra[1], ra[2], sp, s_k, s_r, tp, t_r, t_p,
        da[0], da[1], da[2], dsp, ds_k, ds_r, dtp, dt_r, dt_p,
        ki, ko, n, r,
        KIND=kind, BF=bf, NP=max(2, triton.next_power_of_2(n)), RP=max(2, triton.next_power_of_2(r)), **cfg)
    return grads
