"""Full fine-tuning: every parameter trains (the baseline every method is compared with)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kadapt.methods.base import KadaptConfig, Method, register

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan


@dataclass
class FullFinetuneConfig(KadaptConfig):
    """Full fine-tuning: every parameter trains (the baseline)."""

    method: ClassVar[str] = "full_finetune"


@register(FullFinetuneConfig)
class FullFinetuneMethod(Method):
    def plan(self, config: FullFinetuneConfig, plan: "Plan") -> None:
        plan.train(plan.model.parameters())
