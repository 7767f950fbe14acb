"""Kernel-mix (docs/methods.md §9; arXiv 2205.03720): head-wise plus shared LoRA on Q, V and O.

One ``KernelMix`` module per attention layer (H query heads and H_kv key/value heads of width d, model width
D; H_kv = H without grouped-query attention):

- Q head-wise  ΔQ_h = δ(X) A^Q_h B^Q_h + b^Q_h       A^Q (H, D, r_q), B^Q (H, r_q, d), b^Q (H, d)
- Q shared     ΔQ  += δ(X) A^Qs B^Qs                 A^Qs (D, r_qs), B^Qs (r_qs, H·d)
- V head-wise  ΔV_g = δ(K_g) A^V_g B^V_g + b^V_g     A^V (H_kv, d, r_v), B^V (H_kv, r_v, d), b^V (H_kv, d)
- V shared     ΔV  += δ(X) A^Vs B^Vs                 A^Vs (D, r_vs), B^Vs (r_vs, H_kv·d)
- O head-wise  ΔO   = Σ_h δ(o^h) A^O_h B^O_[h] + b^O   A^O (H, d, r_v), B^O (H·r_v, D), b^O (D)
- O shared     ΔO  += δ(o) A^Os B^Os                 A^Os (H·d, r_vs), B^Os (r_vs, D)

X is the Q/K/V projections' input, K_g KV head g's projected key (with its bias): the value is corrected
from its own key, so under grouped-query attention the V terms live on the H_kv key/value heads while the
Q and O terms stay per query head. o is the O projection's input (the merged heads). Head-wise terms, biases
included, are scaled by ``scale_head``, shared ones by ``scale_shared``; each part draws its own dropout
mask. A rank of 0 drops the part. Forward hooks on the existing projections add the corrections (the key
projection's output reaches the value projection's hook through the per-thread call stash);
``merged_deltas`` gives the merge (ΔW, Δb per projection) for ``kadapt.merge``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import (KadaptConfig, Method, check_bool, check_choice, check_dropout, check_int,
                                 check_positive, register)
from kadapt.methods.common import STASH, accumulation_dtype, fold_linear, kaiming_sqrt5_, tn01_, x_weight

if TYPE_CHECKING:
    from kadapt.patching.base import KernelMixSite
    from kadapt.patching.plan import Plan

KERNEL_MIX_ATTR = "kadapt_kernel_mix"


@dataclass
class KernelMixConfig(KadaptConfig):
    """Kernel-mix (docs/methods.md §9; arXiv 2205.03720): head-wise and shared LoRA on Q, V and O of every
    self-attention layer (T5: encoder self and decoder self; cross-attention with ``cross_attention=True``).

    Q: ΔQ_h = δ(X) A^Q_h B^Q_h + b^Q_h (rank ``r_q``) and ΔQ += δ(X) A^Qs B^Qs (rank ``r_qs``).
    V: ΔV_h = δ(K_h) A^V_h B^V_h + b^V_h, K_h head h's projected key (rank ``r_v``), and ΔV += δ(X) A^Vs B^Vs
    (rank ``r_vs``). O (input o = merged heads): ΔO = Σ_h δ(o^h) A^O_h B^O_[h] + b^O (rank ``r_v``) and
    ΔO += δ(o) A^Os B^Os (rank ``r_vs``), added at ``attn_out`` before the sub-layer dropout.
    Head-wise terms (biases included) are scaled by ``scale_head``, shared ones by ``scale_shared``.
    A rank of 0 disables its part. ``dropout`` p: an independent mask per part on each base input.
    ``init``: "houlsby" (every A, B, b tn01) or "lora" (A kaiming√5, B and b zero: output unchanged at
    init). Defaults: the GPT-2 NLG ``kernel-mix`` preset ranks (docs/methods.md §15). Foldable with ``kadapt.merge``.
    """

    method: ClassVar[str] = "kernel_mix"
    r_q: int = 3
    r_qs: int = 12
    r_v: int = 8
    r_vs: int = 8
    scale_head: float = 1.0
    scale_shared: float = 1.0
    dropout: float = 0.1
    init: str = "houlsby"
    cross_attention: bool = False

    def __post_init__(self) -> None:
        for name in ("r_q", "r_qs", "r_v", "r_vs"):
            check_int(name, getattr(self, name), 0)
        if not any((self.r_q, self.r_qs, self.r_v, self.r_vs)):
            raise ValueError("r_q, r_qs, r_v, r_vs are all 0: nothing would train; at least one rank must be >= 1")
        check_positive("scale_head", self.scale_head)
        check_positive("scale_shared", self.scale_shared)
        check_dropout("dropout", self.dropout)
        check_choice("init", self.init, ("houlsby", "lora"))
        check_bool("cross_attention", self.cross_attention)


class KernelMix(nn.Module):
    def __init__(self, model_dim: int, heads: int, head_dim: int, config: KernelMixConfig, factory: dict,
                 kv_heads: int | None = None):
        super().__init__()
        D, H, d = model_dim, heads, head_dim
        G = H if kv_heads is None else kv_heads
        inner, kv_inner = H * d, G * d
        self.model_dim, self.heads, self.kv_heads, self.head_dim = D, H, G, d
        self.inner, self.kv_inner = inner, kv_inner
        self.r_q, self.r_qs, self.r_v, self.r_vs = config.r_q, config.r_qs, config.r_v, config.r_vs
        self.scale_head, self.scale_shared = float(config.scale_head), float(config.scale_shared)

        # name -> (shape, fan_in of its map when it is an A factor, else None)
        specs: dict[str, tuple[tuple[int, ...], int | None]] = {}
        if self.r_q:
            specs.update(q_a=((H, D, self.r_q), D), q_b=((H, self.r_q, d), None), q_bias=((H, d), None))
        if self.r_qs:
            specs.update(qs_a=((D, self.r_qs), D), qs_b=((self.r_qs, inner), None))
        if self.r_v:
            specs.update(v_a=((G, d, self.r_v), d), v_b=((G, self.r_v, d), None), v_bias=((G, d), None),
                         o_a=((H, d, self.r_v), d), o_b=((H * self.r_v, D), None), o_bias=((D,), None))
        if self.r_vs:
            specs.update(vs_a=((D, self.r_vs), D), vs_b=((self.r_vs, kv_inner), None),
                         os_a=((inner, self.r_vs), inner), os_b=((self.r_vs, D), None))
        for name, (shape, fan_in) in specs.items():
            p = nn.Parameter(torch.empty(*shape, **factory))
            if config.init == "houlsby":
                tn01_(p)
            elif fan_in is not None:  # "lora": A kaiming√5 (fan_in = the map's input width), B and b zero
                kaiming_sqrt5_(p, fan_in)
            else:
                nn.init.zeros_(p)
            self.register_parameter(name, p)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------ forward parts

    @property
    def has_q(self) -> bool:
        return bool(self.r_q or self.r_qs)

    @property
    def has_v(self) -> bool:  # O uses the same ranks as V
        return bool(self.r_v or self.r_vs)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], heads, self.head_dim)

    def delta_q(self, x: torch.Tensor) -> torch.Tensor:
        """ΔQ (…, H·d) from the projection input X (…, D)."""
        out = None
        if self.r_q:
            t = torch.einsum("...i,hir->...hr", self.dropout(x), self.q_a)
            head = torch.einsum("...hr,hrd->...hd", t, self.q_b) + self.q_bias
            out = self.scale_head * head.reshape(*x.shape[:-1], self.inner)
        if self.r_qs:
            shared = self.scale_shared * (self.dropout(x) @ self.qs_a @ self.qs_b)
            out = shared if out is None else out + shared
        return out

    def delta_v(self, k: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """ΔV (…, H_kv·d) from the projected key K (…, H_kv·d) and the projection input X (…, D)."""
        out = None
        if self.r_v:
            if k is None:
                raise RuntimeError("kernel-mix: the value projection ran without a preceding key projection "
                                   "(the head-wise V correction needs K)")
            t = torch.einsum("...hd,hdr->...hr", self._heads(self.dropout(k), self.kv_heads), self.v_a)
            head = torch.einsum("...hr,hre->...he", t, self.v_b) + self.v_bias
            out = self.scale_head * head.reshape(*k.shape[:-1], self.kv_inner)
        if self.r_vs:
            shared = self.scale_shared * (self.dropout(x) @ self.vs_a @ self.vs_b)
            out = shared if out is None else out + shared
        return out

    def delta_o(self, o: torch.Tensor) -> torch.Tensor:
        """ΔO (…, D) from the O projection input o (…, H·d), the merged heads."""
        out = None
        if self.r_v:
            t = torch.einsum("...hd,hdr->...hr", self._heads(self.dropout(o), self.heads), self.o_a)
            head = t.reshape(*o.shape[:-1], self.heads * self.r_v) @ self.o_b + self.o_bias
            out = self.scale_head * head
        if self.r_vs:
            shared = self.scale_shared * (self.dropout(o) @ self.os_a @ self.os_b)
            out = shared if out is None else out + shared
        return out

    # ------------------------------------------------------------------------------------------ merge

    @torch.no_grad()
    def merged_deltas(self, w_k: torch.Tensor, b_k: torch.Tensor | None,
                      dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
        """The merge in ``dtype``: {"q"|"v"|"o": (ΔW (in, out), Δb (out,) or None)} for the parts present.
        ``w_k`` (D, H_kv·d) and ``b_k`` (H_kv·d,) or None are the key projection's weight and bias in the x·W
        convention. ΔW_V[:, g] = W_K[:, g] A^V_g B^V_g (+ shared), Δb_V[g] = b_K[g] A^V_g B^V_g + b^V_g."""
        f = lambda t: t.detach().to(dtype)  # noqa: E731
        sh, ss, H, G, d = self.scale_head, self.scale_shared, self.heads, self.kv_heads, self.head_dim
        dev = w_k.device
        out: dict[str, tuple] = {}
        if self.has_q:
            dw, db = torch.zeros(self.model_dim, self.inner, device=dev, dtype=dtype), None
            if self.r_q:
                dw += sh * torch.einsum("hir,hrd->ihd", f(self.q_a), f(self.q_b)).reshape(self.model_dim, self.inner)
                db = sh * f(self.q_bias).reshape(self.inner)
            if self.r_qs:
                dw += ss * (f(self.qs_a) @ f(self.qs_b))
            out["q"] = (dw, db)
        if self.has_v:
            dw, db = torch.zeros(self.model_dim, self.kv_inner, device=dev, dtype=dtype), None
            if self.r_v:
                ab = torch.einsum("hdr,hre->hde", f(self.v_a), f(self.v_b))  # A^V_g B^V_g, (H_kv, d, d)
                wk = f(w_k).reshape(self.model_dim, G, d)
                dw += sh * torch.einsum("ihd,hde->ihe", wk, ab).reshape(self.model_dim, self.kv_inner)
                db = f(self.v_bias)
                if b_k is not None:
                    db = db + torch.einsum("hd,hde->he", f(b_k).reshape(G, d), ab)
                db = sh * db.reshape(self.kv_inner)
            if self.r_vs:
                dw += ss * (f(self.vs_a) @ f(self.vs_b))
            out["v"] = (dw, db)
            dw, db = torch.zeros(self.inner, self.model_dim, device=dev, dtype=dtype), None
            if self.r_v:
                dw += sh * (torch.block_diag(*f(self.o_a).unbind(0)) @ f(self.o_b))
                db = sh * f(self.o_bias)
            if self.r_vs:
                dw += ss * (f(self.os_a) @ f(self.os_b))
            out["o"] = (dw, db)
        return out

    def extra_repr(self) -> str:
        kv = f", H_kv={self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"D={self.model_dim}, H={self.heads}{kv}, d={self.head_dim}, r_q={self.r_q}, r_qs={self.r_qs}, "
                f"r_v={self.r_v}, r_vs={self.r_vs}, scale_head={self.scale_head:g}, "
                f"scale_shared={self.scale_shared:g}")


# ------------------------------------------------------------------------------------------------- hooks

def _fused_hook(km: KernelMix, qs: tuple, ks: tuple, vs: tuple, module: nn.Module, args, output):
    """GPT-2 c_attn: Q and V corrected from one forward; K_h for ΔV is the K slice of the same output."""
    x = args[0]
    q, k, v = output[..., qs[0]:qs[1]], output[..., ks[0]:ks[1]], output[..., vs[0]:vs[1]]
    if km.has_q:
        q = q + km.delta_q(x).to(q.dtype)
    if km.has_v:
        v = v + km.delta_v(k, x).to(v.dtype)
    return torch.cat([q, k, v], dim=-1)


def _q_hook(km: KernelMix, module: nn.Module, args, output):
    return output + km.delta_q(args[0]).to(output.dtype)


def _k_hook(km: KernelMix, module: nn.Module, args, output):
    STASH.put(km, output)  # the value projection runs next (RoBERTa/BERT, T5, Llama) and takes it


def _v_hook(km: KernelMix, module: nn.Module, args, output):
    return output + km.delta_v(STASH.take(km), args[0]).to(output.dtype)


def _o_hook(km: KernelMix, module: nn.Module, args, output):
    return output + km.delta_o(args[0]).to(output.dtype)


def _fold(km: KernelMix, site: "KernelMixSite") -> list[nn.Module]:
    """Write the merge into the q, v and o projections of ``site``; returns the linears touched."""
    w_k, b_k = x_weight(*site.k)
    deltas = km.merged_deltas(w_k, b_k, accumulation_dtype(w_k.dtype))  # computed before any write
    touched = []
    for part, (dw, db) in deltas.items():
        linear, cols = getattr(site, part)
        fold_linear(linear, cols, dw, db)
        touched.append(linear)
    return touched


def _new_biases(km: KernelMix, site: "KernelMixSite") -> list[nn.Module]:
    """The projections whose merge carries a head-wise bias (q: b^Q; v: b^V and b_K A^V B^V; o: b^O) but that
    have no bias."""
    parts = (["q"] if km.r_q else []) + (["v", "o"] if km.r_v else [])
    linears = [getattr(site, p)[0] for p in parts]
    return [lin for lin in linears if getattr(lin, "bias", None) is None]


@register(KernelMixConfig)
class KernelMixMethod(Method):
    mergeable = True

    def plan(self, config: KernelMixConfig, plan: "Plan") -> None:
        for site in plan.backbone.kernel_mix_sites(config.cross_attention):
            km = KernelMix(plan.backbone.hidden_size, site.heads, site.head_dim, config,
                           plan.factory(site.q[0].weight), kv_heads=site.kv_heads)
            km.train(site.owner.training)  # dropout follows the host's mode
            plan.add_module(site.owner, KERNEL_MIX_ATTR, km)
            if site.fused:
                if km.has_q or km.has_v:
                    plan.forward_hook(site.q[0], functools.partial(_fused_hook, km, site.q[1], site.k[1], site.v[1]))
            else:
                if km.has_q:
                    plan.forward_hook(site.q[0], functools.partial(_q_hook, km))
                if km.r_v:
                    plan.forward_hook(site.k[0], functools.partial(_k_hook, km))
                if km.has_v:
                    plan.forward_hook(site.v[0], functools.partial(_v_hook, km))
            if km.has_v:
                plan.forward_hook(site.o[0], functools.partial(_o_hook, km))
            plan.on_merge(functools.partial(_fold, km, site), functools.partial(_new_biases, km, site))
