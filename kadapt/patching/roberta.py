"""RoBERTa and BERT: post-LN blocks. Bottleneck adapters act after the sub-layer dropout (Houlsby
BERT order, METHODS.md §1), so the hook point is the dropout of SelfOutput / Output."""
from __future__ import annotations

from torch import nn

from kadapt.patching.base import Backbone, Site, single_root


class RobertaBackbone(Backbone):
    family = "roberta"
    model_types = ("roberta", "bert")
    _root_classes = ("RobertaModel", "BertModel")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.root = single_root(model, self._root_classes)

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

    def _body(self) -> list[nn.Module]:
        # The pretrained pooler is not part of the trained body (METHODS.md §3 counts exclude it).
        return [self.root.embeddings, self.root.encoder]
