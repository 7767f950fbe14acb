"""Pooling options for sequence-classification heads: ``cls`` (the model's own) or ``mean`` (masked mean over
the non-padding tokens).

Why mean pooling: sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained on the mean of the token
states; their [CLS] state (and BERT's pooler on it) barely varies between sentences, so a head reading it gives
methods that act through attention (prefix, inducer, prompt tuning) almost nothing to move.

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    set_pooling(model, "mean")          # before kadapt.patch / kadapt.load_adapter
    kadapt.patch(model, config)         # the classification head trains, as with "cls"

``set_pooling`` keeps the head under its usual top-level name (``classifier`` / ``score``), so kadapt treats
it as the task head (it trains, ``save_adapter`` writes it); a model must get the same pooling before
``load_adapter`` as when it was saved. Prompt tuning's prepended positions count as tokens.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

__all__ = ["POOLINGS", "MeanPoolHead", "MeanPooler", "get_pooling", "masked_mean", "set_pooling"]

POOLINGS = ("cls", "mean")
_HOOK_ATTR = "_kadapt_pooling_hook"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, T, H) over the positions where ``mask`` (batch, T') is nonzero. A mask shorter
    than T (prompt tuning prepended T − T' vectors) counts the missing leading positions as tokens."""
    if mask is None:
        return hidden.mean(dim=1)
    mask = mask.to(hidden.device)
    extra = hidden.shape[1] - mask.shape[1]
    if extra > 0:
        mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
    elif extra < 0:
        raise ValueError(f"mean pooling: attention_mask has {mask.shape[1]} positions, the hidden states "
                         f"{hidden.shape[1]}")
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class _MaskStash:
    """The current forward's attention mask, per thread (concurrent forwards stay independent)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def put(self, mask: torch.Tensor | None) -> None:
        self._local.mask = mask

    def get(self) -> torch.Tensor | None:
        return getattr(self._local, "mask", None)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):  # forward(input_ids, attention_mask)
            mask = args[1]
        self.put(mask)


class MeanPooler(nn.Module):
    """Stands in for BERT's pooler: returns the masked mean of the last hidden states (no dense/tanh)."""

    def __init__(self, stash: _MaskStash, original: nn.Module | None):
        super().__init__()
        self._stash = stash
        self.__dict__["_original"] = original  # kept for set_pooling(model, "cls"), not a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return masked_mean(hidden_states, self._stash.get())


class MeanPoolHead(nn.Module):
    """Wraps a head so it reads the masked mean of the token states.

    ``mode="first"``: the head reads position 0 of its input (RoBERTa's classification head); it gets the mean
    as a length-1 sequence. ``mode="tokens"``: the head maps every position (the Llama family's / GPT-2's
    ``score``); its output on the mean is repeated at every position, so whichever token the model picks
    holds it."""

    def __init__(self, head: nn.Module, stash: _MaskStash, mode: str):
        super().__init__()
        if mode not in ("first", "tokens"):
            raise ValueError(f"mode={mode!r}; allowed: first, tokens")
        self.head = head
        self.mode = mode
        self._stash = stash

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pooled = masked_mean(hidden_states, self._stash.get())
        if self.mode == "first":
            return self.head(pooled.unsqueeze(1), *args, **kwargs)
        out = self.head(pooled, *args, **kwargs)
        return out.unsqueeze(1).expand(out.shape[0], hidden_states.shape[1], out.shape[-1])


def _base(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, None) if prefix else None


def get_pooling(model: nn.Module) -> str:
    """"mean" when ``set_pooling(model, "mean")`` is in effect, else "cls"."""
    return "mean" if getattr(model, _HOOK_ATTR, None) is not None else "cls"


def set_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Switch a ``*ForSequenceClassification`` model (BERT, RoBERTa, the Llama family, GPT-2) between its own
    ``"cls"`` pooling and ``"mean"`` pooling over non-padding tokens; in place, returns ``model``. Call it
    before ``kadapt.patch`` / ``kadapt.load_adapter``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; allowed: {', '.join(POOLINGS)}")
    from kadapt.patching import get_record

    if get_record(model) is not None:
        raise ValueError("set_pooling: the model is already patched by kadapt; set the pooling before kadapt.patch "
                         "(and before kadapt.load_adapter)")
    if pooling == get_pooling(model):
        return model
    base = _base(model)
    if pooling == "cls":
        getattr(model, _HOOK_ATTR).remove()
        setattr(model, _HOOK_ATTR, None)
        if isinstance(getattr(base, "pooler", None), MeanPooler):
            base.pooler = base.pooler._original
        for name in ("classifier", "score"):
            if isinstance(getattr(model, name, None), MeanPoolHead):
                setattr(model, name, getattr(model, name).head)
        return model
    stash = _MaskStash()
    classifier, score = getattr(model, "classifier", None), getattr(model, "score", None)
    if isinstance(getattr(base, "pooler", None), nn.Module) and isinstance(classifier, nn.Linear):
        base.pooler = MeanPooler(stash, base.pooler)                     # BERT: classifier(pooler(states))
    elif isinstance(classifier, nn.Module) and hasattr(classifier, "out_proj"):
        model.classifier = MeanPoolHead(classifier, stash, "first")      # RoBERTa: head(states)[:, 0]
    elif isinstance(score, nn.Linear):
        model.score = MeanPoolHead(score, stash, "tokens")               # Llama family / GPT-2: score per token
    else:
        raise ValueError(f"set_pooling: mean pooling supports BERT, RoBERTa, Llama-family and GPT-2 "
                         f"*ForSequenceClassification models, not {type(model).__name__}")
    setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(stash, with_kwargs=True))
    return model
