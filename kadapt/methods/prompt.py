"""Prompt tuning (Lester et al.; docs/methods.md §7): P trainable vectors P_emb ∈ R^{P×D} in front of the input.

Two layouts, by what the backbone declares (``Backbone.prompt_site``):

- **Inline** (GPT-2, RoBERTa/BERT, the Llama family; PEFT's layout). A keyword pre-hook on the patched model
  puts P placeholder ids in front of ``input_ids`` (P prompt rows in front of ``inputs_embeds`` when those are
  given), P ones in front of ``attention_mask``, zeros in front of ``token_type_ids`` and -100 in front of
  token-level ``labels``, and shifts given ``position_ids`` (and index targets such as ``start_positions``) by
  P; a forward hook on the input embedding then writes P_emb over the placeholder rows, before position
  embeddings are added. The prompt therefore takes positions 0..P−1 (rotary ones too) and the model's own code
  does the rest: RoBERTa/BERT classification heads read position 0 (the first prompt vector), and GPT-2/Llama
  sequence classification finds the last non-padding token among the P + T ids (the placeholders are never the
  pad id), i.e. shifted by P. Outputs cover all P + T positions (logits, hidden states), as in PEFT.
  With a non-empty KV cache the prompt is already cached (it entered at prefill): the call's ``input_ids`` stay
  as they are, a mask that lacks the prompt gets P leading ones, and given positions shift by P, so greedy
  ``generate`` with the cache gives the tokens it gives without.
- **Encoder** (T5; the Compacter code's ``T5Stack.forward``). A keyword pre-hook on the encoder stack embeds
  ``input_ids`` and prepends P_emb (after the lookup, before the embedding dropout) and gives the encoder's
  ``attention_mask`` P leading ones; a pre-hook on the decoder stack gives its cross-attention mask P leading
  ones when it is P shorter than the encoder output. The decoder is otherwise untouched; the prompt occupies
  relative positions 0..P−1. (``generate`` calls the encoder directly, hence hooks on the stacks.)

Nothing else trains. At most one prompt per model: P_emb is the root-level child ``kadapt_prompt``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import KadaptConfig, Method, check_bool, check_choice, check_int, is_integral, register
from kadapt.methods.common import STASH

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan

PROMPT_ATTR = "kadapt_prompt"
INITS = ("random", "vocab")
IGNORE_INDEX = -100

# Heads whose ``labels`` align with the input sequence (they get -100 at the prompt positions), and heads whose
# index targets point into it (shifted by P). Sequence-level labels (classification) are left alone.
_TOKEN_LABEL_HEADS = ("LMHeadModel", "ForCausalLM", "ForMaskedLM", "ForTokenClassification", "DoubleHeadsModel")
_INDEX_TARGETS = {"ForQuestionAnswering": ("start_positions", "end_positions"), "DoubleHeadsModel": ("mc_token_ids",)}
# Config attributes naming special token ids (skipped by the default vocab rows).
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
                "mask_token_id", "decoder_start_token_id")


@dataclass
class PromptTuningConfig(KadaptConfig):
    """Prompt tuning (docs/methods.md §7): ``prompt_length`` (P) trainable vectors P_emb ∈ R^{P×D} in front of
    the input embeddings; nothing else trains (P·D: 76,800 on T5-base at P = 100).

    T5: prepended to the encoder's embedded input, with P extra ones in the encoder self-attention and the
    decoder cross-attention masks. GPT-2, RoBERTa/BERT, Llama family: prepended to the token embeddings
    before position embeddings (positions 0..P−1), P leading ones in the attention mask, labels -100 there,
    the prompt in the KV cache from prefill on; outputs cover the P + T positions.

    ``init``: ``"random"`` (PT-R): U(−0.5, 0.5); ``"vocab"`` (PT-T): copies of rows of the model's *loaded*
    input embedding, taken at patch time: the rows ``vocab_ids`` (P ids, each < V) if given, else the first P
    ids that the model config does not name as special (pad/bos/eos/unk/sep/cls/mask/decoder-start), e.g.
    2..P+1 on T5, 3..P+2 on RoBERTa, 0..P−1 on GPT-2 (``vocab_ids=list(range(P))`` gives rows 0..P−1 exactly;
    on BERT, whose ids 1..99 are untrained [unused] rows, pass ``vocab_ids``, e.g. frequent tokens).
    ``compat_prompt_t_random_init`` (with ``init="vocab"``; docs/methods.md §16 quirk 1): N(0, 1) rows instead
    of pretrained ones, as the Compacter code's init, which runs before the checkpoint loads, gives.
    """

    method: ClassVar[str] = "prompt_tuning"
    prompt_length: int = 100
    init: str = "random"
    vocab_ids: tuple[int, ...] | None = None
    compat_prompt_t_random_init: bool = False

    def __post_init__(self) -> None:
        check_int("prompt_length", self.prompt_length, 1)
        check_choice("init", self.init, INITS)
        check_bool("compat_prompt_t_random_init", self.compat_prompt_t_random_init)
        if self.vocab_ids is not None:
            ids = self.vocab_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or \
                    not all(is_integral(i) and i >= 0 for i in ids):
                raise ValueError(f"vocab_ids={ids!r} must be None or a list of token ids (integers >= 0), one per "
                                 f"prompt vector")
            if len(ids) != self.prompt_length:
                raise ValueError(f"vocab_ids has {len(ids)} ids; it must have prompt_length={self.prompt_length} "
                                 f"(one token id per prompt vector)")
            if self.init != "vocab":
                raise ValueError(f"vocab_ids is given with init={self.init!r}; vocab_ids selects the rows that "
                                 f"init='vocab' copies: pass init='vocab' or vocab_ids=None")
            self.vocab_ids = tuple(int(i) for i in ids)  # JSON round trips give a list
        if self.compat_prompt_t_random_init and self.init != "vocab":
            raise ValueError(f"compat_prompt_t_random_init=True applies to init='vocab' only (it replaces the copied "
                             f"rows by N(0, 1) ones); got init={self.init!r}")


class PromptEmbedding(nn.Module):
    """P_emb ∈ R^{P×D} and how it enters a sequence of embeddings (..., T, D)."""

    def __init__(self, length: int, dim: int, factory: dict):
        super().__init__()
        self.length = length
        self.weight = nn.Parameter(torch.empty(length, dim, **factory))

    def _rows(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.weight.to(embeds.dtype).expand(*embeds.shape[:-2], *self.weight.shape)

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """[P_emb; embeds] along the sequence: (..., T, D) → (..., P + T, D)."""
        return torch.cat([self._rows(embeds), embeds], dim=-2)

    def overwrite(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` with its first P rows replaced by P_emb (the placeholder rows)."""
        return torch.cat([self._rows(embeds), embeds[..., self.length:, :]], dim=-2)

    def extra_repr(self) -> str:
        return f"P={self.length}, D={self.weight.shape[1]}"


