"""Factored adapter weights: an in×out matrix given by the factors a method trains (METHODS.md §2).

``AdapterWeight`` names the factorisation; kernels read the factors directly (Triton) or materialise
W once per call (CUDA); ``materialize`` is the reference. ``factor_grads`` turns dL/dW into the
gradients of the factors (METHODS.md §12.3, materialised backward) with PyTorch ops;
``fused_factor_grads`` is what the fused backends' backward ops run (the Triton kernel on "triton").
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kadapt.ops._common import triton_kernels

# Kernel codes of the weight kinds (kadapt/ops/triton/fused_adapter.py uses the same numbers).
WEIGHT_KINDS = {"dense": 0, "phm": 1, "compacter": 2, "lowrank": 3}


class AdapterWeight(NamedTuple):
    """An in×out weight: ``kind`` in WEIGHT_KINDS and its factor tensors.

    dense [W (in, out)]; lowrank [l (in, r), r (r, out)] with W = l r;
    phm [A (n, n, n), B (n, in/n, out/n)] and compacter [A, s (n, in/n, r), t (n, r, out/n)] with
    W = Σ_i A_i ⊗ B_i, B_i = s_i t_i, block (c, a) of W being Σ_i A_i[c, a] B_i.
    """

    kind: str
    tensors: tuple[torch.Tensor, ...]

    @classmethod
    def dense(cls, w: torch.Tensor) -> "AdapterWeight":
        return cls("dense", (w,))

    @classmethod
    def lowrank(cls, left: torch.Tensor, right: torch.Tensor) -> "AdapterWeight":
        return cls("lowrank", (left, right))

    @classmethod
    def phm(cls, rule: torch.Tensor, b: torch.Tensor) -> "AdapterWeight":
        return cls("phm", (rule, b))

    @classmethod
    def compacter(cls, rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> "AdapterWeight":
        return cls("compacter", (rule, s, t))

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out)."""
        ts = self.tensors
        if self.kind == "dense":
            return tuple(ts[0].shape)
        if self.kind == "lowrank":
            return ts[0].shape[0], ts[1].shape[1]
        n = ts[0].shape[0]
        return n * ts[1].shape[1], n * ts[-1].shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a PHM rule A may be stored in another dtype and is cast)."""
        return self.tensors[-1].dtype

    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors that must share the activations' dtype (all but a PHM rule)."""
        return self.tensors[1:] if self.kind in ("phm", "compacter") else self.tensors

    def materialize(self) -> torch.Tensor:
        """The reference W (in, out), computed with PyTorch ops in the compute dtype."""
        ts = self.tensors
        if self.kind == "dense":
            return ts[0]
        if self.kind == "lowrank":
            return ts[0] @ ts[1]
        rule = ts[0]
        b = ts[1] if self.kind == "phm" else ts[1] @ ts[2]
        n, ki, ko = b.shape
        # (i, c, a) x (i, κ, p) -> (c, κ, a, p) -> (in, out)
        return torch.einsum("ica,ikp->ckap", rule.to(b.dtype), b).reshape(n * ki, n * ko)


_FACTOR_DIMS = {"dense": (2,), "lowrank": (2, 2), "phm": (3, 3), "compacter": (3, 3, 3)}  # dims of each factor


