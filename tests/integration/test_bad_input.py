"""Bad input: unsupported models, numbers that don't fit, adapters saved for another method or shape,
truncated or corrupt adapter files. Each must raise a ValueError that names the field and the
allowed values, and leave the model unchanged (state, requires_grad flags, hooks, child modules,
output, patched-ness). Tiny models built from configs; nothing is downloaded."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM,
                          PreTrainedModel, RobertaConfig, RobertaForSequenceClassification, T5Config,
                          T5ForConditionalGeneration)

import kadapt
from kadapt.configs import KadaptConfig
from kadapt.patching import get_record, is_patched

SUPPORTED = "gpt2, roberta, bert, t5, llama, qwen2, mistral"
FAMILIES = ("gpt2", "roberta", "bert", "t5")
STACKS = {"gpt2": ["decoder"], "roberta": ["encoder"], "bert": ["encoder"], "t5": ["decoder", "encoder"]}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------------- models

def tiny(family: str, hidden: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=80, num_labels=3)
        model = RobertaForSequenceClassification(cfg)
    elif family == "bert":
        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=80)
        model = BertModel(cfg)
    elif family == "t5":
        cfg = T5Config(vocab_size=100, d_model=hidden, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       decoder_start_token_id=0)
        model = T5ForConditionalGeneration(cfg)
    elif family == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=100, max_position_embeddings=64,
                          bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif family == "opt":  # a transformers family kadapt does not support
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=hidden)
        model = OPTForCausalLM(cfg)
    else:
        raise KeyError(family)
    return model.eval()


def fixed_output(model) -> torch.Tensor | None:
    """The model's output on a fixed input (eval mode, no grad); None for non-modules."""
    if not isinstance(model, nn.Module):
        return None
    with torch.no_grad():
        if not isinstance(model, PreTrainedModel):  # the plain torch modules below take 4 features
            return model(torch.linspace(-1, 1, 4).unsqueeze(0))
        ids = torch.tensor([[5, 17, 42, 99, 3, 64, 8, 23, 11]])
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if model.config.model_type == "t5":
            kw["decoder_input_ids"] = ids[:, :4]
        return model(**kw)[0].clone()


# ----------------------------------------------------------------------------- "leaves model unchanged"

def snapshot(model) -> SimpleNamespace:
    if isinstance(model, nn.Module):
        model.eval()
    snap = SimpleNamespace(obj_dict=None)
    if not isinstance(model, nn.Module):
        snap.obj_dict = dict(vars(model)) if hasattr(model, "__dict__") else None
        return snap
    snap.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snap.requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    snap.modules = [n for n, _ in model.named_modules(remove_duplicate=False)]
    snap.hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
                  for n, m in model.named_modules(remove_duplicate=False)}
    snap.param_slots = {n: sorted(m._parameters) for n, m in model.named_modules(remove_duplicate=False)}
    snap.training = {n: m.training for n, m in model.named_modules(remove_duplicate=False)}
    snap.patched = is_patched(model)
    snap.record = get_record(model)
    snap.output = fixed_output(model)
    return snap


def assert_unchanged(model, snap: SimpleNamespace, param_slots: bool = True) -> None:
    """(a) state-dict keys and every tensor bit-identical, (b) requires_grad flags, (c) no forward hooks
    added and no new ``kadapt_*`` child modules, (d) bit-identical output on a fixed input, plus the same
    patched-ness (and the very same patch record when the model was patched before)."""
    if not isinstance(model, nn.Module):
        if snap.obj_dict is not None:
            assert dict(vars(model)) == snap.obj_dict
        return
    state = model.state_dict()
    assert list(state) == list(snap.state), "state_dict keys changed"
    for k, v in snap.state.items():
        assert state[k].dtype == v.dtype and state[k].device == v.device, k
        assert torch.equal(state[k], v), f"tensor {k} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == snap.requires_grad
    modules = [n for n, _ in model.named_modules(remove_duplicate=False)]
    assert modules == snap.modules, f"child modules changed: {sorted(set(modules) ^ set(snap.modules))[:5]}"
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules(remove_duplicate=False)}
    assert hooks == snap.hooks, "forward hooks changed"
    if not snap.patched:
        assert not any("kadapt_" in n for n in modules)
        assert not any(hooks[n][0] for n in modules), "a forward hook is left on an unpatched model"
    if param_slots:
        slots = {n: sorted(m._parameters) for n, m in model.named_modules(remove_duplicate=False)}
        assert slots == snap.param_slots, "parameter slots added or removed"
    assert {n: m.training for n, m in model.named_modules(remove_duplicate=False)} == snap.training
    assert is_patched(model) == snap.patched
    assert get_record(model) is snap.record
    out = fixed_output(model)
    assert out is not None and torch.equal(out, snap.output), "output changed"


