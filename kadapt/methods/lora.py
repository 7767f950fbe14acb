"""Plain LoRA (METHODS.md §6): y ← y + s·(Drop_p(x) A B + b_L), A ∈ R^{in×r}, B ∈ R^{r×out}, s = α/r.

One ``LoRA`` module per patched linear. It holds one ``LoRABranch`` per target that linear serves
(GPT-2's fused ``c_attn`` serves "q", "k" and "v", each a column slice of its output) and adds each
branch's correction to its slice of the linear's output. ``fold`` merges the branches into the
linear's weight and bias (``kadapt.merge``).
"""
from __future__ import annotations

import torch
from torch import nn

from kadapt.configs import LoRAConfig
from kadapt.methods.bottleneck import kaiming_sqrt5_


def tn01_(t: torch.Tensor) -> torch.Tensor:
    """`tn01`: 0.01·fmod(z, 2), z ~ N(0, 1) (fmod keeps the sign of z), so |x| < 0.02."""
    with torch.no_grad():
        return t.copy_(0.01 * torch.fmod(torch.randn(t.shape, device=t.device, dtype=t.dtype), 2.0))


class LoRABranch(nn.Module):
    """One low-rank correction for the output columns [start, stop) of a linear map in → out."""

    def __init__(self, in_features: int, start: int, stop: int, config: LoRAConfig, factory: dict):
        super().__init__()
        out = stop - start
        self.in_features, self.start, self.stop, self.scaling = in_features, start, stop, config.scaling
        self.lora_a = nn.Parameter(torch.empty(in_features, config.r, **factory))
        self.lora_b = nn.Parameter(torch.empty(config.r, out, **factory))
        self.lora_bias = nn.Parameter(torch.zeros(out, **factory)) if config.lora_bias else None
        if config.init == "lora":
            kaiming_sqrt5_(self.lora_a, in_features)
            nn.init.zeros_(self.lora_b)
        elif config.init == "houlsby":
            for p in (self.lora_a, self.lora_b, self.lora_bias):
                if p is not None:
                    tn01_(p)
        else:  # bert
            for p in (self.lora_a, self.lora_b, self.lora_bias):
                if p is not None:
                    nn.init.normal_(p, 0.0, 0.02)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·(Drop(x) A B + b_L), width stop - start."""
        d = self.dropout(x) @ self.lora_a @ self.lora_b
        if self.lora_bias is not None:
            d = d + self.lora_bias
        return self.scaling * d

    def delta_weight(self) -> torch.Tensor:
        """s·A B in fp32, (in, stop - start)."""
        return self.scaling * (self.lora_a.float() @ self.lora_b.float())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out=[{self.start}:{self.stop}], r={self.lora_a.shape[1]}, s={self.scaling:g}"


class LoRA(nn.Module):
    """The LoRA branches of one linear, keyed by target name; ``forward(x, y)`` returns y corrected."""

    def __init__(self, out_features: int, weight_layout: str, branches: dict[str, LoRABranch]):
        super().__init__()
        self.out_features, self.weight_layout = out_features, weight_layout  # "in_out" (Conv1D) | "out_in"
        self.branches = nn.ModuleDict(branches)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        branches = sorted(self.branches.values(), key=lambda b: b.start)
        if len(branches) == 1 and branches[0].start == 0 and branches[0].stop == self.out_features:
            return y + branches[0](x).to(y.dtype)
        parts, at = [], 0
        for b in branches:  # disjoint slices: rebuild y from corrected and untouched column blocks
            if b.start > at:
                parts.append(y[..., at:b.start])
            parts.append(y[..., b.start:b.stop] + b(x).to(y.dtype))
            at = b.stop
        if at < self.out_features:
            parts.append(y[..., at:])
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def fold(self, linear: nn.Module) -> None:
        """W ← W + s·A B and b ← b + s·b_L on ``linear``, accumulated in fp32. A bias-free linear
        (T5) gets a bias parameter when a branch has b_L (METHODS.md §6)."""
        weight = linear.weight
        merged = weight.detach().float()
        for b in self.branches.values():
            delta = b.delta_weight()
            if self.weight_layout == "in_out":
                merged[:, b.start:b.stop] += delta
            else:
                merged[b.start:b.stop, :] += delta.t()
        weight.copy_(merged.to(weight.dtype))
        biased = [b for b in self.branches.values() if b.lora_bias is not None]
        if not biased:
            return
        if getattr(linear, "bias", None) is None:
            linear.register_parameter("bias", nn.Parameter(
                torch.zeros(self.out_features, device=weight.device, dtype=weight.dtype),
                requires_grad=weight.requires_grad))
        bias = linear.bias.detach().float()
        for b in biased:
            bias[b.start:b.stop] += b.scaling * b.lora_bias.float()
        linear.bias.copy_(bias.to(linear.bias.dtype))


def build_lora(in_features: int, out_features: int, weight_layout: str, slices: dict[str, tuple[int, int]],
               config: LoRAConfig, factory: dict) -> LoRA:
    """One ``LoRA`` for a linear in → out serving the targets in ``slices`` (name -> output columns)."""
    branches = {name: LoRABranch(in_features, a, b, config, factory) for name, (a, b) in slices.items()}
    return LoRA(out_features, weight_layout, branches)
