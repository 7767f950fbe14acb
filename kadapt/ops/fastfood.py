"""Fastfood projection of Intrinsic-SAID: v_i = P_i z for K tensors (METHODS.md §4, §12.5).

    P_i = σ_i S_{N_i} H G_i Π_i H B_i E_i,   z ∈ R^{d_z},   v_i ∈ R^{N_i}

E_i copies z[:min(d_z, L_i)] into a zero vector of the padded length L_i (a power of two; kadapt's
default L_i = 2^⌈log₂ max(N_i, d_z)⌉, ledger #4), B_i = diag(±1), H the unnormalised Sylvester
Walsh–Hadamard matrix (H² = L_i I), (Π_i v)_k = v_{π_i(k)}, G_i = diag(g_i) with g_i ~ N(0, 1), S_{N_i}
keeps the first N_i entries and σ_i = (N_i Σ_k g_{i,k}²)^{−1/2}. ``fastfood`` returns the concatenation
of the v_i (length ΣN_i, fp32); its backward is exact: ∂z = Σ_i P_iᵀ γ_i (``grad_scale_compat=True``
multiplies tensor i's share by 1/L_i, the original code's FWHT-backward scale, ledger #3).

Randomness is regenerated from ``seed``, never stored per element (no 7.7 GB of Fastfood state):
- a counter-based hash: ``_mix`` is a 32-bit integer finaliser (xorshift-multiply, the "lowbias32"
  constants), and element k of stream s of tensor i draws h = mix(mix(k ⊕ a) ⊕ b) where (a, b) are two
  32-bit keys derived on the host from (seed, i, s) by splitmix64. b_{i,k} is h's top bit; g_{i,k} is
  Box–Muller on two such uniforms (fp32: √(−2 ln u₁)·cos(2π u₂), u = (h >> 8 + ½)·2⁻²⁴ ∈ (0, 1)).
  This is not Philox4x32-10 (METHODS.md §12.5 names it): bit parity with any other generator is not
  a goal, equality in distribution is, and a 32-bit mix is cheap and identical in torch int32 ops and
  Triton uint32 ops, which is what makes the reference and the kernel compute the same function.
- π_i is a keyed bijection on [0, L_i), never stored: k ↦ Feistel₄(k ⊕ w) on n = log₂L_i bits, split
  into ⌊n/2⌋ high and ⌈n/2⌉ low bits (unbalanced when n is odd; the widths alternate and return after
  four rounds), round function F_r(x) = mix(x ⊕ key_r) cropped to the other half's width. π_i⁻¹ runs
  the rounds backwards; the backward gathers with π_i⁻¹ instead of scattering with π_i.
- σ_i from one setup pass over the g_i (Σ g² accumulated in fp64), done once per ``FastfoodPlan``.

Backends (kadapt.set_backend): "reference" — ``fastfood_reference``, plain PyTorch per tensor with an
in-place-free radix-2 FWHT, the truth (its autograd is the exact gradient); "triton" —
kadapt/ops/triton/fastfood.py: one ragged launch per FWHT pass over all tensors (see there); "cuda" —
kadapt._C (csrc/fastfood.cu, ops ``kadapt::fastfood_fwd`` / ``kadapt::fastfood_bwd``): the same
function from the same schedule tables (same launches, same generator; shared-memory/register FWHT
per tile), honoured on CUDA tensors when the extension is built, refused otherwise. "auto" runs Triton
on CUDA tensors (the CUDA kernel is not preferred until GPU measurements say it is faster) and the
reference on CPU tensors.

One autograd path (kadapt/ops/_common.py): both fused backends run ``_FastfoodFunction``, whose forward
calls the custom op ``kadapt::fastfood`` and whose backward calls ``kadapt::fastfood_backward``; their
``backend`` argument ("triton" | "cuda") picks the kernels (linear map: nothing is saved but the plan's
tables).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kadapt import backends
from kadapt.ops._common import define, log_backend

M32 = 0xFFFFFFFF
_GOLDEN64 = 0x9E3779B97F4A7C15
N_ROUNDS = 4  # Feistel rounds of π
# key columns: sign (2), u1 (2), u2 (2), whitening (1), round keys (N_ROUNDS)
_KEY_STREAMS = 7 + N_ROUNDS
INFO_COLS = 8 + _KEY_STREAMS  # N, L, n, ws_off, out_off, m, 0, 0, keys...
MAX_LOG2_LENGTH = 30
_SIGMA_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------
# the generator (torch int32 ops on uint32 bits; kadapt/ops/triton/fastfood.py has the same in Triton)

def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN64) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def tensor_keys(seed: int, i: int) -> tuple[int, ...]:
    """The _KEY_STREAMS 32-bit keys of tensor i under ``seed`` (host side, Python ints)."""
    base = _splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ (i * 0xD1B54A32D192ED03 & 0xFFFFFFFFFFFFFFFF))
    out, x = [], base
    for _ in range(_KEY_STREAMS):
        x = _splitmix64(x)
        out.append(x & M32)
    return tuple(out)


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser on int32 tensors holding uint32 bits: int32 products wrap mod 2³² (two's
    complement, as torch's integer kernels do), and ``& mask`` after ``>>`` makes the shifts logical. 3-4×
    faster than emulating uint32 in int64; tests/ops/test_fastfood.py checks it bit for bit against Triton."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _i32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _i32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def _hash(k: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """int32 bits of mix(mix(k ⊕ a) ⊕ b) for counters k < 2³¹."""
    return _mix(_mix(k.to(torch.int32) ^ _i32(a)) ^ _i32(b))


def _uniform(h: torch.Tensor) -> torch.Tensor:
    return (((h >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * 5.960464477539063e-08  # 2^-24: u ∈ (0, 1)


def signs(k: torch.Tensor, keys) -> torch.Tensor:
    """b_{i,k} ∈ {±1} (fp32) for int64 counters k: the hash's top bit."""
    return 1.0 - 2.0 * (_hash(k, keys[0], keys[1]) < 0).to(torch.float32)


