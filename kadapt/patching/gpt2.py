"""GPT-2: pre-LN blocks; attn_out = attn.c_proj, ffn_out = mlp.c_proj (hooks add before resid dropout)."""
from __future__ import annotations

from torch import nn

from kadapt.patching.base import Backbone, Site, single_root


class GPT2Backbone(Backbone):
    family = "gpt2"
    model_types = ("gpt2",)

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

    def _body(self) -> list[nn.Module]:
        return [self.root]