def assert_still_usable(model, snap: SimpleNamespace, param_slots: bool = True) -> None:
    """(e) an unpatched model is still unpatched and a valid patch works (and unpatches cleanly)."""
    assert not is_patched(model)
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8))
    assert is_patched(model)
    assert any(n.endswith("kadapt_adapter") for n, _ in model.named_modules())
    kadapt.unpatch(model)
    assert_unchanged(model, snap, param_slots=param_slots)


def patch_fails(model, config, match: str) -> None:
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        kadapt.patch(model, config)
    assert_unchanged(model, snap)
    if not snap.patched:
        assert_still_usable(model, snap)


def load_fails(model, directory, match: str, param_slots: bool = True) -> None:
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        kadapt.load_adapter(model, directory)
    assert_unchanged(model, snap, param_slots=param_slots)
    if not snap.patched:
        assert_still_usable(model, snap, param_slots=param_slots)


def _bump_one_element(model):
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] += 1e-6


@pytest.mark.parametrize("mutate", [
    _bump_one_element,
    lambda m: m.transformer.h[0].ln_1.bias.requires_grad_(False),
    lambda m: m.transformer.h[0].attn.register_forward_hook(lambda mod, args, out: None),
    lambda m: m.transformer.h[0].mlp.add_module("kadapt_extra", nn.Identity()),
    lambda m: m.transformer.ln_f.register_parameter("extra", None),
    lambda m: m.transformer.h[1].train(),
    lambda m: kadapt.patch(m, kadapt.AdapterConfig(bottleneck_dim=8)),
    lambda m: kadapt.patch(m, kadapt.BitFitConfig()),
], ids=["tensor", "requires_grad", "hook", "child", "param_slot", "train_mode", "patch", "bitfit"])
def test_assert_unchanged_detects_changes(mutate):
    model = tiny("gpt2")
    snap = snapshot(model)
    assert_unchanged(model, snap)
    mutate(model)
    with pytest.raises(AssertionError):
        assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------ unsupported model

UNSUPPORTED_MSG = (r"model\.config\.model_type='opt' \(OPTForCausalLM\) is not supported; "
             rf"supported model types: {SUPPORTED}$")
NOT_A_MODEL_MSG = (r"model: expected a Hugging Face transformers model \(nn\.Module with \.config\.model_type\), "
                   rf"got {{}}; supported model types: {SUPPORTED}$")


def test_unsupported_hf_model():
    patch_fails_unsupported(tiny("opt"), UNSUPPORTED_MSG)


@pytest.mark.parametrize("make, name", [
    (lambda: nn.Linear(4, 3), "Linear"),
    (lambda: nn.Sequential(nn.Linear(4, 3)), "Sequential"),
    (lambda: object(), "object"),
    (lambda: SimpleNamespace(config=SimpleNamespace(model_type="gpt2")), "SimpleNamespace"),
    (lambda: None, "NoneType"),
    (lambda: "gpt2", "str"),
])
def test_not_a_model(make, name):
    obj = make()
    patch_fails_unsupported(obj, NOT_A_MODEL_MSG.format(name))


def patch_fails_unsupported(obj, match: str) -> None:
    snap = snapshot(obj)
    with pytest.raises(ValueError, match=match):
        kadapt.patch(obj, kadapt.AdapterConfig(bottleneck_dim=8))
    assert_unchanged(obj, snap)
    if isinstance(obj, nn.Module):
        assert not is_patched(obj)


def test_supported_model_type_but_wrong_structure():
    lin = nn.Linear(4, 3)
    lin.config = GPT2Config(n_embd=64, n_layer=2, n_head=4)
    patch_fails_unsupported(lin, r"model: expected one GPT2Model inside Linear, found 0")


