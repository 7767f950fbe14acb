"""Fused bottleneck adapter y = φ(x W_d + b_d) W_u + b_u (+ x) (+ residual) (METHODS.md §12.4).

W_d and W_u are dense tensors or ``AdapterWeight``s (dense, low-rank, PHM, Compacter).

Backends (kadapt.set_backend):
- reference: the PyTorch formula below, the truth (plain autograd);
- triton: kadapt/ops/triton/fused_adapter.py; dense and low-rank tiles are formed in-kernel, PHM and
  Compacter weights are materialised by one launch for both projections;
- cuda: kadapt._C (csrc/fused_adapter.cu); factored weights are materialised first.
Forward: one token-parallel kernel (z = x W_d + b_d, φ, y = h W_u + b_u + x). Backward: one
token-parallel kernel (dx, g_z, h, db_d), then the weight-gradient GEMMs dW_d = xᵀ g_z and
[dW_u; db_u] = [h | 1]ᵀ dy, and the factor gradients of §12.3 (on the triton backend one Triton launch
per PHM/Compacter projection, else the PyTorch formulas of kadapt/ops/weights.py). Saved: x, the fp32
pre-activation z (T×m), the factors and the weights the forward materialised (D×m each); no T×D tensor
besides x.

One autograd path (kadapt/ops/_common.py): the fused backends run ``_FusedAdapterFunction``, whose
forward calls the custom op ``kadapt::fused_adapter`` and whose backward calls
``kadapt::fused_adapter_backward`` (schemas, CPU/CUDA kernels and fake kernels; no autograd of their
own). ``torch.compile(fullgraph=True)`` traces that Function, the two ops being nodes of its forward and
backward graphs; eager mode runs the same Function (on plain tensors calling the ops' kernel function
without the dispatcher round trip: ``define`` in _common.py). Both compute the same gradients with the
same kernels, the factor gradients included.

Autocast: when autocast is enabled for x's device type, the op computes in the autocast dtype (x, every
weight factor, both biases and the residual are cast to it, as autocast casts a matmul's operands),
returns that dtype, and the gradients reach the parameters in their own dtype. Outside autocast, x,
the weights (all factors but a PHM rule A), the biases and the residual must share one dtype
(ValueError naming the first that does not).
"""
from __future__ import annotations

import torch

from kadapt import backends
from kadapt.ops._common import (
    FLOAT_DTYPES,
    autocast_cast,
    autocast_dtype,
    check_dtypes,
    define,
    log_backend,
    placeholder,
    triton_kernels,
    unsupported_dtype,
)
from kadapt.ops.activations import ACTIVATION_CODES, activation
from kadapt.ops.weights import WEIGHT_KINDS, AdapterWeight, as_weight, fused_factor_grads

_DTYPES = FLOAT_DTYPES
# Largest bottleneck each fused backend takes; larger ones run the reference under "auto".
TRITON_MAX_BOTTLENECK = 256
CUDA_MAX_BOTTLENECK = 256
_KIND_NAMES = {v: k for k, v in WEIGHT_KINDS.items()}
# "auto" tries Triton first: on an H100 (bf16, T=8192, D=1024, m=64) the Triton kernels ran the
# forward 2.5x and forward+backward 1.6x faster than the CUDA (WMMA) kernels (benchmarks/RESULTS.md).
AUTO_ORDER = ("triton", "cuda")
_DTYPE_RULE = ("x, the weights (all factors but a PHM rule A), the biases and the residual must share one "
               "dtype")


def fused_adapter_reference(x: torch.Tensor, w_down: torch.Tensor | AdapterWeight, b_down: torch.Tensor,
                            w_up: torch.Tensor | AdapterWeight, b_up: torch.Tensor, act: str = "gelu_new",
                            residual: torch.Tensor | None = None, add_input: bool = False) -> torch.Tensor:
    """The truth: φ(x W_d + b_d) W_u + b_u, plus x if add_input, plus residual if given."""
    wd = as_weight(w_down, "w_down").materialize()
    wu = as_weight(w_up, "w_up").materialize()
    a = activation(act, x @ wd + b_down) @ wu + b_up
    if add_input:
        a = x + a
    return a if residual is None else residual + a


