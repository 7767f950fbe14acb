"""GPT-2: pre-LN blocks; attn_out = attn.c_proj, ffn_out = mlp.c_proj (hooks add before resid dropout)."""
from __future__ import annotations

from torch import nn

from kadapt.patching.base import (AttentionSite, Backbone, KernelMixSite, LinearSite, ParallelSite, PromptSite, Site,
                                  linear_site, single_root)


class GPT2Backbone(Backbone):
    family = "gpt2"
    model_types = ("gpt2",)
    norm, norm_classes, linear_bias, ffn = "layernorm", ("LayerNorm",), True, "plain"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.root = single_root(model, ("GPT2Model",))

    @property
    def hidden_size(self) -> int:
        return self.root.config.n_embd

    def stacks(self) -> dict[str, int]:
        return {"decoder": len(self.root.h)}

    def adapter_sites(self) -> list[Site]:
        sites = []
        for i, block in enumerate(self.root.h):
            sites.append(Site("decoder", i, "attn", block.attn.c_proj, block.attn.c_proj.weight))
            sites.append(Site("decoder", i, "ffn", block.mlp.c_proj, block.mlp.c_proj.weight))
        return sites

    def linear_sites(self, targets: tuple[str, ...]) -> list[LinearSite]:
        d = self.hidden_size
        qkv = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}  # column slices of the fused c_attn
        sites = []
        for i, block in enumerate(self.root.h):
            fused = {t: qkv[t] for t in ("q", "k", "v") if t in targets}
            if fused:
                sites.append(linear_site("decoder", i, block.attn.c_attn, fused))
            for name, mod in (("o", block.attn.c_proj), ("ffn_in", block.mlp.c_fc), ("ffn_out", block.mlp.c_proj)):
                if name in targets:
                    sites.append(linear_site("decoder", i, mod, name=name))
        return sites

    def parallel_sites(self) -> list[ParallelSite]:
        # x = ln_1(h) / ln_2(h) is the input of c_attn / c_fc; f is added before the resid dropout.
        sites = []
        for i, block in enumerate(self.root.h):
            attn, mlp = block.attn, block.mlp
            sites.append(ParallelSite("decoder", i, "attn", attn.c_attn, attn.c_proj, attn.c_proj.weight))
            sites.append(ParallelSite("decoder", i, "ffn", mlp.c_fc, mlp.c_proj, mlp.c_proj.weight))
        return sites

    def kernel_mix_sites(self, cross_attention: bool = False) -> list[KernelMixSite]:
        # Q, K, V: column slices of one forward of the fused c_attn; O: c_proj (before resid dropout).
        d = self.hidden_size
        sites = []
        for i, block in enumerate(self.root.h):
            attn = block.attn
            sites.append(KernelMixSite("decoder", i, "self", attn, (attn.c_attn, (0, d)), (attn.c_attn, (d, 2 * d)),
                                       (attn.c_attn, (2 * d, 3 * d)), (attn.c_proj, (0, d)), attn.num_heads,
                                       attn.head_dim))
        return sites

    def attention_sites(self, cross_attention: bool = False) -> list[AttentionSite]:
        return [AttentionSite("decoder", i, "self", b.attn, b.attn.c_proj, b.attn.num_heads, b.attn.head_dim)
                for i, b in enumerate(self.root.h)]

    def prompt_site(self) -> PromptSite:
        # The prompt rows replace the front of wte's output, before wpe is added.
        return PromptSite(self.root.wte)

    def _body(self) -> list[nn.Module]:
        return [self.root]

    def learned_positions(self) -> tuple[nn.Module, None]:
        return self.root.wpe, None

    def attention_unsupported(self) -> str | None:
        if getattr(self.root.config, "add_cross_attention", False):
            return "add_cross_attention=True (kadapt supports GPT-2 self-attention only); load it without cross-attention"
        return None