def test_load_into_unsupported_model(tmp_path):
    src = tiny("gpt2")
    kadapt.patch(src, kadapt.AdapterConfig(bottleneck_dim=8))
    kadapt.save_adapter(src, tmp_path)
    other = tiny("opt")
    snap = snapshot(other)
    with pytest.raises(ValueError, match=UNSUPPORTED_MSG):
        kadapt.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)
    lin = nn.Linear(4, 3)
    snap = snapshot(lin)
    with pytest.raises(ValueError, match=NOT_A_MODEL_MSG.format("Linear")):
        kadapt.load_adapter(lin, tmp_path)
    assert_unchanged(lin, snap)
    with pytest.raises(ValueError, match=NOT_A_MODEL_MSG.format("object")):
        kadapt.load_adapter(object(), tmp_path)


# -------------------------------------------------------------------------------------- config level

ACTS = r"'gelu_new', 'gelu_tanh', 'gelu', 'relu', 'swish'"

CONFIG_CASES = {
    "rf_zero": (lambda: kadapt.AdapterConfig(reduction_factor=0), r"reduction_factor=0 must be a finite number > 0"),
    "rf_negative": (lambda: kadapt.AdapterConfig(reduction_factor=-1),
                    r"reduction_factor=-1 must be a finite number > 0"),
    "rf_negative_float": (lambda: kadapt.CompacterConfig(reduction_factor=-0.5),
                          r"reduction_factor=-0\.5 must be a finite number > 0"),
    "rf_nan": (lambda: kadapt.AdapterConfig(reduction_factor=float("nan")),
               r"reduction_factor=nan must be a finite number > 0"),
    "rf_inf": (lambda: kadapt.AdapterConfig(reduction_factor=math.inf),
               r"reduction_factor=inf must be a finite number > 0"),
    "rf_bool": (lambda: kadapt.AdapterConfig(reduction_factor=True),
                r"reduction_factor=True must be a finite number > 0"),
    "rf_str": (lambda: kadapt.AdapterConfig(reduction_factor="16"),
               r"reduction_factor='16' must be a finite number > 0"),
    "bottleneck_dim_zero": (lambda: kadapt.AdapterConfig(bottleneck_dim=0),
                            r"bottleneck_dim=0 must be an integer >= 1"),
    "bottleneck_dim_float": (lambda: kadapt.PfeifferConfig(bottleneck_dim=8.0),
                             r"bottleneck_dim=8\.0 must be an integer >= 1"),
    "rank_zero": (lambda: kadapt.LowRankAdapterConfig(rank=0), r"rank=0 must be an integer >= 1"),
    "phm_dim_zero_phm": (lambda: kadapt.PHMAdapterConfig(phm_dim=0), r"phm_dim=0 must be an integer >= 1"),
    "phm_dim_zero_compacter": (lambda: kadapt.CompacterConfig(phm_dim=0), r"phm_dim=0 must be an integer >= 1"),
    "phm_dim_zero_compacterpp": (lambda: kadapt.CompacterPlusPlusConfig(phm_dim=0),
                                 r"phm_dim=0 must be an integer >= 1"),
    "phm_rank_zero": (lambda: kadapt.CompacterConfig(phm_rank=0), r"phm_rank=0 must be an integer >= 1"),
    "phm_init_range_zero": (lambda: kadapt.CompacterConfig(phm_init_range=0),
                            r"phm_init_range=0 must be a finite number > 0"),
    "activation": (lambda: kadapt.AdapterConfig(activation="tanh"),
                   rf"activation='tanh' is not allowed; allowed values: {ACTS}$"),
    "placement": (lambda: kadapt.AdapterConfig(placement="cross"),
                  r"placement='cross' is not allowed; allowed values: 'attn', 'ffn', 'both'$"),
    "pfeiffer_placement_both": (lambda: kadapt.PfeifferConfig(placement="both"),
                                r"placement='both' is not allowed; allowed values: 'attn', 'ffn'$"),
    "init": (lambda: kadapt.AdapterConfig(init="xavier"),
             r"init='xavier' is not allowed; allowed values: 'normal', 'torch_default'$"),
    "drop_first_negative": (lambda: kadapt.AdapterConfig(drop_first=-1), r"drop_first=-1 must be an integer >= 0"),
    "ln_pre_str": (lambda: kadapt.AdapterConfig(ln_pre="yes"), r"ln_pre='yes' must be a bool \(True or False\)"),
    "layers_negative": (lambda: kadapt.AdapterConfig(layers=[-1]),
                        r"layers contains -1; block ids must be integers >= 0"),
    "layers_negative_dict": (lambda: kadapt.AdapterConfig(layers={"encoder": [0], "decoder": [-1]}),
                             r"layers contains -1; block ids must be integers >= 0"),
    "layers_str": (lambda: kadapt.AdapterConfig(layers="0,1"),
                   r"layers='0,1' must be a list of block ids or a dict stack -> list"),
    "layers_and_drop_first": (lambda: kadapt.AdapterConfig(layers=[1], drop_first=1),
                              r"set either layers or drop_first, not both \(layers=\[1\], drop_first=1\)"),
    "phm_c_init": (lambda: kadapt.CompacterConfig(phm_c_init="xavier"),
                   r"phm_c_init='xavier' is not allowed; allowed values: 'normal', 'uniform'$"),
    "shared_phm_rule": (lambda: kadapt.CompacterConfig(shared_phm_rule=1),
                        r"shared_phm_rule=1 must be a bool \(True or False\)"),
    "learn_phm": (lambda: kadapt.PHMAdapterConfig(learn_phm="no"), r"learn_phm='no' must be a bool \(True or False\)"),
    "bitfit_compat": (lambda: kadapt.BitFitConfig(compat_bitfit_skip_final_ln="yes"),
                      r"compat_bitfit_skip_final_ln='yes' must be a bool \(True or False\)"),
    "from_dict_method": (lambda: KadaptConfig.from_dict({"method": "inducer"}),
                         r"method='inducer' is not allowed; allowed values: 'adapter', 'bitfit', 'compacter', "
                         r"'compacter\+\+', 'full_finetune', 'inducer_tuning', 'intrinsic_said', 'kernel_mix', 'lora', "
                         r"'low_rank_adapter', 'mam', 'parallel_adapter', 'pfeiffer', 'phm_adapter', "
                         r"'prefix_tuning', 'prompt_tuning'$"),
    "from_dict_field": (lambda: KadaptConfig.from_dict({"method": "bitfit", "rank": 2}),
                        r"unknown field\(s\) \['rank'\] for method 'bitfit'; allowed fields: "
                        r"\['compat_bitfit_skip_final_ln'\]$"),
    "from_dict_no_method": (lambda: KadaptConfig.from_dict({"rank": 2}), r"config must be a dict with a 'method' key"),
    "backend": (lambda: kadapt.set_backend("fast"),
                r"backend='fast' is not a backend; allowed values: auto, reference, triton, cuda$"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_field(name):
    make, match = CONFIG_CASES[name]
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_preset_lists_every_preset():
    with pytest.raises(ValueError, match=r"preset='compacter_paper\.lora' is not allowed; allowed values: ") as e:
        kadapt.preset("compacter_paper.lora")
    for name in kadapt.PRESETS:
        assert repr(name) in str(e.value)


@pytest.mark.parametrize("config", [None, "adapter", {"method": "adapter"}, kadapt.AdapterConfig, KadaptConfig()])
def test_patch_with_non_config(config):
    model = tiny("gpt2")
    match = (r"config: KadaptConfig is not a registered kadapt method; registered methods: " if isinstance(config, KadaptConfig)
             else r"config: expected a kadapt \*Config instance, got ")
    patch_fails(model, config, match)


# --------------------------------------------------------------------------------------- model level

@pytest.mark.parametrize("family", FAMILIES)
def test_phm_dim_not_dividing_hidden(family):
    # n = 5 divides m = 10 but not D = 64.
    msg = (r"phm_dim=5 must divide both the hidden size D=64 and the bottleneck m=10; "
           r"allowed phm_dim values here: \[1, 2\]$")
    patch_fails(tiny(family), kadapt.PHMAdapterConfig(phm_dim=5, bottleneck_dim=10), msg)
    patch_fails(tiny(family), kadapt.CompacterConfig(phm_dim=5, bottleneck_dim=10), msg)


@pytest.mark.parametrize("family, cls", [(f, kadapt.PHMAdapterConfig) for f in FAMILIES] + [
    ("gpt2", kadapt.CompacterConfig), ("t5", kadapt.CompacterConfig), ("bert", kadapt.CompacterPlusPlusConfig)])
def test_phm_dim_not_dividing_bottleneck(family, cls):
    # n = 4 divides D = 64 but not m = 6.
    msg = (r"phm_dim=4 must divide both the hidden size D=64 and the bottleneck m=6; "
           r"allowed phm_dim values here: \[1, 2\]$")
    patch_fails(tiny(family), cls(phm_dim=4, bottleneck_dim=6), msg)


def test_default_compacter_on_tiny_model():
    # m = 64 // 32 = 2, default n = 4 does not divide it.
    patch_fails(tiny("t5"), kadapt.CompacterConfig(),
                r"phm_dim=4 must divide both the hidden size D=64 and the bottleneck m=2; "
                r"allowed phm_dim values here: \[1, 2\]$")
    patch_fails(tiny("t5"), kadapt.CompacterConfig(reduction_factor=8, phm_dim=3),
                r"phm_dim=3 must divide both .* m=8; allowed phm_dim values here: \[1, 2, 4, 8\]$")


@pytest.mark.parametrize("family, rf, cls", [(f, 1000, kadapt.AdapterConfig) for f in FAMILIES] + [
    ("gpt2", 65, kadapt.LowRankAdapterConfig), ("t5", 64.5, kadapt.PfeifferConfig),
    ("roberta", 100.0, kadapt.CompacterConfig)])
def test_reduction_factor_gives_empty_bottleneck(family, rf, cls):
    msg = (rf"reduction_factor={re.escape(repr(rf))} gives a bottleneck of 0 on hidden size 64; "
           r"allowed: 0 < reduction_factor <= 64$")
    patch_fails(tiny(family), cls(reduction_factor=rf), msg)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_id_out_of_range(family):
    first_stack = "decoder" if family == "gpt2" else "encoder"
    msg = rf"layers: block id\(s\) \[5\] out of range for the {first_stack} stack; allowed block ids: 0\.\.1$"
    patch_fails(tiny(family), kadapt.AdapterConfig(bottleneck_dim=8, layers=[5]), msg)
    patch_fails(tiny(family), kadapt.AdapterConfig(bottleneck_dim=8, layers=[0, 2]),
                rf"layers: block id\(s\) \[2\] out of range for the {first_stack} stack; allowed block ids: 0\.\.1$")


def test_layer_id_out_of_range_t5_decoder():
    patch_fails(tiny("t5"), kadapt.CompacterConfig(bottleneck_dim=8, layers={"encoder": [1], "decoder": [0, 7]}),
                r"layers: block id\(s\) \[7\] out of range for the decoder stack; allowed block ids: 0\.\.1$")


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_unknown_stack(family):
    stacks = re.escape(repr(STACKS[family]))
    patch_fails(tiny(family), kadapt.AdapterConfig(bottleneck_dim=8, layers={"foo": [0]}),
                rf"layers names unknown stack\(s\) \['foo'\]; this \w+ model's stacks: {stacks}$")


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_first_too_large(family):
    patch_fails(tiny(family), kadapt.AdapterConfig(bottleneck_dim=8, drop_first=3),
                r"drop_first=3 exceeds the 2 blocks of the \w+ stack; allowed: 0\.\.2$")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("first", [kadapt.AdapterConfig(bottleneck_dim=8), kadapt.BitFitConfig(),
                                   kadapt.CompacterConfig(bottleneck_dim=8)])
def test_already_patched(family, first):
    model = tiny(family)
    kadapt.patch(model, first)
    name = type(first).__name__
    for second in (first, kadapt.FullFinetuneConfig()):
        patch_fails(model, second, rf"model is already patched with {name}; call kadapt\.unpatch\(model\) first$")


def test_unpatch_and_save_unpatched():
    model = tiny("gpt2")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model is not patched by kadapt \(nothing to unpatch\)"):
        kadapt.unpatch(model)
    with pytest.raises(ValueError, match=r"not patched by kadapt: patch it \(kadapt\.patch\) before save_adapter"):
        kadapt.save_adapter(model, "/nonexistent/never/created")
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------- loading

def saved(tmp_path, family="gpt2", config=None, hidden=64, name="adapter"):
    model = tiny(family, hidden=hidden, seed=123)
    kadapt.patch(model, config or kadapt.AdapterConfig(bottleneck_dim=8))
    with torch.no_grad():  # make the saved tensors differ from a fresh init
        for p in kadapt.api.adapter_state(model).values():
            p.add_(0.5)
    directory = tmp_path / name
    kadapt.save_adapter(model, directory)
    return directory


def edit_meta(directory, fn):
    path = directory / CONFIG_FILE
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_valid_round_trip_sanity(tmp_path):
    """The fixtures used below are valid: a clean load works into unpatched and same-patched models."""
    d = saved(tmp_path)
    model = kadapt.load_adapter(tiny("gpt2"), d)
    assert is_patched(model)
    other = kadapt.patch(tiny("gpt2"), kadapt.AdapterConfig(bottleneck_dim=8))
    kadapt.load_adapter(other, d)
    assert torch.equal(fixed_output(model), fixed_output(other))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_load_other_method_into_patched_model(tmp_path, family):
    d = saved(tmp_path, family, kadapt.AdapterConfig(bottleneck_dim=8))
    model = kadapt.patch(tiny(family), kadapt.CompacterConfig(bottleneck_dim=8))
    load_fails(model, d, r"config: the adapter was saved with AdapterConfig\(.*\), but the model is patched with "
                         r"CompacterConfig\(.*\); call kadapt\.unpatch\(model\) first or load into an unpatched model$")


def test_load_same_method_other_config_into_patched_model(tmp_path):
    d = saved(tmp_path, "roberta", kadapt.AdapterConfig(bottleneck_dim=8))
    model = kadapt.patch(tiny("roberta"), kadapt.AdapterConfig(bottleneck_dim=4))
    load_fails(model, d, r"config: the adapter was saved with AdapterConfig\(.*bottleneck_dim=8.*\), but the model "
                         r"is patched with AdapterConfig\(.*bottleneck_dim=4.*\)")


@pytest.mark.parametrize("family", FAMILIES)
def test_load_other_hidden_size(tmp_path, family):
    d = saved(tmp_path, family, hidden=64)
    mt = family
    load_fails(tiny(family, hidden=32), d,
               rf"model: the adapter was saved for model_type='{mt}' with hidden size 64; "
               rf"this model is model_type='{mt}' with hidden size 32$")
    # ...also into a model already patched with the same config.
    target = kadapt.patch(tiny(family, hidden=32), kadapt.AdapterConfig(bottleneck_dim=8))
    load_fails(target, d, r"model: the adapter was saved for model_type=.* with hidden size 64; .*hidden size 32$")


@pytest.mark.parametrize("src, dst", [("gpt2", "t5"), ("t5", "gpt2"), ("bert", "roberta"), ("roberta", "t5")])
def test_load_other_model_type(tmp_path, src, dst):
    d = saved(tmp_path, src)
    load_fails(tiny(dst), d, rf"model: the adapter was saved for model_type='{src}' with hidden size 64; "
                             rf"this model is model_type='{dst}' with hidden size 64$")


@pytest.mark.parametrize("family", FAMILIES)
def test_load_tensors_do_not_fit_config(tmp_path, family):
    """Saved with bottleneck_dim=8, config rewritten to bottleneck_dim=4: the tensors no longer fit."""
    d = saved(tmp_path, family, kadapt.AdapterConfig(bottleneck_dim=8))
    edit_meta(d, lambda meta: meta["config"].update(bottleneck_dim=4))
    load_fails(tiny(family), d, r"adapter tensor '\S+\.kadapt_adapter\.(down|up)\.(w|bias)' has shape "
                                r"\((64, 8|8, 64|8,)\); the patched model expects \((64, 4|4, 64|4,)\)$")


def test_load_tensors_do_not_fit_into_patched_model(tmp_path):
    d = saved(tmp_path, "gpt2", kadapt.AdapterConfig(bottleneck_dim=8))
    edit_meta(d, lambda meta: meta["config"].update(bottleneck_dim=4))
    model = kadapt.patch(tiny("gpt2"), kadapt.AdapterConfig(bottleneck_dim=4))
    load_fails(model, d, r"adapter tensor '\S+kadapt_adapter\S+' has shape \(64, 8\); the patched model expects "
                         r"\(64, 4\)$")


@pytest.mark.parametrize("family, config", [
    ("gpt2", kadapt.CompacterConfig(bottleneck_dim=8)),
    ("t5", kadapt.PHMAdapterConfig(bottleneck_dim=8, phm_dim=4)),
    ("roberta", kadapt.LowRankAdapterConfig(bottleneck_dim=8, rank=2)),
    ("bert", kadapt.BitFitConfig()),
    ("gpt2", kadapt.FullFinetuneConfig()),
])
def test_load_tensor_shape_mismatch_rolls_back(tmp_path, family, config):
    """A tensor with a wrong shape is found after load_adapter patched the model: it must unpatch again."""
    from safetensors.torch import load_file, save_file
    d = saved(tmp_path, family, config)
    weights = load_file(str(d / WEIGHTS_FILE))
    name = sorted(weights)[-1]
    shape = tuple(weights[name].shape)
    weights[name] = torch.zeros(*shape[:-1], shape[-1] + 1)
    save_file(weights, str(d / WEIGHTS_FILE))
    bad = shape[:-1] + (shape[-1] + 1,)
    load_fails(tiny(family), d, rf"adapter tensor '{re.escape(name)}' has shape {re.escape(str(bad))}; "
                                rf"the patched model expects {re.escape(str(shape))}$")


def _rewrite_weights(d, fn):
    from safetensors.torch import load_file, save_file
    weights = load_file(str(d / WEIGHTS_FILE))
    fn(weights)
    save_file(weights, str(d / WEIGHTS_FILE))


def test_load_missing_unexpected_and_int_tensors(tmp_path):
    d = saved(tmp_path, "t5", kadapt.AdapterConfig(bottleneck_dim=8))
    names = []
    _rewrite_weights(d, lambda w: names.append(sorted(w)[0]) or w.pop(names[0]))
    load_fails(tiny("t5"), d, rf"adapter tensors do not match the patched model: missing \['{re.escape(names[0])}'\], "
                              r"unexpected \[\] \(config 'adapter'\)$")
    d = saved(tmp_path, "t5", kadapt.AdapterConfig(bottleneck_dim=8), name="extra")
    _rewrite_weights(d, lambda w: w.update({"encoder.bogus": torch.zeros(3)}))
    load_fails(tiny("t5"), d, r"missing \[\], unexpected \['encoder\.bogus'\] \(config 'adapter'\)$")
    d = saved(tmp_path, "t5", kadapt.AdapterConfig(bottleneck_dim=8), name="int")
    target = []

    def to_int(w):
        target.append(sorted(w)[-1])
        w[target[0]] = w[target[0]].to(torch.int32)
    _rewrite_weights(d, to_int)
    load_fails(tiny("t5"), d,
               rf"adapter tensor '{re.escape(target[0])}' has dtype torch\.int32; expected a float dtype$")


@pytest.mark.parametrize("family, keep", [(f, 0.5) for f in FAMILIES] + [("gpt2", 0.99), ("t5", 0.0)])
def test_load_truncated_weights(tmp_path, family, keep):
    d = saved(tmp_path, family)
    path = d / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 0.99 else data[:-4])
    msg = r"adapter_model\.safetensors cannot be read \(.*\); the adapter file is truncated or corrupt$"
    load_fails(tiny(family), d, msg)
    # Into a model already patched with the saved config, too.
    load_fails(kadapt.patch(tiny(family), kadapt.AdapterConfig(bottleneck_dim=8)), d, msg)


def test_load_garbage_weights(tmp_path):
    d = saved(tmp_path)
    (d / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    load_fails(tiny("gpt2"), d, r"adapter_model\.safetensors cannot be read .*truncated or corrupt$")


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
def test_load_truncated_config_json(tmp_path, keep):
    d = saved(tmp_path)
    path = d / CONFIG_FILE
    text = path.read_text()
    path.write_text(text[: int(len(text) * keep)])
    load_fails(tiny("gpt2"), d,
               r"adapter_config\.json is not valid JSON \(.*\); the adapter file is truncated or corrupt$")


@pytest.mark.parametrize("key", ["format_version", "config", "model_type", "hidden_size", "shapes"])
def test_load_config_json_missing_field(tmp_path, key):
    d = saved(tmp_path)
    edit_meta(d, lambda meta: meta.pop(key))
    load_fails(tiny("gpt2"), d,
               rf"adapter_config\.json: missing field '{key}'; the adapter file is truncated or corrupt$")


def test_load_config_json_not_an_object(tmp_path):
    d = saved(tmp_path)
    for text in ("[]", '"adapter"'):
        (d / CONFIG_FILE).write_text(text)
        load_fails(tiny("gpt2"), d, r"adapter_config\.json holds (list|str), not a JSON object; .*truncated or corrupt$")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=2), r"adapter_config\.json: format_version=2; this kadapt reads: 1$"),
    (lambda m: m["config"].update(method="inducer"),
     r"method='inducer' is not allowed; allowed values: 'adapter', "),
    (lambda m: m["config"].update(rank=3), r"unknown field\(s\) \['rank'\] for method 'adapter'; allowed fields: \["),
    (lambda m: m["config"].update(reduction_factor=0), r"reduction_factor=0 must be a finite number > 0"),
    (lambda m: m["config"].update(bottleneck_dim=None, reduction_factor=1000),
     r"reduction_factor=1000 gives a bottleneck of 0 on hidden size 64; allowed: 0 < reduction_factor <= 64$"),
    (lambda m: m["config"].update(layers=[5]),
     r"layers: block id\(s\) \[5\] out of range for the decoder stack; allowed block ids: 0\.\.1$"),
    (lambda m: m["config"].update(activation="tanh"), rf"activation='tanh' is not allowed; allowed values: {ACTS}$"),
    (lambda m: m.update(config="adapter"), r"config must be a dict with a 'method' key"),
], ids=["format_version", "method", "unknown_field", "reduction_factor", "empty_bottleneck", "layers",
        "activation", "config_not_dict"])
