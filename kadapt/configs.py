"""The method configs, one dataclass per method, and the named published presets.

Each config lives with its method in kadapt/methods/ (its module holds the config, its nn.Modules and how it
attaches); this module gathers them for ``from kadapt.configs import ...`` and holds the presets. Field
checks that need no model run in ``__post_init__``; checks that need the model run in ``kadapt.patch``
before anything is changed. Every error is a ``ValueError`` naming the field and the allowed values.
The math, defaults and parameter counts behind each field are in docs/methods.md.
"""
from __future__ import annotations

from typing import Any

from kadapt.methods.base import METHODS, KadaptConfig, check_choice
from kadapt.methods.bitfit import BitFitConfig
from kadapt.methods.bottleneck import (ACTIVATIONS, PLACEMENTS, AdapterConfig, BottleneckConfig, CompacterConfig,
                                       CompacterPlusPlusConfig, LowRankAdapterConfig, PfeifferConfig, PHMAdapterConfig,
                                       bottleneck_size)
from kadapt.methods.full_finetune import FullFinetuneConfig
from kadapt.methods.inducer import InducerTuningConfig
from kadapt.methods.kernel_mix import KernelMixConfig
from kadapt.methods.lora import LORA_TARGETS, LoRAConfig
from kadapt.methods.mam import MAMConfig
from kadapt.methods.parallel import ParallelAdapterConfig
from kadapt.methods.prefix import PrefixTuningConfig
from kadapt.methods.prompt import PromptTuningConfig
from kadapt.methods.said import IntrinsicSAIDConfig

__all__ = [
    "ACTIVATIONS", "LORA_TARGETS", "METHODS", "PLACEMENTS", "PRESETS", "AdapterConfig", "BitFitConfig",
    "BottleneckConfig", "CompacterConfig", "CompacterPlusPlusConfig", "FullFinetuneConfig", "InducerTuningConfig",
    "KadaptConfig", "KernelMixConfig", "LoRAConfig", "LowRankAdapterConfig", "MAMConfig", "ParallelAdapterConfig",
    "PfeifferConfig", "PHMAdapterConfig", "PrefixTuningConfig", "PromptTuningConfig", "IntrinsicSAIDConfig",
    "bottleneck_size", "preset",
]

_PRESETS: dict[str, Any] = {
    # docs/methods.md §15 / §5: the Compacter paper's T5-base configurations.
    "compacter_paper.adapter": lambda: AdapterConfig(),
    "compacter_paper.pfeiffer": lambda: PfeifferConfig(placement="attn"),
    "compacter_paper.adapterdrop": lambda: AdapterConfig(drop_first=5),
    "compacter_paper.low_rank_adapter": lambda: LowRankAdapterConfig(),
    "compacter_paper.phm_adapter": lambda: PHMAdapterConfig(),
    "compacter_paper.compacter": lambda: CompacterConfig(),
    "compacter_paper.compacter++": lambda: CompacterPlusPlusConfig(),
    "compacter_paper.bitfit": lambda: BitFitConfig(compat_bitfit_skip_final_ln=True),
    # METHODS.md §4: the GLUE configuration, d_I = 20,000 (the efficiency experiment used 1,400).
    "compacter_paper.intrinsic_said": lambda: IntrinsicSAIDConfig(intrinsic_dim=20000),
    # docs/methods.md §15: kernel-adapters GPT-2 NLG `pfeiffer-adapter` (sequential at attn_out, m = 108).
    "kernel_adapters.nlg.pfeiffer-adapter": lambda: PfeifferConfig(
        placement="attn", reduction_factor=7.11, ln_pre=True, activation="relu", init="torch_default",
        unfreeze_layer_norms=False),
    # docs/methods.md §15: kernel-adapters kernel-mix, GPT-2 NLG (kernel-mix.json) and RoBERTa NLU (intended ranks).
    "kernel_adapters.nlg.kernel-mix": lambda: KernelMixConfig(r_q=3, r_qs=12, r_v=8, r_vs=8, dropout=0.1,
                                                              init="houlsby"),
    "kernel_adapters.nlu.kernel-mix": lambda: KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=4, dropout=0.1,
                                                              init="houlsby"),
    # docs/methods.md §15: kernel-adapters inducer presets. GPT-2 NLG: LoRA-Q α = 32, p = 0.1, bias; parallel FFN
    # adapter m = 42 (rf 18.2), LN_pre, ReLU, s = 1, torch_default init.
    "kernel_adapters.nlg.inducer-no-lora": lambda: InducerTuningConfig(key_width=10, value_width=15),
    "kernel_adapters.nlg.inducer-lora": lambda: InducerTuningConfig(
        key_width=5, value_width=12, lora=LoRAConfig(r=24, alpha=32, dropout=0.1, targets=("q",), lora_bias=True)),
    "kernel_adapters.nlg.inducer-mam": lambda: InducerTuningConfig(
        key_width=3, value_width=7, lora=LoRAConfig(r=16, alpha=32, dropout=0.1, targets=("q",), lora_bias=True),
        parallel_adapter=ParallelAdapterConfig(reduction_factor=18.2, scale=1.0, ln_pre=True, activation="relu",
                                               init="torch_default")),
    # RoBERTa NLU (run_glue.sh): loralib-style LoRA-Q r = 4, α = 32, p = 0.1, no bias; parallel FFN m = 12, s = 2.
    "kernel_adapters.nlu.inducer-lora": lambda: InducerTuningConfig(
        key_width=2, value_width=4, lora=LoRAConfig(r=4, alpha=32, dropout=0.1, targets=("q",))),
    "kernel_adapters.nlu.inducer-no-lora": lambda: InducerTuningConfig(key_width=6, value_width=4),
    "kernel_adapters.nlu.inducer-para-ffn": lambda: InducerTuningConfig(
        key_width=2, value_width=2, lora=LoRAConfig(r=4, alpha=32, dropout=0.1, targets=("q",)),
        parallel_adapter=ParallelAdapterConfig(bottleneck_dim=12, scale=2.0, dropout=0.1)),
    # He et al. MAM on RoBERTa: prefix P = 16, m_p = 800; parallel FFN adapter m = 16, s = 2, "lora" init.
    "he2022_mam_roberta": lambda: MAMConfig(prefix=PrefixTuningConfig(prefix_length=16, hidden_size=800),
                                            parallel_adapter=ParallelAdapterConfig(bottleneck_dim=16, scale=2.0,
                                                                                   dropout=0.1)),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str) -> KadaptConfig:
    """A named published configuration, e.g. ``preset("compacter_paper.compacter")``."""
    check_choice("preset", name, PRESETS)
    return _PRESETS[name]()