def as_weight(w: torch.Tensor | AdapterWeight, field: str) -> AdapterWeight:
    if isinstance(w, torch.Tensor):
        if w.dim() != 2:
            raise ValueError(f"{field} must be a 2-D (in, out) tensor or an AdapterWeight, got shape {tuple(w.shape)}")
        return AdapterWeight("dense", (w,))
    if isinstance(w, AdapterWeight):
        if w.kind not in WEIGHT_KINDS:
            raise ValueError(f"{field}.kind={w.kind!r} is not allowed; allowed values: {', '.join(WEIGHT_KINDS)}")
        dims = _FACTOR_DIMS[w.kind]
        if len(w.tensors) != len(dims):
            raise ValueError(f"{field}: a {w.kind} weight has {len(dims)} factor tensors, got {len(w.tensors)}")
        for j, (t, d) in enumerate(zip(w.tensors, dims)):
            if not isinstance(t, torch.Tensor) or t.dim() != d:
                raise ValueError(f"{field}.tensors[{j}] of a {w.kind} weight must be a {d}-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        _check_factor_shapes(w, field)
        return w
    raise TypeError(f"{field} must be a torch.Tensor or an AdapterWeight, got {type(w).__name__}")


def _check_factor_shapes(w: AdapterWeight, field: str) -> None:
    ts = w.tensors
    if w.kind == "lowrank" and ts[0].shape[1] != ts[1].shape[0]:
        raise ValueError(f"{field}: lowrank factors l {tuple(ts[0].shape)} and r {tuple(ts[1].shape)} differ in rank")
    if w.kind in ("phm", "compacter"):
        n = ts[0].shape[0]
        if tuple(ts[0].shape) != (n, n, n):
            raise ValueError(f"{field}: the PHM rule A must be (n, n, n), got {tuple(ts[0].shape)}")
        if any(t.shape[0] != n for t in ts[1:]):
            raise ValueError(f"{field}: every factor's first dim must be n={n}, got "
                             f"{[tuple(t.shape) for t in ts[1:]]}")
        if w.kind == "compacter" and ts[1].shape[2] != ts[2].shape[1]:
            raise ValueError(f"{field}: compacter factors s {tuple(ts[1].shape)} and t {tuple(ts[2].shape)} "
                             f"differ in rank")


def factor_grads(kind: str, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor],
                 d_w: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the factors from dL/dW (METHODS.md §12.3): dA_i[c,a] = ⟨dW_(c,a), B_i⟩,
    dB_i = Σ_{c,a} A_i[c,a] dW_(c,a), ds_i = dB_i t_iᵀ, dt_i = s_iᵀ dB_i; dl = dW rᵀ, dr = lᵀ dW."""
    if kind == "dense":
        return [d_w]
    if kind == "lowrank":
        left, right = tensors
        return [d_w @ right.t(), left.t() @ d_w]
    rule = tensors[0]
    b = tensors[1] if kind == "phm" else tensors[1] @ tensors[2]
    n, ki, ko = b.shape
    d_w4 = d_w.reshape(n, ki, n, ko)
    d_rule = torch.einsum("ckap,ikp->ica", d_w4, b).to(rule.dtype)
    d_b = torch.einsum("ica,ckap->ikp", rule.to(d_w.dtype), d_w4)
    if kind == "phm":
        return [d_rule, d_b]
    s, t = tensors[1], tensors[2]
    return [d_rule, d_b @ t.transpose(1, 2), s.transpose(1, 2) @ d_b]


def fused_factor_grads(kind: str | int, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor], d_w: torch.Tensor,
                       backend: str) -> list[torch.Tensor]:
    """``factor_grads`` as the fused backends compute it, in eager mode and under torch.compile alike
    (it runs inside their backward custom ops): on "triton" one launch of the Triton kernel for a PHM or
    Compacter weight (instead of ~8 small PyTorch kernels), else, and for shapes outside that kernel,
    the PyTorch formulas. Contiguous, each in its factor's dtype."""
    code = kind if isinstance(kind, int) else WEIGHT_KINDS[kind]
    if code == 0:
        return [d_w.contiguous()]
    if code == 3:  # GEMM outputs: contiguous
        return factor_grads("lowrank", tensors, d_w)
    if backend == "triton":
        grads = triton_kernels().kron_factor_grads(code, list(tensors), d_w)
        if grads is not None:  # None: a shape outside the kernel
            return grads
    return [g.contiguous() for g in factor_grads(_KIND_NAMES[code], tensors, d_w)]


_KIND_NAMES = {v: k for k, v in WEIGHT_KINDS.items()}
