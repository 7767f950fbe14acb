"""Helpers every method uses, each in one place: initialisers, the new-parameter factory, the linear
fold used by merges, and the per-call stash through which a method's hooks hand tensors on.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import nn


# ------------------------------------------------------------------------------------------ initialisers

def tn01_(t: torch.Tensor) -> torch.Tensor:
    """`tn01`: 0.01·fmod(z, 2), z ~ N(0, 1) (fmod keeps the sign of z), so |x| < 0.02."""
    with torch.no_grad():
        return t.copy_(0.01 * torch.fmod(torch.randn(t.shape, device=t.device, dtype=t.dtype), 2.0))


def glorot_sqrt2_(t: torch.Tensor) -> torch.Tensor:
    """`glorot√2`: U(±√2·√(6/(fan_in + fan_out))) on each trailing 2-D slice."""
    fan_in, fan_out = t.shape[-2], t.shape[-1]
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(t, -bound, bound)


def kaiming_sqrt5_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """`kaiming√5` (torch's Linear default): U(±1/√fan_in), fan_in being the map's input width."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


def factory(ref: torch.Tensor) -> dict:
    """device and dtype for new parameters next to ``ref`` (a float dtype even for integer refs)."""
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.get_default_dtype()
    return {"device": ref.device, "dtype": dtype}


def compute_input(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """x as a method computes with it: in the parameters' dtype, unless autocast is on for x's device (then the
    ops follow autocast). Models mixing module dtypes (T5 loaded in fp16 keeps each FFN ``wo`` in fp32) hand a
    method inputs of another dtype than its parameters."""
    if x.dtype == param.dtype or (torch.amp.is_autocast_available(x.device.type)
                                  and torch.is_autocast_enabled(x.device.type)):
        return x
    return x.to(param.dtype)


# ---------------------------------------------------------------------------------------------- merging

def x_weight(linear: nn.Module, cols: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (in, stop - start) in the x·W convention and bias of the output columns ``cols`` of an
    nn.Linear (weight stored (out, in)) or a GPT-2 Conv1D (stored (in, out))."""
    a, b = cols
    w = linear.weight[a:b, :].t() if isinstance(linear, nn.Linear) else linear.weight[:, a:b]
    bias = getattr(linear, "bias", None)
    return w, (bias[a:b] if bias is not None else None)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The wider of fp32 and ``dtype``: merges never round an fp64 model through fp32."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def fold_linear(linear: nn.Module, cols: tuple[int, int], dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """W[:, cols] += ΔW (x·W convention, (in, stop - start)) and b[cols] += Δb on ``linear``, accumulated in
    the wider of fp32 and the weight's dtype; columns outside ``cols`` are not rewritten. A missing bias
    is created when Δb is given."""
    a, b = cols
    weight = linear.weight
    acc = accumulation_dtype(weight.dtype)
    if dw is not None:
        part = weight[a:b, :] if isinstance(linear, nn.Linear) else weight[:, a:b]
        delta = dw.t() if isinstance(linear, nn.Linear) else dw
        part.copy_((part.to(acc) + delta.to(acc)).to(weight.dtype))
    if db is None:
        return
    if getattr(linear, "bias", None) is None:
        out = weight.shape[0] if isinstance(linear, nn.Linear) else weight.shape[1]
        linear.register_parameter("bias", nn.Parameter(torch.zeros(out, device=weight.device, dtype=weight.dtype),
                                                       requires_grad=weight.requires_grad))
    bias = linear.bias[a:b]
    bias.copy_((bias.to(acc) + db.to(acc)).to(bias.dtype))


# ------------------------------------------------------------------------------------------- call stash

class CallStash:
    """Tensors one hook hands to a later hook of the same forward call (e.g. a sub-layer's input to the
    hook at its output). Per thread, so concurrent forwards of one model never see each other's tensors;
    keyed by the owning module's id."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _slots(self) -> dict:
        slots = self._local.__dict__.get("slots")
        if slots is None:
            slots = self._local.slots = {}
        return slots

    def put(self, owner: nn.Module, tensor: torch.Tensor) -> None:
        self._slots()[id(owner)] = tensor

    def take(self, owner: nn.Module) -> torch.Tensor | None:
        return self._slots().pop(id(owner), None)


STASH = CallStash()
