"""Conformance matrix: every registered method (``kadapt.METHODS``, so methods registered later join
automatically) x every model family of tests/_models.py, each through the same steps:

1. ``train``:     patch, forward, ``loss.backward()``: finite outputs, loss and gradients, gradient reaching
                  the method's own parameters (not only the task head);
2. ``save_load``: ``save_adapter`` -> ``load_adapter`` into a fresh ``from_pretrained`` copy of the base:
                  bit-identical outputs and tensors, equal config;
3. ``unpatch``:   the model back bit for bit (outputs, keys, values, flags, hooks, attention implementation);
4. ``merge``:     mergeable methods fold to the same function; the others are refused, model unchanged;
5. ``bad_config``: an invalid field is refused at construction and, when set after construction, by
                  ``patch``, with the model untouched.

A pair refused by design must be listed in REFUSED; the matrix then asserts that refusal (a ValueError
naming the family, model untouched) in every step instead of skipping it.
"""
from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import kadapt
from kadapt.api import WEIGHTS_NAME, adapter_state
from kadapt.methods.base import KadaptConfig, implementation
from kadapt.patching import get_backbone, get_record, is_patched
from _models import ALL_FAMILIES, inputs, output, perturb_trainables, tiny, tiny_configs

METHODS = list(kadapt.METHODS)

# (method, family) -> regex of the ValueError that refuses it (must name the family). None at present.
REFUSED: dict[tuple[str, str], str] = {}

# Invalid values per method: (field path, value). Every registered method with config fields needs an entry.
BAD_FIELDS: dict[str, list[tuple[str, object]]] = {
    "prompt_tuning": [("prompt_length", 0), ("init", "xavier"), ("vocab_ids", [-1]),
                      ("compat_prompt_t_random_init", "yes")],
    "adapter": [("bottleneck_dim", 0), ("activation", "tanh"), ("ln_pre", "yes")],
    "pfeiffer": [("placement", "both"), ("reduction_factor", -1)],
    "low_rank_adapter": [("rank", 0), ("bottleneck_dim", 2.5)],
    "phm_adapter": [("phm_dim", 0), ("learn_phm", "no")],
    "compacter": [("phm_rank", 0), ("phm_c_init", "xavier")],
    "compacter++": [("phm_dim", -1), ("shared_phm_rule", 1)],
    "bitfit": [("compat_bitfit_skip_final_ln", "yes")],
    "lora": [("r", 0), ("alpha", -1.0), ("targets", ("q", "x")), ("init", "kaiming"), ("dropout", 1.0)],
    "parallel_adapter": [("bottleneck_dim", 0), ("scale", 0), ("activation", "tanh"), ("placement", "cross")],
    "kernel_mix": [("r_q", -1), ("dropout", 1.5), ("init", "xavier")],
    "prefix_tuning": [("prefix_length", 0), ("hidden_size", -3), ("reparameterize", "yes")],
    "inducer_tuning": [("key_width", -1), ("value_width", 0), ("ablation", "x"), ("lora", "q"), ("lora.r", 0)],
    "intrinsic_said": [("intrinsic_dim", 0), ("said", "yes"), ("seed", -1), ("compat_said_crop", 1),
                       ("compat_said_grad_scale", None)],
    "mam": [("prefix", None), ("prefix.prefix_length", 0), ("parallel_adapter.placement", "attn")],
}


CASES = [pytest.param(m, f, id=f"{m}-{f}") for m in METHODS for f in ALL_FAMILIES]


# ------------------------------------------------------------------------------------------ helpers

def attn_configs(model) -> dict[str, tuple[int, object]]:
    """Every module's transformers config: (identity, _attn_implementation)."""
    return {n: (id(m.__dict__["config"]), m.__dict__["config"]._attn_implementation)
            for n, m in model.named_modules() if hasattr(m.__dict__.get("config"), "_attn_implementation")}


def hooks(model) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def snapshot(model, family) -> SimpleNamespace:
    with torch.no_grad():
        out = output(model, family).clone()
    return SimpleNamespace(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        modules=[n for n, _ in model.named_modules()],
        slots={n: sorted(m._parameters) for n, m in model.named_modules()},
        hooks=hooks(model), attn=attn_configs(model), record=get_record(model), training=model.training,
        output=out)


