"""Bottleneck-adapter family (docs/methods.md §3): Houlsby/Pfeiffer (dense), low-rank, PHM and
Compacter, with AdapterDrop through ``layers`` / ``drop_first``.

Every projection exposes ``factored()`` (its factors as a kadapt.ops.AdapterWeight), ``weight()``
(the materialised in×out matrix, reference) and ``bias``; the adapter feeds the factors to
``kadapt.ops.fused_adapter``, which picks the backend and never materialises W on the Triton path.
The family is described by data: one config class per member, one ``Method`` for all of them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kadapt.methods.base import (KadaptConfig, Method, check_bool, check_choice, check_int, check_positive,
                                 is_integral, register)
from kadapt.methods.common import compute_input, glorot_sqrt2_, kaiming_sqrt5_
from kadapt.ops import AdapterWeight, fused_adapter
from kadapt.ops.activations import ACTIVATION_CODES

if TYPE_CHECKING:
    from kadapt.patching.base import Backbone, Site
    from kadapt.patching.plan import Plan

ACTIVATIONS = tuple(ACTIVATION_CODES)  # one list: the ops' activation table
PLACEMENTS = ("attn", "ffn", "both")
ADAPTER_ATTR = "kadapt_adapter"
SHARED_RULE_ATTR = "kadapt_phm_rule"


MAX_BOTTLENECK_RATIO = 16  # m ≤ 16·D: wider "bottlenecks" are a typo (rf = 1e-300), not an adapter


def bottleneck_size(bottleneck_dim: int | None, reduction_factor: float, hidden_size: int) -> int:
    """m = bottleneck_dim, else int(D // rf) as upstream computes it; ValueError when m < 1 or m > 16·D."""
    limit = MAX_BOTTLENECK_RATIO * hidden_size
    if bottleneck_dim is not None:
        m = int(bottleneck_dim)
        if m > limit:
            raise ValueError(f"bottleneck_dim={bottleneck_dim!r} exceeds {MAX_BOTTLENECK_RATIO}x the hidden size "
                             f"{hidden_size}; allowed: 1 <= bottleneck_dim <= {limit}")
        return m
    ratio = hidden_size / reduction_factor
    if not ratio < limit + 1:  # also catches inf from a denormal rf
        raise ValueError(f"reduction_factor={reduction_factor!r} gives a bottleneck wider than {MAX_BOTTLENECK_RATIO}x "
                         f"the hidden size {hidden_size}; allowed: {1 / MAX_BOTTLENECK_RATIO:g} <= reduction_factor "
                         f"<= {hidden_size}")
    m = int(hidden_size // reduction_factor)
    if m < 1:
        raise ValueError(
            f"reduction_factor={reduction_factor!r} gives a bottleneck of {m} on hidden size "
            f"{hidden_size}; allowed: 0 < reduction_factor <= {hidden_size}"
        )
    return m


@dataclass
class BottleneckConfig(KadaptConfig):
    """Fields shared by the bottleneck-adapter family (docs/methods.md §3–4).

    Attributes:
        reduction_factor: m = int(D // reduction_factor); may be a float (the kernel-adapters presets
            use 7.11 → m = 108 on D = 768).
        bottleneck_dim: explicit m; overrides ``reduction_factor`` when set.
        activation: φ, one of ``ACTIVATIONS`` (gelu_new is the tanh-approximate GELU).
        placement: "attn" (sequential at ``attn_out``), "ffn" (at ``ffn_out``) or "both".
        layers: AdapterDrop. Block ids that get adapters: a list applied to every stack, or a dict
            from stack name ("encoder", "decoder") to a list. None = every block.
        drop_first: AdapterDrop shorthand: no adapters in blocks 0..drop_first-1 of each stack.
        ln_pre, ln_post: adapter-internal LayerNorms (off in every Compacter-paper config).
        unfreeze_layer_norms: train the backbone's LayerNorms (on for the whole Compacter family).
    """

    reduction_factor: float = 32
    bottleneck_dim: int | None = None
    activation: str = "gelu_new"
    placement: str = "both"
    layers: list[int] | dict[str, list[int]] | None = None
    drop_first: int = 0
    ln_pre: bool = False
    ln_post: bool = False
    unfreeze_layer_norms: bool = True

    def __post_init__(self) -> None:
        check_positive("reduction_factor", self.reduction_factor, " (m = int(D // reduction_factor))")
        if self.bottleneck_dim is not None:
            check_int("bottleneck_dim", self.bottleneck_dim, 1)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("placement", self.placement, PLACEMENTS)
        check_int("drop_first", self.drop_first, 0)
        for name in ("ln_pre", "ln_post", "unfreeze_layer_norms"):
            check_bool(name, getattr(self, name))
        if self.layers is not None:
            groups = self.layers.values() if isinstance(self.layers, dict) else [self.layers]
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple, dict)):
                raise ValueError(f"layers={self.layers!r} must be a list of block ids or a dict stack -> list")
            if isinstance(self.layers, dict) and not all(isinstance(k, str) for k in self.layers):
                raise ValueError(f"layers={self.layers!r}: dict keys must be stack names such as 'encoder' and "
                                 f"'decoder'")
            for ids in groups:
                if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, range)):
                    raise ValueError(f"layers={self.layers!r}: each entry must be a list of block ids")
                for i in ids:
                    if not is_integral(i) or i < 0:
                        raise ValueError(f"layers contains {i!r}; block ids must be integers >= 0")
            self.layers = ({k: list(v) for k, v in self.layers.items()} if isinstance(self.layers, dict)
                           else list(self.layers))
            if self.drop_first:
                raise ValueError(f"set either layers or drop_first, not both (layers={self.layers!r}, "
                             f"drop_first={self.drop_first})")

    def bottleneck_size(self, hidden_size: int) -> int:
        """m for a model of width D, as upstream computes it: int(D // rf)."""
        return bottleneck_size(self.bottleneck_dim, self.reduction_factor, hidden_size)


