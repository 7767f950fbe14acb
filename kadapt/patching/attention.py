"""kadapt's entry in transformers' AttentionInterface and AttentionMaskInterface (name ``"kadapt"``).

Methods that change attention itself (prefix, inducer) switch the patched model's attention
implementation to ``"kadapt"``; nothing of the modelling code is copied. Every attention call then lands
in ``kadapt_attention_forward``: a layer holding a method module (``METHOD_ATTR``) runs it, any other
layer runs the implementation the model had before (SDPA or eager, kept on the layer as ``BASE_ATTR``).
The mask function hands layers an O(T) ``KadaptMask`` (causal flag + key padding) when the mask is a
plain causal or bidirectional one aligned to the end of the keys (no cache, or a dynamic KV cache), and
transformers' 4-D bool mask otherwise (static caches, packed sequences). Methods that need no custom
attention never switch, so SDPA stays in place for them.
"""
from __future__ import annotations

import copy
import functools
import sys
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function, causal_mask_function,
                                        prepare_padding_mask, sdpa_mask)

from kadapt.methods.attention import KadaptMask, call_base

IMPLEMENTATION = "kadapt"
METHOD_ATTR = "kadapt_attention"        # child module of an attention layer: the method that runs there
BASE_ATTR = "_kadapt_base_attention"    # plain attribute of every attention layer: the model's own function
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


def kadapt_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                mask_function: Callable = causal_mask_function, attention_mask: torch.Tensor | None = None,
                device="cpu", **kwargs):
    """A ``KadaptMask`` where the mask is plain causal (end-aligned) or bidirectional with padding;
    otherwise transformers' 4-D bool mask (True = keep)."""
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    causal = mask_function is causal_mask_function
    offsets_known = isinstance(q_offset, int) and isinstance(kv_offset, int)
    if not plain and offsets_known and q_offset + q_length == kv_offset + kv_length \
            and _causal_over(mask_function, batch_size, q_offset, q_length, kv_offset):
        plain = causal = True  # e.g. Mistral's sliding window when it covers every key of this call
    if plain and offsets_known and (not causal or q_offset + q_length == kv_offset + kv_length):
        pad = None
        if attention_mask is not None:
            pad = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
            pad = pad.to(device=device, dtype=torch.bool)
        return KadaptMask(causal, pad)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                     use_vmap=kwargs.get("use_vmap", False), device=device)


def _causal_over(mask_function: Callable, batch_size: int, q_offset: int, q_length: int, kv_offset: int) -> bool:
    """Whether a causal-family mask function (causal with a sliding window, chunks or packed-sequence ids: each
    monotone along the keys) equals the plain causal mask on this call's range: the last query sees the first
    key, the first query sees itself, and (Tq > 1) not the key after it, in every batch row."""
    if torch.compiler.is_compiling():
        return False  # keep traced graphs free of data-dependent checks: the 4-D mask is always correct
    q_first, q_last = q_offset, q_offset + q_length - 1
    t = torch.tensor
    try:
        for b in range(batch_size):
            def f(q, k):
                return bool(mask_function(t(b), t(0), t(q), t(k)))
            if not (f(q_last, kv_offset) and f(q_first, q_first) and f(q_last, q_last)):
                return False
            if q_length > 1 and f(q_first, q_first + 1):
                return False
    except Exception:  # a mask function that needs other inputs: use the general path
        return False
    return True


def kadapt_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-interface signature: returns (output (B, Tq, H, d), weights or None)."""
    base = module.__dict__.get(BASE_ATTR)
    if base is None:
        raise RuntimeError(f"{type(module).__name__}: the 'kadapt' attention implementation is set but this "
                           f"layer was not prepared by kadapt.patch; set the model's attn_implementation back "
                           f"to 'sdpa' or 'eager'")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    method = module._modules.get(METHOD_ATTR)
    if method is None:
        return call_base(base, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return method(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, base=base, **kwargs)


AttentionInterface.register(IMPLEMENTATION, kadapt_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, kadapt_mask)


def base_function(module: nn.Module, implementation: str) -> Callable:
    """The function ``implementation`` ("sdpa" | "eager") runs for ``module`` (eager: its modelling file's)."""
    if implementation == "sdpa":
        return sdpa_attention_forward
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def model_configs(model: nn.Module) -> list:
    """Every distinct transformers config reachable from ``model`` (T5's stacks hold their own copies)."""
    seen: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def check_implementations(model: nn.Module) -> None:
    """ValueError unless every config of ``model`` uses an implementation kadapt can run underneath."""
    found = sorted({str(cfg._attn_implementation) for cfg in model_configs(model)})
    bad = [name for name in found if name not in BASE_IMPLEMENTATIONS]
    if bad:
        raise ValueError(f"model.config._attn_implementation={', '.join(map(repr, bad))}: prefix and inducer tuning "
                         f"run on top of one of {', '.join(map(repr, BASE_IMPLEMENTATIONS))}; load the model with "
                         f"attn_implementation='sdpa' or 'eager'")


def set_implementation(model: nn.Module, implementation: str) -> list[tuple[nn.Module, object]]:
    """Give ``model`` private copies of its transformers configs with ``implementation`` set, so another model
    built from the same config object is not switched too; returns the (module, original config) pairs that
    ``restore_configs`` puts back."""
    copies: dict[int, object] = {}
    rebound = []
    for m in model.modules():
        cfg = m.__dict__.get("config")
        if cfg is None or not hasattr(cfg, "_attn_implementation"):
            continue
        if id(cfg) not in copies:
            private = copy.copy(cfg)
            private._attn_implementation_internal = implementation
            copies[id(cfg)] = private
        m.__dict__["config"] = copies[id(cfg)]
        rebound.append((m, cfg))
    model.__dict__["set_attn_implementation"] = functools.partial(_refuse_switch, implementation)
    return rebound


def restore_configs(model: nn.Module, rebound: list[tuple[nn.Module, object]]) -> None:
    for m, cfg in rebound:
        m.__dict__["config"] = cfg
    model.__dict__.pop("set_attn_implementation", None)


def _refuse_switch(current: str, attn_implementation, *args, **kwargs) -> None:
    if attn_implementation != current:
        raise ValueError(f"set_attn_implementation({attn_implementation!r}): the model is patched by kadapt with a "
                         f"method that runs inside attention (attn_implementation {current!r}); switching would "
                         f"silently drop it. Call kadapt.unpatch(model) first, or load the model with the "
                         f"implementation you want (kadapt runs on top of 'sdpa' or 'eager')")
