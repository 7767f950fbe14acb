"""PHM (Kronecker-sum) linear layer y = x·(Σ_i A_i ⊗ B_i) + b (METHODS.md §2, §12.3).

B_i is a dense (in/n × out/n) factor (PHM) or s_i t_i of any rank r (Compacter); A is the layer's own
rule or one shared by many layers (autograd sums its gradient over them).

``phm_weight`` materialises W in one kernel launch; ``phm_linear`` builds W, runs one GEMM, and in
backward rebuilds W (it is never saved), forms dx = dy Wᵀ, dW = xᵀ dy, db = Σ_t dy_t and the factor
gradients of §12.3 (on the triton backend one Triton launch, else the PyTorch formulas; see
``fused_factor_grads`` in kadapt/ops/weights.py). The reference is the einsum formula with plain autograd.

One autograd path per op (kadapt/ops/_common.py): the fused backends run an autograd.Function whose
forward calls the custom op ``kadapt::phm_weight`` / ``kadapt::phm_linear`` and whose backward calls
``kadapt::phm_weight_backward`` / ``kadapt::phm_linear_backward``; eager mode and torch.compile run
the same Function.

Autocast: when autocast is enabled for the device type of x (of b for ``phm_weight``), the op casts x,
the factors (A included) and the bias to the autocast dtype, computes in it and returns it; gradients
reach the parameters in their own dtype. Outside autocast x, the factors but A and the bias must share
one dtype (ValueError naming the first that does not).
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
from kadapt.ops.weights import WEIGHT_KINDS, AdapterWeight, as_weight, fused_factor_grads

_DTYPES = FLOAT_DTYPES
_DTYPE_RULE = "x, the factors (all but the rule A) and the bias must share one dtype"


def _weight(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> AdapterWeight:
    return as_weight(AdapterWeight.phm(rule, b) if t is None else AdapterWeight.compacter(rule, b, t), "weight")


def phm_weight_reference(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """W = Σ_i A_i ⊗ B_i with B = b (dense) or B_i = b_i t_i (b plays s when t is given)."""
    return _weight(rule, b, t).materialize()


def phm_linear_reference(x: torch.Tensor, rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ phm_weight_reference(rule, b, t)
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# the kernel boundary: custom ops (no autograd of their own; the Functions below are their autograd)

def _build(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.kadapt.kron_weight(rule, b, t)
    w = _weight(rule, b, t)
    d_in, d_out = w.shape
    return triton_kernels().kron_weight(WEIGHT_KINDS[w.kind], list(w.tensors), d_in, d_out, b.dtype)


def _factor_grads(rule, b, t, d_w, backend) -> list[torch.Tensor]:
    return fused_factor_grads("phm" if t is None else "compacter", [rule, b] if t is None else [rule, b, t], d_w,
                              backend)


def _fake_weight(rule, b, t):
    n = rule.shape[0]
    return b.new_empty((n * b.shape[1], n * (b.shape[2] if t is None else t.shape[2])))


def _fake_factor_grads(rule, b, t):
    return [torch.empty_like(v) for v in (rule, b, t) if v is not None]


_phm_weight_op = define("phm_weight(Tensor rule, Tensor b, Tensor? t, str backend) -> Tensor",
                        _build, lambda rule, b, t, backend: _fake_weight(rule, b, t))

# [dA, dB] or [dA, ds, dt] from dL/dW, each in its factor's dtype.
_phm_weight_backward_op = define(
    "phm_weight_backward(Tensor rule, Tensor b, Tensor? t, Tensor d_w, str backend) -> Tensor[]",
    _factor_grads, lambda rule, b, t, d_w, backend: _fake_factor_grads(rule, b, t))


def _linear_impl(x, rule, b, t, bias, backend):
    w = _build(rule, b, t, backend)
    return x @ w if bias is None else torch.addmm(bias, x, w)


_phm_linear_op = define(
    "phm_linear(Tensor x, Tensor rule, Tensor b, Tensor? t, Tensor? bias, str backend) -> Tensor", _linear_impl,
    lambda x, rule, b, t, bias, backend: x.new_empty((x.shape[0], _fake_weight(rule, b, t).shape[1])))


def _linear_backward_impl(x, dy, rule, b, t, spec, backend):
    need_x, need_w, has_bias = spec
    w = _build(rule, b, t, backend) if need_x else None  # rebuilt: W is never saved
    out = [dy @ w.t() if need_x else placeholder(dy),
           dy.sum(0, dtype=torch.float32).to(dy.dtype) if has_bias else placeholder(dy)]
    if need_w:
        return out + _factor_grads(rule, b, t, x.t() @ dy, backend)
    return out + [placeholder(dy) for v in (rule, b, t) if v is not None]


def _linear_backward_fake(x, dy, rule, b, t, spec, backend):
    need_x, need_w, has_bias = spec
    out = [torch.empty_like(x) if need_x else placeholder(dy),
           dy.new_empty((dy.shape[1],)) if has_bias else placeholder(dy)]
    if need_w:
        return out + _fake_factor_grads(rule, b, t)
    return out + [placeholder(dy) for v in (rule, b, t) if v is not None]


# [dx, d_bias, dA, dB (or ds, dt)] for 2-D x and dy; spec = [need_x, need_w (the factors), has_bias]; a (0,)
# placeholder stands for each gradient not needed.
_phm_linear_backward_op = define(
    "phm_linear_backward(Tensor x, Tensor dy, Tensor rule, Tensor b, Tensor? t, int[] spec, str backend) "
    "-> Tensor[]", _linear_backward_impl, _linear_backward_fake)


class _PhmWeightFunction(torch.autograd.Function):
    """The autograd of phm_weight's fused backends, in eager mode and under torch.compile alike."""

    @staticmethod
    def forward(ctx, rule, b, t, backend):
        ctx.save_for_backward(rule, b, t)
        ctx.backend = backend
        return _phm_weight_op(rule, b, t, backend)

    @staticmethod
    def backward(ctx, d_w):
        rule, b, t = ctx.saved_tensors
        g = _phm_weight_backward_op(rule, b, t, d_w.contiguous(), ctx.backend)
        return g[0], g[1], None if t is None else g[2], None


