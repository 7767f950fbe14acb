"""Fused bottleneck adapter y = φ(x W_d + b_d) W_u + b_u (+ x) (+ residual) (METHODS.md §12.4).

W_d and W_u are dense tensors or ``AdapterWeight``s (dense, low-rank, PHM, Compacter).

Backends (kadapt.set_backend):
- reference: the PyTorch formula below, the truth;
- triton: kadapt/ops/triton/fused_adapter.py; dense and low-rank tiles are formed in-kernel, PHM and
  Compacter weights are materialised by one launch for both projections;
- cuda: kadapt._C (csrc/fused_adapter.cu); factored weights are materialised first.
Forward: one token-parallel kernel (z = x W_d + b_d, φ, y = h W_u + b_u + x). Backward: one
token-parallel kernel (dx, g_z, h, db_d), then the weight-gradient GEMMs dW_d = xᵀ g_z and
[dW_u; db_u] = [h | 1]ᵀ dy, and the factor gradients of §12.3. Saved: x, the fp32 pre-activation z (T×m), the
factors and (eager) the materialised weights; no T×D tensor besides x.

Eager calls go through a torch.autograd.Function; under torch.compile the same kernels run as the
custom ops ``kadapt::fused_adapter`` / ``kadapt::fused_adapter_backward`` (fake implementations and
autograd registered), so ``torch.compile(fullgraph=True)`` traces a patched model whole.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from kadapt import backends
from kadapt.ops.activations import ACTIVATION_CODES, activation
from kadapt.ops.weights import WEIGHT_KINDS, AdapterWeight, as_weight, factor_grads

logger = logging.getLogger("kadapt")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest bottleneck each fused backend takes; larger ones run the reference under "auto".
TRITON_MAX_BOTTLENECK = 256
CUDA_MAX_BOTTLENECK = 256
_KIND_NAMES = {v: k for k, v in WEIGHT_KINDS.items()}
# "auto" tries Triton first: on an H100 (bf16, T=8192, D=1024, m=64) the Triton kernels ran the
# forward 2.5x and forward+backward 1.6x faster than the CUDA (WMMA) kernels (benchmarks/RESULTS.md).
AUTO_ORDER = ("triton", "cuda")


def _log_backend(msg: str, *args) -> None:
    # Dynamo cannot trace logging calls; skipping them while compiling keeps graphs whole.
    if not torch.compiler.is_compiling():
        logger.debug(msg, *args)


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
# kernels of the fused backends

def _prepare(down_kind: int, down: list[torch.Tensor], up_kind: int, up: list[torch.Tensor],
             backend: str) -> tuple[int, list[torch.Tensor], int, list[torch.Tensor]]:
    """The weights as the kernels take them. CUDA takes dense matrices; Triton forms dense and
    low-rank tiles in-kernel and gets PHM/Compacter weights materialised by one launch for both
    (forming Kronecker tiles per token tile re-gathers A n times per element: measured 6x slower)."""
    if backend == "cuda":
        return 0, [_dense_for_cuda(down_kind, down)], 0, [_dense_for_cuda(up_kind, up)]
    from kadapt.ops.triton import fused_adapter as kernels

    kron = [(k, ts) for k, ts in ((down_kind, down), (up_kind, up)) if k in (1, 2)]
    if not kron:
        return down_kind, down, up_kind, up
    built = iter(kernels.kron_weights(
        [(k, ts) + tuple(AdapterWeight(_KIND_NAMES[k], tuple(ts)).shape) for k, ts in kron], down[-1].dtype))
    if down_kind in (1, 2):
        down_kind, down = 0, [next(built)]
    if up_kind in (1, 2):
        up_kind, up = 0, [next(built)]
    return down_kind, down, up_kind, up


def _dense_for_cuda(kind: int, ts: list[torch.Tensor]) -> torch.Tensor:
    if kind == 0:
        return ts[0]
    if kind == 3:
        return ts[0] @ ts[1]
    return torch.ops.kadapt.kron_weight(ts[0], ts[1], ts[2] if kind == 2 else None)


def _forward_kernels(x, residual, add_input, down_kind, down, b_down, up_kind, up, b_up, act, backend):
    """(y, z) from prepared weights."""
    if backend == "cuda":
        return torch.ops.kadapt.fused_adapter_fwd(x, residual, add_input, down[0], b_down, up[0], b_up, act)
    from kadapt.ops.triton import fused_adapter as kernels

    return kernels.fused_adapter_fwd(x, residual, add_input, down_kind, down, b_down, up_kind, up, b_up, act)


def _backward_kernels(x, dy, z, down_kind, down, up_kind, up, add_input, act, backend, need_down, need_up):
    """(dx, dW_d, dW_u, db_up, db_down) from prepared weights: the token-parallel backward kernel,
    then the weight-gradient GEMMs dW_d = xᵀ g_z and dW_u = hᵀ dy (None when not needed); bias
    gradients in at least fp32."""
    if backend == "cuda":
        dx, g_z, h, db_up = torch.ops.kadapt.fused_adapter_bwd(dy, z, down[0], up[0], add_input, act)
        db_down = g_z.sum(0, dtype=torch.promote_types(g_z.dtype, torch.float32))
        return (dx, x.t() @ g_z if need_down else None, h.t() @ dy if need_up else None, db_up, db_down)
    from kadapt.ops.triton import fused_adapter as kernels

    m = z.shape[1]
    dx, g_z, h_aug, db_down = kernels.fused_adapter_bwd(dy, z, down_kind, down, up_kind, up, add_input, act)
    up_and_bias = h_aug.t() @ dy  # rows :m are dW_u, row m is db_u (h_aug's ones column)
    return (dx, x.t() @ g_z if need_down else None, up_and_bias[:m], up_and_bias[m], db_down)


def _factor_grads(down_kind, down, up_kind, up, d_wd, d_wu, backend):
    """Factor gradients of both projections from their dense gradients (§12.3)."""
    return (_kind_factor_grads(down_kind, down, d_wd, backend), _kind_factor_grads(up_kind, up, d_wu, backend))


def _kind_factor_grads(kind, tensors, d_w, backend):
    if d_w is None:
        return [None] * len(tensors)
    if backend == "triton" and kind in (1, 2):
        from kadapt.ops.triton import fused_adapter as kernels

        # One launch instead of ~8 small PyTorch kernels per projection (None: shape outside it).
        grads = kernels.kron_factor_grads(kind, list(tensors), d_w)
        if grads is not None:
            return grads
    return factor_grads(_KIND_NAMES[kind], tensors, d_w)


class _FusedAdapterFunction(torch.autograd.Function):
    """Eager path: a plain autograd.Function (a torch.library op costs ~0.5 ms of Python per call
    in eager mode; under torch.compile the custom ops below are used instead)."""

    @staticmethod
    def forward(ctx, x, residual, b_down, b_up, spec, *factors):
        add_input, down_kind, n_down, up_kind, act, backend = spec
        down, up = list(factors[:n_down]), list(factors[n_down:])
        pdk, pdown, puk, pup = _prepare(down_kind, down, up_kind, up, backend)
        y, z = _forward_kernels(x, residual, add_input, pdk, pdown, b_down, puk, pup, b_up, act, backend)
        ctx.save_for_backward(x, z, *factors, *pdown, *pup)
        ctx.spec, ctx.prepared = spec, (pdk, len(pdown), puk)
        ctx.has_residual, ctx.bias_dtypes = residual is not None, (b_down.dtype, b_up.dtype)
        ctx.mark_non_differentiable(z)
        return y

    @staticmethod
    def backward(ctx, dy):
        add_input, down_kind, n_down, up_kind, act, backend = ctx.spec
        pdk, n_pdown, puk = ctx.prepared
        x, z, *rest = ctx.saved_tensors
        n_factors = len(ctx.needs_input_grad) - 5
        factors, prepared = rest[:n_factors], rest[n_factors:]
        down, up = factors[:n_down], factors[n_down:]
        dy = dy.contiguous()
        need = ctx.needs_input_grad[5:]
        dx, d_wd, d_wu, db_up, db_down = _backward_kernels(
            x, dy, z, pdk, list(prepared[:n_pdown]), puk, list(prepared[n_pdown:]), add_input, act, backend,
            any(need[:n_down]), any(need[n_down:]))
        d_down, d_up = _factor_grads(down_kind, down, up_kind, up, d_wd, d_wu, backend)
        return (dx, dy if ctx.has_residual else None, db_down.to(ctx.bias_dtypes[0]), db_up.to(ctx.bias_dtypes[1]),
                None, *d_down, *d_up)


# ---------------------------------------------------------------------------------------------
# custom ops (what torch.compile traces)

@torch.library.custom_op("kadapt::fused_adapter", mutates_args=())
def _fused_adapter_op(x: torch.Tensor, residual: Optional[torch.Tensor], add_input: bool,
                      w_down: list[torch.Tensor], down_kind: int, b_down: torch.Tensor,
                      w_up: list[torch.Tensor], up_kind: int, b_up: torch.Tensor,
                      act: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) for 2-D contiguous x (T, D); z is the fp32 pre-activation (T, m)."""
    pdk, pdown, puk, pup = _prepare(down_kind, list(w_down), up_kind, list(w_up), backend)
    return _forward_kernels(x, residual, add_input, pdk, pdown, b_down, puk, pup, b_up, act, backend)