@dataclass
class AdapterConfig(BottleneckConfig):
    """Houlsby adapter: a(x) = φ(x W_d + b_d) W_u + b_u, dense weights, at ``attn_out`` and ``ffn_out``.

    ``init``: "normal" (W ~ N(0, 0.01²), biases 0: near identity) or "torch_default"
    (U(±1/√fan_in) for weights and biases, the kernel-adapters NLG presets).
    """

    method: ClassVar[str] = "adapter"
    init: str = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("init", self.init, ("normal", "torch_default"))


@dataclass
class PfeifferConfig(AdapterConfig):
    """Pfeiffer adapter: one adapter per block. Default at ``ffn_out`` (AdapterFusion placement);
    the Compacter paper's variant is ``placement="attn"`` (preset ``compacter_paper.pfeiffer``)."""

    method: ClassVar[str] = "pfeiffer"
    placement: str = "ffn"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("placement", self.placement, ("attn", "ffn"))


@dataclass
class LowRankAdapterConfig(BottleneckConfig):
    """Low-rank adapter: each projection is W = w_l w_r of rank ``rank`` plus a bias (glorot√2 init)."""

    method: ClassVar[str] = "low_rank_adapter"
    rank: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank, 1)


@dataclass
class PHMAdapterConfig(BottleneckConfig):
    """PHM adapter: W = Σ_i A_i ⊗ B_i with full B_i; each layer owns its rule A ~ N(0, 0.01²).

    ``phm_dim`` (n) must divide both D and m. ``learn_phm=False`` freezes the rules A.
    """

    method: ClassVar[str] = "phm_adapter"
    phm_dim: int = 12
    learn_phm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("phm_dim", self.phm_dim, 1)
        check_bool("learn_phm", self.learn_phm)


