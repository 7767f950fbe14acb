"""MAM, the mix-and-match adapter (He et al.; docs/methods.md; docs/methods.md §15): prefix tuning at
self-attention plus a scaled parallel FFN adapter, each planned as its own method."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kadapt.methods.base import KadaptConfig, Method, register, sub_config
from kadapt.methods.parallel import ParallelAdapterConfig
from kadapt.methods.prefix import PrefixTuningConfig

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan


@dataclass
class MAMConfig(KadaptConfig):
    """Mix-and-match adapter (He et al.; docs/methods.md §15): prefix tuning at self-attention (``prefix``) plus
    a scaled parallel FFN adapter (``parallel_adapter``, placement "ffn")."""

    method: ClassVar[str] = "mam"
    prefix: Any = dataclasses.field(default_factory=lambda: PrefixTuningConfig())
    parallel_adapter: Any = dataclasses.field(default_factory=lambda: ParallelAdapterConfig(scale=4.0))

    def __post_init__(self) -> None:
        self.prefix = sub_config("prefix", self.prefix, PrefixTuningConfig, optional=False)
        self.parallel_adapter = sub_config("parallel_adapter", self.parallel_adapter, ParallelAdapterConfig,
                                            optional=False)
        if self.parallel_adapter.placement != "ffn":
            raise ValueError(f"parallel_adapter.placement={self.parallel_adapter.placement!r}: MAM puts the parallel "
                             f"adapter at the FFN; allowed values: 'ffn'")


@register(MAMConfig)
class MAMMethod(Method):
    def plan(self, config: MAMConfig, plan: "Plan") -> None:
        plan.include(config.prefix)
        plan.include(config.parallel_adapter)