@_fused_adapter_op.register_fake
def _(x, residual, add_input, w_down, down_kind, b_down, w_up, up_kind, b_up, act, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0], b_down.shape[0]), dtype=torch.float32)


@torch.library.custom_op("kadapt::fused_adapter_backward", mutates_args=())
def _fused_adapter_backward_op(x: torch.Tensor, dy: torch.Tensor, z: torch.Tensor, w_down: list[torch.Tensor],
                               down_kind: int, w_up: list[torch.Tensor], up_kind: int, add_input: bool, act: int,
                               backend: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_d, dW_u, db_up, db_down) with dW dense (in, out) and fp32 bias gradients; factored
    weights are rebuilt (W is never saved)."""
    pdk, pdown, puk, pup = _prepare(down_kind, list(w_down), up_kind, list(w_up), backend)
    dx, d_wd, d_wu, db_up, db_down = _backward_kernels(x, dy, z, pdk, pdown, puk, pup, add_input, act, backend,
                                                       True, True)
    return dx, d_wd, d_wu.contiguous(), db_up.float().clone(), db_down.float()  # outputs may not alias


@_fused_adapter_backward_op.register_fake
def _(x, dy, z, w_down, down_kind, w_up, up_kind, add_input, act, backend):
    d, m = dy.shape[1], z.shape[1]
    return (torch.empty_like(dy), dy.new_empty((d, m)), dy.new_empty((m, d)),
            dy.new_empty((d,), dtype=torch.float32), dy.new_empty((m,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, residual, add_input, w_down, down_kind, b_down, w_up, up_kind, b_up, act, backend = inputs
    ctx.save_for_backward(x, output[1], *w_down, *w_up)
    ctx.n_down = len(w_down)
    ctx.meta = (down_kind, up_kind, add_input, residual is not None, act, backend, b_down.dtype, b_up.dtype)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dz):
    x, z, *ws = ctx.saved_tensors
    w_down, w_up = ws[:ctx.n_down], ws[ctx.n_down:]
    down_kind, up_kind, add_input, has_residual, act, backend, bd_dtype, bu_dtype = ctx.meta
    dy = dy.contiguous()
    dx, d_wd, d_wu, db_up, db_down = torch.ops.kadapt.fused_adapter_backward(
        x, dy, z, list(w_down), down_kind, list(w_up), up_kind, add_input, act, backend)
    # The PyTorch formulas: this backward is traced by AOTAutograd, a Triton launch here is not.
    d_down, d_up = _factor_grads(down_kind, w_down, up_kind, w_up, d_wd, d_wu, "traced")
    return (dx, dy if has_residual else None, None, d_down, None, db_down.to(bd_dtype), d_up, None,
            db_up.to(bu_dtype), None, None)


_fused_adapter_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# dispatch

def _unsupported(x: torch.Tensor, weights: tuple[AdapterWeight, AdapterWeight], biases: tuple,
                 residual: torch.Tensor | None) -> str | None:
    """Why no fused kernel can take these inputs, or None (dtypes already agree: _check_shapes)."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    tensors = [t for w in weights for t in w.tensors] + list(biases) + ([residual] if residual is not None else [])
    if any(t.device != x.device for t in tensors):
        return "weights and input are on different devices"
    return None