def test_load_invalid_saved_config(tmp_path, edit, match):
    d = saved(tmp_path)
    edit_meta(d, edit)
    load_fails(tiny("gpt2"), d, match)


def test_load_missing_directory_and_files(tmp_path):
    load_fails(tiny("gpt2"), tmp_path / "nope",
               r"nope/adapter_config\.json not found: not a kadapt adapter directory "
               r"\(expected adapter_config\.json and adapter_model\.safetensors\)$")
    d = saved(tmp_path)
    (d / WEIGHTS_FILE).unlink()
    load_fails(tiny("gpt2"), d, r"adapter_model\.safetensors not found: the adapter directory lacks its weights file "
                                r"adapter_model\.safetensors$")
    d = saved(tmp_path, name="b")
    (d / CONFIG_FILE).unlink()
    load_fails(tiny("gpt2"), d, r"adapter_config\.json not found")
    # a file, not a directory
    load_fails(tiny("gpt2"), d / WEIGHTS_FILE, r"adapter_config\.json not found")


# --------------------------------------------------------------------------- regressions (bugs found and fixed)

@pytest.mark.parametrize("text", ["null", "1"])
def test_regression_config_json_scalar(tmp_path, text):
    d = saved(tmp_path)
    (d / CONFIG_FILE).write_text(text)
    load_fails(tiny("gpt2"), d, r"adapter_config\.json.*truncated or corrupt")


