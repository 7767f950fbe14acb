"""Prefix tuning (Li & Liang; He et al.; docs/methods.md; docs/methods.md §11).

One ``PrefixEncoder`` per prefix set (GPT-2, RoBERTa and the Llama family: one; T5: encoder self, decoder
self, cross) computes M = tanh(E W_1 + b_1) W_2 + b_2, E ∈ R^{P×D}, W_2 ∈ R^{m_p×2N_b·W}, W the key/value
width H_kv·d (D without grouped-query attention); layer ℓ's keys are columns [2ℓW, (2ℓ+1)W) and its values
[(2ℓ+1)W, (2ℓ+2)W) (column ((2ℓ + kv)·H_kv + h)·d + e, PEFT's order), each reshaped to (H_kv, P, d). A layer
computes only its own 2W columns, so the MLP costs one pass per forward in total. ``PrefixAttention`` (one
per attention layer) puts [K_P; K], [V_P; V] into the model's own attention implementation (SDPA or eager)
with the prefix columns visible to every query, no rotary position and zero T5 relative bias. After
``eject`` the layer holds K_P, V_P as parameters and the encoder is gone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from kadapt.methods.attention import call_base, prepend_keys
from kadapt.methods.base import KadaptConfig, Method, check_bool, check_int, register
from kadapt.methods.common import kaiming_sqrt5_

if TYPE_CHECKING:
    from kadapt.patching.base import AttentionSite
    from kadapt.patching.plan import Plan

PREFIX_ATTR = "kadapt_prefix_"  # + prefix set name, on the model root


@dataclass
class PrefixTuningConfig(KadaptConfig):
    """Prefix tuning (Li & Liang; He et al.; docs/methods.md §11): every self-attention layer attends to
    ``prefix_length`` (P) extra keys and values in front of its own, [K_P; K] and [V_P; V].

    With ``reparameterize`` (the default) the prefixes are M = tanh(E W_1 + b_1) W_2 + b_2, E ∈ R^{P×D},
    W_1 ∈ R^{D×m_p} (m_p = ``hidden_size``), W_2 ∈ R^{m_p×2N_bD}, one MLP per prefix set; ``kadapt.eject``
    caches M and drops the MLP (2·N_b·P·D parameters remain). ``reparameterize=False`` trains K_P, V_P
    directly (initialised from a freshly drawn MLP). Prefix columns are visible to every query (no causal or
    padding mask), get no position embedding and zero T5 relative bias; nothing is stored in the KV cache.
    T5: one set each for encoder self-, decoder self- and (``cross_attention``, default on) cross-attention.
    Defaults P = 30, m_p = 512 (generic); preset ``he2022_mam_roberta`` uses P = 16, m_p = 800.
    ``compat_prefix_shift_positions`` (GPT-2 only; docs/methods.md §16 quirk 17): real-token positions start at
    P, as when the prefix is fed through ``past_key_values`` (PEFT); needed for exact PEFT export.
    """

    method: ClassVar[str] = "prefix_tuning"
    prefix_length: int = 30
    hidden_size: int = 512
    reparameterize: bool = True
    cross_attention: bool = True
    compat_prefix_shift_positions: bool = False

    def __post_init__(self) -> None:
        check_bool("compat_prefix_shift_positions", self.compat_prefix_shift_positions)
        check_int("prefix_length", self.prefix_length, 1)
        check_int("hidden_size", self.hidden_size, 1)
        check_bool("reparameterize", self.reparameterize)
        check_bool("cross_attention", self.cross_attention)


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
        """(K_P, V_P) of ``layer``, each (H_kv, P, d) with H_kv·d = the attention's key/value width (D except
        on T5 configs with num_heads·d_kv ≠ d_model, and under grouped-query attention)."""
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
        self.layer, self.heads, self.head_dim = layer, heads, head_dim  # heads: the key/value heads
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


def _shift_positions_hook(shift: int, pad: int | None, module: nn.Module, args):
    ids = args[0]
    shifted = ids + shift if pad is None else torch.where(ids != pad, ids + shift, ids)
    if not torch.compiler.is_compiling() and shifted.numel() and int(shifted.max()) >= module.num_embeddings:
        raise ValueError(f"compat_prefix_shift_positions=True: prefix_length={shift} plus the sequence needs position "
                         f"{int(shifted.max())}, but the model has {module.num_embeddings} learned positions; use "
                         f"shorter inputs or compat_prefix_shift_positions=False")
    return (shifted, *args[1:])


def _eject(encoders: list[tuple[nn.Module, str]], layers: list[PrefixAttention], config: PrefixTuningConfig,
           record) -> None:
    for layer in layers:
        layer.eject()
    for owner, name in encoders:
        record.remove_module(owner, name)
    config.reparameterize = False


@register(PrefixTuningConfig)
class PrefixTuningMethod(Method):
    ejectable = True

    def plan(self, config: PrefixTuningConfig, plan: "Plan") -> None:
        backbone = plan.backbone
        if config.compat_prefix_shift_positions:
            learned = backbone.learned_positions()
            if learned is None:
                raise ValueError(f"compat_prefix_shift_positions=True needs learned absolute positions (GPT-2, "
                                 f"RoBERTa, BERT: PEFT's past_key_values prefix shifts them); this model is "
                                 f"{backbone.family!r}")
            positions, pad = learned
            first = (pad + 1 if pad is not None else 0) + config.prefix_length
            if first >= positions.num_embeddings:
                raise ValueError(f"compat_prefix_shift_positions=True with prefix_length={config.prefix_length}: real "
                                 f"tokens would start at position {first}, past the model's {positions.num_embeddings} "
                                 f"learned positions; allowed: prefix_length < {positions.num_embeddings - first + config.prefix_length}")
            plan.forward_pre_hook(positions, functools.partial(_shift_positions_hook, config.prefix_length, pad))
        by_set: dict[str, list["AttentionSite"]] = {}
        for site in backbone.attention_sites(cross_attention=config.cross_attention):
            by_set.setdefault(site.prefix_set, []).append(site)
        layers, encoders = [], []
        for name, members in by_set.items():
            ref, width = members[0].o.weight, members[0].kv_heads * members[0].head_dim
            encoder = PrefixEncoder(config.prefix_length, backbone.hidden_size, width, config.hidden_size,
                                    len(members), plan.factory(ref))
            for index, site in enumerate(members):
                layer = PrefixAttention(encoder, index, site.kv_heads, site.head_dim)
                layers.append((site, layer))
            if config.reparameterize:
                plan.add_module(plan.model, PREFIX_ATTR + name, encoder)
                encoders.append((plan.model, PREFIX_ATTR + name))
        for site, layer in layers:
            if not config.reparameterize:  # train K_P, V_P directly, drawn from a fresh MLP
                layer.eject()
            plan.attend(site.module, layer)
        if config.reparameterize:
            plan.on_eject(functools.partial(_eject, encoders, [layer for _, layer in layers], config))