def _too_wide(m: int, max_m: int) -> str | None:
    return f"bottleneck m={m} exceeds the kernel's {max_m}" if m > max_m else None


def _check_shapes(x, wd: AdapterWeight, b_down, wu: AdapterWeight, b_up, residual) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (…, D)")
    D = x.shape[-1]
    d_in, m = wd.shape
    if d_in != D:
        raise ValueError(f"w_down must map D={D} (x.shape[-1]) to m, got an ({d_in}, {m}) weight")
    if tuple(wu.shape) != (m, D):
        raise ValueError(f"w_up must be ({m}, {D}) to map the bottleneck back, got {tuple(wu.shape)}")
    if tuple(b_down.shape) != (m,):
        raise ValueError(f"b_down must have shape ({m},), got {tuple(b_down.shape)}")
    if tuple(b_up.shape) != (D,):
        raise ValueError(f"b_up must have shape ({D},), got {tuple(b_up.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    named = [("b_down", b_down), ("b_up", b_up)] + ([("residual", residual)] if residual is not None else [])
    for field, w in (("w_down", wd), ("w_up", wu)):
        first = len(w.tensors) - len(w.factor_tensors())  # a PHM rule A may be stored in another dtype
        named += [(f"{field}.tensors[{i}]", t) for i, t in enumerate(w.factor_tensors(), start=first)]
    for name, t in named:
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}: x, the weights (all factors but a "
                             f"PHM rule A), the biases and the residual must share one dtype")


