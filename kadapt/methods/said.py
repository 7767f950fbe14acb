"""Intrinsic-SAID and DID (docs/methods.md, METHODS.md §4 and ledger #3–#6): every deduplicated parameter
tensor θ_i of the model (a tied weight once) becomes

    θ_i = θ_{i,0} + λ_i P_i z        (DID, ``said=False``: θ_i = θ_{i,0} + P_i z)

with z ∈ R^{d_z} (zero at init) and λ ∈ R^{K+1} (one at init; its last entry unused, so that SAID trains
exactly ``intrinsic_dim`` numbers) the only trainable tensors, and P_i the Fastfood projection of
kadapt/ops/fastfood.py. The frozen originals are θ_0 (no copy).

How the forward sees θ. θ is computed once per change of z or λ (an optimizer step — a global optimizer
post-step hook marks it stale, as fused optimizers bypass version counters —, a load, an in-place edit) into one cache
tensor per θ_i (in θ_{i,0}'s dtype, computed in fp32 or wider) — never per forward, so evaluation and
generation cost nothing extra. Each module owning a θ_i reads it through a pre-hook that puts the cached
tensor in its parameter slot for the duration of its own forward (the slot holds θ_{i,0} again afterwards,
so the state dict, ``unpatch`` and ``save_pretrained`` see the original model). Gradient checkpointing
re-runs those hooks, so recomputed layers read θ too.

Gradients. With grad enabled, the model's forward first routes the cached tensors through one autograd node
(``_ThetaBridge``) whose backward receives every γ_i = ∂L/∂θ_i at once and returns the exact
∂z = Σ_i λ_i P_iᵀ γ_i and ∂λ_i = ⟨γ_i, P_i z⟩ through the Fastfood op's own autograd (one forward and one
transpose transform per backward). z and λ thus get ordinary ``.grad`` through autograd (gradient
accumulation, clipping, DDP all see them). With reentrant gradient checkpointing the node runs once per
checkpointed segment (correct, but one transform pair each).
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import KadaptConfig, Method, check_bool, check_int, is_integral, register
from kadapt.methods.common import accumulation_dtype
from kadapt.ops.fastfood import FastfoodPlan, _check_sizes, fastfood, fastfood_plan

if TYPE_CHECKING:
    from kadapt.patching.plan import Plan

SAID_ATTR = "kadapt_said"

# Every live SAID module, for the optimizer hook below. Fused optimizers (torch's ``fused=True`` AdamW, HF
# Trainer's default ``adamw_torch_fused``) update parameters without bumping their version counters, so the
# version check alone would miss their steps.
_LIVE: "weakref.WeakSet[IntrinsicSAID]" = weakref.WeakSet()
_HOOK = None


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Global post-step hook of every torch optimizer: θ of a SAID module whose z or λ it holds is stale."""
    if not _LIVE:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for said in list(_LIVE):
        if id(said.z) in held or (said.lam is not None and id(said.lam) in held):
            said.mark_stale()


def _install_hook() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


@dataclass
class IntrinsicSAIDConfig(KadaptConfig):
    """Intrinsic-SAID (``said=True``) or DID (``said=False``) with ``intrinsic_dim`` trainable numbers.

    ``seed`` keys the Fastfood draws (signs, Gaussians, permutations), regenerated on the fly.
    Parity flags (METHODS.md §11): ``compat_said_grad_scale`` scales tensor i's share of ∂z by 1/L_i (#3);
    ``compat_said_crop`` pads to L_i = 2^⌈log₂N_i⌉, so smaller tensors see only z[:L_i] (#4);
    ``compat_said_untied_lm_head`` leaves a tied LM head at θ_0 (#5).
    """

    method: ClassVar[str] = "intrinsic_said"
    intrinsic_dim: int = 20000
    said: bool = True
    seed: int = 0
    compat_said_grad_scale: bool = False
    compat_said_crop: bool = False
    compat_said_untied_lm_head: bool = False

    def __post_init__(self) -> None:
        check_int("intrinsic_dim", self.intrinsic_dim, 1)
        check_bool("said", self.said)
        if not is_integral(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2^63)")
        for name in ("compat_said_grad_scale", "compat_said_crop", "compat_said_untied_lm_head"):
            check_bool(name, getattr(self, name))


