"""``patch`` / ``unpatch``: insert a method into a backbone and take it out again.

Flow: patch → backbone family (where) → method module (what) → op (how fast). Methods attach
through forward hooks on existing modules plus new child modules, never by copying modelling
code, so the backbone's own state-dict keys are unchanged. Everything is validated and built before
the model is touched; a failure while attaching rolls back, leaving the model as it was.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from kadapt.configs import (BitFitConfig, BottleneckConfig, CompacterConfig, FullFinetuneConfig,
                            InducerTuningConfig, KadaptConfig, KernelMixConfig, LoRAConfig, MAMConfig,
                            ParallelAdapterConfig, PrefixTuningConfig)
from kadapt.methods.bottleneck import PHMRule, build_adapter, compacter_rule, validate_bottleneck
from kadapt.methods.inducer import InducerAttention
from kadapt.methods.kernel_mix import KernelMix
from kadapt.methods.lora import LoRA, build_lora
from kadapt.methods.parallel import ParallelAdapter
from kadapt.methods.prefix import PrefixAttention, PrefixEncoder
from kadapt.patching import attention
from kadapt.patching.base import AttentionSite, Backbone, BiasSite, KernelMixSite, LinearSite, ParallelSite, Site
from kadapt.patching.gpt2 import GPT2Backbone
from kadapt.patching.roberta import RobertaBackbone
from kadapt.patching.t5 import T5Backbone

BACKBONES: tuple[type[Backbone], ...] = (GPT2Backbone, RobertaBackbone, T5Backbone)
SUPPORTED_MODEL_TYPES = tuple(t for b in BACKBONES for t in b.model_types)

RECORD_ATTR = "_kadapt_record"
ADAPTER_ATTR = "kadapt_adapter"
SHARED_RULE_ATTR = "kadapt_phm_rule"
LORA_ATTR = "kadapt_lora"
PARALLEL_ATTR = "kadapt_parallel"
KERNEL_MIX_ATTR = "kadapt_kernel_mix"
PREFIX_ATTR = "kadapt_prefix_"  # + prefix set name, on the model root
MERGEABLE = (LoRAConfig, KernelMixConfig)  # linear methods kadapt.merge folds into the weights


def _adapter_hook(module: nn.Module, args, output):
    return getattr(module, ADAPTER_ATTR)(output)


def _bias_hook(module: nn.Module, args, output):
    return output + module.bias


def _lora_hook(module: nn.Module, args, output):
    return getattr(module, LORA_ATTR)(args[0], output)


def _parallel_stash_hook(adapter: ParallelAdapter, module: nn.Module, args):
    adapter.stash(args[0])


def _parallel_hook(module: nn.Module, args, output):
    return getattr(module, PARALLEL_ATTR)(output)


def _km_fused_hook(km: KernelMix, qs: tuple, ks: tuple, vs: tuple, module: nn.Module, args, output):
    """GPT-2 c_attn: Q and V corrected from one forward; K_h for ΔV is the K slice of the same output."""
    x = args[0]
    q, k, v = output[..., qs[0]:qs[1]], output[..., ks[0]:ks[1]], output[..., vs[0]:vs[1]]
    if km.has_q:
        q = q + km.delta_q(x).to(q.dtype)
    if km.has_v:
        v = v + km.delta_v(k, x).to(v.dtype)
    return torch.cat([q, k, v], dim=-1)


def _km_q_hook(km: KernelMix, module: nn.Module, args, output):
    return output + km.delta_q(args[0]).to(output.dtype)


def _km_k_hook(km: KernelMix, module: nn.Module, args, output):
    km.stash_key(output)  # the value projection runs next (RoBERTa/BERT, T5) and takes it


def _km_v_hook(km: KernelMix, module: nn.Module, args, output):
    return output + km.delta_v(km.pop_key(), args[0]).to(output.dtype)


def _km_o_hook(km: KernelMix, module: nn.Module, args, output):
    return output + km.delta_o(args[0]).to(output.dtype)


def _inducer_o_hook(inducer: InducerAttention, module: nn.Module, args, output):
    return output + inducer.take_delta().to(output.dtype)


@dataclass
class PatchRecord:
    """Everything ``unpatch`` needs to restore the model exactly."""

    config: KadaptConfig
    family: str
    hidden_size: int
    hooks: list = field(default_factory=list)                       # RemovableHandle
    added_modules: list[tuple[nn.Module, str]] = field(default_factory=list)
    added_params: list[tuple[nn.Module, str, bool]] = field(default_factory=list)  # (module, name, slot existed)
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    snapshots: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    attn_configs: list[tuple[object, str]] = field(default_factory=list)  # (transformers config, previous impl)
    base_attrs: list[nn.Module] = field(default_factory=list)             # layers given attention.BASE_ATTR


def get_backbone(model: nn.Module) -> Backbone:
    """The family adapter for ``model``; ValueError naming the model type and the supported ones."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if not isinstance(model, nn.Module) or model_type is None:
        raise ValueError(f"model: expected a Hugging Face transformers model (nn.Module with .config.model_type), "
                         f"got {type(model).__name__}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for cls in BACKBONES:
        if model_type in cls.model_types:
            return cls(model)
    raise ValueError(f"model.config.model_type={model_type!r} ({type(model).__name__}) is not supported; "
                     f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def is_patched(model: nn.Module) -> bool:
    return getattr(model, RECORD_ATTR, None) is not None


def get_record(model: nn.Module) -> PatchRecord | None:
    return getattr(model, RECORD_ATTR, None)


def _factory(ref: torch.Tensor) -> dict:
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.get_default_dtype()
    return {"device": ref.device, "dtype": dtype}


def _selected_sites(config: BottleneckConfig, backbone: Backbone) -> list[Site]:
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
        unknown = sorted(set(spec) - set(stacks))
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


class _Plan:
    """Modules built and validated before the model is touched."""

    def __init__(self):
        self.adapters: list[tuple[Site, nn.Module]] = []
        self.shared_rule: PHMRule | None = None
        self.bias_sites: list[BiasSite] = []
        self.train_existing: list[nn.Parameter] = []
        self.lora: list[tuple[LinearSite, LoRA]] = []
        self.parallel: list[tuple[ParallelSite, ParallelAdapter]] = []
        self.kernel_mix: list[tuple[KernelMixSite, KernelMix]] = []
        self.prefix_encoders: dict[str, PrefixEncoder] = {}
        self.attention: list[tuple[AttentionSite, nn.Module]] = []  # prefix / inducer layer modules
        self.switch_attention = False                               # set the "kadapt" implementation
        self.position_shift: tuple[nn.Module, int] | None = None    # (position embedding, P): quirk 17


def _plan_lora(plan: _Plan, backbone: Backbone, config: LoRAConfig) -> None:
    for site in backbone.linear_sites(config.targets):
        lora = build_lora(site.in_features, site.out_features, site.weight_layout, site.slices, config,
                          _factory(site.module.weight))
        plan.lora.append((site, lora.train(site.module.training)))  # dropout follows the host's mode


def _plan_parallel(plan: _Plan, backbone: Backbone, config: ParallelAdapterConfig) -> None:
    dim = backbone.hidden_size
    m = config.bottleneck_size(dim)
    kinds = ("attn", "ffn") if config.placement == "both" else (config.placement,)
    for site in backbone.parallel_sites():
        if site.kind in kinds:
            adapter = ParallelAdapter(dim, m, config, _factory(site.ref_weight))
            plan.parallel.append((site, adapter.train(site.target.training)))


def _shift_positions_hook(shift: int, module: nn.Module, args):
    return (args[0] + shift, *args[1:])


def _plan_prefix(plan: _Plan, model: nn.Module, backbone: Backbone, config: PrefixTuningConfig) -> None:
    attention.check_implementations(model)
    plan.switch_attention = True
    if config.compat_prefix_shift_positions:
        if backbone.family != "gpt2":
            raise ValueError(f"compat_prefix_shift_positions=True is GPT-2 only (PEFT's past_key_values prefix "
                             f"shifts GPT-2's learned positions); this model is {backbone.family!r}")
        plan.position_shift = (backbone.root.wpe, config.prefix_length)
    dim = backbone.hidden_size
    sites = backbone.attention_sites(cross_attention=config.cross_attention)
    by_set: dict[str, list[AttentionSite]] = {}
    for site in sites:
        by_set.setdefault(site.prefix_set, []).append(site)
    for name, members in by_set.items():
        ref, inner = members[0].o.weight, members[0].heads * members[0].head_dim
        encoder = PrefixEncoder(config.prefix_length, dim, inner, config.hidden_size, len(members), _factory(ref))
        plan.prefix_encoders[name] = encoder
        for layer, site in enumerate(members):
            plan.attention.append((site, PrefixAttention(encoder, layer, site.heads, site.head_dim)))
    if not config.reparameterize:  # train K_P, V_P directly, drawn from a fresh MLP
        for _, module in plan.attention:
            module.eject()
        plan.prefix_encoders = {}


def _plan_kernel_mix(plan: _Plan, backbone: Backbone, config: KernelMixConfig) -> None:
    for site in backbone.kernel_mix_sites(config.cross_attention):
        km = KernelMix(backbone.hidden_size, site.heads, site.head_dim, config, _factory(site.q[0].weight))
        plan.kernel_mix.append((site, km.train(site.owner.training)))  # dropout follows the host's mode


def _plan_inducer(plan: _Plan, model: nn.Module, backbone: Backbone, config: InducerTuningConfig) -> None:
    attention.check_implementations(model)
    plan.switch_attention = True
    dim = backbone.hidden_size
    prefixes: dict[int, tuple[AttentionSite, PrefixAttention]] = {}
    if config.prefix is not None:
        _plan_prefix(plan, model, backbone, config.prefix)
        prefixes = {id(site.module): (site, module) for site, module in plan.attention}
        plan.attention = []
    for site in backbone.attention_sites(cross_attention=config.cross_attention):
        inducer = InducerAttention(dim, site.heads, site.head_dim, config.key_width, config.value_width,
                                   config.value_extension, config.head_share, config.gating, config.w_dropout,
                                   _factory(site.o.weight), config.compat_inducer_lse_with_padding,
                                   config.ablation)
        if id(site.module) in prefixes:
            inducer.prefix = prefixes.pop(id(site.module))[1]
        plan.attention.append((site, inducer.train(site.module.training)))
    plan.attention += list(prefixes.values())  # prefix-only layers (e.g. T5 cross-attention)
    if config.kernel_mix is not None:
        _plan_kernel_mix(plan, backbone, config.kernel_mix)
    if config.lora is not None:
        _plan_lora(plan, backbone, config.lora)
    if config.parallel_adapter is not None:
        _plan_parallel(plan, backbone, config.parallel_adapter)


def _plan(model: nn.Module, backbone: Backbone, config: KadaptConfig) -> _Plan:
    plan = _Plan()
    heads = [p for h in backbone.task_heads() for p in h.parameters()]
    if isinstance(config, BottleneckConfig):
        dim = backbone.hidden_size
        m = validate_bottleneck(config, dim)
        sites = _selected_sites(config, backbone)
        if isinstance(config, CompacterConfig) and config.shared_phm_rule and sites:
            plan.shared_rule = compacter_rule(config, _factory(sites[0].ref_weight))
        for site in sites:
            plan.adapters.append((site, build_adapter(config, dim, m, _factory(site.ref_weight), plan.shared_rule)))
        if config.unfreeze_layer_norms:
            plan.train_existing += [p for ln in backbone.layer_norms() for p in ln.parameters()]
    elif isinstance(config, BitFitConfig):
        biases = backbone.existing_biases()
        if biases is None:
            plan.bias_sites = backbone.bias_sites(config.compat_bitfit_skip_final_ln)
        else:
            plan.train_existing += biases
    elif isinstance(config, FullFinetuneConfig):
        plan.train_existing += list(model.parameters())
    elif isinstance(config, LoRAConfig):
        _plan_lora(plan, backbone, config)
    elif isinstance(config, ParallelAdapterConfig):
        _plan_parallel(plan, backbone, config)
    elif isinstance(config, PrefixTuningConfig):
        _plan_prefix(plan, model, backbone, config)
    elif isinstance(config, MAMConfig):
        _plan_prefix(plan, model, backbone, config.prefix)
        _plan_parallel(plan, backbone, config.parallel_adapter)
    elif isinstance(config, InducerTuningConfig):
        _plan_inducer(plan, model, backbone, config)
    elif isinstance(config, KernelMixConfig):
        _plan_kernel_mix(plan, backbone, config)
    else:
        raise ValueError(f"config: {type(config).__name__} is not supported by this version of kadapt.patch")
    plan.train_existing += heads
    return plan


def patch(model: nn.Module, config: KadaptConfig) -> nn.Module:
    """Insert the method ``config`` into ``model`` in place and return it.

    Only the method's parameters (plus the LayerNorms or biases the method unfreezes, and new task
    heads) are left trainable. Raises ValueError, with the model untouched, on bad input.
    """
    if not isinstance(config, KadaptConfig):
        raise ValueError(f"config: expected a kadapt *Config instance, got {type(config).__name__}")
    config.__post_init__()  # re-check fields changed after construction
    backbone = get_backbone(model)
    if is_patched(model):
        raise ValueError(f"model is already patched with {type(get_record(model).config).__name__}; "
                         f"call kadapt.unpatch(model) first")
    plan = _plan(model, backbone, config)

    # The record keeps its own copy: later edits of the caller's config must not change what was applied.
    record = PatchRecord(config=copy.deepcopy(config), family=backbone.family, hidden_size=backbone.hidden_size)
    try:
        params = list(dict.fromkeys(model.parameters()))  # unique, in order
        record.requires_grad = [(p, p.requires_grad) for p in params]
        if not isinstance(config, FullFinetuneConfig):
            # Existing tensors the method trains are restored by unpatch; kept on the CPU.
            record.snapshots = [(p, p.detach().clone() if p.is_meta else p.detach().to("cpu", copy=True))
                                for p in dict.fromkeys(plan.train_existing)]
        for p in params:
            p.requires_grad_(False)
        for p in plan.train_existing:
            p.requires_grad_(True)
        if plan.shared_rule is not None:
            model.add_module(SHARED_RULE_ATTR, plan.shared_rule)
            record.added_modules.append((model, SHARED_RULE_ATTR))
        for site, adapter in plan.adapters:
            site.target.add_module(ADAPTER_ATTR, adapter)
            record.added_modules.append((site.target, ADAPTER_ATTR))
            record.hooks.append(site.target.register_forward_hook(_adapter_hook))
        for site, lora in plan.lora:
            site.module.add_module(LORA_ATTR, lora)
            record.added_modules.append((site.module, LORA_ATTR))
            record.hooks.append(site.module.register_forward_hook(_lora_hook))
        for site, adapter in plan.parallel:
            site.target.add_module(PARALLEL_ATTR, adapter)
            record.added_modules.append((site.target, PARALLEL_ATTR))
            record.hooks.append(site.source.register_forward_pre_hook(functools.partial(_parallel_stash_hook, adapter)))
            record.hooks.append(site.target.register_forward_hook(_parallel_hook))
        for site, km in plan.kernel_mix:
            site.owner.add_module(KERNEL_MIX_ATTR, km)
            record.added_modules.append((site.owner, KERNEL_MIX_ATTR))
            if site.fused:
                if km.has_q or km.has_v:
                    hook = functools.partial(_km_fused_hook, km, site.q[1], site.k[1], site.v[1])
                    record.hooks.append(site.q[0].register_forward_hook(hook))
            else:
                if km.has_q:
                    record.hooks.append(site.q[0].register_forward_hook(functools.partial(_km_q_hook, km)))
                if km.r_v:
                    record.hooks.append(site.k[0].register_forward_hook(functools.partial(_km_k_hook, km)))
                if km.has_v:
                    record.hooks.append(site.v[0].register_forward_hook(functools.partial(_km_v_hook, km)))
            if km.has_v:
                record.hooks.append(site.o[0].register_forward_hook(functools.partial(_km_o_hook, km)))
        for name, encoder in plan.prefix_encoders.items():
            model.add_module(PREFIX_ATTR + name, encoder)
            record.added_modules.append((model, PREFIX_ATTR + name))
        if plan.switch_attention:
            # Every attention layer (patched or not) keeps the model's own function for kadapt's dispatcher.
            for site in backbone.attention_sites(cross_attention=True):
                implementation = site.module.config._attn_implementation
                site.module.__dict__[attention.BASE_ATTR] = attention.base_function(site.module, implementation)
                record.base_attrs.append(site.module)
            for site, module in plan.attention:
                site.module.add_module(attention.METHOD_ATTR, module)
                record.added_modules.append((site.module, attention.METHOD_ATTR))
                if isinstance(module, InducerAttention) and module.value_extension:
                    record.hooks.append(site.o.register_forward_hook(functools.partial(_inducer_o_hook, module)))
            record.attn_configs = attention.set_implementation(model, attention.IMPLEMENTATION)
        if plan.position_shift is not None:
            wpe, shift = plan.position_shift
            record.hooks.append(wpe.register_forward_pre_hook(functools.partial(_shift_positions_hook, shift)))
        for bs in plan.bias_sites:
            ref = bs.module.weight
            existed = "bias" in bs.module._parameters
            bs.module.register_parameter("bias", nn.Parameter(torch.zeros(bs.size, device=ref.device, dtype=ref.dtype)))
            record.added_params.append((bs.module, "bias", existed))
            if not bs.native:
                record.hooks.append(bs.module.register_forward_hook(_bias_hook))
        object.__setattr__(model, RECORD_ATTR, record)
    except BaseException:
        _restore(model, record)
        raise
    return model


def added_parameters(record: PatchRecord) -> set[nn.Parameter]:
    """Every parameter kadapt added (trainable or not), for save/load."""
    params = {p for owner, name in record.added_modules for p in owner._modules[name].parameters()}
    params |= {module._parameters[name] for module, name, _ in record.added_params}
    return params


def _restore(model: nn.Module, record: PatchRecord) -> None:
    for cfg, previous in record.attn_configs:
        cfg._attn_implementation_internal = previous
    for module in record.base_attrs:
        module.__dict__.pop(attention.BASE_ATTR, None)
    for handle in record.hooks:
        handle.remove()
    for owner, name in reversed(record.added_modules):
        if name in owner._modules:
            del owner._modules[name]
    for module, name, existed in record.added_params:
        if existed:  # nn.Linear(bias=False) keeps a None slot
            module.register_parameter(name, None)
        else:
            module._parameters.pop(name, None)
    with torch.no_grad():
        for p, saved in record.snapshots:
            p.copy_(saved)
    for p, flag in record.requires_grad:
        p.requires_grad_(flag)
    if RECORD_ATTR in model.__dict__:
        object.__delattr__(model, RECORD_ATTR)


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the method: hooks, added modules and biases go; requires_grad flags and the values of
    existing tensors the method trained (LayerNorms, BitFit biases) are restored. After full
    fine-tuning the trained weights are kept (a snapshot would double the model's memory)."""
    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt (nothing to unpatch)")
    _restore(model, record)
    return model


def eject(model: nn.Module) -> nn.Module:
    """Prefix tuning (also inside MAM): cache every layer's prefix M = tanh(E W_1 + b_1) W_2 + b_2 as
    trainable (H, P, d) key and value parameters and drop the reparameterisation MLPs (METHODS.md §7).
    The model computes the same function; the recorded config becomes ``reparameterize=False``, so
    ``save_adapter`` / ``load_adapter`` round-trip the ejected form."""
    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt (nothing to eject)")
    config = record.config
    prefix = config.prefix if isinstance(config, (MAMConfig, InducerTuningConfig)) else config
    if not isinstance(prefix, PrefixTuningConfig):
        raise ValueError(f"model is patched with method {config.method!r} without a prefix: nothing to eject; "
                         f"methods with a prefix: {PrefixTuningConfig.method!r}, {MAMConfig.method!r}, "
                         f"{InducerTuningConfig.method!r} with prefix=...")
    if not prefix.reparameterize:
        raise ValueError("the prefix is already ejected (reparameterize=False): there is no MLP to drop")
    for module in model.modules():
        if isinstance(module, PrefixAttention):
            module.eject()
    for owner, name in list(record.added_modules):
        if isinstance(owner._modules.get(name), PrefixEncoder):
            del owner._modules[name]
            record.added_modules.remove((owner, name))
    prefix.reparameterize = False
    return model


def _x_weight(linear: nn.Module, cols: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (in, stop - start) in the x·W convention and bias of the output columns ``cols``."""
    a, b = cols
    w = linear.weight[a:b, :].t() if isinstance(linear, nn.Linear) else linear.weight[:, a:b]
    bias = getattr(linear, "bias", None)
    return w, (bias[a:b] if bias is not None else None)


@torch.no_grad()
def _fold_into(linear: nn.Module, cols: tuple[int, int], dw: torch.Tensor, db: torch.Tensor | None) -> None:
    """W[:, cols] += ΔW and b[cols] += Δb on ``linear`` (fp32 accumulation; a missing bias is created)."""
    a, b = cols
    weight = linear.weight
    merged = weight.detach().float()
    if isinstance(linear, nn.Linear):
        merged[a:b, :] += dw.t()
    else:
        merged[:, a:b] += dw
    weight.copy_(merged.to(weight.dtype))
    if db is None:
        return
    if getattr(linear, "bias", None) is None:
        out = weight.shape[0] if isinstance(linear, nn.Linear) else weight.shape[1]
        linear.register_parameter("bias", nn.Parameter(torch.zeros(out, device=weight.device, dtype=weight.dtype),
                                                       requires_grad=weight.requires_grad))
    bias = linear.bias.detach().float()
    bias[a:b] += db
    linear.bias.copy_(bias.to(linear.bias.dtype))


def _fold_kernel_mix(km: KernelMix, site: KernelMixSite) -> list[nn.Module]:
    """The §6 kernel-mix merge into the q, v and o projections of ``site``; returns the linears touched."""
    w_k, b_k = _x_weight(*site.k)
    deltas = km.merged_deltas(w_k, b_k)  # computed before any write
    touched = []
    for part, (dw, db) in deltas.items():
        linear, cols = getattr(site, part)
        _fold_into(linear, cols, dw, db)
        touched.append(linear)
    return touched


def merge(model: nn.Module) -> nn.Module:
    """Fold a linear method (LoRA, kernel-mix) into the frozen weights and take the method out.

    Kernel-mix uses the METHODS.md §6 merge formulas (ΔW_Q, ΔW_V = W_K[:, h] A^V_h B^V_h + shared,
    Δb_V = b_K[h] A^V_h B^V_h + b^V_h, ΔW_O = blockdiag(A^O) B^O + shared, Δb_O = b^O), accumulated in
    fp32; bias-free T5 projections get a bias where a head-wise bias is merged.

    W ← W + s·A B and b ← b + s·b_L, accumulated in fp32 and written back in the weight's dtype; a
    bias-free linear (T5) gets a bias parameter when ``lora_bias=True``. The LoRA modules and hooks
    are removed and the requires_grad flags restored, as by ``unpatch``, but trained task heads keep
    their trained values. Afterwards the model is no longer patched (``unpatch`` raises) and
    computes the same function (up to rounding; exactly so in eval mode, where dropout is off).
    """
    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt (nothing to merge)")
    if not isinstance(record.config, MERGEABLE):
        raise ValueError(f"model is patched with method {record.config.method!r} ({type(record.config).__name__}), "
                         f"which cannot be merged into the weights; mergeable methods: "
                         f"{', '.join(repr(c.method) for c in MERGEABLE)}")
    known = {id(p) for p, _ in record.requires_grad}
    folded = []
    km_sites = None
    for owner, name in record.added_modules:
        lora = owner._modules.get(name)
        if isinstance(lora, LoRA):
            lora.fold(owner)
            folded.append(owner)
        elif isinstance(lora, KernelMix):
            if km_sites is None:
                sites = get_backbone(model).kernel_mix_sites(record.config.cross_attention)
                km_sites = {id(s.owner): s for s in sites}
            folded += _fold_kernel_mix(lora, km_sites[id(owner)])
    record.snapshots = []  # merge keeps what was trained (task heads)
    _restore(model, record)
    for linear in folded:  # a bias merge created follows its weight's restored flag
        bias = getattr(linear, "bias", None)
        if bias is not None and id(bias) not in known:
            bias.requires_grad_(linear.weight.requires_grad)
    return model