def assert_unchanged(model, family, snap, values: bool = True) -> None:
    """Keys, tensors (``values``), flags, modules, parameter slots, hooks, attention configs, patch record,
    output: all as in ``snap``."""
    state = model.state_dict()
    assert list(state) == list(snap.state), "state-dict keys changed"
    if values:
        changed = [k for k, v in snap.state.items() if not torch.equal(state[k], v)]
        assert not changed, f"tensors changed: {changed[:5]}"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap.flags, "requires_grad flags changed"
    assert [n for n, _ in model.named_modules()] == snap.modules, "child modules changed"
    assert {n: sorted(m._parameters) for n, m in model.named_modules()} == snap.slots, "parameter slots changed"
    assert hooks(model) == snap.hooks, "forward hooks / pre-hooks changed"
    assert attn_configs(model) == snap.attn, "config objects or _attn_implementation changed"
    assert get_record(model) is snap.record and model.training == snap.training
    if values:
        with torch.no_grad():
            assert torch.equal(output(model, family), snap.output), "output changed"


def assert_clean(model) -> None:
    """Nothing of kadapt left: no record, no kadapt module, hook or attribute."""
    assert not is_patched(model)
    assert not any("kadapt" in n for n, _ in model.named_modules()), "kadapt modules left"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "hooks left"
    assert not any(k.startswith("_kadapt") for m in model.modules() for k in m.__dict__), "kadapt attributes left"
    assert "set_attn_implementation" not in model.__dict__, "set_attn_implementation still overridden"


def patched(method: str, family: str, model=None):
    """``tiny(family)`` patched with the method's tiny config, or None for a pair refused by design (the
    refusal, a ValueError naming the family with the model untouched, is asserted here)."""
    model = tiny(family) if model is None else model
    config = tiny_configs()[method]
    if (method, family) in REFUSED:
        snap = snapshot(model, family)
        with pytest.raises(ValueError, match=REFUSED[method, family]) as e:
            kadapt.patch(model, config)
        assert family in str(e.value)
        assert_unchanged(model, family, snap)
        return None
    assert kadapt.patch(model, config) is model
    return model


# ---------------------------------------------------------------------------------------- registry

def test_registry_is_covered():
    configs = tiny_configs()
    missing = sorted(set(METHODS) - set(configs))
    assert not missing, f"registered method(s) without a tiny_configs() entry in tests/_models.py: {missing}"
    for name in METHODS:
        assert type(configs[name]) is kadapt.METHODS[name] and configs[name].method == name
        if dataclasses.fields(kadapt.METHODS[name]):
            assert BAD_FIELDS.get(name), f"method {name!r} has config fields but no BAD_FIELDS entry"
    assert set(BAD_FIELDS) <= set(METHODS) and {m for m, _ in REFUSED} <= set(METHODS)


# ------------------------------------------------------------------------------------------- steps

def _loss_inputs(family: str) -> dict:
    kw = inputs(family)
    kw["attention_mask"][1, -2:] = 0  # padding on one row
    ids = kw["input_ids"]
    if family in ("roberta", "bert"):
        kw["labels"] = torch.tensor([0, 2])
    elif family == "t5":
        kw["labels"] = kw["decoder_input_ids"].clone()
    else:
        kw["labels"] = ids
    return kw


@pytest.mark.parametrize("method,family", CASES)
def test_train(method, family):
    model = patched(method, family)
    if model is None:
        return
    perturb_trainables(model)  # zero-initialised factors (LoRA B, ...) pass gradient on
    model.train()
    torch.manual_seed(0)
    out = model(**_loss_inputs(family))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad[:5]}"
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    heads = {id(p) for h in get_backbone(model).task_heads() for p in h.parameters()}
    own = [n for n, p in trainable.items() if id(p) not in heads]
    assert own, "only the task head trains"
    assert any(trainable[n].grad.any() for n in own), "no parameter of the method gets a non-zero gradient"


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory):
    """save_pretrained of each tiny base model, once per session."""
    root, done = tmp_path_factory.mktemp("bases"), {}

    def get(family):
        if family not in done:
            tiny(family).save_pretrained(root / family)
            done[family] = root / family
        return done[family]

    return get