class _PhmLinearFunction(torch.autograd.Function):
    """The autograd of phm_linear's fused backends, in eager mode and under torch.compile alike."""

    @staticmethod
    def forward(ctx, x, rule, b, t, bias, backend):
        ctx.save_for_backward(x, rule, b, t)
        ctx.backend, ctx.has_bias = backend, bias is not None
        return _phm_linear_op(x, rule, b, t, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        x, rule, b, t = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_w = need[1] or need[2] or need[3]
        g = _phm_linear_backward_op(x, dy.contiguous(), rule, b, t, [int(need[0]), int(need_w), int(ctx.has_bias)],
                                   ctx.backend)
        d_t = g[4] if need_w and t is not None else None
        return (g[0] if need[0] else None, g[2] if need_w else None, g[3] if need_w else None, d_t,
                g[1] if ctx.has_bias else None, None)


# ---------------------------------------------------------------------------------------------
# dispatch

def _unsupported(x: torch.Tensor) -> str | None:
    """Why no fused kernel can take x (the factors' dtypes already agree: _check_dtypes)."""
    return None if x.dtype in _DTYPES else unsupported_dtype(x.dtype)


def _resolve(op: str, x: torch.Tensor, rule, b, t, bias) -> str:
    device = x.device
    for o in (rule, b, t, bias):
        if o is not None and o.device != device:
            raise ValueError(f"{op}: every tensor must be on x's device {x.device}")
    reason = _unsupported(x)
    backend = backends.resolve(op, x, cuda_unsupported=reason, triton_unsupported=reason)
    log_backend(op, backend)
    return backend


def _check_dtypes(x: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    check_dtypes(x, [("b", b), ("t", t), ("bias", bias)], _DTYPE_RULE)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def phm_weight(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """W = Σ_i A_i ⊗ B_i (in, out), B = b or B_i = b_i t_i, on the backend in force (under autocast, in
    the autocast dtype)."""
    _weight(rule, b, t)
    dtype = autocast_dtype(b)
    if dtype is not None:
        rule, b, t = autocast_cast(rule, dtype), autocast_cast(b, dtype), autocast_cast(t, dtype)
    _check_dtypes(b, b, t, None)
    backend = _resolve("phm_weight", b, rule, b, t, None)
    if backend == "reference":
        return phm_weight_reference(rule, b, t)
    return _PhmWeightFunction.apply(rule.contiguous(), b.contiguous(), _contiguous(t), backend)


def phm_linear(x: torch.Tensor, rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·(Σ_i A_i ⊗ B_i) + bias for x (…, in); B = b (n, in/n, out/n) or B_i = b_i t_i with
    b (n, in/n, r) and t (n, r, out/n). Under autocast, computed in and returned in the autocast dtype."""
    w = _weight(rule, b, t)
    d_in, d_out = w.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x must be (…, {d_in}) to match the PHM weight ({d_in}, {d_out}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, rule, b, t, bias = (autocast_cast(v, dtype) for v in (x, rule, b, t, bias))
    _check_dtypes(x, b, t, bias)
    backend = _resolve("phm_linear", x, rule, b, t, bias)
    if backend == "reference":
        return phm_linear_reference(x, rule, b, t, bias)
    shape = x.shape
    y = _PhmLinearFunction.apply(x.reshape(-1, d_in).contiguous(), rule.contiguous(), b.contiguous(),
                                 _contiguous(t), _contiguous(bias), backend)
    return y.reshape(*shape[:-1], d_out)
