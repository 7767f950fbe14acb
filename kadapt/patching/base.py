"""What a backbone family declares: its blocks, hook points (sites), norms, biases, heads and FFN shape.

A family module answers "where" only; method math lives in kadapt.methods. Nothing is guessed: each family
states its norm type (``norm``), whether its linears carry biases (``linear_bias``), its FFN shape (``ffn``)
and, per attention site, its query and key/value head counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = "supported: GPT-2, RoBERTa, BERT, T5 and Llama-family (Llama, Qwen2, Mistral) transformers models"

# Top-level attributes of HF task models that hold a newly initialised task head (these train).
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head", "multiple_choice_head")


@dataclass
class Site:
    """A hook point: ``target``'s forward output is f at ``kind`` ("attn" = attn_out, "ffn" = ffn_out)."""

    stack: str
    block: int
    kind: str
    target: nn.Module
    ref_weight: torch.Tensor  # gives the device and dtype for new parameters


@dataclass
class LinearSite:
    """A linear map a method may correct (LoRA): ``module``'s forward input is x and its output y.

    ``slices``: target name -> output columns [start, stop) that target owns (one linear can serve
    several targets, e.g. GPT-2's fused ``c_attn``). ``weight_layout``: "in_out" (Conv1D) or "out_in"
    (nn.Linear).
    """

    stack: str
    block: int
    module: nn.Module
    in_features: int
    out_features: int
    weight_layout: str
    slices: dict[str, tuple[int, int]]


@dataclass
class ParallelSite:
    """A parallel-adapter site: ``source``'s forward input (args[0]) is the sub-layer input x, and
    ``target``'s forward output is f at the addition site (docs/methods.md §2)."""

    stack: str
    block: int
    kind: str
    source: nn.Module
    target: nn.Module
    ref_weight: torch.Tensor


@dataclass
class KernelMixSite:
    """One attention layer for kernel-mix (docs/methods.md §9). ``q``, ``k``, ``v``, ``o``: (module, output
    columns [start, stop)) of each projection; on GPT-2 q, k and v are slices of the fused ``c_attn``.
    The forward input of q/v is X, of o the merged heads. ``owner`` holds the KernelMix module."""

    stack: str
    block: int
    kind: str  # "self" | "cross"
    owner: nn.Module
    q: tuple[nn.Module, tuple[int, int]]
    k: tuple[nn.Module, tuple[int, int]]
    v: tuple[nn.Module, tuple[int, int]]
    o: tuple[nn.Module, tuple[int, int]]
    heads: int
    head_dim: int
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = heads

    def __post_init__(self) -> None:
        self.kv_heads = self.kv_heads or self.heads

    @property
    def fused(self) -> bool:
        return self.q[0] is self.k[0]


@dataclass
class AttentionSite:
    """One attention layer for the attention-side methods (prefix, inducer). ``module`` is the module that
    calls transformers' attention interface (kadapt.patching.attention); ``o`` its output projection, whose
    output is attn_out (before the sub-layer dropout, docs/methods.md §2). ``kind``: "self" | "cross"."""

    stack: str
    block: int
    kind: str
    module: nn.Module
    o: nn.Module
    heads: int
    head_dim: int
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = heads

    def __post_init__(self) -> None:
        self.kv_heads = self.kv_heads or self.heads

    @property
    def prefix_set(self) -> str:
        """Which prefix set the layer draws from (T5 has three: encoder self, decoder self, cross)."""
        return f"{self.stack}_{self.kind}"


@dataclass
class BiasSite:
    """Where BitFit's biases live: ``module``'s bias of ``size`` trains if it exists, else a zero one is added.

    ``native``: the module's forward already uses ``module.bias`` (nn.Linear, LayerNorm); otherwise a forward
    hook adds it to the output (RMSNorm-style norms: T5LayerNorm, LlamaRMSNorm).
    """

    module: nn.Module
    size: int
    native: bool


@dataclass
class PromptSite:
    """Where prompt tuning (docs/methods.md §7) puts its P prompt vectors.

    ``embedding``: the input token embedding (nn.Embedding): its rows are the vocabulary ``init="vocab"``
    copies, and its forward output is where the prompt rows go in front of the token embeddings (before
    position embeddings are added) on GPT-2, RoBERTa/BERT and the Llama family. ``encoder`` / ``decoder``
    (T5 only; None elsewhere): the stack whose embedded input gets the prompt (after the lookup, before the
    embedding dropout; its forward takes ``input_ids`` / ``inputs_embeds`` / ``attention_mask``), and the
    stack whose cross-attention mask (``encoder_attention_mask``) gets P leading ones (None on an
    encoder-only model)."""

    embedding: nn.Module
    encoder: nn.Module | None = None
    decoder: nn.Module | None = None