def test_regression_from_dict_layers_not_a_list(tmp_path):
    d = saved(tmp_path)
    edit_meta(d, lambda meta: meta["config"].update(layers={"decoder": 5}))
    load_fails(tiny("gpt2"), d, r"layers")


def test_regression_mutated_config_not_revalidated():
    config = kadapt.AdapterConfig()
    config.reduction_factor = 0
    patch_fails(tiny("gpt2"), config, r"reduction_factor=0")


def _t5_bitfit_adapter_with_bad_shape(tmp_path):
    d = saved(tmp_path, "t5", kadapt.BitFitConfig())
    _rewrite_weights(d, lambda w: w.update({"lm_head.bias": torch.zeros(101)}))
    return d


T5_BITFIT_MSG = r"adapter tensor 'lm_head\.bias' has shape \(101,\); the patched model expects \(100,\)$"


def test_t5_bitfit_failed_load_rolls_back(tmp_path):
    """BitFit on T5 adds new bias parameters; a failed load must take them out again ((a)-(e))."""
    load_fails(tiny("t5"), _t5_bitfit_adapter_with_bad_shape(tmp_path), T5_BITFIT_MSG, param_slots=False)


def test_regression_t5_bitfit_failed_load_leaves_bias_slots(tmp_path):
    load_fails(tiny("t5"), _t5_bitfit_adapter_with_bad_shape(tmp_path), T5_BITFIT_MSG)


def test_regression_mutated_layers_not_revalidated():
    config = kadapt.AdapterConfig(bottleneck_dim=8)
    config.layers = [-1]
    patch_fails(tiny("gpt2"), config, r"layers")
