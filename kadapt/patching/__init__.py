"""``patch`` / ``unpatch`` / ``merge`` / ``eject``: the generic mechanics, naming no method.

Flow: patch → backbone family (where) → method module (what) → op (how fast). Every registered method
plans itself on a ``Plan`` (kadapt.patching.plan) against the sites its backbone family declares; the plan
is built and validated before the model is touched, then attached at once: child modules added, hooks
registered, existing parameters unfrozen or added, the attention implementation switched where a method
runs inside attention. A failure while attaching rolls back, leaving the model as it was. Methods attach
through forward hooks and new child modules, never by copying modelling code, so the backbone's own
state-dict keys are unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

import kadapt.methods  # noqa: F401  (registers every method)
from kadapt.methods.base import METHODS, KadaptConfig, implementation, registered_with
from kadapt.patching import attention
from kadapt.patching.base import Backbone
from kadapt.patching.gpt2 import GPT2Backbone
from kadapt.patching.llama import LlamaBackbone
from kadapt.patching.plan import Part, Plan
from kadapt.patching.roberta import RobertaBackbone
from kadapt.patching.t5 import T5Backbone

BACKBONES: tuple[type[Backbone], ...] = (GPT2Backbone, RobertaBackbone, T5Backbone, LlamaBackbone)
SUPPORTED_MODEL_TYPES = tuple(t for b in BACKBONES for t in b.model_types)

RECORD_ATTR = "_kadapt_record"


@dataclass
class PatchRecord:
    """Everything ``unpatch`` needs to restore the model exactly, and what ``merge`` / ``eject`` run.

    ``config`` is what the caller passed (one config, or a list of them for a composite); ``parts`` every
    method planned, nested ones included, in plan order."""

    config: KadaptConfig | list[KadaptConfig]
    family: str
    hidden_size: int
    parts: list[Part] = field(default_factory=list)
    hooks: list = field(default_factory=list)                       # RemovableHandle
    added_modules: list[tuple[nn.Module, str]] = field(default_factory=list)
    added_params: list[tuple[nn.Module, str, bool]] = field(default_factory=list)  # (module, name, slot existed)
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    snapshots: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    attn_configs: list[tuple[nn.Module, object]] = field(default_factory=list)  # (module, its original config)
    base_attrs: list[nn.Module] = field(default_factory=list)             # layers given attention.BASE_ATTR
    merges: list = field(default_factory=list)
    ejects: list = field(default_factory=list)
    state_checks: dict = field(default_factory=dict)  # part name -> (save, check): see Plan.on_save_state
    restores: list = field(default_factory=list)       # Plan.on_restore callbacks

    @property
    def configs(self) -> list[KadaptConfig]:
        return list(self.config) if isinstance(self.config, list) else [self.config]

    @property
    def methods(self) -> str:
        """The method names, for messages: 'lora' or 'prefix_tuning + lora'."""
        return " + ".join(c.method for c in self.configs)

    def remove_module(self, owner: nn.Module, name: str) -> None:
        """Drop an added child module (eject)."""
        del owner._modules[name]
        self.added_modules.remove((owner, name))


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


def _configs(config) -> list[KadaptConfig]:
    """The configs of one patch call: a config or a non-empty list of them, each re-checked."""
    many = isinstance(config, (list, tuple))
    configs = list(config) if many else [config]
    if many and not configs:
        raise ValueError("config: an empty list; pass one kadapt *Config or a list of them")
    for i, c in enumerate(configs):
        if not isinstance(c, KadaptConfig):
            where = f"config[{i}]" if many else "config"
            raise ValueError(f"{where}: expected a kadapt *Config instance, got {type(c).__name__}; registered "
                             f"methods: {', '.join(sorted(METHODS))}")
        implementation(c)
        c.__post_init__()  # re-check fields changed after construction
    return configs


def _plan(model: nn.Module, backbone: Backbone, configs: list[KadaptConfig], many: bool) -> Plan:
    plan = Plan(model, backbone)
    for i, config in enumerate(configs):
        plan.include(config, f"[{i}] {config.method}" if many else config.method)
    methods = " + ".join(c.method for c in configs)
    if plan.attention:
        reason = backbone.attention_unsupported()
        if reason is not None:
            raise ValueError(f"{methods}: runs inside attention, which this {backbone.family!r} model does not let "
                             f"kadapt do: {reason}")
        attention.check_implementations(model)
    added = [p for _, _, m, _ in plan.modules.values() for p in m.parameters()]
    added += [p for _, m, _ in plan.attention.values() for p in m.parameters()]
    if not (added or plan.params or plan.train_existing):
        raise ValueError(f"config: {methods} trains nothing on this {backbone.family!r} model (no site selected and "
                         f"nothing unfrozen); check the fields that select sites (layers, drop_first, placement, "
                         f"targets) and unfreeze_layer_norms")
    exclusive = [p for p in plan.parts if implementation(p.config).exclusive]
    if exclusive and len(plan.parts) > 1:
        others = ", ".join(repr(p.name) for p in plan.parts if p is not exclusive[0])
        raise ValueError(f"config: {exclusive[0].config.method!r} re-parameterises every tensor of the model and "
                         f"cannot be composed with other methods (got also {others}); patch it alone")
    if not exclusive:
        plan.train(p for h in backbone.task_heads() for p in h.parameters())
    return plan


def patch(model: nn.Module, config: KadaptConfig | Sequence[KadaptConfig]) -> nn.Module:
    """Insert the method ``config`` (or the methods of a list of configs, composed in list order) into
    ``model`` in place and return it.

    Only the methods' parameters (plus the LayerNorms or biases a method unfreezes, and new task heads) are
    left trainable. Raises ValueError, with the model untouched, on bad input or methods that cannot be
    composed.
    """
    many = isinstance(config, (list, tuple))
    configs = _configs(config)
    backbone = get_backbone(model)
    if is_patched(model):
        raise ValueError(f"model is already patched with {_describe(get_record(model).config)}; "
                         f"call kadapt.unpatch(model) first")
    # The plan and the record use their own copy: later edits of the caller's configs change nothing applied.
    record_config = copy.deepcopy(list(configs) if many else configs[0])
    plan = _plan(model, backbone, record_config if many else [record_config], many)
    record = PatchRecord(config=record_config, family=backbone.family, hidden_size=backbone.hidden_size,
                         parts=plan.parts, merges=plan.merges, ejects=plan.ejects, state_checks=plan.state_checks,
                         restores=plan.restores)
    try:
        _attach(model, backbone, plan, record)
    except BaseException:
        _restore(model, record)
        raise
    return model


def _describe(config) -> str:
    configs = config if isinstance(config, list) else [config]
    return " + ".join(type(c).__name__ for c in configs)


def _attach(model: nn.Module, backbone: Backbone, plan: Plan, record: PatchRecord) -> None:
    params = list(dict.fromkeys(model.parameters()))  # unique, in order
    record.requires_grad = [(p, p.requires_grad) for p in params]
    trains_everything = {id(p) for p in plan.train_existing} >= {id(p) for p in params}
    if not trains_everything:
        # Existing tensors the methods train are restored by unpatch; kept on the CPU. (Full fine-tuning
        # keeps its trained weights: a snapshot would double the model's memory.)
        record.snapshots = [(p, p.detach().clone() if p.is_meta else p.detach().to("cpu", copy=True))
                            for p in dict.fromkeys(plan.train_existing)]
    for p in params:
        p.requires_grad_(False)
    for p in plan.train_existing:
        p.requires_grad_(True)
    for owner, name, module, _ in plan.modules.values():
        owner.add_module(name, module)
        record.added_modules.append((owner, name))
    for module, name, param, _ in plan.params.values():
        existed = name in module._parameters
        module.register_parameter(name, param)
        record.added_params.append((module, name, existed))
    if plan.attention:
        # Every attention layer (patched or not) keeps the model's own function for kadapt's dispatcher.
        for site in backbone.attention_sites(cross_attention=True):
            implementation_name = site.module.config._attn_implementation
            site.module.__dict__[attention.BASE_ATTR] = attention.base_function(site.module, implementation_name)
            record.base_attrs.append(site.module)
        for layer, module, _ in plan.attention.values():
            layer.add_module(attention.METHOD_ATTR, module)
            record.added_modules.append((layer, attention.METHOD_ATTR))
        record.attn_configs = attention.set_implementation(model, attention.IMPLEMENTATION)
    for hook in plan.hooks:
        if hook.kind == "forward":
            handle = hook.module.register_forward_hook(hook.fn, with_kwargs=hook.with_kwargs,
                                                       always_call=hook.always_call)
        else:
            handle = hook.module.register_forward_pre_hook(hook.fn, with_kwargs=hook.with_kwargs)
        record.hooks.append(handle)
    object.__setattr__(model, RECORD_ATTR, record)


def added_parameters(record: PatchRecord) -> set[nn.Parameter]:
    """Every parameter kadapt added (trainable or not), for save/load."""
    params = {p for owner, name in record.added_modules for p in owner._modules[name].parameters()}
    params |= {module._parameters[name] for module, name, _ in record.added_params}
    return params


def _restore(model: nn.Module, record: PatchRecord) -> None:
    for fn in record.restores:
        fn()
    attention.restore_configs(model, record.attn_configs)
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
    """Remove the methods: hooks, added modules and biases go; requires_grad flags and the values of
    existing tensors a method trained (LayerNorms, BitFit biases) are restored. After full fine-tuning
    the trained weights are kept (a snapshot would double the model's memory)."""
    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt (nothing to unpatch)")
    _restore(model, record)
    return model


def _ejectable() -> str:
    return ", ".join(map(repr, registered_with("ejectable")))


def eject(model: nn.Module) -> nn.Module:
    """Drop training-time reparameterisations that inference does not need, keeping the function: every
    part of the patch that registered an eject runs it (prefix tuning, also nested in another method: it
    caches each layer's prefix as trainable (H_kv, P, d) key and value parameters, drops its MLPs and records
    ``reparameterize=False``, so ``save_adapter`` / ``load_adapter`` round-trip the ejected form)."""
    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt (nothing to eject)")
    if not record.ejects:
        if any(implementation(p.config).ejectable for p in record.parts):
            raise ValueError(f"model is patched with {record.methods}, already ejected (reparameterize=False): "
                             f"there is no MLP to drop")
        raise ValueError(f"model is patched with method {record.methods!r}, which has nothing to eject; methods "
                         f"with something to eject: {_ejectable()} (also when nested in another method's config)")
    for fn in record.ejects:
        fn(record)
    record.ejects = []
    return model


def _mergeable() -> str:
    return ", ".join(map(repr, registered_with("mergeable")))


def merge(model: nn.Module, allow_new_biases: bool = False) -> nn.Module:
    """Fold linear methods (LoRA, kernel-mix; every part of a composite must be one) into the frozen
    weights and take them out.

    Each method folds its correction with its own formulas (LoRA: W ← W + s·A B, b ← b + s·b_L; kernel-mix:
    the merge of docs/methods.md), accumulated in the wider of fp32 and the weight's dtype and written back
    in the weight's dtype, touching only the output columns it corrects. The method modules and hooks are
    removed and the requires_grad flags restored, as by ``unpatch``, but trained task heads keep their
    trained values. Afterwards the model is no longer patched (``unpatch`` raises) and computes the same
    function (up to rounding; exactly so in eval mode, where dropout is off).

    A bias term (LoRA with ``lora_bias``, kernel-mix's head-wise biases) folds into the linear's bias. Where
    the linear has none (T5, the Llama family) merge refuses, because a bias the architecture lacks is dropped
    by ``save_pretrained`` / ``from_pretrained``; ``allow_new_biases=True`` adds it anyway (the merged model is
    then exact in memory, but ``from_pretrained`` of its saved copy lacks those biases).
    """
    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt (nothing to merge)")
    blocked = [p for p in record.parts if not p.mergeable]
    if blocked:
        names = ", ".join(f"{p.config.method!r} ({type(p.config).__name__})" for p in blocked)
        raise ValueError(f"model is patched with method {names}, which cannot be merged into the weights; "
                         f"mergeable methods: {_mergeable()}")
    if not isinstance(allow_new_biases, bool):
        raise ValueError(f"allow_new_biases={allow_new_biases!r} must be a bool (True or False)")
    if not allow_new_biases:
        lacking = [lin for _, new_biases in record.merges if new_biases is not None for lin in new_biases()]
        if lacking:
            names = sorted({n for n, m in model.named_modules() if any(m is lin for lin in lacking)})
            raise ValueError(f"merge would add a bias to {len(names)} linear(s) of this {type(model).__name__} that "
                             f"have none (e.g. {names[0]}); save_pretrained/from_pretrained would drop it. Merge a "
                             f"method without bias terms (LoRA lora_bias=False), keep the adapter unmerged "
                             f"(kadapt.save_adapter), or pass allow_new_biases=True")
    known = {id(p) for p, _ in record.requires_grad}
    touched: list[nn.Module] = []
    for fold, _ in record.merges:  # in plan order: a later method sees the weights earlier ones folded
        touched += fold()
    record.snapshots = []  # merge keeps what was trained (task heads)
    _restore(model, record)
    for linear in touched:  # a bias merge created follows its weight's restored flag
        bias = getattr(linear, "bias", None)
        if bias is not None and id(bias) not in known:
            bias.requires_grad_(linear.weight.requires_grad)
    return model