# --------------------------------------------------------------------------------------------- helpers

def _positional_names(module: nn.Module) -> tuple[str, ...]:
    """The forward's parameters that can be given positionally (hooks move them to keywords)."""
    params = inspect.signature(module.forward).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _keywords(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    if len(args) > len(names):
        raise TypeError(f"prompt tuning: {len(args)} positional arguments, but the forward takes at most "
                        f"{len(names)} ({', '.join(names)})")
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _front(t: torch.Tensor, length: int, value) -> torch.Tensor:
    """``t`` with ``length`` entries of ``value`` in front of its last dimension."""
    return torch.cat([t.new_full((*t.shape[:-1], length), value), t], dim=-1)


def _mask(mask: torch.Tensor | None, length: int, covers: int) -> torch.Tensor | None:
    """A 2-D (..., L) key mask that lacks the prompt (L + P == ``covers``) gets P leading ones."""
    if mask is None:
        return None
    if mask.dim() > 2:
        raise ValueError(f"prompt tuning: attention_mask of shape {tuple(mask.shape)}; it takes a 2-D (batch, "
                         f"sequence) padding mask (the prompt positions are added to it)")
    if mask.shape[-1] + length == covers:
        return _front(mask, length, 1)
    return mask


def _cache_length(kwargs: dict) -> int:
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return cache.get_seq_length()
    return 0


def _default_vocab_ids(config, vocab: int, length: int) -> list[int]:
    special: set[int] = set()
    for name in _SPECIAL_IDS:
        value = getattr(config, name, None)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if is_integral(v):
                special.add(int(v))
    ids = [i for i in range(min(vocab, length + len(special))) if i not in special][:length]
    if len(ids) < length:
        raise ValueError(f"prompt_length={length} with init='vocab': the vocabulary has only {len(ids)} non-special "
                         f"ids (V = {vocab}); allowed: prompt_length <= {len(ids)}, or pass vocab_ids")
    return ids


# ------------------------------------------------------------------------------------- inline layout

@dataclass
class _Inline:
    """The keyword pre-hook of the patched model (GPT-2, RoBERTa/BERT, Llama family)."""

    prompt: PromptEmbedding
    names: tuple[str, ...]
    placeholder: int
    token_labels: bool
    index_targets: tuple[str, ...]
    first_position: int          # position id of the first prompt vector (RoBERTa: padding_idx + 1)
    pad_position: int | None     # RoBERTa's padding_idx: padded positions stay there
    limit: int | None            # learned positions available to the prompted sequence (None: no limit)
    limit_text: str
    family: str

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        kw = _keywords(self.names, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            STASH.put(self.prompt, None)
            return None
        P = self.prompt.length
        T = ids.shape[-1] if ids is not None else embeds.shape[-2]
        past = _cache_length(kw)
        prefill = past == 0
        self._check_limit(past, T, prefill)
        if prefill:
            if ids is not None:
                kw["input_ids"] = _front(ids, P, self.placeholder)
                STASH.put(self.prompt, True)  # the embedding hook writes P_emb over the placeholder rows
            else:
                kw["inputs_embeds"] = self.prompt.prepend(embeds)
                STASH.put(self.prompt, None)
            kw["attention_mask"] = _mask(kw.get("attention_mask"), P, P + T)
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = _front(kw["token_type_ids"], P, 0)
            if kw.get("position_ids") is not None:
                pos = self._shift(kw["position_ids"])
                front = torch.arange(P, device=pos.device, dtype=pos.dtype) + self.first_position
                kw["position_ids"] = torch.cat([front.expand(*pos.shape[:-1], P), pos], dim=-1)
            if kw.get("cache_position") is not None:  # transformers < 5.2x
                cp = kw["cache_position"]
                kw["cache_position"] = torch.cat([torch.arange(P, device=cp.device, dtype=cp.dtype), cp + P])
            if self.token_labels:
                for name in ("labels", "shift_labels"):
                    if kw.get(name) is not None:
                        kw[name] = _front(kw[name], P, IGNORE_INDEX)
            for name in self.index_targets:
                if kw.get(name) is not None:
                    kw[name] = kw[name] + P
        else:  # the prompt is in the cache since prefill
            STASH.put(self.prompt, None)
            kw["attention_mask"] = _mask(kw.get("attention_mask"), P, past + T)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = self._shift(kw["position_ids"])
            if kw.get("cache_position") is not None:
                kw["cache_position"] = kw["cache_position"] + P
        return (), kw

    def _shift(self, pos: torch.Tensor) -> torch.Tensor:
        P = self.prompt.length
        return pos + P if self.pad_position is None else torch.where(pos != self.pad_position, pos + P, pos)

    def _check_limit(self, past: int, length: int, prefill: bool) -> None:
        if self.limit is None or torch.compiler.is_compiling():
            return
        P = self.prompt.length
        total = past + length + (P if prefill else 0)
        if total > self.limit:
            cached = f" after {past} cached positions" if past else ""
            allowed = self.limit - past - (P if prefill else 0)
            raise ValueError(f"prompt tuning: prompt_length={P} plus {length} input positions{cached} needs {total} "
                             f"positions, but this {self.family!r} model has {self.limit} ({self.limit_text}); "
                             f"allowed: at most {max(allowed, 0)} input positions per sequence with this prompt")


def _embedding_hook(prompt: PromptEmbedding, module: nn.Module, args, output: torch.Tensor):
    if STASH.take(prompt) is None:
        return None
    return prompt.overwrite(output)


# ------------------------------------------------------------------------------------ encoder layout

def _encoder_hook(prompt: PromptEmbedding, names: tuple[str, ...], module: nn.Module, args: tuple, kwargs: dict):
    kw = _keywords(names, args, kwargs)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            return None  # the stack raises its own error
        embeds = module.embed_tokens(ids)
    T = embeds.shape[-2]
    kw["input_ids"] = None
    kw["inputs_embeds"] = prompt.prepend(embeds)
    mask = kw.get("attention_mask")
    if mask is not None and mask.shape[-1] == T:
        kw["attention_mask"] = _mask(mask, prompt.length, prompt.length + T)
    return (), kw


def _decoder_hook(length: int, names: tuple[str, ...], module: nn.Module, args: tuple, kwargs: dict):
    kw = _keywords(names, args, kwargs)
    states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
    if states is None or mask is None:
        return None
    kw["encoder_attention_mask"] = _mask(mask, length, states.shape[-2])
    return (), kw


def _labels_hook(length: int, names: tuple[str, ...], module: nn.Module, args: tuple, kwargs: dict):
    """Token-level labels of an encoder-only head over the prompted encoder (T5ForTokenClassification)."""
    kw = _keywords(names, args, kwargs)
    if kw.get("labels") is None:
        return None
    kw["labels"] = _front(kw["labels"], length, IGNORE_INDEX)
    return (), kw


# ---------------------------------------------------------------------------------------------- method

def _placeholder(model: nn.Module, avoid: set[int]) -> int:
    """A token id that is not the pad id (sequence classification and RoBERTa positions look for pads)."""
    avoid = avoid | {getattr(model.config, "pad_token_id", None)}
    return next(i for i in range(len(avoid) + 1) if i not in avoid)


@torch.no_grad()
def _initialise(prompt: PromptEmbedding, embedding: nn.Module, config: PromptTuningConfig, model: nn.Module) -> None:
    weight, P = prompt.weight, config.prompt_length
    if config.init == "random":
        nn.init.uniform_(weight, -0.5, 0.5)
        return
    vocab = embedding.weight.shape[0]
    ids = list(config.vocab_ids) if config.vocab_ids is not None else _default_vocab_ids(model.config, vocab, P)
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise ValueError(f"vocab_ids contains {bad[:5]}{' ...' if len(bad) > 5 else ''}, outside this model's "
                         f"vocabulary; allowed: token ids 0..{vocab - 1}")
    if config.compat_prompt_t_random_init:  # quirk 1: the rows of a freshly drawn N(0, 1) embedding
        nn.init.normal_(weight, 0.0, 1.0)
        return
    index = torch.tensor(ids, dtype=torch.long, device=embedding.weight.device)
    weight.copy_(embedding.weight.index_select(0, index).to(weight.dtype))


def _suffix(model: nn.Module, suffixes) -> bool:
    return type(model).__name__.endswith(tuple(suffixes))


@register(PromptTuningConfig)
class PromptTuningMethod(Method):

    def plan(self, config: PromptTuningConfig, plan: "Plan") -> None:
        backbone, model, P = plan.backbone, plan.model, config.prompt_length
        site = backbone.prompt_site()
        limit, limit_text, first, pad = self._positions(backbone, P)
        prompt = PromptEmbedding(P, backbone.hidden_size, plan.factory(site.embedding.weight))
        _initialise(prompt, site.embedding, config, model)
        plan.add_module(model, PROMPT_ATTR, prompt)
        if site.encoder is not None:  # T5
            plan.forward_pre_hook(site.encoder, functools.partial(_encoder_hook, prompt,
                                                                  _positional_names(site.encoder)), with_kwargs=True)
            if site.decoder is not None:
                plan.forward_pre_hook(site.decoder, functools.partial(_decoder_hook, P,
                                                                      _positional_names(site.decoder)),
                                      with_kwargs=True)
            if _suffix(model, ("ForTokenClassification",)):
                plan.forward_pre_hook(model, functools.partial(_labels_hook, P, _positional_names(model)),
                                      with_kwargs=True)
            return
        index_targets = tuple(n for suffix, names in _INDEX_TARGETS.items() if _suffix(model, (suffix,))
                              for n in names)
        hook = _Inline(prompt, _positional_names(model), _placeholder(model, {pad} if pad is not None else set()),
                       _suffix(model, _TOKEN_LABEL_HEADS), index_targets, first, pad, limit, limit_text,
                       backbone.family)
        plan.forward_pre_hook(model, hook, with_kwargs=True)
        plan.forward_hook(site.embedding, functools.partial(_embedding_hook, prompt))

    @staticmethod
    def _positions(backbone, P: int) -> tuple[int | None, str, int, int | None]:
        """(positions the prompted sequence may use, their description, the first prompt position, RoBERTa's
        padding position); the prompt alone must leave room for a token."""
        learned = backbone.learned_positions()
        if learned is None:
            return None, "", 0, None
        positions, pad = learned
        offset = pad + 1 if pad is not None else 0
        limit, n = positions.num_embeddings - offset, positions.num_embeddings
        name = "n_positions" if getattr(backbone.model.config, "n_positions", None) == n else "max_position_embeddings"
        text = f"{name} = {n}" + (f" minus the padding offset {offset}" if offset else "")
        if P >= limit:
            raise ValueError(f"prompt_length={P} leaves no position for a token: this {backbone.family!r} model has "
                             f"{limit} ({text}); allowed: prompt_length <= {limit - 1}")
        return limit, text, offset, pad
