"""Ops: each file holds the reference (the truth), the custom op and the backend dispatch."""
from kadapt.ops.fastfood import FastfoodPlan, fastfood, fastfood_plan, fastfood_reference
from kadapt.ops.fused_adapter import fused_adapter, fused_adapter_reference
from kadapt.ops.inducer_attention import (
    inducer_attention,
    inducer_attention_concat_reference,
    inducer_attention_reference,
)
from kadapt.ops.phm import phm_linear, phm_linear_reference, phm_weight, phm_weight_reference
from kadapt.ops.weights import WEIGHT_KINDS, AdapterWeight

# Earlier names of the fused adapter (same arguments).
bottleneck_adapter = fused_adapter
bottleneck_adapter_reference = fused_adapter_reference

__all__ = [
    "WEIGHT_KINDS", "AdapterWeight", "FastfoodPlan", "bottleneck_adapter", "bottleneck_adapter_reference", "fastfood",
    "fastfood_plan", "fastfood_reference", "fused_adapter",
    "fused_adapter_reference", "inducer_attention", "inducer_attention_concat_reference",
    "inducer_attention_reference", "phm_linear", "phm_linear_reference", "phm_weight", "phm_weight_reference",
]
