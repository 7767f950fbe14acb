"""What attention-side methods (prefix, inducer) receive from transformers' attention interface.

``KadaptMask`` is the O(T) mask kadapt's mask function (kadapt.patching.attention) hands every
attention call: ``causal`` (query i sees keys j ≤ i + Tk − Tq, i.e. aligned to the end of the keys, which
is what a KV cache needs) and an optional (B, Tk) key-padding mask. Masks that do not fit that form
(static caches, packed sequences, custom 4-D masks) arrive as transformers' 4-D bool tensor instead.
``call_base`` runs the model's own implementation ("sdpa" or "eager") on either form.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from kadapt.ops.inducer_attention import attention_mask as _keep_mask


class KadaptMask(NamedTuple):
    """causal: end-aligned causal mask; key_padding: (B, Tk) bool, True = keep, or None."""

    causal: bool
    key_padding: torch.Tensor | None


def materialize(mask, batch: int, q_len: int, k_len: int, device) -> torch.Tensor | None:
    """A 4-D (B or 1, 1, Tq, Tk) bool keep-mask (None when nothing is masked) from either mask form."""
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    if not mask.causal and mask.key_padding is None:
        return None
    if mask.key_padding is None:  # the same for every batch row: broadcast one
        batch = 1
    return _keep_mask(batch, q_len, k_len, mask.causal and q_len > 1, mask.key_padding, device)


def _check_bool(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"attention mask: expected a bool keep-mask, got {mask.dtype}")
    return mask


def prepend_keys(mask, batch: int, n: int):
    """The mask after ``n`` always-visible keys are put in front of the real ones."""
    if isinstance(mask, torch.Tensor):
        ones = torch.ones((*mask.shape[:-1], n), dtype=torch.bool, device=mask.device)
        return torch.cat([ones, _check_bool(mask)], dim=-1)
    if mask is None:
        return None
    pad = mask.key_padding
    if pad is not None:
        pad = torch.cat([torch.ones((batch, n), dtype=torch.bool, device=pad.device), pad], dim=-1)
    # End-aligned causal masking keeps the prefix visible: j' ≤ i + (n + Tk) − Tq covers every j' < n.
    return KadaptMask(mask.causal, pad)


def call_base(base: Callable, module: torch.nn.Module, query, key, value, mask, scaling, dropout, **kwargs):
    """The model's own attention implementation ``base`` (transformers' sdpa_attention_forward or the
    modelling file's eager_attention_forward) on q, k, v and either mask form."""
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    if getattr(base, "__name__", "") == "eager_attention_forward":  # additive float masks
        keep = materialize(mask, B, Tq, Tk, query.device)
        attn_mask = None if keep is None else torch.zeros(keep.shape, dtype=query.dtype, device=query.device
                                                           ).masked_fill(~keep, torch.finfo(query.dtype).min)
        return base(module, query, key, value, attn_mask, scaling=scaling, dropout=dropout, **kwargs)
    if isinstance(mask, KadaptMask) and mask.key_padding is None and (not mask.causal or Tq in (1, Tk)):
        # SDPA's own is_causal (top-left aligned) is exact here; no T×T mask is built.
        return base(module, query, key, value, None, scaling=scaling, dropout=dropout,
                    is_causal=mask.causal and Tq > 1, **kwargs)
    keep = materialize(mask, B, Tq, Tk, query.device)
    return base(module, query, key, value, keep, scaling=scaling, dropout=dropout, is_causal=False, **kwargs)


def unpack(mask):
    """(causal, key_padding_mask (B, Tk) or None, attn_mask 4-D bool or None) for kadapt's ops."""
    if mask is None:
        return False, None, None
    if isinstance(mask, torch.Tensor):
        return False, None, _check_bool(mask)
    return bool(mask.causal), mask.key_padding, None