# ---------------------------------------------------------------------------------------------
# kernels of the fused backends (called by the custom ops below)

_N_FACTORS = (1, 2, 3, 2)  # factor tensors per weight kind (WEIGHT_KINDS codes)


def _materialized(kind: int, backend: str) -> bool:
    """Whether the forward builds this weight as a dense matrix for the kernels. CUDA takes dense
    matrices; Triton forms dense and low-rank tiles in-kernel and gets PHM/Compacter weights built
    by one launch for both (forming Kronecker tiles per token tile re-gathers A n times per element:
    measured 6x slower)."""
    return kind != 0 if backend == "cuda" else kind in (1, 2)


def _weight_shape(kind: int, tensors) -> tuple:
    return tuple(AdapterWeight(_KIND_NAMES[kind], tuple(tensors)).shape)


def _build(down_kind: int, down: list[torch.Tensor], up_kind: int, up: list[torch.Tensor],
           backend: str) -> list[torch.Tensor]:
    """The dense matrices of the weights that ``_materialized`` (down first)."""
    todo = [(k, ts) for k, ts in ((down_kind, down), (up_kind, up)) if _materialized(k, backend)]
    if not todo:
        return []
    if backend == "cuda":
        return [_dense_for_cuda(k, ts) for k, ts in todo]
    return triton_kernels().kron_weights([(k, ts) + _weight_shape(k, ts) for k, ts in todo], down[-1].dtype)


def _dense_for_cuda(kind: int, ts: list[torch.Tensor]) -> torch.Tensor:
    if kind == 3:
        return ts[0] @ ts[1]
    return torch.ops.kadapt.kron_weight(ts[0], ts[1], ts[2] if kind == 2 else None)


def _prepared(down_kind, down, up_kind, up, built, backend):
    """(kind, tensors) of both weights as the kernels take them: the built matrices where there are."""
    if built:
        built = iter(built)
        if _materialized(down_kind, backend):
            down_kind, down = 0, [next(built)]
        if _materialized(up_kind, backend):
            up_kind, up = 0, [next(built)]
    return down_kind, down, up_kind, up


def _forward_kernels(x, residual, add_input, down_kind, down, b_down, up_kind, up, b_up, act, backend):
    """(y, z) from prepared weights."""
    if backend == "cuda":
        return torch.ops.kadapt.fused_adapter_fwd(x, residual, add_input, down[0], b_down, up[0], b_up, act)
    return triton_kernels().fused_adapter_fwd(x, residual, add_input, down_kind, down, b_down, up_kind, up, b_up, act)


def _backward_kernels(x, dy, z, down_kind, down, up_kind, up, add_input, act, backend, need_down, need_up):
    """(dx, dW_d, dW_u, db_up, db_down) from prepared weights: the token-parallel backward kernel,
    then the weight-gradient GEMMs dW_d = xᵀ g_z and dW_u = hᵀ dy (None when not needed); the bias
    gradients in dy's dtype, accumulated in at least fp32 (db_u in the GEMM's accumulator)."""
    if backend == "cuda":
        dx, g_z, h, db_up = torch.ops.kadapt.fused_adapter_bwd(dy, z, down[0], up[0], add_input, act)
        db_down = g_z.sum(0, dtype=torch.promote_types(g_z.dtype, torch.float32))
        return (dx, x.t() @ g_z if need_down else None, h.t() @ dy if need_up else None, db_up.to(dy.dtype),
                db_down.to(dy.dtype))
    m = z.shape[1]
    dx, g_z, h_aug, db_down = triton_kernels().fused_adapter_bwd(dy, z, down_kind, down, up_kind, up, add_input, act)
    up_and_bias = h_aug.t() @ dy  # rows :m are dW_u, row m is db_u (h_aug's ones column)
    # db_u cloned: no output may alias another (dW_u) or start inside its storage (the fake kernel's do not)
    return (dx, x.t() @ g_z if need_down else None, up_and_bias[:m] if need_up else None, up_and_bias[m].clone(),
            db_down.to(dy.dtype))


