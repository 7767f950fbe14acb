"""Bottleneck adapter y = residual + φ(x W_d + b_d) W_u + b_u (METHODS.md §12.4).

Backends: the reference below (pure PyTorch, the truth) and the CUDA extension's fused forward
(``kadapt::bottleneck_adapter_fwd``), whose backward recomputes from the saved pre-activation z.
Triton kernels for this op come with the fused-kernel issue; forcing "triton" here is refused.
"""
from __future__ import annotations

import logging

import torch

from kadapt import backends
from kadapt.ops.activations import ACTIVATION_CODES, activation

logger = logging.getLogger("kadapt")


def _log_backend(msg: str, *args) -> None:
    # Dynamo cannot trace logging calls; skipping them while compiling keeps graphs whole.
    if not torch.compiler.is_compiling():
        logger.debug(msg, *args)


def bottleneck_adapter_reference(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                                 w_up: torch.Tensor, b_up: torch.Tensor, act: str = "gelu_new",
                                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """The truth: residual + φ(x W_d + b_d) W_u + b_u with W_d (D, m) and W_u (m, D)."""
    a = activation(act, x @ w_down + b_down) @ w_up + b_up
    return a if residual is None else residual + a


def _fused_forward(x, residual, w_down, b_down, w_up, b_up, code):
    """The CUDA kernel: returns (y, z) with z the fp32 pre-activation (T, m)."""
    return torch.ops.kadapt.bottleneck_adapter_fwd(x, residual, w_down, b_down, w_up, b_up, code)


class _CudaBottleneckAdapter(torch.autograd.Function):
    """Fused CUDA forward; backward in PyTorch from the saved fp32 pre-activation z."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, act, residual):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
        y, z = _fused_forward(
            x2, r2, w_down.contiguous(), b_down.contiguous(), w_up.contiguous(), b_up.contiguous(),
            ACTIVATION_CODES[act])
        ctx.save_for_backward(x2, z, w_down, w_up)
        ctx.act, ctx.shape, ctx.has_residual = act, shape, residual is not None
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, z, w_down, w_up = ctx.saved_tensors
        g = grad_y.reshape(-1, ctx.shape[-1])
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            h = activation(ctx.act, zz)
        g_h = g @ w_up.t()
        (g_z,) = torch.autograd.grad(h, zz, g_h.to(h.dtype))
        g_z = g_z.to(x2.dtype)
        h = h.detach().to(x2.dtype)
        gx = g_z @ w_down.t()
        g_res = g.reshape(ctx.shape) if ctx.has_residual else None
        return (gx.reshape(ctx.shape), x2.t() @ g_z, g_z.sum(0), h.t() @ g, g.sum(0), None, g_res)


# The kernel stages 1024 x columns plus z in 48 KiB of shared memory (csrc/bottleneck_adapter.cu).
CUDA_MAX_BOTTLENECK = 48 * 1024 // 4 - 1024


def _cuda_can_run(x: torch.Tensor, w_down: torch.Tensor, ws: tuple, residual: torch.Tensor | None) -> str | None:
    """None if the CUDA kernel can take these inputs, else the reason it cannot."""
    if not x.is_cuda:
        return "inputs are not CUDA tensors"
    if not backends.cuda_extension_built():
        return "the CUDA extension kadapt._C was not built (see `python -m kadapt info`)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
    if any(w.dtype != x.dtype or w.device != x.device for w in ws):
        return "weights and input differ in dtype or device"
    if w_down.shape[1] > CUDA_MAX_BOTTLENECK:
        return f"bottleneck m={w_down.shape[1]} exceeds the kernel's {CUDA_MAX_BOTTLENECK}"
    if residual is not None and residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}"
    return None


def bottleneck_adapter(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor, act: str = "gelu_new",
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + φ(x W_d + b_d) W_u + b_u on the backend in force (kadapt.set_backend)."""
    if act not in ACTIVATION_CODES:
        raise ValueError(f"act={act!r} is not allowed; allowed values: {', '.join(ACTIVATION_CODES)}")
    backend = backends.get_backend()
    ws = (w_down, b_down, w_up, b_up) + (() if residual is None else (residual,))
    if backend == "reference":
        return bottleneck_adapter_reference(x, w_down, b_down, w_up, b_up, act, residual)
    if backend == "triton":
        raise RuntimeError("backend 'triton' is forced but bottleneck_adapter has no Triton kernel yet; "
                           "use set_backend('auto'), 'reference' or 'cuda'")
    reason = _cuda_can_run(x, w_down, ws, residual)
    if backend == "cuda" and reason is not None:
        raise RuntimeError(f"backend 'cuda' is forced but cannot run bottleneck_adapter: {reason}")
    if reason is None:
        _log_backend("bottleneck_adapter: cuda backend")
        return _CudaBottleneckAdapter.apply(x, w_down, b_down, w_up, b_up, act, residual)
    _log_backend("bottleneck_adapter: reference backend (%s)", reason)
    return bottleneck_adapter_reference(x, w_down, b_down, w_up, b_up, act, residual)
