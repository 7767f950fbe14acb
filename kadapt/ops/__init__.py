"""Fused ops. Each file holds the reference (pure PyTorch, the truth), the autograd op and the
dispatch to the Triton or CUDA implementation (see kadapt.backends)."""
from kadapt.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference

__all__ = ["bottleneck_adapter", "bottleneck_adapter_reference"]
