"""One dataclass per method. Field checks that need no model run in ``__post_init__``; checks that
need the model (n dividing D and m, layer ids in range) run in ``kadapt.patch`` before anything is
changed. Every error is a ``ValueError`` naming the field and the allowed values.

The math, defaults and parameter counts behind each field are in METHODS.md §1–§3.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from kadapt.ops.activations import ACTIVATION_CODES

ACTIVATIONS = tuple(ACTIVATION_CODES)  # one list: the ops' activation table
PLACEMENTS = ("attn", "ffn", "both")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a bool (True or False)")


def _check_positive(name: str, value: Any, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0{hint}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


@dataclass
class KadaptConfig:
    """Base of every method config. ``method`` is the registry name used in saved adapters."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Field checks; subclasses extend. ``patch`` calls it again to catch later edits."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "KadaptConfig":
        """Rebuild a config from ``to_dict`` output; unknown methods or fields raise ValueError."""
        if not isinstance(data, dict) or "method" not in data:
            raise ValueError("config must be a dict with a 'method' key")
        data = dict(data)
        method = data.pop("method")
        _check_choice("method", method, tuple(sorted(METHODS)))
        cls = METHODS[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for method {method!r}; allowed fields: {sorted(names)}")
        return cls(**data)


def bottleneck_size(bottleneck_dim: int | None, reduction_factor: float, hidden_size: int) -> int:
    """m = bottleneck_dim, else int(D // rf) as upstream computes it; ValueError when m < 1."""
    m = bottleneck_dim if bottleneck_dim is not None else int(hidden_size // reduction_factor)
    if m < 1:
        raise ValueError(
            f"reduction_factor={reduction_factor!r} gives a bottleneck of {m} on hidden size "
            f"{hidden_size}; allowed: 0 < reduction_factor <= {hidden_size}"
        )
    return m


@dataclass
class BottleneckConfig(KadaptConfig):
    """Fields shared by the bottleneck-adapter family (§2).

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
        _check_positive("reduction_factor", self.reduction_factor, " (m = int(D // reduction_factor))")
        if self.bottleneck_dim is not None:
            _check_int("bottleneck_dim", self.bottleneck_dim, 1)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_int("drop_first", self.drop_first, 0)
        for name in ("ln_pre", "ln_post", "unfreeze_layer_norms"):
            _check_bool(name, getattr(self, name))
        if self.layers is not None:
            groups = self.layers.values() if isinstance(self.layers, dict) else [self.layers]
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, (list, tuple, dict)):
                raise ValueError(f"layers={self.layers!r} must be a list of block ids or a dict stack -> list")
            for ids in groups:
                if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, range)):
                    raise ValueError(f"layers={self.layers!r}: each entry must be a list of block ids")
                for i in ids:
                    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
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
        _check_choice("init", self.init, ("normal", "torch_default"))


@dataclass
class PfeifferConfig(AdapterConfig):
    """Pfeiffer adapter: one adapter per block. Default at ``ffn_out`` (AdapterFusion placement);
    the Compacter paper's variant is ``placement="attn"`` (preset ``compacter_paper.pfeiffer``)."""

    method: ClassVar[str] = "pfeiffer"
    placement: str = "ffn"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("placement", self.placement, ("attn", "ffn"))


@dataclass
class LowRankAdapterConfig(BottleneckConfig):
    """Low-rank adapter: each projection is W = w_l w_r of rank ``rank`` plus a bias (glorot√2 init)."""

    method: ClassVar[str] = "low_rank_adapter"
    rank: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("rank", self.rank, 1)


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
        _check_int("phm_dim", self.phm_dim, 1)
        _check_bool("learn_phm", self.learn_phm)


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
        _check_int("phm_dim", self.phm_dim, 1)
        _check_int("phm_rank", self.phm_rank, 1)
        _check_positive("phm_init_range", self.phm_init_range)
        _check_choice("phm_c_init", self.phm_c_init, ("normal", "uniform"))
        _check_bool("shared_phm_rule", self.shared_phm_rule)
        _check_bool("learn_phm", self.learn_phm)


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: Compacter at ``ffn_out`` only."""

    method: ClassVar[str] = "compacter++"
    placement: str = "ffn"


@dataclass
class BitFitConfig(KadaptConfig):
    """BitFit. GPT-2 / RoBERTa / BERT: train the existing biases. T5: add zero biases to q/k/v/o,
    wi/wo, every LayerNorm and the LM head, and train only those.

    ``compat_bitfit_skip_final_ln``: give the two final T5 LayerNorms no bias (upstream parity: 280,932
    on T5-base instead of 282,468).
    """

    method: ClassVar[str] = "bitfit"
    compat_bitfit_skip_final_ln: bool = False

    def __post_init__(self) -> None:
        _check_bool("compat_bitfit_skip_final_ln", self.compat_bitfit_skip_final_ln)


@dataclass
class FullFinetuneConfig(KadaptConfig):
    """Full fine-tuning: every parameter trains (the baseline)."""

    method: ClassVar[str] = "full_finetune"


LORA_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


def _check_dropout(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1)")


@dataclass
class LoRAConfig(KadaptConfig):
    """Plain LoRA (METHODS.md §6): y ← y + s·(Drop_p(x) A B + b_L), s = alpha / r.

    ``targets``: any of ``LORA_TARGETS``. "q"/"k"/"v" are the query/key/value projections (on GPT-2
    the column slices [0:D], [D:2D], [2D:3D] of the fused ``c_attn``), "o" the attention output
    projection, "ffn_in"/"ffn_out" the two FFN linears; on T5 every attention module (encoder self,
    decoder self and cross) is targeted. ``lora_bias`` adds b_L (zero at init, scaled by s).
    ``init``: "lora" (A kaiming√5, B = 0, output unchanged at init), "houlsby" (A, B, b_L tn01) or
    "bert" (N(0, 0.02²)). Foldable into the weights with ``kadapt.merge``.
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    lora_bias: bool = False
    init: str = "lora"

    def __post_init__(self) -> None:
        _check_int("r", self.r, 1)
        _check_positive("alpha", self.alpha, " (s = alpha / r)")
        _check_dropout("dropout", self.dropout)
        if isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"targets={self.targets!r} must be a non-empty list of target names; allowed values: "
                             f"{', '.join(map(repr, LORA_TARGETS))}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"targets contains {t!r}; allowed values: {', '.join(map(repr, LORA_TARGETS))}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets={self.targets!r} names a target twice; allowed values: "
                             f"{', '.join(map(repr, LORA_TARGETS))}, each at most once")
        self.targets = tuple(self.targets)  # JSON round trips give a list
        _check_bool("lora_bias", self.lora_bias)
        _check_choice("init", self.init, ("lora", "houlsby", "bert"))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class ParallelAdapterConfig(KadaptConfig):
    """Parallel adapter (He et al.; METHODS.md §7): f ← f + s·(φ(LN_pre(x) W_d + b_d) W_u + b_u), x the
    sub-layer input (``ffn_in``, or ``attn_in`` for placement "attn"), added at ``ffn_out`` / ``attn_out``
    (GPT-2, T5: before the sub-layer dropout; RoBERTa/BERT: after it, before the residual LayerNorm).
    Never on T5 cross-attention.

    ``reduction_factor`` (m = int(D // rf)) or ``bottleneck_dim``; ``scale`` s (``learnable_scale``: s
    is a trained scalar initialised to ``scale``); ``init`` "lora" (W_d kaiming√5, W_u = 0, biases 0:
    output unchanged at init) or "torch_default"; ``dropout`` on the bottleneck activation.
    """

    method: ClassVar[str] = "parallel_adapter"
    bottleneck_dim: int | None = None
    reduction_factor: float = 32
    scale: float = 2.0
    learnable_scale: bool = False
    ln_pre: bool = False
    activation: str = "relu"
    init: str = "lora"
    placement: str = "ffn"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.bottleneck_dim is not None:
            _check_int("bottleneck_dim", self.bottleneck_dim, 1)
        _check_positive("reduction_factor", self.reduction_factor, " (m = int(D // reduction_factor))")
        _check_positive("scale", self.scale)
        _check_bool("learnable_scale", self.learnable_scale)
        _check_bool("ln_pre", self.ln_pre)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("init", self.init, ("lora", "torch_default"))
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_dropout("dropout", self.dropout)

    def bottleneck_size(self, hidden_size: int) -> int:
        """m for a model of width D, as upstream computes it: int(D // rf)."""
        return bottleneck_size(self.bottleneck_dim, self.reduction_factor, hidden_size)


@dataclass
class KernelMixConfig(KadaptConfig):
    """Kernel-mix (METHODS.md §6; arXiv 2205.03720): head-wise and shared LoRA on Q, V and O of every
    self-attention layer (T5: encoder self and decoder self; cross-attention with ``cross_attention=True``).

    Q: ΔQ_h = δ(X) A^Q_h B^Q_h + b^Q_h (rank ``r_q``) and ΔQ += δ(X) A^Qs B^Qs (rank ``r_qs``).
    V: ΔV_h = δ(K_h) A^V_h B^V_h + b^V_h, K_h head h's projected key (rank ``r_v``), and ΔV += δ(X) A^Vs B^Vs
    (rank ``r_vs``). O (input o = merged heads): ΔO = Σ_h δ(o^h) A^O_h B^O_[h] + b^O (rank ``r_v``) and
    ΔO += δ(o) A^Os B^Os (rank ``r_vs``), added at ``attn_out`` before the sub-layer dropout.
    Head-wise terms (biases included) are scaled by ``scale_head``, shared ones by ``scale_shared``.
    A rank of 0 disables its part. ``dropout`` p: an independent mask per part on each base input.
    ``init``: "houlsby" (every A, B, b tn01) or "lora" (A kaiming√5, B and b zero: output unchanged at
    init). Defaults: the GPT-2 NLG ``kernel-mix`` preset ranks (§9). Foldable with ``kadapt.merge``.
    """

    method: ClassVar[str] = "kernel_mix"
    r_q: int = 3
    r_qs: int = 12
    r_v: int = 8
    r_vs: int = 8
    scale_head: float = 1.0
    scale_shared: float = 1.0
    dropout: float = 0.1
    init: str = "houlsby"
    cross_attention: bool = False

    def __post_init__(self) -> None:
        for name in ("r_q", "r_qs", "r_v", "r_vs"):
            _check_int(name, getattr(self, name), 0)
        if not any((self.r_q, self.r_qs, self.r_v, self.r_vs)):
            raise ValueError("r_q, r_qs, r_v, r_vs are all 0: nothing would train; at least one rank must be >= 1")
        _check_positive("scale_head", self.scale_head)
        _check_positive("scale_shared", self.scale_shared)
        _check_dropout("dropout", self.dropout)
        _check_choice("init", self.init, ("houlsby", "lora"))
        _check_bool("cross_attention", self.cross_attention)


def _sub_config(name: str, value: Any, cls: type[KadaptConfig], optional: bool) -> Any:
    """A nested method config given as an instance or as its ``to_dict`` output (JSON round trips)."""
    if value is None and optional:
        return None
    if isinstance(value, dict):
        data = dict(value)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{name}: expected a {cls.__name__} (method {cls.method!r}), got method {method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {unknown} for {cls.__name__}; allowed fields: {sorted(names)}")
        return cls(**data)
    if not isinstance(value, cls):
        allowed = f"a {cls.__name__}" + (" or None" if optional else "")
        raise ValueError(f"{name}={value!r} must be {allowed}")
    value.__post_init__()
    return value


@dataclass
class PrefixTuningConfig(KadaptConfig):
    """Prefix tuning (Li & Liang; He et al.; METHODS.md §7): every self-attention layer attends to
    ``prefix_length`` (P) extra keys and values in front of its own, [K_P; K] and [V_P; V].

    With ``reparameterize`` (the default) the prefixes are M = tanh(E W_1 + b_1) W_2 + b_2, E ∈ R^{P×D},
    W_1 ∈ R^{D×m_p} (m_p = ``hidden_size``), W_2 ∈ R^{m_p×2N_bD}, one MLP per prefix set; ``kadapt.eject``
    caches M and drops the MLP (2·N_b·P·D parameters remain). ``reparameterize=False`` trains K_P, V_P
    directly (initialised from a freshly drawn MLP). Prefix columns are visible to every query (no causal or
    padding mask), get no position embedding and zero T5 relative bias; nothing is stored in the KV cache.
    T5: one set each for encoder self-, decoder self- and (``cross_attention``, default on) cross-attention.
    Defaults P = 30, m_p = 512 (generic); preset ``he2022_mam_roberta`` uses P = 16, m_p = 800.
    ``compat_prefix_shift_positions`` (GPT-2 only; METHODS.md §11 quirk 17): real-token positions start at
    P, as when the prefix is fed through ``past_key_values`` (PEFT); needed for exact PEFT export.
    """

    method: ClassVar[str] = "prefix_tuning"
    prefix_length: int = 30
    hidden_size: int = 512
    reparameterize: bool = True
    cross_attention: bool = True
    compat_prefix_shift_positions: bool = False

    def __post_init__(self) -> None:
        _check_bool("compat_prefix_shift_positions", self.compat_prefix_shift_positions)
        _check_int("prefix_length", self.prefix_length, 1)
        _check_int("hidden_size", self.hidden_size, 1)
        _check_bool("reparameterize", self.reparameterize)
        _check_bool("cross_attention", self.cross_attention)


@dataclass
class InducerTuningConfig(KadaptConfig):
    """Inducer-tuning (METHODS.md §8; arXiv 2210.14469): one query-specific inducer key per head.

    Key MLP (residual) p = q + φ(q), φ(q) = tanh(q A^k + a^k) B^k + b^k of width m_k = ``key_width``
    (0: identity key p = q); logit s0 = c⟨q, p⟩; weight w = σ(s0 − LSE) over the real keys; w̃ = Drop(w)
    with p = ``w_dropout`` (None: the backbone's attention dropout). With ``value_extension`` (default)
    Δ = Σ_h w̃^h tanh(q A^v_h + a^v_h) B^v_h + c_v (B^v_h ∈ R^{m_v×D}, m_v = ``value_width``) is added at
    ``attn_out`` after the output projection; ``head_share`` uses one B^v for all heads (forces the
    extension on). Without it, o^h ← o^h + w̃^h (tanh(q A^v_h + a^v_h) B′^v_h + b′^v_h) before W_O.
    ``gating``: O ← (1 − w) O with the undropped w. Every parameter is tn01-initialised.

    ``lora`` (a LoRAConfig, e.g. Q only) and ``parallel_adapter`` (a ParallelAdapterConfig) add those
    methods alongside, as the kernel-adapters presets do (inducer-lora, inducer-mam); ``kernel_mix`` (a
    KernelMixConfig: the inducer then sees the corrected q) and ``prefix`` (a PrefixTuningConfig: the
    prefix keys enter the inducer's LSE) compose as METHODS.md §9 says. Self-attention everywhere; T5
    cross-attention with ``cross_attention=True``.

    ``ablation`` (§8 item 12): "mh_adapter" (w ≡ 1: the model's own attention plus the value term, a
    multi-head adapter) or "value_gating" (key = q; the extension gated by the undropped w, plus per-key
    values g(k_j) = tanh(k_j A′_h + a′_h) mixed with (1 − w_i) P_ij and projected by B′_h ∈ R^{m_v×D} + b′;
    fused as one attention over the value [v | g(k)]); both need key_width=0 and value_extension=True.

    ``compat_inducer_lse_with_padding`` (METHODS.md §11 quirk 7, for parity with the published NLU numbers,
    which pad to 512): w = σ(s0 − LSE*) with LSE* over the padded keys too, as the seed's joint softmax
    before the padding mask does; O is unchanged. Costs a second attention pass over unmasked keys.
    """

    method: ClassVar[str] = "inducer_tuning"
    key_width: int = 10
    value_width: int = 15
    value_extension: bool = True
    head_share: bool = False
    gating: bool = False
    w_dropout: float | None = None
    cross_attention: bool = False
    lora: Any = None
    parallel_adapter: Any = None
    kernel_mix: Any = None
    prefix: Any = None
    compat_inducer_lse_with_padding: bool = False
    ablation: str = "none"

    def __post_init__(self) -> None:
        _check_int("key_width", self.key_width, 0)
        _check_bool("compat_inducer_lse_with_padding", self.compat_inducer_lse_with_padding)
        _check_choice("ablation", self.ablation, ("none", "mh_adapter", "value_gating"))
        if self.ablation != "none":
            for name, bad in (("key_width", self.key_width != 0), ("value_extension", not self.value_extension),
                              ("gating", self.gating),
                              ("compat_inducer_lse_with_padding", self.compat_inducer_lse_with_padding)):
                if bad:
                    raise ValueError(f"ablation={self.ablation!r} needs key_width=0, value_extension=True, "
                                     f"gating=False and compat_inducer_lse_with_padding=False; got "
                                     f"{name}={getattr(self, name)!r}")
        _check_int("value_width", self.value_width, 1)
        _check_bool("value_extension", self.value_extension)
        _check_bool("head_share", self.head_share)
        if self.head_share and not self.value_extension:
            raise ValueError("head_share=True needs value_extension=True (a shared B^v maps to the model width D); "
                             "allowed: head_share=False, or value_extension=True")
        _check_bool("gating", self.gating)
        if self.w_dropout is not None:
            _check_dropout("w_dropout", self.w_dropout)
        _check_bool("cross_attention", self.cross_attention)
        self.lora = _sub_config("lora", self.lora, LoRAConfig, optional=True)
        self.parallel_adapter = _sub_config("parallel_adapter", self.parallel_adapter, ParallelAdapterConfig,
                                            optional=True)
        self.kernel_mix = _sub_config("kernel_mix", self.kernel_mix, KernelMixConfig, optional=True)
        self.prefix = _sub_config("prefix", self.prefix, PrefixTuningConfig, optional=True)


@dataclass
class MAMConfig(KadaptConfig):
    """Mix-and-match adapter (He et al.; METHODS.md §9): prefix tuning at self-attention (``prefix``) plus
    a scaled parallel FFN adapter (``parallel_adapter``, placement "ffn")."""

    method: ClassVar[str] = "mam"
    prefix: Any = dataclasses.field(default_factory=lambda: PrefixTuningConfig())
    parallel_adapter: Any = dataclasses.field(default_factory=lambda: ParallelAdapterConfig(scale=4.0))

    def __post_init__(self) -> None:
        self.prefix = _sub_config("prefix", self.prefix, PrefixTuningConfig, optional=False)
        self.parallel_adapter = _sub_config("parallel_adapter", self.parallel_adapter, ParallelAdapterConfig,
                                            optional=False)
        if self.parallel_adapter.placement != "ffn":
            raise ValueError(f"parallel_adapter.placement={self.parallel_adapter.placement!r}: MAM puts the parallel "
                             f"adapter at the FFN; allowed values: 'ffn'")


METHODS: dict[str, type[KadaptConfig]] = {
    cls.method: cls
    for cls in (AdapterConfig, PfeifferConfig, LowRankAdapterConfig, PHMAdapterConfig, CompacterConfig,
                CompacterPlusPlusConfig, BitFitConfig, FullFinetuneConfig, LoRAConfig, ParallelAdapterConfig,
                KernelMixConfig, PrefixTuningConfig, InducerTuningConfig, MAMConfig)
}

_PRESETS: dict[str, Any] = {
    # METHODS.md §10 / §5: the Compacter paper's T5-base configurations.
    "compacter_paper.adapter": lambda: AdapterConfig(),
    "compacter_paper.pfeiffer": lambda: PfeifferConfig(placement="attn"),
    "compacter_paper.adapterdrop": lambda: AdapterConfig(drop_first=5),
    "compacter_paper.low_rank_adapter": lambda: LowRankAdapterConfig(),
    "compacter_paper.phm_adapter": lambda: PHMAdapterConfig(),
    "compacter_paper.compacter": lambda: CompacterConfig(),
    "compacter_paper.compacter++": lambda: CompacterPlusPlusConfig(),
    "compacter_paper.bitfit": lambda: BitFitConfig(compat_bitfit_skip_final_ln=True),
    # METHODS.md §9: kernel-adapters GPT-2 NLG `pfeiffer-adapter` (sequential at attn_out, m = 108).
    "kernel_adapters.nlg.pfeiffer-adapter": lambda: PfeifferConfig(
        placement="attn", reduction_factor=7.11, ln_pre=True, activation="relu", init="torch_default",
        unfreeze_layer_norms=False),
    # METHODS.md §9: kernel-adapters kernel-mix, GPT-2 NLG (kernel-mix.json) and RoBERTa NLU (intended ranks).
    "kernel_adapters.nlg.kernel-mix": lambda: KernelMixConfig(r_q=3, r_qs=12, r_v=8, r_vs=8, dropout=0.1,
                                                              init="houlsby"),
    "kernel_adapters.nlu.kernel-mix": lambda: KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=4, dropout=0.1,
                                                              init="houlsby"),
    # METHODS.md §9: kernel-adapters inducer presets. GPT-2 NLG: LoRA-Q α = 32, p = 0.1, bias; parallel FFN
    # adapter m = 42 (rf 18.2), LN_pre, ReLU, s = 1, torch_default init.
    "kernel_adapters.nlg.inducer-no-lora": lambda: InducerTuningConfig(key_width=10, value_width=15),
    "kernel_adapters.nlg.inducer-lora": lambda: InducerTuningConfig(
        key_width=5, value_width=12, lora=LoRAConfig(r=24, alpha=32, dropout=0.1, targets=("q",), lora_bias=True)),
    "kernel_adapters.nlg.inducer-mam": lambda: InducerTuningConfig(
        key_width=3, value_width=7, lora=LoRAConfig(r=16, alpha=32, dropout=0.1, targets=("q",), lora_bias=True),
        parallel_adapter=ParallelAdapterConfig(reduction_factor=18.2, scale=1.0, ln_pre=True, activation="relu",
                                               init="torch_default")),
    # RoBERTa NLU (run_glue.sh): loralib-style LoRA-Q r = 4, α = 32, p = 0.1, no bias; parallel FFN m = 12, s = 2.
    "kernel_adapters.nlu.inducer-lora": lambda: InducerTuningConfig(
        key_width=2, value_width=4, lora=LoRAConfig(r=4, alpha=32, dropout=0.1, targets=("q",))),
    "kernel_adapters.nlu.inducer-no-lora": lambda: InducerTuningConfig(key_width=6, value_width=4),
    "kernel_adapters.nlu.inducer-para-ffn": lambda: InducerTuningConfig(
        key_width=2, value_width=2, lora=LoRAConfig(r=4, alpha=32, dropout=0.1, targets=("q",)),
        parallel_adapter=ParallelAdapterConfig(bottleneck_dim=12, scale=2.0, dropout=0.1)),
    # He et al. MAM on RoBERTa: prefix P = 16, m_p = 800; parallel FFN adapter m = 16, s = 2, "lora" init.
    "he2022_mam_roberta": lambda: MAMConfig(prefix=PrefixTuningConfig(prefix_length=16, hidden_size=800),
                                            parallel_adapter=ParallelAdapterConfig(bottleneck_dim=16, scale=2.0,
                                                                                   dropout=0.1)),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str) -> KadaptConfig:
    """A named published configuration, e.g. ``preset("compacter_paper.compacter")``."""
    _check_choice("preset", name, PRESETS)
    return _PRESETS[name]()
