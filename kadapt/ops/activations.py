"""Adapter activations φ and their integer codes for the CUDA extension."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Code used by csrc/ (see the kadapt::bottleneck_adapter_fwd schema).
ACTIVATION_CODES = {"gelu_new": 0, "gelu_tanh": 0, "gelu": 1, "relu": 2, "swish": 3}


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """φ(z). gelu_new / gelu_tanh is the tanh approximation (GPT-2's gelu_new)."""
    if name in ("gelu_new", "gelu_tanh"):
        return F.gelu(z, approximate="tanh")
    if name == "gelu":
        return F.gelu(z)
    if name == "relu":
        return F.relu(z)
    if name == "swish":
        return F.silu(z)
    raise ValueError(f"activation={name!r} is not allowed; allowed values: {', '.join(ACTIVATION_CODES)}")
