"""Defects found when kadapt was tried as a user would (each reproduced on af8c7e5; each test failed there)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import kadapt
from _models import inputs, output, perturb_trainables, tiny
from kadapt.patching import is_patched


def _prefix():
    return kadapt.PrefixTuningConfig(prefix_length=3, hidden_size=8)


# ------------------------------------------------------------------------------ one model never changes another

def test_patching_one_model_leaves_a_model_sharing_its_config_alone():
    """RLHF-style policy + frozen reference built from one config object."""
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32)
    policy, reference = GPT2LMHeadModel(cfg).eval(), GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    before = reference(input_ids=ids).logits
    kadapt.patch(policy, _prefix())
    assert reference.config._attn_implementation == "sdpa" and cfg._attn_implementation == "sdpa"
    assert torch.equal(reference(input_ids=ids).logits, before)  # was: RuntimeError "...not prepared"
    assert policy.config._attn_implementation == "kadapt"
    kadapt.unpatch(policy)
    assert policy.config is cfg and policy.transformer.h[0].attn.config is cfg


def test_switching_attention_after_patch_is_refused():
    model = tiny("gpt2")
    kadapt.patch(model, _prefix())
    perturb_trainables(model)
    with_prefix = output(model, "gpt2")
    with pytest.raises(ValueError, match=r"set_attn_implementation\('eager'\): the model is patched by kadapt"):
        model.set_attn_implementation("eager")
    assert torch.equal(output(model, "gpt2"), with_prefix)  # the prefix still applies
    model.set_attn_implementation("kadapt")  # a no-op is fine
    kadapt.unpatch(model)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------------------------- threads

@pytest.mark.parametrize("family", ["roberta", "t5", "gpt2"])
@pytest.mark.parametrize("config", [
    kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement="both", init="torch_default"),
    kadapt.InducerTuningConfig(key_width=2, value_width=3),
    kadapt.MAMConfig(prefix=kadapt.PrefixTuningConfig(prefix_length=3, hidden_size=8),
                     parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8, init="torch_default")),
    kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=2),
], ids=["parallel", "inducer", "mam", "kernel_mix"])
def test_concurrent_forwards_are_correct(family, config):
    """Two threads running no_grad forwards on one patched model: every output equals the single-thread one
    (hooks hand tensors on per thread, not through module attributes)."""
    model = tiny(family)
    kadapt.patch(model, config)
    perturb_trainables(model)
    batches = [inputs(family, batch=1 + i % 2, length=5 + i, seed=i) for i in range(6)]
    with torch.no_grad():
        want = [output(model, family, **kw) for kw in batches]
    errors, wrong = [], []

    def run(offset: int) -> None:
        try:
            for step in range(40):
                i = (step + offset) % len(batches)
                with torch.no_grad():
                    got = output(model, family, **batches[i])
                if not torch.allclose(got, want[i], rtol=1e-5, atol=1e-6):
                    wrong.append(i)
        except Exception as e:  # pragma: no cover - the failure being tested
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors[:3], len(wrong))


# ------------------------------------------------------------------------------------- HF save / load

@pytest.mark.parametrize("family, config", [
    ("gpt2", kadapt.LoRAConfig(r=2, targets=("q", "v", "o"), lora_bias=True)),
    ("roberta", kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=2)),
    ("t5", kadapt.LoRAConfig(r=2, targets=("q", "k", "v", "o"))),
    ("llama", kadapt.LoRAConfig(r=2, targets=("q", "v", "ffn_in", "ffn_out"))),
])
def test_merged_model_round_trips_through_save_pretrained(tmp_path, family, config):
    model = tiny(family)
    kadapt.patch(model, config)
    perturb_trainables(model)
    kadapt.merge(model)
    want = output(model, family)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(again, family), want, rtol=0, atol=0)


@pytest.mark.parametrize("family, config", [
    ("t5", kadapt.LoRAConfig(r=2, lora_bias=True)),
    ("t5", kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=2)),
    ("llama", kadapt.KernelMixConfig(r_q=1, r_qs=0, r_v=0, r_vs=1)),
])
def test_merge_refuses_to_add_biases_the_architecture_lacks(tmp_path, family, config):
    """Merged biases on bias-free T5/Llama linears would be dropped by from_pretrained: refused before any write,
    or added on request (allow_new_biases=True) with the in-memory model exact."""
    model = tiny(family)
    kadapt.patch(model, config)
    perturb_trainables(model)
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"merge would add a bias to \d+ linear\(s\) .* allow_new_biases=True"):
        kadapt.merge(model)
    assert is_patched(model) and all(torch.equal(state[n], p) for n, p in model.state_dict().items())
    want = output(model, family)
    kadapt.merge(model, allow_new_biases=True)
    torch.testing.assert_close(output(model, family), want, rtol=1e-5, atol=1e-5)


def test_patched_model_save_pretrained_then_load_adapter(tmp_path):
    """The documented path for an unmerged model: save_pretrained keeps only the base weights (kadapt's tensors
    are not in the HF state dict under names the class knows), so reload the base and load_adapter."""
    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8))
    perturb_trainables(model)
    want = output(model, "gpt2")
    kadapt.save_adapter(model, tmp_path / "adapter")
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, "gpt2"), want)


# ---------------------------------------------------------------------------- user-unfrozen tensors

def test_user_unfrozen_embeddings_round_trip(tmp_path):
    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, kadapt.LoRAConfig(r=2))
    model.transformer.wte.weight.requires_grad_(True)
    perturb_trainables(model)
    want = output(model, "gpt2")
    kadapt.save_adapter(model, tmp_path / "adapter")
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    original = fresh.transformer.wte.weight.detach().clone()
    kadapt.load_adapter(fresh, tmp_path / "adapter")  # was: refused ("unexpected transformer.wte.weight")
    assert torch.equal(output(fresh, "gpt2"), want)
    assert fresh.transformer.wte.weight.requires_grad
    kadapt.unpatch(fresh)
    assert torch.equal(fresh.transformer.wte.weight, original)  # the loaded value is taken back out


# --------------------------------------------------------------------- refuse before touching the model

def _untouched(model, configs, match):
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        kadapt.patch(model, configs)
    assert not is_patched(model) and all(torch.equal(state[n], p) for n, p in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("config", [_prefix(), kadapt.InducerTuningConfig(key_width=2, value_width=3)],
                         ids=["prefix", "inducer"])
def test_attention_methods_refuse_unsupported_cross_attention(config):
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=50, is_decoder=True, add_cross_attention=True)).eval()
    _untouched(bert, config, r"runs inside attention, which this 'bert' model does not let kadapt do: "
                             r"add_cross_attention=True")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, add_cross_attention=True)).eval()
    _untouched(gpt2, config, r"'gpt2' model does not let kadapt do: add_cross_attention=True")


def test_prefix_shift_positions_checks_the_position_limit():
    model = tiny("gpt2")  # n_positions = 64
    _untouched(model, kadapt.PrefixTuningConfig(prefix_length=64, hidden_size=8, compat_prefix_shift_positions=True),
               r"real tokens would start at position 64, past the model's 64 learned positions")
    kadapt.patch(model, kadapt.PrefixTuningConfig(prefix_length=60, hidden_size=8, compat_prefix_shift_positions=True))
    with pytest.raises(ValueError, match=r"needs position 68, but the model has 64 learned positions"):
        model(input_ids=torch.randint(0, 100, (1, 9)))  # was: IndexError


def test_a_config_that_trains_nothing_is_refused():
    _untouched(tiny("gpt2"), kadapt.AdapterConfig(layers=[], unfreeze_layer_norms=False),
               r"config: adapter trains nothing on this 'gpt2' model .*layers, drop_first")


def test_layers_with_non_string_keys_is_a_value_error():
    with pytest.raises(ValueError, match=r"layers=.*dict keys must be stack names"):
        kadapt.AdapterConfig(layers={1: [0], "foo": [0]})


def test_numpy_numbers_are_accepted_and_saved_as_json(tmp_path):
    config = kadapt.LoRAConfig(r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.0))
    model = tiny("gpt2")
    kadapt.patch(model, config)
    kadapt.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert saved["r"] == 4 and type(saved["r"]) is int and saved["alpha"] == 8.0
    kadapt.load_adapter(tiny("gpt2"), tmp_path)
    kadapt.AdapterConfig(bottleneck_dim=np.int32(8), reduction_factor=np.float64(16.0), layers=[np.int64(0)])


def test_non_utf8_config_names_the_file(tmp_path):
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.LoRAConfig(r=2))
    kadapt.save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(b"\xff\xfe{ not utf-8 \x80")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not UTF-8 text"):
        kadapt.load_adapter(tiny("gpt2"), tmp_path)


def test_config_naming_another_method_than_its_tensors_is_refused(tmp_path):
    """A Houlsby file (ffn placement) relabelled "pfeiffer" would load silently as Pfeiffer: refused, naming both."""
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8, placement="ffn"))
    kadapt.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["config"]["method"] = "pfeiffer"
    path.write_text(json.dumps(meta))
    fresh = tiny("gpt2")
    with pytest.raises(ValueError, match=r"names method 'pfeiffer' but adapter_model\.safetensors was saved by "
                                         r"method 'adapter'"):
        kadapt.load_adapter(fresh, tmp_path)
    assert not is_patched(fresh)
