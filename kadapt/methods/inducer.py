"""Inducer-tuning (METHODS.md §8; arXiv 2210.14469) in one attention layer.

Parameters (H heads of width d, model width D, m_k = key width, m_v = value width; all tn01):

  key MLP          A_k (H, d, m_k), a_k (H, m_k), B_k (H, m_k, d), b_k (H, d)       (absent when m_k = 0)
  value extension  A_v (H, d, m_v), a_v (H, m_v), B_v (H, m_v, D) or shared (m_v, D), c_v (D)
  no extension     A_v (H, d, m_v), a_v (H, m_v), B_v (H, m_v, d), b_v (H, d)

The attention call runs ``kadapt.ops.inducer_attention`` (O, LSE, w = σ(s0 − LSE); the fused kernels
where the backend allows), then w̃ = Drop(w) and u = tanh(q A_v + a_v). With the value extension the
term Δ = Σ_h w̃^h u^h B^v_h + c_v is computed here and stashed; the patcher's forward hook on the output
projection adds it to attn_out (after W_O and its bias, before the sub-layer dropout). Without it,
o^h ← o^h + w̃^h (u^h B^v_h + b^v_h) before W_O.
"""
from __future__ import annotations

import torch
from torch import nn

from kadapt.methods.attention import call_base, unpack
from kadapt.methods.lora import tn01_
from kadapt.ops.inducer_attention import inducer_attention


ABLATIONS = ("none", "mh_adapter", "value_gating")


class InducerAttention(nn.Module):
    def __init__(self, model_dim: int, heads: int, head_dim: int, key_width: int, value_width: int,
                 value_extension: bool, head_share: bool, gating: bool, w_dropout: float | None, factory: dict,
                 lse_with_padding: bool = False, ablation: str = "none"):
        super().__init__()
        self.lse_with_padding = lse_with_padding  # quirk 7: w from an LSE that includes padded keys
        self.ablation = ablation                  # §8.12: "mh_adapter" (w ≡ 1) or "value_gating"
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
        self._delta: torch.Tensor | None = None  # Δ of the call in flight, taken by the O-projection hook
        self._gate_delta: torch.Tensor | None = None  # value_gating's per-key term of the call in flight
        self.prefix: nn.Module | None = None      # a PrefixAttention when prefix tuning coexists (§9)

    def key_mlp(self) -> tuple:
        if not self.key_width:
            return (None, None, None, None)
        return (self.key_a, self.key_a_bias, self.key_b, self.key_b_bias)

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling, dropout, base=None, **kwargs):
        if self.prefix is not None:  # the prefix keys enter the LSE (METHODS.md §9)
            key, value, mask, kwargs = self.prefix.extend(query, key, value, mask, kwargs)
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
            # [v | g(k)] as one value of width d + m (METHODS.md §8.12): q and k get m zero columns, which leave
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
            self._gate_delta = (torch.einsum("bhtm,hmD->btD", gate, self.gate_b.to(gate.dtype))
                                + self.gate_b_bias.to(gate.dtype))
            return self._value_term(o, query, w, 0.0).transpose(1, 2).contiguous(), None  # w undropped here
        compat = self.lse_with_padding and kpm is not None
        o, _, w = inducer_attention(query, key, value, *mlp, key_padding_mask=kpm, gating=self.gating and not compat,
                                    dropout_p=float(dropout), **common)
        if compat:
            # The seed's joint softmax ran before the padding mask: w = σ(s0 − LSE*), LSE* over padded keys too
            # (exact gradients: padded keys get only the LSE* term, METHODS.md §12.1 "padding parity").
            _, _, w = inducer_attention(query, key, value, *mlp, **common)
            if self.gating:
                o = (1 - w)[..., None].to(o.dtype) * o
        return self._value_term(o, query, w, self._w_dropout(dropout)).transpose(1, 2).contiguous(), None

    def _w_dropout(self, attention_dropout: float) -> float:
        """p of the dropout on w: the attention dropout in force (0 in eval), or ``w_dropout`` in training."""
        return attention_dropout if self.w_dropout is None else (self.w_dropout if self.training else 0.0)

    def _value_term(self, o: torch.Tensor, query: torch.Tensor, w: torch.Tensor, p_w: float) -> torch.Tensor:
        """w̃ = Drop_{p_w}(w); u = tanh(q A_v + a_v); stash Δ (value extension) or return o + w̃ P^v.
        o (B, H, Tq, d)."""
        w = nn.functional.dropout(w, p_w, training=p_w > 0).to(query.dtype)  # (B, H, Tq)
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
        if self.ablation == "value_gating":
            delta = delta + self._gate_delta
            self._gate_delta = None
        self._delta = delta
        return o

    def take_delta(self) -> torch.Tensor:
        delta, self._delta = self._delta, None
        if delta is None:
            raise RuntimeError("inducer-tuning: the output projection ran without a preceding attention call "
                               "(the value-extension term is missing)")
        return delta

    def extra_repr(self) -> str:
        return (f"D={self.model_dim}, H={self.heads}, d={self.head_dim}, m_k={self.key_width}, "
                f"m_v={self.value_width}, value_extension={self.value_extension}, head_share={self.head_share}, "
                f"gating={self.gating}" + (f", ablation={self.ablation}" if self.ablation != "none" else ""))
