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
    KadaptConfig,
    KernelMixConfig,
    LoRAConfig,
    LowRankAdapterConfig,
    ParallelAdapterConfig,
    PfeifferConfig,
    PHMAdapterConfig,
    preset,
)
from kadapt.patching import merge, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "merge", "trainable_parameters", "save_adapter", "load_adapter", "set_backend", "get_backend",
    "AdapterConfig", "PfeifferConfig", "LowRankAdapterConfig", "PHMAdapterConfig", "CompacterConfig",
    "CompacterPlusPlusConfig", "BitFitConfig", "FullFinetuneConfig", "LoRAConfig",
    "ParallelAdapterConfig", "KernelMixConfig", "KadaptConfig", "METHODS", "PRESETS",
    "preset", "__version__",
]
