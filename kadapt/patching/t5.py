"""T5: pre-RMSNorm blocks in an encoder and a decoder stack. attn_out = self-attention ``o``;
ffn_out = the DenseReluDense output (both before the sub-layer dropout). Cross-attention gets no
bottleneck adapters (docs/methods.md §2)."""
from __future__ import annotations

from torch import nn

from kadapt.patching.base import (SUPPORTED, AttentionSite, Backbone, BiasSite, KernelMixSite, LinearSite,
                                  ParallelSite, PromptSite, Site, find_modules, linear_site)


class T5Backbone(Backbone):
    family = "t5"
    model_types = ("t5",)
    norm, norm_classes, linear_bias = "rmsnorm", ("T5LayerNorm",), False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        stacks = find_modules(model, ("T5Stack",))
        if not stacks:
            raise ValueError(f"model: found no T5Stack inside {type(model).__name__}; {SUPPORTED}")
        self.stack_modules = {("decoder" if s.is_decoder else "encoder"): s for s in stacks}
        if len(self.stack_modules) != len(stacks):
            raise ValueError(f"model: expected at most one encoder and one decoder T5Stack, found {len(stacks)}")

    @property
    def hidden_size(self) -> int:
        return next(iter(self.stack_modules.values())).config.d_model

    @property
    def ffn(self) -> str:
        """T5 v1.1 / FLAN-T5 use a gated FFN (wi_0, wi_1)."""
        return "gated" if getattr(self.model.config, "is_gated_act", False) else "plain"

    def stacks(self) -> dict[str, int]:
        return {name: len(s.block) for name, s in self.stack_modules.items()}

    def adapter_sites(self) -> list[Site]:
        sites = []
        for name, stack in self.stack_modules.items():
            for i, block in enumerate(stack.block):
                attn = block.layer[0].SelfAttention
                ffn = block.layer[-1].DenseReluDense
                sites.append(Site(name, i, "attn", attn.o, attn.o.weight))
                sites.append(Site(name, i, "ffn", ffn, ffn.wo.weight))
        return sites

    def linear_sites(self, targets: tuple[str, ...]) -> list[LinearSite]:
        # Every attention module: encoder self, decoder self and cross (docs/methods.md §2, PEFT convention).
        sites = []
        for name, stack in self.stack_modules.items():
            for i, block in enumerate(stack.block):
                for layer in block.layer:
                    attn = getattr(layer, "SelfAttention", None) or getattr(layer, "EncDecAttention", None)
                    ffn = getattr(layer, "DenseReluDense", None)
                    if attn is not None:
                        for t in ("q", "k", "v", "o"):
                            if t in targets:
                                sites.append(linear_site(name, i, getattr(attn, t), name=t))
                    if ffn is not None:
                        wis = [getattr(ffn, n) for n in ("wi", "wi_0", "wi_1") if hasattr(ffn, n)]
                        mods = [("ffn_in", w) for w in wis] + [("ffn_out", ffn.wo)]
                        sites += [linear_site(name, i, mod, name=t) for t, mod in mods if t in targets]
        return sites

    def parallel_sites(self) -> list[ParallelSite]:
        # x = LN(h) is the input of the self-attention's q / of DenseReluDense; f (o's output / the
        # DenseReluDense output) is taken before the sub-layer dropout. No cross-attention.
        sites = []
        for name, stack in self.stack_modules.items():
            for i, block in enumerate(stack.block):
                attn = block.layer[0].SelfAttention
                ffn = block.layer[-1].DenseReluDense
                sites.append(ParallelSite(name, i, "attn", attn.q, attn.o, attn.o.weight))
                sites.append(ParallelSite(name, i, "ffn", ffn, ffn, ffn.wo.weight))
        return sites

    def attention_sites(self, cross_attention: bool = False) -> list[AttentionSite]:
        # Encoder self, decoder self (+ cross with cross_attention=True), in model order; o before dropout.
        sites = []
        for name, stack in self.stack_modules.items():
            for i, block in enumerate(stack.block):
                for layer in block.layer:
                    attn, kind = getattr(layer, "SelfAttention", None), "self"
                    if attn is None and cross_attention:
                        attn, kind = getattr(layer, "EncDecAttention", None), "cross"
                    if attn is not None:
                        sites.append(AttentionSite(name, i, kind, attn, attn.o, attn.n_heads, attn.key_value_proj_dim))
        return sites

    def kernel_mix_sites(self, cross_attention: bool = False) -> list[KernelMixSite]:
        # The attention layers above; k runs before v.
        sites = []
        for s in self.attention_sites(cross_attention):
            attn, inner = s.module, s.heads * s.head_dim
            sites.append(KernelMixSite(s.stack, s.block, s.kind, attn, (attn.q, (0, inner)), (attn.k, (0, inner)),
                                       (attn.v, (0, inner)), (attn.o, (0, attn.o.out_features)), s.heads,
                                       s.head_dim))
        return sites

    def prompt_site(self) -> PromptSite:
        # The encoder's embedded input (embed_tokens' output, before its dropout) gets the prompt; the
        # decoder only sees P more encoder positions through its cross-attention mask.
        encoder = self.stack_modules.get("encoder")
        if encoder is None:
            raise ValueError(f"model: {type(self.model).__name__} has no T5 encoder stack; prompt tuning prepends "
                             f"the prompt to the encoder input")
        return PromptSite(encoder.embed_tokens, encoder, self.stack_modules.get("decoder"))

    def _body(self) -> list[nn.Module]:
        return list(self.stack_modules.values())

    def bias_sites(self, skip_final_ln: bool) -> list[BiasSite]:
        sites = []
        for stack in self.stack_modules.values():
            for m in stack.modules():
                if type(m).__name__ == "T5Attention":
                    sites += [BiasSite(lin, lin.out_features, True) for lin in (m.q, m.k, m.v, m.o)]
                elif type(m).__name__ in ("T5DenseActDense", "T5DenseGatedActDense"):
                    lins = [getattr(m, n) for n in ("wi", "wi_0", "wi_1", "wo") if hasattr(m, n)]
                    sites += [BiasSite(lin, lin.out_features, True) for lin in lins]
                elif type(m).__name__ == "T5LayerNorm":
                    if skip_final_ln and m is stack.final_layer_norm:
                        continue
                    sites.append(BiasSite(m, m.weight.shape[0], False))
        head = getattr(self.model, "lm_head", None)
        if isinstance(head, nn.Linear) and head.bias is None:
            sites.append(BiasSite(head, head.out_features, True))
        return sites