@dataclass
class CompacterConfig(BottleneckConfig):
    """Compacter (LPHM): B_i = s_i t_i of rank ``phm_rank``; one rule A shared by every PHM layer of
    the model (its gradient sums over all of them) when ``shared_phm_rule``.

    ``phm_c_init``: "normal" (A ~ N(0, phm_init_range²)) or "uniform" (U(-1, 1)).
    """

    method: ClassVar[str] = "compacter"
    phm_dim: int = 4
    phm_rank: int = 1
    phm_init_range: float = 1e-4
    phm_c_init: str = "normal"
    shared_phm_rule: bool = True
    learn_phm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("phm_dim", self.phm_dim, 1)
        check_int("phm_rank", self.phm_rank, 1)
        check_positive("phm_init_range", self.phm_init_range)
        check_choice("phm_c_init", self.phm_c_init, ("normal", "uniform"))
        check_bool("shared_phm_rule", self.shared_phm_rule)
        check_bool("learn_phm", self.learn_phm)


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: Compacter at ``ffn_out`` only."""

    method: ClassVar[str] = "compacter++"
    placement: str = "ffn"


def _empty(*shape: int, factory: dict) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, **factory))


class DenseProjection(nn.Module):
    """x W + b with W stored (in, out)."""

    def __init__(self, in_features: int, out_features: int, init: str, factory: dict):
        super().__init__()
        self.w = _empty(in_features, out_features, factory=factory)
        self.bias = _empty(out_features, factory=factory)
        if init == "normal":
            nn.init.normal_(self.w, 0.0, 0.01)
            nn.init.zeros_(self.bias)
        else:  # torch_default
            kaiming_sqrt5_(self.w, in_features)
            kaiming_sqrt5_(self.bias, in_features)

    def factored(self) -> AdapterWeight:
        return AdapterWeight.dense(self.w)

    def weight(self) -> torch.Tensor:
        return self.w


class LowRankProjection(nn.Module):
    """W = w_l w_r with w_l (in, r), w_r (r, out), plus a bias (any r ≥ 1; ledger #2)."""

    def __init__(self, in_features: int, out_features: int, rank: int, factory: dict):
        super().__init__()
        self.left = glorot_sqrt2_(_empty(in_features, rank, factory=factory))
        self.right = glorot_sqrt2_(_empty(rank, out_features, factory=factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))

    def factored(self) -> AdapterWeight:
        return AdapterWeight.lowrank(self.left, self.right)

    def weight(self) -> torch.Tensor:
        return self.factored().materialize()


class PHMRule(nn.Module):
    """The PHM rule tensor A ∈ R^{n×n×n}; one instance may be shared by every PHM layer."""

    def __init__(self, n: int, init: str, init_range: float, factory: dict, trainable: bool = True):
        super().__init__()
        self.weight = _empty(n, n, n, factory=factory)
        if init == "uniform":
            nn.init.uniform_(self.weight, -1.0, 1.0)
        else:
            nn.init.normal_(self.weight, 0.0, init_range)
        self.weight.requires_grad_(trainable)


class PHMProjection(nn.Module):
    """W = Σ_i A_i ⊗ B_i; B_i full (PHM) or s_i t_i of rank r (Compacter).

    Block convention: W[(c,κ),(a,p)] = Σ_i A_i[c,a] B_i[κ,p]. A shared rule is held by reference
    (not registered here) so the model owns it once and its gradient sums over every layer.
    """

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None, factory: dict,
                 rule: PHMRule | None = None, own_rule: PHMRule | None = None):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        ki, ko = in_features // n, out_features // n
        if own_rule is not None:
            self.rule = own_rule
        self._shared = [rule] if rule is not None else None  # unregistered: the model registers it once
        if rank is None:
            self.phm_b = glorot_sqrt2_(_empty(n, ki, ko, factory=factory))
        else:
            self.phm_s = glorot_sqrt2_(_empty(n, ki, rank, factory=factory))
            self.phm_t = glorot_sqrt2_(_empty(n, rank, ko, factory=factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))

    def rule_tensor(self) -> torch.Tensor:
        return self._shared[0].weight if self._shared is not None else self.rule.weight

    def factors(self) -> torch.Tensor:
        """B ∈ R^{n×(in/n)×(out/n)}."""
        return self.phm_b if hasattr(self, "phm_b") else self.phm_s @ self.phm_t

    def factored(self) -> AdapterWeight:
        if hasattr(self, "phm_b"):
            return AdapterWeight.phm(self.rule_tensor(), self.phm_b)
        return AdapterWeight.compacter(self.rule_tensor(), self.phm_s, self.phm_t)

    def weight(self) -> torch.Tensor:
        return self.factored().materialize()


