"""Kernel-mix (METHODS.md §6; arXiv 2205.03720): head-wise plus shared LoRA on Q, V and O.

One ``KernelMix`` module per attention layer (H heads of width d, model width D, inner width H·d):

- Q head-wise  ΔQ_h = δ(X) A^Q_h B^Q_h + b^Q_h      A^Q (H, D, r_q), B^Q (H, r_q, d), b^Q (H, d)
- Q shared     ΔQ  += δ(X) A^Qs B^Qs                A^Qs (D, r_qs), B^Qs (r_qs, H·d)
- V head-wise  ΔV_h = δ(K_h) A^V_h B^V_h + b^V_h    A^V (H, d, r_v), B^V (H, r_v, d), b^V (H, d)
- V shared     ΔV  += δ(X) A^Vs B^Vs                A^Vs (D, r_vs), B^Vs (r_vs, H·d)
- O head-wise  ΔO   = Σ_h δ(o^h) A^O_h B^O_[h] + b^O  A^O (H, d, r_v), B^O (H·r_v, D), b^O (D)
- O shared     ΔO  += δ(o) A^Os B^Os                A^Os (H·d, r_vs), B^Os (r_vs, D)

X is the Q/K/V projections' input, K_h head h's projected key (with its bias), o the O projection's
input (the merged heads). Head-wise terms, biases included, are scaled by ``scale_head``, shared ones by
``scale_shared``; each part draws its own dropout mask. A rank of 0 drops the part. The patching layer
calls ``delta_q`` / ``delta_v`` / ``delta_o`` from forward hooks on the existing projections;
``merged_deltas`` gives the §6 merge (ΔW, Δb per projection, fp32) for ``kadapt.merge``.
"""
from __future__ import annotations

import torch
from torch import nn

from kadapt.configs import KernelMixConfig
from kadapt.methods.bottleneck import kaiming_sqrt5_
from kadapt.methods.lora import tn01_


