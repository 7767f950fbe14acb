"""What every fused op (fused_adapter, phm, inducer_attention, fastfood) shares: the kernel-boundary op
definitions, dtype checks, autocast, backend logging.

Shape of an op (kadapt/ops/fused_adapter.py, phm.py): a public function checks its arguments, applies
autocast (``autocast_dtype`` / ``autocast_cast``), picks the backend (kadapt.backends.resolve) and runs
either the reference (plain PyTorch autograd) or ONE ``torch.autograd.Function`` whose forward calls the
op's forward custom op and whose backward calls its backward custom op. Those custom ops are the kernel
boundary: ``define`` registers them with ``torch.library.Library`` (a schema, one Python kernel for the
CPU and CUDA dispatch keys, a fake (meta) kernel for torch.compile and meta tensors) and no autograd
formula of their own. torch.compile traces the Function (Dynamo supports autograd.Function; AOTAutograd
takes its backward), the custom ops being opaque nodes of the graphs; eager mode runs the same Function.
So eager and compiled runs execute the same gradient formula and the same kernels.

Host cost (benchmarks/op_host_time.py, CPU, kernels stubbed, 8 tokens): ``torch.library.custom_op`` +
``register_autograd`` called in eager costs ~70 µs per forward and ~205 µs per forward+backward of the
fused adapter against ~10 / ~65 µs for an autograd.Function around the same kernels: an Autograd kernel
in Python, a generated autograd.Function with pytree flattening of tensor lists, a second dispatcher
trip to the backend kernel, an alias check of every output against every input, and each dispatcher
crossing converting the arguments to IValues and back. A ``Library``-defined op called from inside the
Function costs one crossing, 2.5–5 µs with these ops' arguments (lists and strings cost most). That is
still +8–19% on the fused adapter's eager call, so ``define`` returns a function that, for plain eager
tensors, calls the op's kernel function directly (see there); everything else goes through the
dispatcher.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("kadapt")

# The dtypes the fused kernels take (anything else runs the reference under "auto").
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One fragment of the ``kadapt`` namespace for the Python-defined ops (kadapt._C defines the C++ ones).
LIB = torch.library.Library("kadapt", "FRAGMENT")


def define(schema: str, impl: Callable, fake: Callable) -> Callable:
    """Define ``kadapt::<schema>`` with ``impl`` as its CPU and CUDA kernel and ``fake`` as its fake
    (meta) kernel; returns the function the op's autograd.Function calls (``.op`` is the OpOverload).

    The op has no autograd formula: it is called inside an autograd.Function (with grad mode off in
    forward and backward). Its outputs must be new tensors, aliasing no input and no other output.

    The returned function calls the op through the dispatcher (``.op``) while Dynamo traces (the op is
    then a node of the graph), under a TorchDispatchMode (FakeTensorMode, FunctionalTensorMode,
    FlopCounterMode, ...), while the profiler runs (its ranges name the op), for a tensor-subclass first
    argument, or when ``EAGER_DISPATCH`` is True; otherwise — plain eager tensors, the hot path — it calls
    ``impl`` itself: the same function the dispatcher would call, with the same arguments, minus the
    2.5–5 µs dispatcher round trip (benchmarks/op_host_time.py)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    for key in ("CPU", "CUDA"):
        LIB.impl(name, impl, key)
    torch.library.register_fake(f"kadapt::{name}", fake, lib=LIB)
    op = getattr(torch.ops.kadapt, name).default
    plain = (torch.Tensor, torch.nn.Parameter)  # no __torch_dispatch__ of their own

    def call(first, *args):
        if (EAGER_DISPATCH or torch.compiler.is_compiling() or type(first) not in plain
                or torch._C._len_torch_dispatch_stack() or torch._C._autograd._profiler_enabled()):
            return op(first, *args)
        return impl(first, *args)

    call.op, call.impl = op, impl
    return call


# True: eager calls go through the dispatcher too (what torch.compile always does); tests set it to run
# the eager suites through the registered kernels.
EAGER_DISPATCH = False


def unsupported_dtype(dtype: torch.dtype) -> str | None:
    """Why the fused kernels cannot take ``dtype``, or None."""
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not one of float32, float16, bfloat16"
    return None


def check_dtypes(x: torch.Tensor, named: list[tuple[str, torch.Tensor | None]], rule: str) -> None:
    """ValueError naming the first tensor in ``named`` whose dtype is not x's (``rule`` says which must agree)."""
    for name, t in named:
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}: {rule}")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is enabled for x's device type, else None.

    An op that gets a dtype here computes in it: ``autocast_cast`` its floating inputs (as autocast
    treats a matmul), so it returns that dtype and autograd takes the gradients back through the casts
    to the parameters in their own dtype."""
    if not torch._C._is_any_autocast_enabled():  # the common case, ~0.1 µs
        return None
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in ``dtype`` if autocast would cast it (floating, not float64), else t unchanged."""
    if t is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


def log_backend(op: str, backend: str) -> None:
    """Debug log of the backend that runs ``op`` (skipped while Dynamo traces: it cannot trace logging)."""
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s: %s backend", op, backend)


_TRITON_KERNELS = None


def triton_kernels():
    """kadapt/ops/triton/fused_adapter.py (the adapter and Kronecker kernels), imported on first use: it
    imports triton, which reads TRITON_INTERPRET then."""
    global _TRITON_KERNELS
    if _TRITON_KERNELS is None:
        from kadapt.ops.triton import fused_adapter

        _TRITON_KERNELS = fused_adapter
    return _TRITON_KERNELS


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """The (0,) tensor a backward op returns for a gradient it was told is not needed."""
    return like.new_empty((0,))
