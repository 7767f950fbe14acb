"""Inducer-tuning (docs/methods.md §14; arXiv 2210.14469) in one attention layer.

Parameters (H query heads of width d, model width D, m_k = key width, m_v = value width; all tn01):

  key MLP          A_k (H, d, m_k), a_k (H, m_k), B_k (H, m_k, d), b_k (H, d)       (absent when m_k = 0)
  value extension  A_v (H, d, m_v), a_v (H, m_v), B_v (H, m_v, D) or shared (m_v, D), c_v (D)
  no extension     A_v (H, d, m_v), a_v (H, m_v), B_v (H, m_v, d), b_v (H, d)

The attention call runs ``kadapt.ops.inducer_attention`` (O, LSE, w = σ(s0 − LSE); the fused kernels
where the backend allows; under grouped-query attention the query heads of a group share their key/value
head inside the op), then w̃ = Drop(w) and u = tanh(q A_v + a_v). With the value extension the term
Δ = Σ_h w̃^h u^h B^v_h + c_v is computed here and handed, through the per-thread call stash, to the forward
hook on the output projection, which adds it to attn_out (after W_O and its bias, before the sub-layer
dropout). Without it, o^h ← o^h + w̃^h (u^h B^v_h + b^v_h) before W_O. A prefix (``extension``) composes:
its keys enter the LSE.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from kadapt.methods.attention import call_base, unpack
from kadapt.methods.base import (KadaptConfig, Method, check_bool, check_choice, check_dropout, check_int,
                                 register, sub_config)
from kadapt.methods.common import STASH, tn01_
from kadapt.methods.kernel_mix import KernelMixConfig
from kadapt.methods.lora import LoRAConfig
from kadapt.methods.parallel import ParallelAdapterConfig
from kadapt.methods.prefix import PrefixTuningConfig
from kadapt.ops.inducer_attention import inducer_attention

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan


@dataclass
class InducerTuningConfig(KadaptConfig):
    """Inducer-tuning (docs/methods.md §14; arXiv 2210.14469): one query-specific inducer key per head.

    Key MLP (residual) p = q + φ(q), φ(q) = tanh(q A^k + a^k) B^k + b^k of width m_k = ``key_width``
    (0: identity key p = q); logit s0 = c⟨q, p⟩; weight w = σ(s0 − LSE) over the real keys; w̃ = Drop(w)
    with p = ``w_dropout`` (None: the backbone's attention dropout). With ``value_extension`` (default)
    Δ = Σ_h w̃^h tanh(q A^v_h + a^v_h) B^v_h + c_v (B^v_h ∈ R^{m_v×D}, m_v = ``value_width``) is added at
    ``attn_out`` after the output projection; ``head_share`` uses one B^v for all heads (forces the
    extension on). Without it, o^h ← o^h + w̃^h (tanh(q A^v_h + a^v_h) B′^v_h + b′^v_h) before W_O.
    ``gating``: O ← (1 − w) O with the undropped w. Every parameter is tn01-initialised.

    ``lora`` (a LoRAConfig, e.g. Q only) and ``parallel_adapter`` (a ParallelAdapterConfig) add those
    methods alongside, as the kernel-adapters presets do (inducer-lora, inducer-mam); ``kernel_mix`` (a
    KernelMixConfig: the inducer then sees the corrected q) and ``prefix`` (a PrefixTuningConfig: the
    prefix keys enter the inducer's LSE) compose as docs/methods.md §15 says. Self-attention everywhere; T5
    cross-attention with ``cross_attention=True``.

    ``ablation`` (docs/methods.md §14): "mh_adapter" (w ≡ 1: the model's own attention plus the value term, a
    multi-head adapter) or "value_gating" (key = q; the extension gated by the undropped w, plus per-key
    values g(k_j) = tanh(k_j A′_h + a′_h) mixed with (1 − w_i) P_ij and projected by B′_h ∈ R^{m_v×D} + b′;
    fused as one attention over the value [v | g(k)]); both need key_width=0 and value_extension=True.

    ``compat_inducer_lse_with_padding`` (docs/methods.md §16 quirk 7, for parity with the published NLU numbers,
    which pad to 512): w = σ(s0 − LSE*) with LSE* over the padded keys too, as the seed's joint softmax
    before the padding mask does; O is unchanged. Costs a second attention pass over unmasked keys.
    """

    method: ClassVar[str] = "inducer_tuning"
    key_width: int = 10
    value_width: int = 15
    value_extension: bool = True
    head_share: bool = False
    gating: bool = False
    w_dropout: float | None = None
    cross_attention: bool = False
    lora: Any = None
    parallel_adapter: Any = None
    kernel_mix: Any = None
    prefix: Any = None
    compat_inducer_lse_with_padding: bool = False
    ablation: str = "none"

    def __post_init__(self) -> None:
        check_int("key_width", self.key_width, 0)
        check_bool("compat_inducer_lse_with_padding", self.compat_inducer_lse_with_padding)
        check_choice("ablation", self.ablation, ("none", "mh_adapter", "value_gating"))
        if self.ablation != "none":
            for name, bad in (("key_width", self.key_width != 0), ("value_extension", not self.value_extension),
                              ("gating", self.gating),
                              ("compat_inducer_lse_with_padding", self.compat_inducer_lse_with_padding)):
                if bad:
                    raise ValueError(f"ablation={self.ablation!r} needs key_width=0, value_extension=True, "
                                     f"gating=False and compat_inducer_lse_with_padding=False; got "
                                     f"{name}={getattr(self, name)!r}")
        check_int("value_width", self.value_width, 1)
        check_bool("value_extension", self.value_extension)
        check_bool("head_share", self.head_share)
        if self.head_share and not self.value_extension:
            raise ValueError("head_share=True needs value_extension=True (a shared B^v maps to the model width D); "
                             "allowed: head_share=False, or value_extension=True")
        check_bool("gating", self.gating)
        if self.w_dropout is not None:
            check_dropout("w_dropout", self.w_dropout)
        check_bool("cross_attention", self.cross_attention)
        self.lora = sub_config("lora", self.lora, LoRAConfig, optional=True)
        self.parallel_adapter = sub_config("parallel_adapter", self.parallel_adapter, ParallelAdapterConfig,
                                            optional=True)
        self.kernel_mix = sub_config("kernel_mix", self.kernel_mix, KernelMixConfig, optional=True)
        self.prefix = sub_config("prefix", self.prefix, PrefixTuningConfig, optional=True)


ABLATIONS = ("none", "mh_adapter", "value_gating")


class InducerAttention(nn.Module):
    def __init__(self, model_dim: int, heads: int, head_dim: int, key_width: int, value_width: int,
                 value_extension: bool, head_share: bool, gating: bool, w_dropout: float | None, factory: dict,
                 lse_with_padding: bool = False, ablation: str = "none"):
        super().__init__()
        self.lse_with_padding = lse_with_padding  # quirk 7: w from an LSE that includes padded keys
        self.ablation = ablation                  # docs/methods.md §14: "mh_adapter" (w ≡ 1) or "value_gating"
        D, H, d, mk, mv = model_dim, heads, head_dim, key_width, value_width
        self.model_dim, self.heads, self.head_dim = D, H, d
        self.key_width, self.value_width = mk, mv
        self.value_extension, self.head_share, self.gating = value_extension, head_share, gating
        self.w_dropout = w_dropout
        shapes: dict[str, tuple[int, ...]] = {}
        if mk:
            shapes.update(key_a=(H, d, mk), key_a_bias=(H, mk), key_b=(H, mk, d), key_b_bias=(H, d))
        shapes.update(value_a=(H, d, mv), value_a_bias=(H, mv))
        if value_extension:
            shapes.update(value_b=(mv, D) if head_share else (H, mv, D), value_b_bias=(D,))
        else:
            shapes.update(value_b=(H, mv, d), value_b_bias=(H, d))
        if ablation == "value_gating":  # per-key values g(k) = tanh(k A′ + a′), projected by B′_h, + b′
            shapes.update(gate_a=(H, d, mv), gate_a_bias=(H, mv), gate_b=(H, mv, D), gate_b_bias=(D,))
        for name, shape in shapes.items():
            p = nn.Parameter(torch.empty(*shape, **factory))
            tn01_(p)
            self.register_parameter(name, p)
        self.prefix: nn.Module | None = None      # a PrefixAttention when prefix tuning coexists (docs/methods.md §15)

    accepts_extension = True  # a key extension (prefix) runs inside: its keys enter the LSE

    @property
    def extension(self) -> nn.Module | None:
        return self.prefix

    def set_extension(self, module: nn.Module) -> None:
        self.prefix = module  # the child's name keeps saved adapters' keys (…kadapt_attention.prefix.key)

    def key_mlp(self) -> tuple:
        if not self.key_width:
            return (None, None, None, None)
        return (self.key_a, self.key_a_bias, self.key_b, self.key_b_bias)

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling, dropout, base=None, **kwargs):
        dev = query.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            # Under autocast rotary embeddings (fp32 cos/sin) leave q and k in fp32 and v in the autocast dtype:
            # the attention computes in the autocast dtype, as SDPA does there.
            dtype = torch.get_autocast_dtype(dev)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if self.prefix is not None:  # the prefix keys enter the LSE (docs/methods.md §15)
            key, value, mask, kwargs = self.prefix.extend(query, key, value, mask, kwargs)
        gate_delta = None
        if self.ablation == "mh_adapter":  # w ≡ 1: the model's own attention, plus the value term
            out, _ = call_base(base, module, query, key, value, mask, scaling, dropout, **kwargs)
            w = torch.ones(query.shape[:-1], dtype=torch.float32, device=query.device)
            return self._value_term(out.transpose(1, 2), query, w, self._w_dropout(dropout)).transpose(1, 2), None
        d = query.shape[-1]
        causal, kpm, attn_mask = unpack(mask)  # causal is end-aligned: exact with a KV cache (Tq < Tk)
        bias = kwargs.get("position_bias")
        mlp = tuple(None if t is None else t.to(query.dtype) for t in self.key_mlp())
        common = dict(scale=scaling, causal=causal, attn_mask=attn_mask, attn_bias=bias)
        if self.ablation == "value_gating":
            # [v | g(k)] as one value of width d + m (docs/methods.md §14): q and k get m zero columns, which leave
            # every logit, s0 and the LSE unchanged, so one fused pass gives O and Σ_j P_ij g(k_j).
            m = self.value_width
            g = torch.tanh(torch.einsum("bhtd,hdm->bhtm", key, self.gate_a.to(key.dtype))
                           + self.gate_a_bias.to(key.dtype)[:, None, :])
            pad = (0, m)
            o_ext, _, w = inducer_attention(nn.functional.pad(query, pad), nn.functional.pad(key, pad),
                                            torch.cat([value, g], -1), key_padding_mask=kpm,
                                            dropout_p=float(dropout), **common)
            o, mixed = o_ext[..., :d], o_ext[..., d:]
            gate = ((1 - w)[..., None].to(mixed.dtype) * mixed)  # (1 − w_i) Σ_j P_ij g(k_j), undropped w
            gate_delta = (torch.einsum("bhtm,hmD->btD", gate, self.gate_b.to(gate.dtype))
                          + self.gate_b_bias.to(gate.dtype))
            return self._value_term(o, query, w, 0.0, gate_delta).transpose(1, 2).contiguous(), None  # w undropped
        compat = self.lse_with_padding and kpm is not None
        o, _, w = inducer_attention(query, key, value, *mlp, key_padding_mask=kpm, gating=self.gating and not compat,
                                    dropout_p=float(dropout), **common)
        if compat:
            # The seed's joint softmax ran before the padding mask: w = σ(s0 − LSE*), LSE* over padded keys too
            # (exact gradients: padded keys get only the LSE* term, docs/methods.md §17 "padding parity").
            _, _, w = inducer_attention(query, key, value, *mlp, **common)
            if self.gating:
                o = (1 - w)[..., None].to(o.dtype) * o
        return self._value_term(o, query, w, self._w_dropout(dropout)).transpose(1, 2).contiguous(), None

    def _w_dropout(self, attention_dropout: float) -> float:
        """p of the dropout on w: the attention dropout in force (0 in eval), or ``w_dropout`` in training."""
        return float(attention_dropout if self.w_dropout is None else (self.w_dropout if self.training else 0.0))

    def _value_term(self, o: torch.Tensor, query: torch.Tensor, w: torch.Tensor, p_w: float,
                    gate_delta: torch.Tensor | None = None) -> torch.Tensor:
        """w̃ = Drop_{p_w}(w); u = tanh(q A_v + a_v); stash Δ (value extension; the O-projection hook takes it)
        or return o + w̃ P^v. o (B, H, Tq, d)."""
        w = nn.functional.dropout(w, p_w, training=bool(p_w > 0)).to(query.dtype)  # (B, H, Tq)
        u = torch.tanh(torch.einsum("bhtd,hdm->bhtm", query, self.value_a.to(query.dtype))
                       + self.value_a_bias.to(query.dtype)[:, None, :])
        z = w[..., None] * u  # (B, H, Tq, m_v)
        if not self.value_extension:
            pv = torch.einsum("bhtm,hme->bhte", u, self.value_b.to(u.dtype)) + self.value_b_bias.to(u.dtype)[:, None]
            return o + w[..., None] * pv
        if self.head_share:
            delta = z.sum(1) @ self.value_b.to(z.dtype)
        else:
            delta = torch.einsum("bhtm,hmD->btD", z, self.value_b.to(z.dtype))
        delta = delta + self.value_b_bias.to(z.dtype)
        if gate_delta is not None:
            delta = delta + gate_delta
        STASH.put(self, delta)
        return o

    def take_delta(self) -> torch.Tensor:
        """Δ of this thread's call in flight (once)."""
        delta = STASH.take(self)
        if delta is None:
            raise RuntimeError("inducer-tuning: the output projection ran without a preceding attention call "
                               "(the value-extension term is missing)")
        return delta

    def extra_repr(self) -> str:
        return (f"D={self.model_dim}, H={self.heads}, d={self.head_dim}, m_k={self.key_width}, "
                f"m_v={self.value_width}, value_extension={self.value_extension}, head_share={self.head_share}, "
                f"gating={self.gating}" + (f", ablation={self.ablation}" if self.ablation != "none" else ""))


def _value_hook(inducer: InducerAttention, module: nn.Module, args, output):
    return output + inducer.take_delta().to(output.dtype)


@register(InducerTuningConfig)
class InducerTuningMethod(Method):
    """The inducer in every self-attention layer (T5 cross-attention too with ``cross_attention``); the
    nested ``prefix``, ``kernel_mix``, ``lora`` and ``parallel_adapter`` are planned as their own methods."""

    def plan(self, config: InducerTuningConfig, plan: "Plan") -> None:
        backbone = plan.backbone
        if config.prefix is not None:
            plan.include(config.prefix)
        for site in backbone.attention_sites(cross_attention=config.cross_attention):
            if config.ablation == "value_gating" and site.kv_heads != site.heads:
                raise ValueError(f"ablation='value_gating' needs one key/value head per query head; the "
                                 f"{backbone.family!r} model has {site.heads} query heads over {site.kv_heads} "
                                 f"key/value heads (grouped-query attention); allowed here: ablation='none' or "
                                 f"'mh_adapter'")
            inducer = InducerAttention(backbone.hidden_size, site.heads, site.head_dim, config.key_width,
                                       config.value_width, config.value_extension, config.head_share, config.gating,
                                       config.w_dropout, plan.factory(site.o.weight),
                                       config.compat_inducer_lse_with_padding, config.ablation)
            inducer.train(site.module.training)
            plan.attend(site.module, inducer)
            if inducer.value_extension:
                plan.forward_hook(site.o, functools.partial(_value_hook, inducer))
        for sub in (config.kernel_mix, config.lora, config.parallel_adapter):
            if sub is not None:
                plan.include(sub)
