"""Parallel adapter (He et al.; docs/methods.md; docs/methods.md §11): f ← f + s·(φ(LN_pre(x) W_d + b_d) W_u + b_u).

x is the sub-layer input, f the sub-layer output at the addition site. Where one module reads x and writes
f (T5's DenseReluDense, the Llama MLP) one forward hook does it all; otherwise a forward pre-hook on the
module that reads x hands it, through the per-thread call stash, to the forward hook at the addition site.
Without dropout the bottleneck runs through ``kadapt.ops.fused_adapter``; with dropout (on φ(·), before
W_u) in training mode it runs the reference math in PyTorch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import (KadaptConfig, Method, check_bool, check_choice, check_dropout, check_int,
                                 check_positive, register)
from kadapt.methods.bottleneck import ACTIVATIONS, PLACEMENTS, bottleneck_size
from kadapt.methods.common import STASH, compute_input, kaiming_sqrt5_
from kadapt.ops import fused_adapter
from kadapt.ops.activations import activation

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan

PARALLEL_ATTR = "kadapt_parallel"


@dataclass
class ParallelAdapterConfig(KadaptConfig):
    """Parallel adapter (He et al.; docs/methods.md §11): f ← f + s·(φ(LN_pre(x) W_d + b_d) W_u + b_u), x the
    sub-layer input (``ffn_in``, or ``attn_in`` for placement "attn"), added at ``ffn_out`` / ``attn_out``
    (GPT-2, T5: before the sub-layer dropout; RoBERTa/BERT: after it, before the residual LayerNorm).
    Never on T5 cross-attention.

    ``reduction_factor`` (m = int(D // rf)) or ``bottleneck_dim``; ``scale`` s (``learnable_scale``: s
    is a trained scalar initialised to ``scale``); ``init`` "lora" (W_d kaiming√5, W_u = 0, biases 0:
    output unchanged at init) or "torch_default"; ``dropout`` on the bottleneck activation.
    """

    method: ClassVar[str] = "parallel_adapter"
    bottleneck_dim: int | None = None
    reduction_factor: float = 32
    scale: float = 2.0
    learnable_scale: bool = False
    ln_pre: bool = False
    activation: str = "relu"
    init: str = "lora"
    placement: str = "ffn"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.bottleneck_dim is not None:
            check_int("bottleneck_dim", self.bottleneck_dim, 1)
        check_positive("reduction_factor", self.reduction_factor, " (m = int(D // reduction_factor))")
        check_positive("scale", self.scale)
        check_bool("learnable_scale", self.learnable_scale)
        check_bool("ln_pre", self.ln_pre)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("init", self.init, ("lora", "torch_default"))
        check_choice("placement", self.placement, PLACEMENTS)
        check_dropout("dropout", self.dropout)

    def bottleneck_size(self, hidden_size: int) -> int:
        """m for a model of width D, as upstream computes it: int(D // rf)."""
        return bottleneck_size(self.bottleneck_dim, self.reduction_factor, hidden_size)


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

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·(φ(LN_pre(x) W_d + b_d) W_u + b_u)."""
        x = compute_input(x, self.w_down)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        if self.dropout is not None and self.training:
            h = self.dropout(activation(self.act, x @ self.w_down + self.b_down))
            a = h @ self.w_up + self.b_up
        else:
            a = fused_adapter(x, self.w_down, self.b_down, self.w_up, self.b_up, self.act)
        return self.scale * a

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """f + s·a(x): x the sub-layer input, f its output at the addition site."""
        return f + self.delta(x).to(f.dtype)

    def extra_repr(self) -> str:
        s = "learnable" if isinstance(self.scale, nn.Parameter) else f"{self.scale:g}"
        return f"dim={self.dim}, bottleneck={self.bottleneck}, act={self.act}, scale={s}"


def _input_hook(adapter: ParallelAdapter, module: nn.Module, args):
    STASH.put(adapter, args[0])


def _output_hook(adapter: ParallelAdapter, module: nn.Module, args, output):
    x = STASH.take(adapter)
    if x is None:
        raise RuntimeError("parallel adapter: the sub-layer input was not captured before its output "
                           "(the patched module was called out of order)")
    return adapter(x, output)


def _one_module_hook(adapter: ParallelAdapter, module: nn.Module, args, output):
    return adapter(args[0], output)


@register(ParallelAdapterConfig)
class ParallelAdapterMethod(Method):
    def plan(self, config: ParallelAdapterConfig, plan: "Plan") -> None:
        dim = plan.backbone.hidden_size
        m = config.bottleneck_size(dim)
        kinds = ("attn", "ffn") if config.placement == "both" else (config.placement,)
        for site in plan.backbone.parallel_sites():
            if site.kind not in kinds:
                continue
            adapter = ParallelAdapter(dim, m, config, plan.factory(site.ref_weight))
            adapter.train(site.target.training)
            plan.add_module(site.target, PARALLEL_ATTR, adapter)
            if site.source is site.target:
                plan.forward_hook(site.target, functools.partial(_one_module_hook, adapter))
            else:
                plan.forward_pre_hook(site.source, functools.partial(_input_hook, adapter))
                plan.forward_hook(site.target, functools.partial(_output_hook, adapter))
