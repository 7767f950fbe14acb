"""Parallel adapter (He et al.; METHODS.md §7): f ← f + s·(φ(LN_pre(x) W_d + b_d) W_u + b_u).

x is the sub-layer input, f the sub-layer output at the addition site. The patcher hands x to
``stash`` (a forward pre-hook on the module that reads x) and calls ``forward(f)`` from a forward hook
at the addition site. Without dropout the bottleneck runs through ``kadapt.ops.fused_adapter``; with
dropout (on φ(·), before W_u) in training mode it runs the reference math in PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from kadapt.configs import ParallelAdapterConfig
from kadapt.methods.bottleneck import kaiming_sqrt5_
from kadapt.ops import fused_adapter
from kadapt.ops.activations import activation


class ParallelAdapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, config: ParallelAdapterConfig, factory: dict):
        super().__init__()
        self.dim, self.bottleneck, self.act = dim, bottleneck, config.activation
        self.ln_pre = nn.LayerNorm(dim, **factory) if config.ln_pre else None
        self.w_down = nn.Parameter(torch.empty(dim, bottleneck, **factory))
        self.b_down = nn.Parameter(torch.zeros(bottleneck, **factory))
        self.w_up = nn.Parameter(torch.empty(bottleneck, dim, **factory))
        self.b_up = nn.Parameter(torch.zeros(dim, **factory))
        kaiming_sqrt5_(self.w_down, dim)
        if config.init == "lora":
            nn.init.zeros_(self.w_up)
        else:  # torch_default
            kaiming_sqrt5_(self.b_down, dim)
            kaiming_sqrt5_(self.w_up, bottleneck)
            kaiming_sqrt5_(self.b_up, bottleneck)
        if config.learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(config.scale), **factory))
        else:
            self.scale = float(config.scale)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._x: torch.Tensor | None = None  # the sub-layer input of the call in flight

    def stash(self, x: torch.Tensor) -> None:
        self._x = x

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·(φ(LN_pre(x) W_d + b_d) W_u + b_u)."""
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        if self.dropout is not None and self.training:
            h = self.dropout(activation(self.act, x @ self.w_down + self.b_down))
            a = h @ self.w_up + self.b_up
        else:
            a = fused_adapter(x, self.w_down, self.b_down, self.w_up, self.b_up, self.act)
        return self.scale * a

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("ParallelAdapter: the sub-layer input was not captured before its output "
                               "(the patched module was called out of order)")
        return f + self.delta(x).to(f.dtype)

    def extra_repr(self) -> str:
        s = "learnable" if isinstance(self.scale, nn.Parameter) else f"{self.scale:g}"
        return f"dim={self.dim}, bottleneck={self.bottleneck}, act={self.act}, scale={s}"
