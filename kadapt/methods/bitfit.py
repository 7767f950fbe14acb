"""BitFit (docs/methods.md §5): train only biases. Where a family's linears or norms carry a
bias it trains; where they do not (T5, the Llama family) a zero bias is added and trains (norms without a
bias, e.g. RMSNorm, get an additive bias after their scale through a forward hook)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import KadaptConfig, Method, check_bool, register

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan


@dataclass
class BitFitConfig(KadaptConfig):
    """BitFit. GPT-2 / RoBERTa / BERT: train the existing biases. T5: add zero biases to q/k/v/o,
    wi/wo, every LayerNorm and the LM head, and train only those.

    ``compat_bitfit_skip_final_ln``: give the two final T5 LayerNorms no bias (upstream parity: 280,932
    on T5-base instead of 282,468).
    """

    method: ClassVar[str] = "bitfit"
    compat_bitfit_skip_final_ln: bool = False

    def __post_init__(self) -> None:
        check_bool("compat_bitfit_skip_final_ln", self.compat_bitfit_skip_final_ln)


def _bias_hook(module: nn.Module, args, output):
    return output + module.bias


@register(BitFitConfig)
class BitFitMethod(Method):
    def plan(self, config: BitFitConfig, plan: "Plan") -> None:
        for site in plan.backbone.bias_sites(config.compat_bitfit_skip_final_ln):
            existing = site.module._parameters.get("bias")
            if existing is not None:
                plan.train([existing])
                continue
            ref = site.module.weight
            plan.add_parameter(site.module, "bias", nn.Parameter(torch.zeros(site.size, device=ref.device,
                                                                             dtype=ref.dtype)))
            if not site.native:
                plan.forward_hook(site.module, _bias_hook)
