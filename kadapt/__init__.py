"""kadapt: fast parameter-efficient fine-tuning of Hugging Face models.

    model = kadapt.patch(model, kadapt.CompacterConfig())
"""
from kadapt.api import load_adapter, save_adapter, trainable_parameters
from kadapt.backends import get_backend, set_backend
from kadapt.configs import (
    METHODS,
    PRESETS,
    AdapterConfig,
    BitFitConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    FullFinetuneConfig,
    InducerTuningConfig,
    KadaptConfig,
    KernelMixConfig,
    LoRAConfig,
    LowRankAdapterConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PfeifferConfig,
    PHMAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    IntrinsicSAIDConfig,
    preset,
)
from kadapt.methods.said import said_step
from kadapt.patching import eject, merge, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "merge", "eject", "trainable_parameters", "save_adapter", "load_adapter", "set_backend",
    "get_backend",
    "AdapterConfig", "PfeifferConfig", "LowRankAdapterConfig", "PHMAdapterConfig", "CompacterConfig",
    "CompacterPlusPlusConfig", "BitFitConfig", "FullFinetuneConfig", "LoRAConfig",
    "ParallelAdapterConfig", "KernelMixConfig", "PrefixTuningConfig", "InducerTuningConfig", "MAMConfig",
    "PromptTuningConfig", "IntrinsicSAIDConfig", "said_step",
    "KadaptConfig", "METHODS", "PRESETS",
    "preset", "__version__",
]