class _ThetaBridge(torch.autograd.Function):
    """Hands out the cached θ_i (as views) and turns their gradients into ∂z and ∂λ (module docstring)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, lam: torch.Tensor | None, said: "IntrinsicSAID"):
        ctx.said = weakref.ref(said)  # no cycle said -> current -> grad_fn -> said (it would outlive `del model`)
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in said.cache)

    @staticmethod
    def backward(ctx, *grads):
        said = ctx.said()
        if said is None:
            raise RuntimeError("Intrinsic-SAID: the model this graph was built from no longer exists")
        return (*said.project_gradients(grads), None)


class IntrinsicSAID(nn.Module):
    """z, λ and the Fastfood plan of the K tensors θ_{i,0} (kept by reference, not registered here)."""

    def __init__(self, originals: list[nn.Parameter], config: IntrinsicSAIDConfig, d_z: int,
                 lengths: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(d_z, dtype=dtype, device=device))
        self.lam = nn.Parameter(torch.ones(len(originals) + 1, dtype=dtype, device=device)) if config.said else None
        self.seed, self.lengths = int(config.seed), lengths
        self.grad_scale_compat = config.compat_said_grad_scale
        self.originals = originals            # θ_{i,0}: the model's own frozen parameters (a plain list)
        self.sizes = tuple(p.numel() for p in originals)
        self.cache: list[torch.Tensor] = []   # θ_i, one tensor per original
        self.current: tuple[torch.Tensor, ...] | None = None  # what the owners read in this forward
        self._current_has_graph = False
        self._stamp: tuple | None = None
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = []  # (owner, name, θ_{i,0}) for every swap
        self._init_runtime()

    def _init_runtime(self) -> None:
        """State that is never copied: the owners' lock (one thread inside the owners at a time, since a swap
        is visible to every thread), the per-thread swap depth, the registration for the optimizer hook."""
        self._lock = threading.RLock()
        self._local = threading.local()
        _LIVE.add(self)
        _install_hook()

    def __getstate__(self) -> dict:
        """deepcopy / pickle: no lock, no forward state, no cache (recomputed on first use)."""
        state = self.__dict__.copy()
        for name in ("_lock", "_local"):
            state.pop(name, None)
        state.update(current=None, _current_has_graph=False, cache=[], _stamp=None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_runtime()

    # ------------------------------------------------------------------------------ the owners' slots

    def enter(self, module: nn.Module, slots: tuple[tuple[str, int], ...]) -> None:
        """Before an owner's forward: θ in its parameter slots (under the lock, released by ``leave``)."""
        self._lock.acquire()
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            self.ensure()
            for name, i in slots:
                module._parameters[name] = self.current[i]
        except BaseException:
            self.leave(module, ())
            raise

    def leave(self, module: nn.Module, slots: tuple[tuple[str, int, nn.Parameter], ...]) -> None:
        for name, _, original in slots:
            module._parameters[name] = original
        self._local.depth -= 1
        self._lock.release()

    def restore_slots(self) -> None:
        """θ_{i,0} back in every slot and the lock released, after a forward interrupted by a BaseException
        (KeyboardInterrupt) that skipped the owners' post-hooks; run at the next forward and by unpatch/merge."""
        for module, name, original in self.slots:
            module._parameters[name] = original
        depth = getattr(self._local, "depth", 0)
        self._local.depth = 0
        for _ in range(depth):
            self._lock.release()

    def extra_repr(self) -> str:
        lam = f", λ: {self.lam.numel()}" if self.lam is not None else " (DID)"
        return f"z: {self.z.numel()}{lam}, tensors: {len(self.originals)}, elements: {sum(self.sizes)}"

    def mark_stale(self) -> None:
        """z or λ changed behind autograd's version counters (a fused optimizer step): recompute θ at the
        next forward."""
        self._stamp = None

    # -------------------------------------------------------------------------------- the transform

    def plan(self) -> FastfoodPlan:
        """The Fastfood plan (σ_i drawn once, on the parameters' device; cached by the op per key)."""
        return fastfood_plan(self.sizes, self.seed, self.z.numel(), self.lengths, device=self.z.device)

    def _projection(self, z: torch.Tensor) -> torch.Tensor:
        return fastfood(z, plan=self.plan(), grad_scale_compat=self.grad_scale_compat)

    def _versions(self) -> tuple:
        lam = self.lam
        return (self.z._version, self.z.data_ptr(), None if lam is None else (lam._version, lam.data_ptr()))

    def _full_stamp(self) -> tuple:
        return self._versions(), tuple((p.data_ptr(), p._version, p.dtype) for p in self.originals)

    @torch.inference_mode(False)  # a first forward under inference_mode must not make the cache inference tensors
    @torch.no_grad()
    def recompute(self) -> None:
        """θ_i = θ_{i,0} + λ_i P_i z into the cache (in the wider of fp32 and θ_{i,0}'s dtype, stored in the
        latter)."""
        v = self._projection(self.z.detach())
        offsets = self.plan().out_offsets
        cache = []
        for i, p in enumerate(self.originals):
            old = self.cache[i] if i < len(self.cache) else None
            out = old if old is not None and old.shape == p.shape and old.dtype == p.dtype \
                and old.device == p.device else torch.empty_like(p, memory_format=torch.contiguous_format)
            acc = accumulation_dtype(p.dtype)
            delta = v[offsets[i]:offsets[i + 1]].view(p.shape).to(device=p.device, dtype=acc)
            if self.lam is not None:
                delta = delta * self.lam[i].to(acc)
            out.copy_(p.detach().to(acc) + delta)
            cache.append(out)
        self.cache = cache
        self._stamp = self._full_stamp()
        self.current, self._current_has_graph = None, False

    def project_gradients(self, grads) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(∂z, ∂λ) for the gradients γ_i of the cached θ_i (None: not used in this graph): ∂λ_i = ⟨γ_i, P_i z⟩
        from one forward transform, ∂z = Σ_i P_iᵀ(λ_i γ_i) from the op's exact backward. Temporaries: P z and
        the flat γ (ΣN_i each), scaled in place."""
        z, lam = self.z, self.lam
        gamma = torch.cat([(g if g is not None else torch.zeros(p.shape, device=z.device)).reshape(-1)
                           .to(device=z.device, dtype=z.dtype) for g, p in zip(grads, self.originals)])
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(True)
            v = self._projection(z_)
            dlam = None
            if lam is not None:
                offsets = self.plan().out_offsets
                with torch.no_grad():
                    dots = [torch.dot(gamma[a:b], v[a:b].to(gamma.dtype)) for a, b in zip(offsets, offsets[1:])]
                    dlam = torch.cat([torch.stack(dots), torch.zeros(1, dtype=lam.dtype, device=lam.device)])
                    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
                        gamma[a:b].mul_(lam[i])
            dz = torch.autograd.grad(v, z_, gamma.to(v.dtype))[0]
        return dz, dlam

    # ---------------------------------------------------------------------------------- the forward

    def prepare(self, check_originals: bool = True) -> None:
        """Make ``current`` what this forward's modules read: θ fresh (recomputed when z, λ or θ_0 changed),
        through the gradient node when grad is enabled and z trains."""
        stale = self._stamp is None or (self._full_stamp() if check_originals else
                                        (self._versions(), self._stamp[1])) != self._stamp
        if stale:
            self.recompute()
        needs_graph = torch.is_grad_enabled() and self.z.requires_grad
        if needs_graph:
            self.current, self._current_has_graph = _ThetaBridge.apply(self.z, self.lam, self), True
        elif self.current is None or stale or self._current_has_graph:
            self.current, self._current_has_graph = tuple(self.cache), False

    def ensure(self) -> None:
        """Cheap check for a module called outside the model's forward (T5's encoder in ``generate``)."""
        if self.current is None or self._stamp is None or self._versions() != self._stamp[0] \
                or (not self._current_has_graph and torch.is_grad_enabled() and self.z.requires_grad):
            self.prepare(check_originals=False)

    def theta(self) -> list[torch.Tensor]:
        """The current θ_i (fresh), e.g. for inspection or a merge."""
        if self._stamp is None or self._full_stamp() != self._stamp:
            self.recompute()
        return list(self.cache)


# --------------------------------------------------------------------------------------------- hooks

def _model_pre_hook(said: IntrinsicSAID, module, args) -> None:
    if getattr(said._local, "depth", 0):  # this thread's last forward was interrupted inside an owner
        said.restore_slots()
    said.prepare()


def _model_post_hook(said: IntrinsicSAID, module, args, output) -> None:
    said.current, said._current_has_graph = None, False  # the next forward (or a recompute) builds its own


def _owner_pre_hook(said: IntrinsicSAID, slots: tuple[tuple[str, int], ...], module, args) -> None:
    said.enter(module, slots)


def _owner_post_hook(said: IntrinsicSAID, slots: tuple[tuple[str, int, nn.Parameter], ...], module, args,
                     output) -> None:
    said.leave(module, slots)


def said_step(model: nn.Module) -> None:
    """Recompute θ now from the current z and λ (otherwise done at the first forward after they change)."""
    said = getattr(model, SAID_ATTR, None)
    if not isinstance(said, IntrinsicSAID):
        raise ValueError("model is not patched with IntrinsicSAIDConfig (no kadapt_said module)")
    said.recompute()


@register(IntrinsicSAIDConfig)
class IntrinsicSAIDMethod(Method):
    mergeable = True
    exclusive = True  # trains every tensor of the model through z and λ: composes with nothing

    def plan(self, config: IntrinsicSAIDConfig, plan: "Plan") -> None:
        model = plan.model
        originals = list(dict.fromkeys(model.parameters()))
        K = len(originals)
        dim, seed = int(config.intrinsic_dim), int(config.seed)  # numpy integers allowed in the config
        d_z = dim - (K + 1) if config.said else dim
        if d_z < 1:
            raise ValueError(f"intrinsic_dim={config.intrinsic_dim} is too small for SAID on this model: it has K={K} "
                             f"parameter tensors and SAID trains λ (K + 1 = {K + 1}) plus z; use intrinsic_dim >= "
                             f"{K + 2}, or said=False (DID)")
        sizes = tuple(p.numel() for p in originals)
        lengths = tuple(1 << max(0, (n - 1).bit_length()) for n in sizes) if config.compat_said_crop else None
        _check_sizes(sizes, d_z, lengths, seed)  # refuse oversize tensors before touching the model
        ref = originals[0]
        dtype = torch.promote_types(ref.dtype if ref.dtype.is_floating_point else torch.float32, torch.float32)
        said = IntrinsicSAID(originals, config, d_z, lengths, dtype, ref.device)
        plan.add_module(model, SAID_ATTR, said)
        plan.forward_pre_hook(model, functools.partial(_model_pre_hook, said))
        plan.forward_hook(model, functools.partial(_model_post_hook, said), always_call=True)

        index = {id(p): i for i, p in enumerate(originals)}
        skip = set()
        if config.compat_said_untied_lm_head:
            head, embed = model.get_output_embeddings(), model.get_input_embeddings()
            if head is not None and embed is not None and head.weight is embed.weight:
                skip.add(id(head))  # ledger #5: the tied LM head keeps θ_0
        for module in model.modules():
            if id(module) in skip:
                continue
            slots = tuple((name, index[id(p)], p) for name, p in module._parameters.items()
                          if p is not None and id(p) in index)
            if not slots:
                continue
            said.slots += [(module, name, p) for name, _, p in slots]
            plan.forward_pre_hook(module, functools.partial(_owner_pre_hook, said, tuple(s[:2] for s in slots)))
            plan.forward_hook(module, functools.partial(_owner_post_hook, said, slots), always_call=True)
        plan.on_restore(said.restore_slots)
        plan.on_merge(functools.partial(_merge, said, config))
        plan.on_save_state(functools.partial(_identity, said, model), functools.partial(_check_identity, said))


@torch.no_grad()
def _merge(said: IntrinsicSAID, config: IntrinsicSAIDConfig) -> list[nn.Module]:
    if config.compat_said_untied_lm_head:
        raise ValueError("compat_said_untied_lm_head=True: the embedding and the tied LM head hold different values "
                         "(θ and θ_0), which one tied tensor cannot store; merge is refused (save the adapter instead)")
    for p, theta in zip(said.originals, said.theta()):
        p.copy_(theta)
    return []


# ------------------------------------------------------------------------- the base model's identity

def fingerprint(said: IntrinsicSAID) -> list[list[float]]:
    """Per θ_{i,0}: its size, and the sum and sum of squares of its values (fp64)."""
    out = []
    with torch.no_grad():
        for p in said.originals:
            x = p.detach().to(torch.float64)
            out.append([float(p.numel()), float(x.sum()), float(x.square().sum())])
    return out


def _identity(said: IntrinsicSAID, model: nn.Module) -> dict:
    """What the adapter file records of the base model: z and λ only make sense on the same θ_0."""
    return {"name_or_path": getattr(model.config, "_name_or_path", "") or "", "tensors": len(said.originals),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in said.originals}),
            "fingerprint": fingerprint(said)}


def _same_values(saved: list, live: list) -> bool:
    """Same size, and sums within what rounding the base to another dtype (bf16: 2⁻⁹ relative per element)
    moves them: |Δ Σx²| ≤ 2 % of Σx², |Δ Σx| ≤ 5 % of √Σx² (√Σx² bounds the spread of a sum of rounding
    errors); other weights of the same shapes miss by far more."""
    n, s, q = (float(v) for v in saved)
    n2, s2, q2 = live
    return n == n2 and abs(q - q2) <= 0.02 * q + 1e-12 and abs(s - s2) <= 0.05 * math.sqrt(q) + 1e-12


def _check_identity(said: IntrinsicSAID, saved: dict | None) -> None:
    lacks = ("the Intrinsic-SAID adapter lacks the base model's identity (method_state.fingerprint); the file is "
             "truncated or was not written by kadapt.save_adapter")
    if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), list):
        raise ValueError(lacks)
    live, theirs = fingerprint(said), saved["fingerprint"]
    name = saved.get("name_or_path") or "an unnamed model"
    if len(theirs) != len(live):
        raise ValueError(f"the Intrinsic-SAID adapter was trained on a base model with {len(theirs)} parameter "
                         f"tensors ({name}); this model has {len(live)}: z and λ only apply to the same base model")
    for i, (a, b) in enumerate(zip(theirs, live)):
        try:
            same = _same_values(a, b)
        except (TypeError, ValueError):
            raise ValueError(f"{lacks} (entry #{i} is {a!r})") from None
        if not same:
            raise ValueError(f"the Intrinsic-SAID adapter was trained on other base weights ({name}): parameter tensor "
                             f"#{i} differs (size/sum/sum of squares {a} saved, {b} here); z and λ only apply to the "
                             f"same base model")
