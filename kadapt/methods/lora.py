"""Plain LoRA (docs/methods.md §9): y ← y + s·(Drop_p(x) A B + b_L), A ∈ R^{in×r},
B ∈ R^{r×out}, s = α/r.

One ``LoRA`` module per patched linear. It holds one ``LoRABranch`` per target that linear serves
(GPT-2's fused ``c_attn`` serves "q", "k" and "v", each a column slice of its output) and adds each
branch's correction to its slice of the linear's output. ``fold`` merges the branches into the
linear's weight and bias (``kadapt.merge``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import (KadaptConfig, Method, check_bool, check_choice, check_dropout, check_int,
                                 check_positive, register)
from kadapt.methods.common import accumulation_dtype, fold_linear, kaiming_sqrt5_, tn01_

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan

LORA_ATTR = "kadapt_lora"


# "ffn_in" is every linear reading the FFN input (gated FFNs: gate and up), "ffn_out" the one writing its output.
LORA_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


@dataclass
class LoRAConfig(KadaptConfig):
    """Plain LoRA (docs/methods.md §9): y ← y + s·(Drop_p(x) A B + b_L), s = alpha / r.

    ``targets``: any of ``LORA_TARGETS``. "q"/"k"/"v" are the query/key/value projections (on GPT-2
    the column slices [0:D], [D:2D], [2D:3D] of the fused ``c_attn``), "o" the attention output
    projection, "ffn_in" the FFN linear(s) reading its input (gated FFNs, as in the Llama family: gate and up)
    and "ffn_out" the one writing its output (down); on T5 every attention module (encoder self,
    decoder self and cross) is targeted. ``lora_bias`` adds b_L (zero at init, scaled by s).
    ``init``: "lora" (A kaiming√5, B = 0, output unchanged at init), "houlsby" (A, B, b_L tn01) or
    "bert" (N(0, 0.02²)). Foldable into the weights with ``kadapt.merge``.
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    lora_bias: bool = False
    init: str = "lora"

    def __post_init__(self) -> None:
        check_int("r", self.r, 1)
        check_positive("alpha", self.alpha, " (s = alpha / r)")
        check_dropout("dropout", self.dropout)
        if isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"targets={self.targets!r} must be a non-empty list of target names; allowed values: "
                             f"{', '.join(map(repr, LORA_TARGETS))}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"targets contains {t!r}; allowed values: {', '.join(map(repr, LORA_TARGETS))}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets={self.targets!r} names a target twice; allowed values: "
                             f"{', '.join(map(repr, LORA_TARGETS))}, each at most once")
        self.targets = tuple(self.targets)  # JSON round trips give a list
        check_bool("lora_bias", self.lora_bias)
        check_choice("init", self.init, ("lora", "houlsby", "bert"))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


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

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s·A B in ``dtype``, (in, stop - start)."""
        return self.scaling * (self.lora_a.detach().to(dtype) @ self.lora_b.detach().to(dtype))

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

    def fold(self, linear: nn.Module) -> None:
        """W ← W + s·A B and b ← b + s·b_L on ``linear`` (kadapt.methods.common.fold_linear: accumulated in
        the wider of fp32 and the weight's dtype; only the corrected columns are rewritten)."""
        for b in self.branches.values():
            db = b.scaling * b.lora_bias.detach() if b.lora_bias is not None else None
            fold_linear(linear, (b.start, b.stop), b.delta_weight(accumulation_dtype(linear.weight.dtype)), db)


def build_lora(in_features: int, out_features: int, weight_layout: str, slices: dict[str, tuple[int, int]],
               config: LoRAConfig, factory: dict) -> LoRA:
    """One ``LoRA`` for a linear in → out serving the targets in ``slices`` (name -> output columns)."""
    branches = {name: LoRABranch(in_features, a, b, config, factory) for name, (a, b) in slices.items()}
    return LoRA(out_features, weight_layout, branches)


def _lora_hook(lora: LoRA, module: nn.Module, args, output):
    return lora(args[0], output)


@register(LoRAConfig)
class LoRAMethod(Method):
    mergeable = True

    def plan(self, config: LoRAConfig, plan: "Plan") -> None:
        sites = plan.backbone.linear_sites(config.targets)
        for site in sites:
            lora = build_lora(site.in_features, site.out_features, site.weight_layout, site.slices, config,
                              plan.factory(site.module.weight))
            lora.train(site.module.training)  # dropout follows the host's mode
            plan.add_module(site.module, LORA_ATTR, lora)
            plan.forward_hook(site.module, functools.partial(_lora_hook, lora))
            plan.on_merge(functools.partial(_fold, lora, site.module), functools.partial(_new_bias, lora, site.module))


def _fold(lora: LoRA, linear: nn.Module) -> list[nn.Module]:
    lora.fold(linear)
    return [linear]


def _new_bias(lora: LoRA, linear: nn.Module) -> list[nn.Module]:
    biased = any(b.lora_bias is not None for b in lora.branches.values())
    return [linear] if biased and getattr(linear, "bias", None) is None else []