class BottleneckAdapter(nn.Module):
    """f ← f + LN_post(a(LN_pre(f))), a(x) = φ(x W_d + b_d) W_u + b_u (residual un-normalised)."""

    def __init__(self, dim: int, bottleneck: int, act: str, down: nn.Module, up: nn.Module,
                 ln_pre: bool, ln_post: bool, factory: dict):
        super().__init__()
        self.dim, self.bottleneck, self.act = dim, bottleneck, act
        self.down, self.up = down, up
        self.ln_pre = nn.LayerNorm(dim, **factory) if ln_pre else None
        self.ln_post = nn.LayerNorm(dim, **factory) if ln_post else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        wd, bd, wu, bu = self.down.factored(), self.down.bias, self.up.factored(), self.up.bias
        g = compute_input(f, bd)
        if self.ln_pre is None and self.ln_post is None:
            out = fused_adapter(g, wd, bd, wu, bu, self.act, add_input=True)  # reads f once
        else:
            x = g if self.ln_pre is None else self.ln_pre(g)
            if self.ln_post is None:
                out = fused_adapter(x, wd, bd, wu, bu, self.act, residual=g)
            else:
                out = g + self.ln_post(fused_adapter(x, wd, bd, wu, bu, self.act))
        return out.to(f.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, act={self.act}"


def divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def validate_bottleneck(config: BottleneckConfig, dim: int) -> int:
    """Model-dependent checks; returns m. Raises ValueError naming the field."""
    m = config.bottleneck_size(dim)
    if isinstance(config, (PHMAdapterConfig, CompacterConfig)):
        n = config.phm_dim
        if dim % n or m % n:
            raise ValueError(
                f"phm_dim={n} must divide both the hidden size D={dim} and the bottleneck m={m}; "
                f"allowed phm_dim values here: {divisors(math.gcd(dim, m))}")
    return m


def compacter_rule(config: CompacterConfig, factory: dict) -> PHMRule:
    """A Compacter rule A: N(0, phm_init_range²) or U(-1, 1); one per model when shared."""
    return PHMRule(config.phm_dim, config.phm_c_init, config.phm_init_range, factory, config.learn_phm)


def build_adapter(config: BottleneckConfig, dim: int, m: int, factory: dict,
                  shared_rule: PHMRule | None = None) -> BottleneckAdapter:
    """One adapter of the family ``config`` for width ``dim`` and bottleneck ``m``, both already
    checked by validate_bottleneck."""

    def projection(i: int, o: int) -> nn.Module:
        if isinstance(config, AdapterConfig):
            return DenseProjection(i, o, config.init, factory)
        if isinstance(config, LowRankAdapterConfig):
            return LowRankProjection(i, o, config.rank, factory)
        if isinstance(config, CompacterConfig):
            own = None if shared_rule is not None else compacter_rule(config, factory)
            return PHMProjection(i, o, config.phm_dim, config.phm_rank, factory, rule=shared_rule, own_rule=own)
        if isinstance(config, PHMAdapterConfig):
            # Per-layer rule, std fixed at 0.01 upstream (phm_init_range does not reach it).
            own = PHMRule(config.phm_dim, "normal", 0.01, factory, config.learn_phm)
            return PHMProjection(i, o, config.phm_dim, None, factory, own_rule=own)
        raise TypeError(f"not a bottleneck config: {type(config).__name__}")

    return BottleneckAdapter(dim, m, config.activation, projection(dim, m), projection(m, dim),
                             config.ln_pre, config.ln_post, factory)


def selected_sites(config: BottleneckConfig, backbone: "Backbone") -> list["Site"]:
    """Sites for the configured placement and AdapterDrop layers; validates ``layers``."""
    stacks = backbone.stacks()
    kinds = ("attn", "ffn") if config.placement == "both" else (config.placement,)
    if config.layers is None:
        for name, n in stacks.items():
            if config.drop_first > n:
                raise ValueError(f"drop_first={config.drop_first} exceeds the {n} blocks of the {name} stack; "
                                 f"allowed: 0..{n}")
        chosen = {name: set(range(config.drop_first, n)) for name, n in stacks.items()}
    else:
        spec = config.layers if isinstance(config.layers, dict) else {name: config.layers for name in stacks}
        unknown = sorted(set(spec) - set(stacks), key=str)
        if unknown:
            raise ValueError(f"layers names unknown stack(s) {unknown}; this {backbone.family} model's stacks: "
                             f"{sorted(stacks)}")
        chosen = {}
        for name, ids in spec.items():
            bad = [i for i in ids if i >= stacks[name]]
            if bad:
                raise ValueError(f"layers: block id(s) {bad} out of range for the {name} stack; "
                                 f"allowed block ids: 0..{stacks[name] - 1}")
            chosen[name] = set(ids)
    return [s for s in backbone.adapter_sites() if s.kind in kinds and s.block in chosen.get(s.stack, ())]


def _adapter_hook(adapter: BottleneckAdapter, module: nn.Module, args, output):
    return adapter(output)


@register(AdapterConfig, PfeifferConfig, LowRankAdapterConfig, PHMAdapterConfig, CompacterConfig,
          CompacterPlusPlusConfig)
class BottleneckMethod(Method):
    """A sequential adapter at each selected ``attn_out`` / ``ffn_out`` site (f ← f + a(f)); the Compacter
    rule A is one module at the model root shared by every PHM layer; LayerNorms train when
    ``unfreeze_layer_norms``."""

    def plan(self, config: BottleneckConfig, plan: "Plan") -> None:
        backbone = plan.backbone
        dim = backbone.hidden_size
        m = validate_bottleneck(config, dim)
        sites = selected_sites(config, backbone)
        shared = None
        if isinstance(config, CompacterConfig) and config.shared_phm_rule and sites:
            shared = compacter_rule(config, plan.factory(sites[0].ref_weight))
            plan.add_module(plan.model, SHARED_RULE_ATTR, shared)
        for site in sites:
            adapter = build_adapter(config, dim, m, plan.factory(site.ref_weight), shared)
            plan.add_module(site.target, ADAPTER_ATTR, adapter)
            plan.forward_hook(site.target, functools.partial(_adapter_hook, adapter))
        if config.unfreeze_layer_norms:
            plan.train(p for norm in backbone.norms() for p in norm.parameters())