# ---------------------------------------------------------------------------------------------
# the kernel boundary: custom ops (no autograd of their own; _FusedAdapterFunction is their autograd)

def _forward_impl(x, residual, b_down, b_up, factors, spec, backend):
    add_input, down_kind, up_kind, act = spec
    n_down = _N_FACTORS[down_kind]
    down, up = factors[:n_down], factors[n_down:]
    built = _build(down_kind, down, up_kind, up, backend)
    dk, pd, uk, pu = _prepared(down_kind, down, up_kind, up, built, backend)
    y, z = _forward_kernels(x, residual, bool(add_input), dk, pd, b_down, uk, pu, b_up, act, backend)
    return [y, z, *built]


def _forward_fake(x, residual, b_down, b_up, factors, spec, backend):
    _, down_kind, up_kind, _ = spec
    n_down = _N_FACTORS[down_kind]
    out = [torch.empty_like(x), x.new_empty((x.shape[0], b_down.shape[0]), dtype=torch.float32)]
    return out + [x.new_empty(_weight_shape(k, ts)) for k, ts in ((down_kind, factors[:n_down]),
                                                                  (up_kind, factors[n_down:]))
                  if _materialized(k, backend)]


# [y, z, *built] for 2-D contiguous x (T, D): z is the fp32 pre-activation (T, m), built the weights
# materialised for the kernels (_materialized); factors: those of W_d then those of W_u;
# spec = [add_input, down_kind, up_kind, act code]; backend "triton" or "cuda".
_fused_adapter_op = define(
    "fused_adapter(Tensor x, Tensor? residual, Tensor b_down, Tensor b_up, Tensor[] factors, int[] spec, "
    "str backend) -> Tensor[]", _forward_impl, _forward_fake)


def _backward_impl(x, dy, z, weights, spec, backend):
    add_input, down_kind, up_kind, act, need_down, need_up = spec
    n_down = _N_FACTORS[down_kind]
    n = n_down + _N_FACTORS[up_kind]
    down, up, built = weights[:n_down], weights[n_down:n], weights[n:]
    dk, pd, uk, pu = _prepared(down_kind, down, up_kind, up, built, backend)
    dx, d_wd, d_wu, db_up, db_down = _backward_kernels(x, dy, z, dk, pd, uk, pu, bool(add_input), act, backend,
                                                       need_down, need_up)
    d_down = fused_factor_grads(down_kind, down, d_wd, backend) if need_down else [placeholder(dy) for _ in down]
    d_up = fused_factor_grads(up_kind, up, d_wu, backend) if need_up else [placeholder(dy) for _ in up]
    return [dx, db_down, db_up, *d_down, *d_up]


def _backward_fake(x, dy, z, weights, spec, backend):
    _, down_kind, up_kind, _, need_down, need_up = spec
    n_down = _N_FACTORS[down_kind]
    out = [torch.empty_like(dy), dy.new_empty((z.shape[1],)), dy.new_empty((dy.shape[1],))]
    out += [torch.empty_like(t) if need_down else placeholder(dy) for t in weights[:n_down]]
    return out + [torch.empty_like(t) if need_up else placeholder(dy)
                  for t in weights[n_down:n_down + _N_FACTORS[up_kind]]]


# [dx, db_down, db_up, *d_factors] for the saved x and z and dy (T, D) contiguous; weights: the factors of
# W_d, of W_u, then the matrices the forward built; bias gradients in dy's dtype, factor gradients in their
# factor's dtype, a (0,) placeholder for each factor of a projection not needed; spec = the forward's spec
# + [need_down, need_up].
_fused_adapter_backward_op = define(
    "fused_adapter_backward(Tensor x, Tensor dy, Tensor z, Tensor[] weights, int[] spec, str backend) -> Tensor[]",
    _backward_impl, _backward_fake)