def gaussians(k: torch.Tensor, keys) -> torch.Tensor:
    """g_{i,k} ~ N(0, 1) (fp32, Box–Muller) for int64 counters k."""
    u1 = _uniform(_hash(k, keys[2], keys[3]))
    u2 = _uniform(_hash(k, keys[4], keys[5]))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def permutation(k: torch.Tensor, n: int, keys, inverse: bool = False) -> torch.Tensor:
    """π_i(k) (or π_i⁻¹(k)) as int64 for int64 k in [0, 2ⁿ): the keyed Feistel bijection (module docstring).
    Computed in int32 (n ≤ 30, so every intermediate is non-negative)."""
    nl, nr = n // 2, n - n // 2
    ml, mr = (1 << nl) - 1, (1 << nr) - 1
    w = keys[6] & ((1 << n) - 1)
    rk = [_i32(key) for key in keys[7:7 + N_ROUNDS]]
    widths = [ml if r % 2 == 0 else mr for r in range(N_ROUNDS)]  # width of F_r's output
    k = k.to(torch.int32)
    if not inverse:
        x = k ^ w
        left, right = x >> nr, x & mr
        for r in range(N_ROUNDS):
            left, right = right, left ^ (_mix(right ^ rk[r]) & widths[r])
        return ((left << nr) | right).to(torch.int64)
    left, right = k >> nr, k & mr
    for r in reversed(range(N_ROUNDS)):
        left, right = right ^ (_mix(left ^ rk[r]) & widths[r]), left
    return (((left << nr) | right) ^ w).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# the plan

def default_lengths(sizes, d_z: int) -> tuple[int, ...]:
    """kadapt's L_i = 2^⌈log₂ max(N_i, d_z)⌉ (ledger #4)."""
    return tuple(1 << max(0, (max(n, d_z) - 1).bit_length()) for n in sizes)


@dataclass(frozen=True, eq=False)
class FastfoodPlan:
    """Everything about the transform that is fixed by (sizes, seed, d_z, lengths): build it once
    (``fastfood_plan``) and pass it to every call. Plain Python numbers, so torch.compile guards on
    them as constants; the device tables of the Triton kernels are built on first use and cached."""

    sizes: tuple[int, ...]
    lengths: tuple[int, ...]
    d_z: int
    seed: int
    out_offsets: tuple[int, ...]  # prefix sums of sizes (K + 1)
    ws_offsets: tuple[int, ...]  # prefix sums of lengths (K + 1)
    sigma: tuple[float, ...]  # σ_i (fp64 values; the kernels use them in fp32)
    keys: tuple[tuple[int, ...], ...]
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def total_out(self) -> int:
        return self.out_offsets[-1]

    @property
    def total_ws(self) -> int:
        return self.ws_offsets[-1]

    def info(self) -> torch.Tensor:
        """(K, INFO_COLS) int64 host table: N, L, log₂L, ws offset, out offset, min(d_z, L), 0, 0, keys."""
        rows = []
        for i, (n, L) in enumerate(zip(self.sizes, self.lengths)):
            rows.append([n, L, L.bit_length() - 1, self.ws_offsets[i], self.out_offsets[i], min(self.d_z, L), 0, 0,
                         *self.keys[i]])
        return torch.tensor(rows, dtype=torch.int64).reshape(len(self.sizes), INFO_COLS)