class Backbone:
    """Base class; a family sets the declarations below and implements the site queries."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    norm: str = ""                      # "layernorm" | "rmsnorm"
    norm_classes: tuple[str, ...] = ()  # class names of the family's norm modules
    linear_bias: bool = True            # whether the block's linears carry biases
    ffn: str = "plain"                  # "plain": out(act(in(x))) | "gated": out(act(gate(x)) * up(x))

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def stacks(self) -> dict[str, int]:
        """Stack name -> number of blocks."""
        raise NotImplementedError

    def adapter_sites(self) -> list[Site]:
        """Sequential bottleneck-adapter sites (attn_out and ffn_out of every block of every stack;
        never T5 cross-attention), in model order."""
        raise NotImplementedError

    def linear_sites(self, targets: tuple[str, ...]) -> list[LinearSite]:
        """LoRA: the linears serving ``targets`` ("q", "k", "v", "o", "ffn_in", "ffn_out"), in model order."""
        raise NotImplementedError

    def parallel_sites(self) -> list[ParallelSite]:
        """Parallel adapters: attn_in → attn_out and ffn_in → ffn_out of every block (never T5 cross-attention)."""
        raise NotImplementedError

    def kernel_mix_sites(self, cross_attention: bool = False) -> list[KernelMixSite]:
        """Kernel-mix: every self-attention layer (T5: encoder self, decoder self, and cross-attention when
        ``cross_attention``), in model order."""
        raise NotImplementedError

    def attention_sites(self, cross_attention: bool = False) -> list[AttentionSite]:
        """Prefix / inducer: every self-attention layer (T5: encoder self, decoder self, and cross-attention
        when ``cross_attention``), in model order."""
        raise NotImplementedError

    def prompt_site(self) -> PromptSite:
        """Prompt tuning: the input embedding and, on an encoder-decoder model, the prompted encoder stack."""
        raise NotImplementedError

    def _body(self) -> list[nn.Module]:
        """The modules the method trains in (not pretrained or task heads)."""
        raise NotImplementedError

    def norms(self) -> list[nn.Module]:
        """The backbone's own norms (``norm_classes``; not those of pretrained or task heads)."""
        return [m for part in self._body() for m in part.modules() if type(m).__name__ in self.norm_classes]

    def layer_norms(self) -> list[nn.Module]:
        """Earlier name of ``norms``."""
        return self.norms()

    def bias_sites(self, skip_final_ln: bool) -> list[BiasSite]:
        """BitFit: every module of the body that has a bias (biased families train these and add nothing)."""
        return [BiasSite(m, m.bias.shape[0], True) for part in self._body() for m in part.modules()
                if isinstance(getattr(m, "bias", None), nn.Parameter)]

    def learned_positions(self) -> tuple[nn.Module, int | None] | None:
        """The learned position embedding whose input is the position ids (GPT-2's wpe, RoBERTa/BERT's
        position_embeddings) and the padding position it keeps unshifted (RoBERTa's padding_idx), or None."""
        return None

    def attention_unsupported(self) -> str | None:
        """Why methods that run inside attention (prefix, inducer) cannot run on this model, or None."""
        return None

    def task_heads(self) -> list[nn.Module]:
        heads = []
        for name in TASK_HEAD_NAMES:
            mod = getattr(self.model, name, None)
            if isinstance(mod, nn.Module):
                heads.append(mod)
        return heads


def linear_site(stack: str, block: int, module: nn.Module, slices: dict[str, tuple[int, int]] | None = None,
                name: str = "") -> LinearSite:
    """A LinearSite for an nn.Linear or a GPT-2 Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        i, o, layout = module.in_features, module.out_features, "out_in"
    else:
        (i, o), layout = module.weight.shape, "in_out"
    return LinearSite(stack, block, module, i, o, layout, slices if slices is not None else {name: (0, o)})


def find_modules(root: nn.Module, class_names: tuple[str, ...]) -> list[nn.Module]:
    return [m for m in root.modules() if type(m).__name__ in class_names]


def single_root(model: nn.Module, class_names: tuple[str, ...]) -> nn.Module:
    """The one module of a class in ``class_names`` inside ``model``; ValueError otherwise."""
    roots = find_modules(model, class_names)
    if len(roots) != 1:
        raise ValueError(f"model: expected one {'/'.join(class_names)} inside {type(model).__name__}, "
                         f"found {len(roots)}; {SUPPORTED}")
    return roots[0]
