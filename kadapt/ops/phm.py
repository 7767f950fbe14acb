"""PHM (Kronecker-sum) linear layer y = x·(Σ_i A_i ⊗ B_i) + b (METHODS.md §2, §12.3).

B_i is a dense (in/n × out/n) factor (PHM) or s_i t_i of any rank r (Compacter); A is the layer's own
rule or one shared by many layers (autograd sums its gradient over them).

``phm_weight`` materialises W in one kernel launch (custom op ``kadapt::phm_weight``);
``phm_linear`` (custom op ``kadapt::phm_linear``) builds W, runs one GEMM, and in backward forms
dW = xᵀ dy and the factor gradients of §12.3 (dx = dy Wᵀ, db = Σ_t dy_t). The reference is the
einsum formula with plain autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from kadapt import backends
from kadapt.ops.weights import WEIGHT_KINDS, AdapterWeight, as_weight, factor_grads

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> AdapterWeight:
    return as_weight(AdapterWeight.phm(rule, b) if t is None else AdapterWeight.compacter(rule, b, t), "weight")


def phm_weight_reference(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """W = Σ_i A_i ⊗ B_i with B = b (dense) or B_i = b_i t_i (b plays s when t is given)."""
    return _weight(rule, b, t).materialize()


def phm_linear_reference(x: torch.Tensor, rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ phm_weight_reference(rule, b, t)
    return y if bias is None else y + bias


def _build(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.kadapt.kron_weight(rule, b, t)
    from kadapt.ops.triton import fused_adapter as kernels

    w = _weight(rule, b, t)
    d_in, d_out = w.shape
    return kernels.kron_weight(WEIGHT_KINDS[w.kind], list(w.tensors), d_in, d_out, b.dtype)


def _fake_weight(rule, b, t):
    n = rule.shape[0]
    return b.new_empty((n * b.shape[1], n * (b.shape[2] if t is None else t.shape[2])))


@torch.library.custom_op("kadapt::phm_weight", mutates_args=())
def _phm_weight_op(rule: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _build(rule, b, t, backend)


@_phm_weight_op.register_fake
def _(rule, b, t, backend):
    return _fake_weight(rule, b, t)


def _phm_weight_setup(ctx, inputs, output):
    rule, b, t, _ = inputs
    ctx.save_for_backward(rule, b, t)


def _phm_weight_backward(ctx, d_w):
    rule, b, t = ctx.saved_tensors
    kind = "phm" if t is None else "compacter"
    grads = factor_grads(kind, (rule, b) if t is None else (rule, b, t), d_w)
    return grads[0], grads[1], grads[2] if t is not None else None, None


_phm_weight_op.register_autograd(_phm_weight_backward, setup_context=_phm_weight_setup)


@torch.library.custom_op("kadapt::phm_linear", mutates_args=())
def _phm_linear_op(x: torch.Tensor, rule: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    w = _build(rule, b, t, backend)
    return x @ w if bias is None else torch.addmm(bias, x, w)


@_phm_linear_op.register_fake
def _(x, rule, b, t, bias, backend):
    return x.new_empty((x.shape[0], _fake_weight(rule, b, t).shape[1]))


def _phm_linear_setup(ctx, inputs, output):
    x, rule, b, t, bias, backend = inputs
    ctx.save_for_backward(x, rule, b, t)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _phm_linear_backward(ctx, dy):
    x, rule, b, t = ctx.saved_tensors
    w = torch.ops.kadapt.phm_weight(rule, b, t, ctx.backend)  # recomputed: W is never saved
    kind = "phm" if t is None else "compacter"
    grads = factor_grads(kind, (rule, b) if t is None else (rule, b, t), x.t() @ dy)
    d_bias = None if ctx.bias_dtype is None else dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dy @ w.t(), grads[0], grads[1], grads[2] if t is not None else None, d_bias, None


_phm_linear_op.register_autograd(_phm_linear_backward, setup_context=_phm_linear_setup)


def _unsupported(x: torch.Tensor) -> str | None:
    """Why no fused kernel can take x (the factors' dtypes already agree: _check_dtypes)."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    return None


def _resolve(op: str, x: torch.Tensor, rule, b, t, bias) -> str:
    others = [o for o in (t, bias) if o is not None]
    if any(o.device != x.device for o in [rule, b] + others):
        raise ValueError(f"{op}: every tensor must be on x's device {x.device}")
    reason = _unsupported(x)
    return backends.resolve(op, x, cuda_unsupported=reason, triton_unsupported=reason)


def _check_dtypes(x: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    for name, v in (("b", b), ("t", t), ("bias", bias)):
        if v is not None and v.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {v.dtype} but x has {x.dtype}: x, the factors (all but the rule A) "
                             f"and the bias must share one dtype")


def phm_weight(rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """W = Σ_i A_i ⊗ B_i (in, out), B = b or B_i = b_i t_i, on the backend in force."""
    _weight(rule, b, t)
    _check_dtypes(b, b, t, None)
    backend = _resolve("phm_weight", b, rule, b, t, None)
    if backend == "reference":
        return phm_weight_reference(rule, b, t)
    return torch.ops.kadapt.phm_weight(rule.contiguous(), b.contiguous(),
                                       None if t is None else t.contiguous(), backend)


def phm_linear(x: torch.Tensor, rule: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·(Σ_i A_i ⊗ B_i) + bias for x (…, in); B = b (n, in/n, out/n) or B_i = b_i t_i with
    b (n, in/n, r) and t (n, r, out/n)."""
    w = _weight(rule, b, t)
    d_in, d_out = w.shape
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x must be (…, {d_in}) to match the PHM weight ({d_in}, {d_out}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    _check_dtypes(x, b, t, bias)
    backend = _resolve("phm_linear", x, rule, b, t, bias)
    if backend == "reference":
        return phm_linear_reference(x, rule, b, t, bias)
    shape = x.shape
    y = torch.ops.kadapt.phm_linear(
        x.reshape(-1, d_in).contiguous(), rule.contiguous(), b.contiguous(),
        None if t is None else t.contiguous(), None if bias is None else bias.contiguous(), backend)
    return y.reshape(*shape[:-1], d_out)
