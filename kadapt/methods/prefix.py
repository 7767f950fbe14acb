"""Prefix tuning (Li & Liang; He et al.; METHODS.md §7).

One ``PrefixEncoder`` per prefix set (GPT-2 and RoBERTa: one; T5: encoder self, decoder self, cross)
computes M = tanh(E W_1 + b_1) W_2 + b_2, E ∈ R^{P×D}, W_2 ∈ R^{m_p×2N_bD}; layer ℓ's keys are columns
[2ℓD, (2ℓ+1)D) and its values [(2ℓ+1)D, (2ℓ+2)D) (column ((2ℓ + kv)·H + h)·d + e, PEFT's order), each
reshaped to (H, P, d) (the inner width H·d replaces D in W_2 where they
differ, as T5 allows). A layer computes only its own 2D columns, so the MLP costs one pass per forward
in total. ``PrefixAttention`` (one per attention layer) puts [K_P; K], [V_P; V] into the model's own
attention implementation (SDPA or eager) with the prefix columns visible to every query and zero T5
relative bias. After ``eject`` the layer holds K_P, V_P as parameters and the encoder is gone.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kadapt.methods.attention import call_base, prepend_keys
from kadapt.methods.bottleneck import kaiming_sqrt5_


class PrefixEncoder(nn.Module):
    """The reparameterisation MLP of one prefix set of ``layers`` attention layers."""

    def __init__(self, prefix_length: int, model_dim: int, inner_dim: int, hidden: int, layers: int, factory: dict):
        super().__init__()
        P, D = prefix_length, model_dim
        self.prefix_length, self.model_dim, self.inner_dim, self.layers = P, D, inner_dim, layers
        self.embedding = nn.Parameter(torch.randn(P, D, **factory))  # E ~ N(0, 1)
        self.w1 = nn.Parameter(torch.empty(D, hidden, **factory))
        self.b1 = nn.Parameter(torch.empty(hidden, **factory))
        self.w2 = nn.Parameter(torch.empty(hidden, 2 * layers * inner_dim, **factory))
        self.b2 = nn.Parameter(torch.empty(2 * layers * inner_dim, **factory))
        for w, b, fan_in in ((self.w1, self.b1, D), (self.w2, self.b2, hidden)):  # torch_default
            kaiming_sqrt5_(w, fan_in)
            kaiming_sqrt5_(b, fan_in)

    def layer_prefix(self, layer: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K_P, V_P) of ``layer``, each (H, P, d) with H·d = the attention's inner width (D except on T5
        configs with num_heads·d_kv ≠ d_model)."""
        D = self.inner_dim
        cols = slice(2 * layer * D, (2 * layer + 2) * D)
        hidden = torch.tanh(self.embedding @ self.w1 + self.b1)
        m = hidden @ self.w2[:, cols] + self.b2[cols]  # (P, 2D): keys then values
        kv = m.reshape(self.prefix_length, 2, heads, D // heads).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def extra_repr(self) -> str:
        return f"P={self.prefix_length}, D={self.model_dim}, hidden={self.w1.shape[1]}, layers={self.layers}"


class PrefixAttention(nn.Module):
    """Prefix tuning in one attention layer; the encoder (shared by the set) is held, not owned."""

    def __init__(self, encoder: PrefixEncoder, layer: int, heads: int, head_dim: int):
        super().__init__()
        self.layer, self.heads, self.head_dim = layer, heads, head_dim
        self.prefix_length = encoder.prefix_length
        object.__setattr__(self, "_encoder", encoder)  # not a child: its parameters belong to the model root
        self.key: nn.Parameter | None = None  # (H, P, d) after eject
        self.value: nn.Parameter | None = None

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is not None:
            return self.key, self.value
        return self._encoder.layer_prefix(self.layer, self.heads)

    @torch.no_grad()
    def eject(self) -> None:
        """Cache this layer's (K_P, V_P) as parameters (same dtype and device) and drop the encoder."""
        k, v = self._encoder.layer_prefix(self.layer, self.heads)
        self.key = nn.Parameter(k.detach().clone())
        self.value = nn.Parameter(v.detach().clone())
        object.__setattr__(self, "_encoder", None)

    def extend(self, query, key, value, mask, kwargs: dict):
        """(key, value, mask, kwargs) with the prefix in front: [K_P; K], [V_P; V], P always-visible columns,
        zero T5 relative bias on them."""
        B, P = query.shape[0], self.prefix_length
        kp, vp = self.prefix()
        key = torch.cat([kp.to(key.dtype).expand(B, -1, -1, -1), key], dim=2)
        value = torch.cat([vp.to(value.dtype).expand(B, -1, -1, -1), value], dim=2)
        mask = prepend_keys(mask, B, P)
        bias = kwargs.get("position_bias")
        if bias is not None:
            kwargs = {**kwargs, "position_bias": torch.cat([bias.new_zeros((*bias.shape[:-1], P)), bias], dim=-1)}
        return key, value, mask, kwargs

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling, dropout, base: Callable, **kwargs):
        key, value, mask, kwargs = self.extend(query, key, value, mask, kwargs)
        return call_base(base, module, query, key, value, mask, scaling, dropout, **kwargs)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, P={self.prefix_length}, ejected={self.key is not None}"
