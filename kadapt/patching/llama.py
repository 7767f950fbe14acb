"""The Llama family (Llama, Qwen2, Mistral): pre-RMSNorm decoder blocks, rotary positions, grouped-query
attention (``num_key_value_heads`` ≤ ``num_attention_heads``) and a gated FFN
down_proj(act(gate_proj(x)) · up_proj(x)). attn_out = self_attn.o_proj's output, ffn_out = the MLP's output,
both before the residual add (the family has no sub-layer dropout). The projections carry no bias, except
Qwen2's q/k/v; BitFit trains the biases that exist and adds zero ones elsewhere, as on T5."""
from __future__ import annotations

from torch import nn

from kadapt.patching.base import (AttentionSite, Backbone, BiasSite, KernelMixSite, LinearSite, ParallelSite,
                                  PromptSite, Site, linear_site, single_root)


class LlamaBackbone(Backbone):
    family = "llama"
    model_types = ("llama", "qwen2", "mistral")
    norm, norm_classes, linear_bias, ffn = "rmsnorm", ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"), False, "gated"
    _root_classes = ("LlamaModel", "Qwen2Model", "MistralModel")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.root = single_root(model, self._root_classes)
        cfg = self.root.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.family = cfg.model_type  # messages name the model's own family ("qwen2", "mistral")

    @property
    def hidden_size(self) -> int:
        return self.root.config.hidden_size

    def stacks(self) -> dict[str, int]:
        return {"decoder": len(self.root.layers)}

    def adapter_sites(self) -> list[Site]:
        sites = []
        for i, layer in enumerate(self.root.layers):
            o, mlp = layer.self_attn.o_proj, layer.mlp
            sites.append(Site("decoder", i, "attn", o, o.weight))
            sites.append(Site("decoder", i, "ffn", mlp, mlp.down_proj.weight))
        return sites

    def linear_sites(self, targets: tuple[str, ...]) -> list[LinearSite]:
        sites = []
        for i, layer in enumerate(self.root.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for name, mod in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                              ("ffn_in", mlp.gate_proj), ("ffn_in", mlp.up_proj), ("ffn_out", mlp.down_proj)):
                if name in targets:
                    sites.append(linear_site("decoder", i, mod, name=name))
        return sites

    def parallel_sites(self) -> list[ParallelSite]:
        # attn: x = the normed hidden state (q_proj's input; the attention module takes it as a keyword),
        # f = o_proj's output. ffn: the MLP reads x and writes f itself.
        sites = []
        for i, layer in enumerate(self.root.layers):
            attn, mlp = layer.self_attn, layer.mlp
            sites.append(ParallelSite("decoder", i, "attn", attn.q_proj, attn.o_proj, attn.o_proj.weight))
            sites.append(ParallelSite("decoder", i, "ffn", mlp, mlp, mlp.down_proj.weight))
        return sites

    def kernel_mix_sites(self, cross_attention: bool = False) -> list[KernelMixSite]:
        # k_proj runs before v_proj; the V terms live on the key/value heads.
        sites = []
        for i, layer in enumerate(self.root.layers):
            a = layer.self_attn
            d = a.head_dim
            sites.append(KernelMixSite("decoder", i, "self", a, (a.q_proj, (0, self.heads * d)),
                                       (a.k_proj, (0, self.kv_heads * d)), (a.v_proj, (0, self.kv_heads * d)),
                                       (a.o_proj, (0, a.o_proj.out_features)), self.heads, d, self.kv_heads))
        return sites

    def attention_sites(self, cross_attention: bool = False) -> list[AttentionSite]:
        return [AttentionSite("decoder", i, "self", layer.self_attn, layer.self_attn.o_proj, self.heads,
                              layer.self_attn.head_dim, self.kv_heads) for i, layer in enumerate(self.root.layers)]

    def prompt_site(self) -> PromptSite:
        # embed_tokens' output; rotary positions come from position_ids, so the prompt takes 0..P-1.
        return PromptSite(self.root.embed_tokens)

    def _body(self) -> list[nn.Module]:
        return [self.root]

    def bias_sites(self, skip_final_ln: bool) -> list[BiasSite]:
        """Every projection (its bias if it has one, else an added one), an additive bias after every RMSNorm
        (the final one unless ``skip_final_ln``) and the LM head."""
        sites = []
        for layer in self.root.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                        mlp.down_proj):
                sites.append(BiasSite(lin, lin.out_features, True))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                sites.append(BiasSite(norm, norm.weight.shape[0], False))
        if not skip_final_ln:
            sites.append(BiasSite(self.root.norm, self.root.norm.weight.shape[0], False))
        head = getattr(self.model, "lm_head", None)
        if isinstance(head, nn.Linear):
            sites.append(BiasSite(head, head.out_features, True))
        return sites