class KernelMix(nn.Module):
    def __init__(self, model_dim: int, heads: int, head_dim: int, config: KernelMixConfig, factory: dict):
        super().__init__()
        D, H, d = model_dim, heads, head_dim
        inner = H * d
        self.model_dim, self.heads, self.head_dim, self.inner = D, H, d, inner
        self.r_q, self.r_qs, self.r_v, self.r_vs = config.r_q, config.r_qs, config.r_v, config.r_vs
        self.scale_head, self.scale_shared = float(config.scale_head), float(config.scale_shared)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, **factory))

        # name -> (parameter, fan_in of its map when it is an A factor, else None)
        specs: dict[str, tuple[tuple[int, ...], int | None]] = {}
        if self.r_q:
            specs.update(q_a=((H, D, self.r_q), D), q_b=((H, self.r_q, d), None), q_bias=((H, d), None))
        if self.r_qs:
            specs.update(qs_a=((D, self.r_qs), D), qs_b=((self.r_qs, inner), None))
        if self.r_v:
            specs.update(v_a=((H, d, self.r_v), d), v_b=((H, self.r_v, d), None), v_bias=((H, d), None),
                         o_a=((H, d, self.r_v), d), o_b=((H * self.r_v, D), None), o_bias=((D,), None))
        if self.r_vs:
            specs.update(vs_a=((D, self.r_vs), D), vs_b=((self.r_vs, inner), None),
                         os_a=((inner, self.r_vs), inner), os_b=((self.r_vs, D), None))
        for name, (shape, fan_in) in specs.items():
            p = param(*shape)
            if config.init == "houlsby":
                tn01_(p)
            elif fan_in is not None:  # "lora": A kaiming√5 (fan_in = the map's input width), B and b zero
                kaiming_sqrt5_(p, fan_in)
            else:
                nn.init.zeros_(p)
            self.register_parameter(name, p)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._key: torch.Tensor | None = None  # K stashed by the key projection's hook (RoBERTa, T5)

    # ------------------------------------------------------------------------------------ forward parts

    @property
    def has_q(self) -> bool:
        return bool(self.r_q or self.r_qs)

    @property
    def has_v(self) -> bool:  # O uses the same ranks as V
        return bool(self.r_v or self.r_vs)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.heads, self.head_dim)

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
        """ΔV (…, H·d) from the projected key K (…, H·d) and the projection input X (…, D)."""
        out = None
        if self.r_v:
            if k is None:
                raise RuntimeError("kernel-mix: the value projection ran without a preceding key projection "
                                   "(the head-wise V correction needs K)")
            t = torch.einsum("...hd,hdr->...hr", self._heads(self.dropout(k)), self.v_a)
            head = torch.einsum("...hr,hre->...he", t, self.v_b) + self.v_bias
            out = self.scale_head * head.reshape(*k.shape[:-1], self.inner)
        if self.r_vs:
            shared = self.scale_shared * (self.dropout(x) @ self.vs_a @ self.vs_b)
            out = shared if out is None else out + shared
        return out

    def delta_o(self, o: torch.Tensor) -> torch.Tensor:
        """ΔO (…, D) from the O projection input o (…, H·d), the merged heads."""
        out = None
        if self.r_v:
            t = torch.einsum("...hd,hdr->...hr", self._heads(self.dropout(o)), self.o_a)
            head = t.reshape(*o.shape[:-1], self.heads * self.r_v) @ self.o_b + self.o_bias
            out = self.scale_head * head
        if self.r_vs:
            shared = self.scale_shared * (self.dropout(o) @ self.os_a @ self.os_b)
            out = shared if out is None else out + shared
        return out

    def stash_key(self, k: torch.Tensor) -> None:
        self._key = k

    def pop_key(self) -> torch.Tensor | None:
        k, self._key = self._key, None
        return k

    # ------------------------------------------------------------------------------------------ merge

    @torch.no_grad()
    def merged_deltas(self, w_k: torch.Tensor, b_k: torch.Tensor | None) -> dict[str, tuple]:
        """The §6 merge in fp32: {"q"|"v"|"o": (ΔW (in, out) or None, Δb (out,) or None)} for the parts
        present. ``w_k`` (D, H·d) and ``b_k`` (H·d,) or None are the key projection's weight and bias in
        the x·W convention."""
        f = lambda t: t.detach().float()  # noqa: E731
        sh, ss, H, d = self.scale_head, self.scale_shared, self.heads, self.head_dim
        out: dict[str, tuple] = {}
        if self.has_q:
            dw, db = torch.zeros(self.model_dim, self.inner, device=w_k.device), None
            if self.r_q:
                dw += sh * torch.einsum("hir,hrd->ihd", f(self.q_a), f(self.q_b)).reshape(self.model_dim, self.inner)
                db = sh * f(self.q_bias).reshape(self.inner)
            if self.r_qs:
                dw += ss * (f(self.qs_a) @ f(self.qs_b))
            out["q"] = (dw, db)
        if self.has_v:
            dw, db = torch.zeros(self.model_dim, self.inner, device=w_k.device), None
            if self.r_v:
                ab = torch.einsum("hdr,hre->hde", f(self.v_a), f(self.v_b))  # A^V_h B^V_h, (H, d, d)
                wk = f(w_k).reshape(self.model_dim, H, d)
                dw += sh * torch.einsum("ihd,hde->ihe", wk, ab).reshape(self.model_dim, self.inner)
                db = f(self.v_bias)
                if b_k is not None:
                    db = db + torch.einsum("hd,hde->he", f(b_k).reshape(H, d), ab)
                db = sh * db.reshape(self.inner)
            if self.r_vs:
                dw += ss * (f(self.vs_a) @ f(self.vs_b))
            out["v"] = (dw, db)
            dw, db = torch.zeros(self.inner, self.model_dim, device=w_k.device), None
            if self.r_v:
                dw += sh * (torch.block_diag(*f(self.o_a).unbind(0)) @ f(self.o_b))
                db = sh * f(self.o_bias)
            if self.r_vs:
                dw += ss * (f(self.os_a) @ f(self.os_b))
            out["o"] = (dw, db)
        return out

    def extra_repr(self) -> str:
        return (f"D={self.model_dim}, H={self.heads}, d={self.head_dim}, r_q={self.r_q}, r_qs={self.r_qs}, "
                f"r_v={self.r_v}, r_vs={self.r_vs}, scale_head={self.scale_head:g}, "
                f"scale_shared={self.scale_shared:g}")