class _FusedAdapterFunction(torch.autograd.Function):
    """The autograd of the fused backends, in eager mode and under torch.compile alike.

    x and residual come in their own (…, D) shape and are flattened here (no autograd view nodes);
    y is returned (T, D). Dynamo refuses a tensor passed to two inputs, so each tensor is passed once:
    ``residual_is_x`` stands for residual=x, and ``tensors`` are the distinct factor tensors; with
    ``where`` None they are the factors of W_d then W_u, else factor i is ``tensors[where[i]]`` (one
    PHM rule A shared by both projections, which gets the sum of its two gradients)."""

    @staticmethod
    def forward(ctx, x, residual, b_down, b_up, spec, backend, residual_is_x, where, *tensors):
        d = x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        r2 = x2 if residual_is_x else None if residual is None else residual.reshape(-1, d).contiguous()
        factors = list(tensors) if where is None else [tensors[i] for i in where]
        out = _fused_adapter_op(x2, r2, b_down, b_up, factors, spec, backend)
        ctx.save_for_backward(x2, *out[1:], *tensors)
        ctx.spec, ctx.backend, ctx.where, ctx.n_built, ctx.x_shape = spec, backend, where, len(out) - 2, x.shape
        ctx.has_residual, ctx.residual_is_x = residual is not None, residual_is_x
        return out[0]

    @staticmethod
    def backward(ctx, dy):
        spec, where, x_shape = ctx.spec, ctx.where, ctx.x_shape
        x, z, *rest = ctx.saved_tensors
        built, tensors = rest[:ctx.n_built], rest[ctx.n_built:]
        n_down = _N_FACTORS[spec[1]]
        need = ctx.needs_input_grad[8:]  # those of the tensors
        if where is None:
            factors, need_down, need_up = list(tensors), any(need[:n_down]), any(need[n_down:])
        else:
            factors = [tensors[i] for i in where]
            need_down = any(need[i] for i in where[:n_down])
            need_up = any(need[i] for i in where[n_down:])
        dy = dy.contiguous()
        g = _fused_adapter_backward_op(x, dy, z, factors + built, [*spec, int(need_down), int(need_up)], ctx.backend)
        if where is None:
            grads = [*(g[3:3 + n_down] if need_down else [None] * n_down),
                     *(g[3 + n_down:] if need_up else [None] * (len(g) - 3 - n_down))]
        else:
            grads = [None] * len(tensors)
            for pos, i in enumerate(where):
                if need_down if pos < n_down else need_up:
                    grads[i] = g[3 + pos] if grads[i] is None else grads[i] + g[3 + pos]
        dx = g[0] + dy if ctx.residual_is_x else g[0]
        d_res = dy.view(x_shape) if ctx.has_residual else None
        return (dx.view(x_shape), d_res, g[1], g[2], None, None, None, None, *grads)


def _distinct(factors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...] | None]:
    """(the distinct tensors of ``factors``, by identity in order of first use; None if all are
    distinct, else where each factor is among them)."""
    tensors, where = [], []
    for t in factors:
        for i, u in enumerate(tensors):
            if u is t:
                where.append(i)
                break
        else:
            where.append(len(tensors))
            tensors.append(t)
    if len(tensors) == len(factors):
        return factors, None
    return tuple(tensors), tuple(where)


# ---------------------------------------------------------------------------------------------
# dispatch

def _unsupported(x: torch.Tensor, weights: tuple[AdapterWeight, AdapterWeight], biases: tuple,
                 residual: torch.Tensor | None) -> str | None:
    """Why no fused kernel can take these inputs, or None (dtypes already agree: _check_shapes)."""
    if x.dtype not in _DTYPES:
        return unsupported_dtype(x.dtype)
    device = x.device
    for t in (*weights[0].tensors, *weights[1].tensors, *biases, residual):
        if t is not None and t.device != device:
            return "weights and input are on different devices"
    return None


def _too_wide(m: int, max_m: int) -> str | None:
    return f"bottleneck m={m} exceeds the kernel's {max_m}" if m > max_m else None


