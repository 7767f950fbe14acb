"""Bottleneck-adapter family (METHODS.md §2): Houlsby/Pfeiffer (dense), low-rank, PHM and Compacter.

Every projection exposes ``factored()`` (its factors as a kadapt.ops.AdapterWeight), ``weight()``
(the materialised in×out matrix, reference) and ``bias``; the adapter feeds the factors to
``kadapt.ops.fused_adapter``, which picks the backend and never materialises W on the Triton path.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kadapt.configs import AdapterConfig, BottleneckConfig, CompacterConfig, LowRankAdapterConfig, PHMAdapterConfig
from kadapt.ops import AdapterWeight, fused_adapter


def glorot_sqrt2_(t: torch.Tensor) -> torch.Tensor:
    """`glorot√2`: U(±√2·√(6/(fan_in + fan_out))) on each trailing 2-D slice."""
    fan_in, fan_out = t.shape[-2], t.shape[-1]
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(t, -bound, bound)


def kaiming_sqrt5_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """`kaiming√5` (torch's Linear default): U(±1/√fan_in), fan_in being the map's input width."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


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
        if self.ln_pre is None and self.ln_post is None:
            return fused_adapter(f, wd, bd, wu, bu, self.act, add_input=True)  # reads f once
        x = f if self.ln_pre is None else self.ln_pre(f)
        if self.ln_post is None:
            return fused_adapter(x, wd, bd, wu, bu, self.act, residual=f)
        return f + self.ln_post(fused_adapter(x, wd, bd, wu, bu, self.act))

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