def _check_sizes(sizes, d_z, lengths, seed):
    if isinstance(sizes, torch.Tensor) or not hasattr(sizes, "__len__"):
        raise ValueError(f"sizes must be a sequence of positive ints, got {type(sizes).__name__}")
    sizes = tuple(sizes)
    if not sizes:
        raise ValueError("sizes must not be empty")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"sizes must be positive ints, got {n!r}")
    if isinstance(d_z, bool) or not isinstance(d_z, int) or d_z <= 0:
        raise ValueError(f"d_z must be a positive int, got {d_z!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if lengths is None:
        lengths = default_lengths(sizes, d_z)
    else:
        lengths = tuple(lengths)
        if len(lengths) != len(sizes):
            raise ValueError(f"lengths has {len(lengths)} entries but sizes has {len(sizes)}")
        for n, L in zip(sizes, lengths):
            if isinstance(L, bool) or not isinstance(L, int) or L <= 0 or L & (L - 1):
                raise ValueError(f"lengths must be powers of two, got {L!r}")
            if L < n:
                raise ValueError(f"lengths: L={L} is smaller than its tensor's size {n}")
    for L in lengths:
        if L > 1 << MAX_LOG2_LENGTH:
            raise ValueError(f"lengths: L={L} exceeds 2^{MAX_LOG2_LENGTH}")
    return sizes, lengths


def sum_g2(L: int, keys, device=None) -> float:
    """Σ_k g_{i,k}² over k < L in fp64 (chunked), g in fp32 as the kernels draw it."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, L, _SIGMA_CHUNK):
        k = torch.arange(start, min(L, start + _SIGMA_CHUNK), device=device, dtype=torch.int64)
        total += gaussians(k, keys).double().square().sum()
    return float(total)


_PLANS: dict = {}


def fastfood_plan(sizes, seed: int, d_z: int | None = None, lengths=None, device=None) -> FastfoodPlan:
    """The plan of the transform (L_i, offsets, keys, σ_i), cached per (sizes, seed, d_z, lengths).

    ``d_z`` defaults to max(sizes) only for convenience in tests; SAID passes it. The setup pass that
    computes σ_i draws every g_{i,k} once (on ``device``, default CPU): build the plan once, not per step."""
    if d_z is None:
        d_z = max(_check_sizes(sizes, 1, None, seed)[0])
    sizes, lengths = _check_sizes(sizes, d_z, lengths, seed)
    key = (sizes, lengths, d_z, seed)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    keys = tuple(tensor_keys(seed, i) for i in range(len(sizes)))
    sigma = tuple(1.0 / math.sqrt(n * sum_g2(L, kk, device)) for n, L, kk in zip(sizes, lengths, keys))
    out_off, ws_off = [0], [0]
    for n, L in zip(sizes, lengths):
        out_off.append(out_off[-1] + n)
        ws_off.append(ws_off[-1] + L)
    plan = FastfoodPlan(sizes, lengths, d_z, seed, tuple(out_off), tuple(ws_off), sigma, keys)
    _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------------------------------------
# the reference (the truth)

def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester Walsh–Hadamard transform of a 1-D power-of-two-length x: radix-2 stages,
    no in-place ops (autograd and torch.compile trace it; H is symmetric so its backward is H)."""
    L = x.shape[0]
    h = 1
    while h < L:
        y = x.reshape(L // (2 * h), 2, h)
        a, b = y[:, 0], y[:, 1]
        x = torch.stack((a + b, a - b), dim=1).reshape(L)
        h *= 2
    return x


def _ks(L: int, device) -> torch.Tensor:
    return torch.arange(L, device=device, dtype=torch.int64)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The reference computes in fp32, or in fp64 for fp64 input (finite-difference gradient checks); the
    random draws are fp32 values either way, so both compute the same function up to rounding."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fastfood_one_reference(z: torch.Tensor, plan: FastfoodPlan, i: int) -> torch.Tensor:
    """v_i = P_i z (length N_i; fp32, fp64 for fp64 z)."""
    n, L, keys = plan.sizes[i], plan.lengths[i], plan.keys[i]
    k = _ks(L, z.device)
    m, dt = min(plan.d_z, L), compute_dtype(z)
    x = F.pad(z[:m].to(dt), (0, L - m))
    x = fwht(x * signs(k, keys).to(dt))
    x = x[permutation(k, L.bit_length() - 1, keys)] * gaussians(k, keys).to(dt)
    return fwht(x)[:n] * plan.sigma[i]


def fastfood_reference(z: torch.Tensor, sizes, seed: int, d_z: int | None = None, lengths=None,
                       grad_scale_compat: bool = False, plan: FastfoodPlan | None = None) -> torch.Tensor:
    """The truth: cat_i P_i z in plain PyTorch, in fp32 (fp64 for fp64 z); autograd gives the exact ∂z;
    with ``grad_scale_compat`` tensor i's share of ∂z is scaled by 1/L_i, the forward unchanged."""
    plan = _plan_for(z, sizes, seed, d_z, lengths, plan)
    parts = []
    for i in range(len(plan.sizes)):
        zi = _GradScale.apply(z, 1.0 / plan.lengths[i]) if grad_scale_compat else z
        parts.append(fastfood_one_reference(zi, plan, i))
    return torch.cat(parts)


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient × ``scale`` (ledger #3 on the reference path)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def fastfood_transpose_reference(gamma: torch.Tensor, plan: FastfoodPlan, grad_scale_compat: bool = False
                                 ) -> torch.Tensor:
    """∂z = Σ_i P_iᵀ γ_i by the explicit transpose chain of METHODS.md §12.5 (v = pad(σγ) → g ⊙ Hv →
    scatter w_{π(k)} = v_k → b ⊙ Hw → first min(d_z, L) entries), no autograd."""
    dt = compute_dtype(gamma)
    dz = torch.zeros(plan.d_z, dtype=dt, device=gamma.device)
    for i, (n, L) in enumerate(zip(plan.sizes, plan.lengths)):
        keys, k = plan.keys[i], _ks(L, gamma.device)
        g = gamma[plan.out_offsets[i]:plan.out_offsets[i + 1]].to(dt)
        v = gaussians(k, keys).to(dt) * fwht(F.pad(g * plan.sigma[i], (0, L - n)))
        w = torch.zeros_like(v).index_copy(0, permutation(k, L.bit_length() - 1, keys), v)
        q = (signs(k, keys).to(dt) * fwht(w))[:min(plan.d_z, L)]
        dz = dz + F.pad(q * (1.0 / L if grad_scale_compat else 1.0), (0, plan.d_z - q.shape[0]))
    return dz


# ---------------------------------------------------------------------------------------------
# the kernel boundary: custom ops (no autograd of their own; _FastfoodFunction is their autograd)

_TRITON = None


def _triton():
    global _TRITON
    if _TRITON is None:
        from kadapt.ops.triton import fastfood as mod

        _TRITON = mod
    return _TRITON


@torch.compiler.assume_constant_result
def _schedule(plan: FastfoodPlan, device: torch.device):
    """The Triton schedule of ``plan`` (built once per plan and device, then cached): Dynamo calls this
    while tracing and takes its result as a constant, so the tables are not traced ops."""
    return _triton().schedule(plan, device)


# The largest transform one block of csrc/fastfood.cu does (kMaxTileLog2): the schedule's inner tile TR·TC
# and outer tile RO·OC must not exceed it (the GPU config's are 2^13 and 2^12).
CUDA_MAX_TILE = 1 << 13


def _forward_impl(z: torch.Tensor, tables: list[torch.Tensor], meta: list[int], backend: str = "triton"
                  ) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.kadapt.fastfood_fwd(z, tables, meta)
    return _triton().fastfood_fwd(z, tables, meta)


def _forward_fake(z: torch.Tensor, tables: list[torch.Tensor], meta: list[int], backend: str = "triton"
                  ) -> torch.Tensor:
    return z.new_empty((meta[1],), dtype=torch.float32)


# v (ΣN_i,) fp32 for z (d_z,) fp32 contiguous; tables/meta: kadapt/ops/triton/fastfood.py ``schedule``;
# backend "triton" (kadapt/ops/triton/fastfood.py) or "cuda" (kadapt._C, csrc/fastfood.cu): the same function
_fastfood_op = define("fastfood(Tensor z, Tensor[] tables, int[] meta, str backend='triton') -> Tensor",
                      _forward_impl, _forward_fake)


def _backward_impl(grad: torch.Tensor, tables: list[torch.Tensor], meta: list[int], backend: str = "triton"
                   ) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.kadapt.fastfood_bwd(grad, tables, meta)
    return _triton().fastfood_bwd(grad, tables, meta)


def _backward_fake(grad: torch.Tensor, tables: list[torch.Tensor], meta: list[int], backend: str = "triton"
                   ) -> torch.Tensor:
    return grad.new_empty((meta[0],), dtype=torch.float32)


# ∂z (d_z,) fp32 for γ (ΣN_i,) fp32 contiguous; meta as the forward's (meta[-1]: grad_scale_compat); backend
# as the forward's
_fastfood_backward_op = define("fastfood_backward(Tensor grad, Tensor[] tables, int[] meta, "
                               "str backend='triton') -> Tensor", _backward_impl, _backward_fake)


class _FastfoodFunction(torch.autograd.Function):
    """The autograd of the fused backends, eager and under torch.compile alike (``backend`` picks the
    Triton or the CUDA kernels of both ops). P is linear: the backward needs only γ and the plan's tables."""

    @staticmethod
    def forward(ctx, z, meta, backend, *tables):
        ctx.meta, ctx.backend, ctx.tables = meta, backend, tables
        return _fastfood_op(z, list(tables), meta, backend)

    @staticmethod
    def backward(ctx, grad):
        dz = _fastfood_backward_op(grad.contiguous().to(torch.float32), list(ctx.tables), ctx.meta, ctx.backend)
        return (dz, None, None, *[None] * len(ctx.tables))


# ---------------------------------------------------------------------------------------------
# dispatch

def _check_z(z) -> None:
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 1:
        raise ValueError(f"z must be 1-D (d_z,), got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"z has dtype {z.dtype}; allowed: float32, float16, bfloat16, float64")


# "auto" on CUDA tensors: Triton first, then the CUDA kernel; to be reordered by GPU measurements
# (benchmarks/fastfood.py), not before.
AUTO_ORDER = ("triton", "cuda")


def _cuda_unsupported(z: torch.Tensor, plan: FastfoodPlan) -> str | None:
    """Why the CUDA kernel cannot run this call, beyond what ``backends.cuda_reason`` checks, or None."""
    if not z.is_cuda or not backends.cuda_extension_built():
        return None  # backends.resolve names these reasons itself
    if not backends.triton_importable():
        return "its schedule tables are built by kadapt/ops/triton/fastfood.py, which needs triton"
    TR, TC, RO, OC = _schedule(plan, z.device)[1][4:8]
    if TR * TC > CUDA_MAX_TILE or RO * OC > CUDA_MAX_TILE:
        return (f"the tile config (TR, TC, RO, OC) = {(TR, TC, RO, OC)} needs TR·TC and RO·OC <= {CUDA_MAX_TILE} "
                f"for the CUDA kernel")
    return None


def _plan_for(z, sizes, seed, d_z, lengths, plan) -> FastfoodPlan:
    _check_z(z)
    if d_z is None:
        d_z = z.shape[0]
    if d_z != z.shape[0]:
        raise ValueError(f"d_z={d_z} but z has {z.shape[0]} entries")
    if plan is None:
        return fastfood_plan(sizes, seed, d_z, lengths)
    if plan.d_z != d_z:
        raise ValueError(f"plan has d_z={plan.d_z} but z has {z.shape[0]} entries")
    return plan


def fastfood(z: torch.Tensor, sizes=None, seed: int | None = None, d_z: int | None = None, lengths=None,
             grad_scale_compat: bool = False, plan: FastfoodPlan | None = None) -> torch.Tensor:
    """cat_i P_i z (fp32, length ΣN_i) on the backend in force; exact backward (module docstring).

    z: 1-D (d_z,) floating tensor (computed in fp32). sizes, seed, lengths: the tensors' sizes N_i, the
    generator seed and optional padded lengths L_i (powers of two ≥ N_i; default
    2^⌈log₂ max(N_i, d_z)⌉). Pass ``plan=fastfood_plan(...)`` (then sizes/seed/lengths are ignored) to
    skip the plan lookup: required under torch.compile unless the plan was built before tracing.

    Backends: a forced "cuda" runs csrc/fastfood.cu when kadapt._C is built and z is a CUDA tensor, and
    raises RuntimeError otherwise; "auto" on CUDA tensors runs Triton first (``AUTO_ORDER``: the CUDA
    kernel is not measured faster yet), then the CUDA kernel, then the reference."""
    if plan is None:
        if sizes is None or seed is None:
            raise ValueError("sizes and seed are required when no plan is given")
    plan = _plan_for(z, sizes, seed, d_z, lengths, plan)
    backend = backends.resolve("fastfood", z, cuda_unsupported=_cuda_unsupported(z, plan), order=AUTO_ORDER)
    log_backend("fastfood", backend)
    if backend == "reference":
        return fastfood_reference(z, None, None, plan.d_z, grad_scale_compat=grad_scale_compat, plan=plan)
    tables, meta = _schedule(plan, z.device)
    zf = z.to(torch.float32).contiguous()
    return _FastfoodFunction.apply(zf, [*meta, int(grad_scale_compat)], backend, *tables)