def _check_shapes(x, wd: AdapterWeight, b_down, wu: AdapterWeight, b_up, residual) -> int:
    """ValueError naming the first argument of a wrong shape or dtype; returns m."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (…, D)")
    D = x.shape[-1]
    d_in, m = wd.shape
    if d_in != D:
        raise ValueError(f"w_down must map D={D} (x.shape[-1]) to m, got an ({d_in}, {m}) weight")
    if wu.shape != (m, D):
        raise ValueError(f"w_up must be ({m}, {D}) to map the bottleneck back, got {tuple(wu.shape)}")
    if b_down.shape != (m,):
        raise ValueError(f"b_down must have shape ({m},), got {tuple(b_down.shape)}")
    if b_up.shape != (D,):
        raise ValueError(f"b_up must have shape ({D},), got {tuple(b_up.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    dtype = x.dtype
    if (b_down.dtype != dtype or b_up.dtype != dtype or (residual is not None and residual.dtype != dtype)
            or any(t.dtype != dtype for t in wd.factor_tensors() + wu.factor_tensors())):
        named = [("b_down", b_down), ("b_up", b_up), ("residual", residual)]
        for field, w in (("w_down", wd), ("w_up", wu)):
            first = len(w.tensors) - len(w.factor_tensors())  # a PHM rule A may be stored in another dtype
            named += [(f"{field}.tensors[{i}]", t) for i, t in enumerate(w.factor_tensors(), start=first)]
        check_dtypes(x, named, _DTYPE_RULE)
    return m


def _autocast(dtype, x, wd: AdapterWeight, b_down, wu: AdapterWeight, b_up, residual):
    cast = autocast_cast
    return (cast(x, dtype), AdapterWeight(wd.kind, tuple(cast(t, dtype) for t in wd.tensors)), cast(b_down, dtype),
            AdapterWeight(wu.kind, tuple(cast(t, dtype) for t in wu.tensors)), cast(b_up, dtype),
            cast(residual, dtype))


def fused_adapter(x: torch.Tensor, w_down: torch.Tensor | AdapterWeight, b_down: torch.Tensor,
                  w_up: torch.Tensor | AdapterWeight, b_up: torch.Tensor, act: str = "gelu_new",
                  residual: torch.Tensor | None = None, add_input: bool = False) -> torch.Tensor:
    """φ(x W_d + b_d) W_u + b_u (+ x if add_input) (+ residual) on the backend in force.

    x is (…, D); W_d maps D → m and W_u m → D; with ``add_input`` the kernel reads x once for both
    the projection and the residual (a sequential adapter f + a(f)). Under autocast the op computes
    in, and returns, the autocast dtype.
    """
    code = ACTIVATION_CODES.get(act) if isinstance(act, str) else None
    if code is None:
        raise ValueError(f"act={act!r} is not allowed; allowed values: {', '.join(ACTIVATION_CODES)}")
    wd, wu = as_weight(w_down, "w_down"), as_weight(w_up, "w_up")
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, wd, b_down, wu, b_up, residual = _autocast(dtype, x, wd, b_down, wu, b_up, residual)
    m = _check_shapes(x, wd, b_down, wu, b_up, residual)
    reason = _unsupported(x, (wd, wu), (b_down, b_up), residual)
    backend = backends.resolve(
        "fused_adapter", x,
        cuda_unsupported=reason or _too_wide(m, CUDA_MAX_BOTTLENECK),
        triton_unsupported=reason or _too_wide(m, TRITON_MAX_BOTTLENECK),
        order=AUTO_ORDER)
    log_backend("fused_adapter", backend)
    if backend == "reference":
        return fused_adapter_reference(x, wd, b_down, wu, b_up, act, residual, add_input)
    tensors, where = _distinct(wd.tensors + wu.tensors)
    spec = [int(add_input), WEIGHT_KINDS[wd.kind], WEIGHT_KINDS[wu.kind], code]
    residual_is_x = residual is x
    y = _FusedAdapterFunction.apply(x, None if residual_is_x else residual, b_down.contiguous(), b_up.contiguous(),
                                    spec, backend, residual_is_x, where, *[t.contiguous() for t in tensors])
    return y if x.dim() == 2 else y.view(x.shape)
