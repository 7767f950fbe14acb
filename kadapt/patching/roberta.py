"""RoBERTa and BERT: post-LN blocks. Bottleneck adapters act after the sub-layer dropout (Houlsby
BERT order, docs/methods.md §2), so the hook point is the dropout of SelfOutput / Output."""
from __future__ import annotations

from torch import nn

from kadapt.patching.base import (AttentionSite, Backbone, KernelMixSite, LinearSite, ParallelSite, PromptSite, Site,
                                  linear_site, single_root)


class RobertaBackbone(Backbone):
    family = "roberta"
    model_types = ("roberta", "bert")
    norm, norm_classes, linear_bias, ffn = "layernorm", ("LayerNorm",), True, "plain"
    _root_classes = ("RobertaModel", "BertModel")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.root = single_root(model, self._root_classes)
        self.family = self.root.config.model_type  # messages name the model's own family ("bert")

    @property
    def hidden_size(self) -> int:
        return self.root.config.hidden_size

    def stacks(self) -> dict[str, int]:
        return {"encoder": len(self.root.encoder.layer)}

    def adapter_sites(self) -> list[Site]:
        sites = []
        for i, layer in enumerate(self.root.encoder.layer):
            attn_out, ffn_out = layer.attention.output, layer.output
            sites.append(Site("encoder", i, "attn", attn_out.dropout, attn_out.dense.weight))
            sites.append(Site("encoder", i, "ffn", ffn_out.dropout, ffn_out.dense.weight))
        return sites

    def linear_sites(self, targets: tuple[str, ...]) -> list[LinearSite]:
        sites = []
        for i, layer in enumerate(self.root.encoder.layer):
            att = layer.attention
            for name, mod in (("q", att.self.query), ("k", att.self.key), ("v", att.self.value),
                              ("o", att.output.dense), ("ffn_in", layer.intermediate.dense),
                              ("ffn_out", layer.output.dense)):
                if name in targets:
                    sites.append(linear_site("encoder", i, mod, name=name))
        return sites

    def parallel_sites(self) -> list[ParallelSite]:
        # x = h (the query projection's input) / the attention block output (the intermediate dense's
        # input); the term is added after the sub-layer dropout, before the residual LayerNorm (He et al.).
        sites = []
        for i, layer in enumerate(self.root.encoder.layer):
            attn_out, ffn_out = layer.attention.output, layer.output
            sites.append(ParallelSite("encoder", i, "attn", layer.attention.self.query, attn_out.dropout,
                                      attn_out.dense.weight))
            sites.append(ParallelSite("encoder", i, "ffn", layer.intermediate.dense, ffn_out.dropout,
                                      ffn_out.dense.weight))
        return sites

    def kernel_mix_sites(self, cross_attention: bool = False) -> list[KernelMixSite]:
        # key runs before value in the self-attention forward; O = attention.output.dense (before dropout).
        sites = []
        for i, layer in enumerate(self.root.encoder.layer):
            sa, dense = layer.attention.self, layer.attention.output.dense
            inner = sa.num_attention_heads * sa.attention_head_size
            sites.append(KernelMixSite("encoder", i, "self", layer.attention, (sa.query, (0, inner)),
                                       (sa.key, (0, inner)), (sa.value, (0, inner)),
                                       (dense, (0, dense.out_features)), sa.num_attention_heads,
                                       sa.attention_head_size))
        return sites

    def attention_sites(self, cross_attention: bool = False) -> list[AttentionSite]:
        sites = []
        for i, layer in enumerate(self.root.encoder.layer):
            sa = layer.attention.self
            sites.append(AttentionSite("encoder", i, "self", sa, layer.attention.output.dense,
                                       sa.num_attention_heads, sa.attention_head_size))
        return sites

    def prompt_site(self) -> PromptSite:
        # word_embeddings' output, before the token-type and position embeddings are added.
        return PromptSite(self.root.embeddings.word_embeddings)

    def learned_positions(self) -> tuple[nn.Module, int | None] | None:
        emb = self.root.embeddings
        if getattr(self.root.config, "position_embedding_type", "absolute") != "absolute":
            return None
        return emb.position_embeddings, getattr(emb, "padding_idx", None)  # RoBERTa keeps pads at padding_idx

    def attention_unsupported(self) -> str | None:
        if getattr(self.root.config, "add_cross_attention", False):
            return ("add_cross_attention=True (kadapt supports RoBERTa/BERT self-attention only); load it without "
                    "cross-attention")
        return None

    def _body(self) -> list[nn.Module]:
        # The pretrained pooler is not part of the trained body (docs/methods.md §5 counts exclude it).
        return [self.root.embeddings, self.root.encoder]