def fused_adapter(x: torch.Tensor, w_down: torch.Tensor | AdapterWeight, b_down: torch.Tensor,
                  w_up: torch.Tensor | AdapterWeight, b_up: torch.Tensor, act: str = "gelu_new",
                  residual: torch.Tensor | None = None, add_input: bool = False) -> torch.Tensor:
    """φ(x W_d + b_d) W_u + b_u (+ x if add_input) (+ residual) on the backend in force.

    x is (…, D); W_d maps D → m and W_u m → D; with ``add_input`` the kernel reads x once for both
    the projection and the residual (a sequential adapter f + a(f)).
    """
    if act not in ACTIVATION_CODES:
        raise ValueError(f"act={act!r} is not allowed; allowed values: {', '.join(ACTIVATION_CODES)}")
    wd, wu = as_weight(w_down, "w_down"), as_weight(w_up, "w_up")
    _check_shapes(x, wd, b_down, wu, b_up, residual)
    weights, biases = (wd, wu), (b_down, b_up)
    reason, m = _unsupported(x, weights, biases, residual), b_down.shape[0]
    backend = backends.resolve(
        "fused_adapter", x,
        cuda_unsupported=reason or _too_wide(m, CUDA_MAX_BOTTLENECK),
        triton_unsupported=reason or _too_wide(m, TRITON_MAX_BOTTLENECK),
        order=AUTO_ORDER)
    _log_backend("fused_adapter: %s backend", backend)
    if backend == "reference":
        return fused_adapter_reference(x, wd, b_down, wu, b_up, act, residual, add_input)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    r2 = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
    down = [t.contiguous() for t in wd.tensors]
    up = [t.contiguous() for t in wu.tensors]
    dk, uk, code = WEIGHT_KINDS[wd.kind], WEIGHT_KINDS[wu.kind], ACTIVATION_CODES[act]
    if torch.compiler.is_compiling():
        y, _ = torch.ops.kadapt.fused_adapter(x2, r2, add_input, down, dk, b_down.contiguous(), up, uk,
                                              b_up.contiguous(), code, backend)
    else:
        y = _FusedAdapterFunction.apply(x2, r2, b_down.contiguous(), b_up.contiguous(),
                                        (add_input, dk, len(down), uk, code, backend), *down, *up)
    return y.reshape(shape)