@pytest.mark.parametrize("method,family", CASES)
def test_save_load(method, family, base_dirs, tmp_path):
    base = base_dirs(family)
    model = patched(method, family)
    if model is None:
        return
    perturb_trainables(model)
    with torch.no_grad():
        expected = output(model, family)
    kadapt.save_adapter(model, tmp_path)
    fresh = type(model).from_pretrained(base).eval()
    assert kadapt.load_adapter(fresh, tmp_path) is fresh
    with torch.no_grad():
        assert torch.equal(output(fresh, family), expected)
    saved, loaded = load_file(str(tmp_path / WEIGHTS_NAME)), adapter_state(fresh)
    assert sorted(saved) == sorted(loaded)
    differ = [k for k, v in saved.items() if not torch.equal(v, loaded[k].detach())]
    assert not differ, f"saved tensors differ from the loaded parameters: {differ[:5]}"
    assert get_record(fresh).config == tiny_configs()[method]


@pytest.mark.parametrize("method,family", CASES)
def test_unpatch(method, family):
    model = tiny(family)
    before = snapshot(model, family)
    if patched(method, family, model) is None:
        return
    perturb_trainables(model)
    trains_everything = all(p.requires_grad for p in model.parameters())
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        patched_out = output(model, family)
    assert not torch.equal(patched_out, before.output), "the perturbed method does not change the output"
    assert kadapt.unpatch(model) is model
    assert_clean(model)
    if trains_everything:  # by design (README): full fine-tuning keeps its trained weights
        before.state, before.output = {k: trained[k] for k in before.state}, patched_out
    assert_unchanged(model, family, before)


@pytest.mark.parametrize("method,family", CASES)
def test_merge(method, family):
    model = tiny(family)
    before = snapshot(model, family)
    if patched(method, family, model) is None:
        return
    perturb_trainables(model)
    with torch.no_grad():
        unmerged = output(model, family)
    if not implementation(tiny_configs()[method]).mergeable:
        snap = snapshot(model, family)
        with pytest.raises(ValueError, match=r"cannot be merged"):
            kadapt.merge(model, allow_new_biases=True)
        assert is_patched(model)
        assert_unchanged(model, family, snap)
        return
    assert kadapt.merge(model, allow_new_biases=True) is model  # T5 / Llama: biases the architecture lacks
    assert_clean(model)
    with torch.no_grad():
        merged = output(model, family)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert not torch.equal(merged, before.output), "merge folded nothing"
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in before.flags} == before.flags
    assert attn_configs(model) == before.attn


def _set(config: KadaptConfig, path: str, value) -> None:
    *outer, last = path.split(".")
    for name in outer:
        config = getattr(config, name)
    setattr(config, last, value)


def _construct(method: str, path: str, value) -> None:
    """Build the tiny config with ``path`` replaced by ``value`` (nested configs given as dicts)."""
    config = tiny_configs()[method]
    field, *inner = path.split(".")
    if inner:
        value = {**getattr(config, field).to_dict(), inner[0]: value}
    dataclasses.replace(config, **{field: value})


def _names(path: str) -> str:
    return rf"\b{re.escape(path.split('.')[-1])}\b"


BAD_CASES = [pytest.param(m, p, v, id=f"{m}-{p}={v!r}") for m in METHODS for p, v in BAD_FIELDS.get(m, [])]


@pytest.mark.parametrize("method,path,value", BAD_CASES)
def test_bad_config_construction(method, path, value):
    with pytest.raises(ValueError, match=_names(path)):
        _construct(method, path, value)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_field_from_dict(method):
    data = {**tiny_configs()[method].to_dict(), "no_such_field": 1}
    with pytest.raises(ValueError, match=r"no_such_field"):
        KadaptConfig.from_dict(data)


@pytest.mark.parametrize("method,family", CASES)
def test_bad_config_patch(method, family):
    """Each invalid value set after construction: patch refuses it naming the field, model untouched."""
    model = tiny(family)
    snap = snapshot(model, family)
    for path, value in BAD_FIELDS.get(method, []):
        config = tiny_configs()[method]
        _set(config, path, value)
        with pytest.raises(ValueError, match=_names(path)):
            kadapt.patch(model, config)
        assert_unchanged(model, family, snap)
        assert_clean(model)
