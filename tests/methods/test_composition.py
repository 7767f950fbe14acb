"""Methods composed as a list: ``kadapt.patch(model, [cfg_a, cfg_b, ...])`` applies them in list order with one
record; unpatch, save/load, merge and eject work on the composite; the nested forms (InducerTuningConfig(lora=...),
MAMConfig, the presets) are the same composition and keep their exact budgets; conflicts name both methods."""
from __future__ import annotations

import pytest
import torch

import kadapt
from _models import (check_merge, gpt2_small_meta, inputs, output, perturb_trainables, roberta_base_meta, tiny)
from kadapt.patching import get_record, is_patched


def _prefix(**kw):
    return kadapt.PrefixTuningConfig(prefix_length=3, hidden_size=8, **kw)


def _inducer(**kw):
    return kadapt.InducerTuningConfig(key_width=2, value_width=3, **kw)


LORA_Q = kadapt.LoRAConfig(r=2, targets=("q",), lora_bias=True, init="houlsby")
KERNEL_MIX = kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=2)
PARALLEL = kadapt.ParallelAdapterConfig(bottleneck_dim=4, init="torch_default")

# (list form, the nested form it equals): same parts, planned in the same order, so the same parameters.
EQUIVALENT = {
    "inducer+prefix": ([_prefix(), _inducer()], _inducer(prefix=_prefix())),
    "inducer+lora": ([_inducer(), LORA_Q], _inducer(lora=LORA_Q)),
    "inducer+kernel_mix": ([_inducer(), KERNEL_MIX], _inducer(kernel_mix=KERNEL_MIX)),
    "inducer+parallel": ([_inducer(), PARALLEL], _inducer(parallel_adapter=PARALLEL)),
    "inducer+all": ([_prefix(), _inducer(), KERNEL_MIX, LORA_Q, PARALLEL],
                    _inducer(prefix=_prefix(), kernel_mix=KERNEL_MIX, lora=LORA_Q, parallel_adapter=PARALLEL)),
    "mam": ([_prefix(), PARALLEL], kadapt.MAMConfig(prefix=_prefix(), parallel_adapter=PARALLEL)),
}


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_list_equals_nested_form(name, family):
    composed, nested = EQUIVALENT[name]
    a, b = tiny(family), tiny(family)
    torch.manual_seed(5)
    kadapt.patch(a, composed)
    torch.manual_seed(5)
    kadapt.patch(b, nested)
    assert kadapt.trainable_parameters(a) == kadapt.trainable_parameters(b)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sorted(pa) == sorted(pb)  # the same state-dict names: saved adapters are interchangeable
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    kw = inputs(family)
    out_a = output(a, family, **kw)
    out_b = output(b, family, **kw)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    out_a.sum().backward()
    out_b.sum().backward()
    for n, p in pa.items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, pb[n].grad, rtol=1e-6, atol=1e-7, msg=n)


def test_list_forms_keep_the_exact_budgets():
    """docs/methods.md budgets: GPT-2 small inducer-lora 2,002,320 and inducer-mam 2,020,248; RoBERTa-base MAM
    599,232 after eject, given as lists."""
    lora24 = kadapt.LoRAConfig(r=24, alpha=32, dropout=0.1, targets=("q",), lora_bias=True)
    model = gpt2_small_meta()
    kadapt.patch(model, [kadapt.InducerTuningConfig(key_width=5, value_width=12), lora24])
    assert kadapt.trainable_parameters(model)[0] == 2_002_320 == 12 * (8_508 + 120_720 + 37_632)
    model = gpt2_small_meta()
    kadapt.patch(model, [kadapt.InducerTuningConfig(key_width=3, value_width=7),
                         kadapt.LoRAConfig(r=16, alpha=32, dropout=0.1, targets=("q",), lora_bias=True),
                         kadapt.ParallelAdapterConfig(reduction_factor=18.2, scale=1.0, ln_pre=True, activation="relu",
                                                      init="torch_default")])
    assert kadapt.trainable_parameters(model)[0] == 2_020_248 == 12 * (5_412 + 70_740 + 25_344 + 66_858)
    model = roberta_base_meta()
    with torch.device("meta"):
        kadapt.patch(model, [kadapt.PrefixTuningConfig(prefix_length=16, hidden_size=800),
                             kadapt.ParallelAdapterConfig(bottleneck_dim=16, scale=2.0, dropout=0.1)])
        kadapt.eject(model)
    assert kadapt.trainable_parameters(model)[0] == 599_232 == 12 * (24_576 + 25_360)


@pytest.mark.parametrize("family", ["gpt2", "t5", "llama"])
def test_composite_unpatch_and_save_load(tmp_path, family):
    configs = [kadapt.AdapterConfig(bottleneck_dim=8, placement="ffn"), kadapt.LoRAConfig(r=2, targets=("q", "v")),
               kadapt.ParallelAdapterConfig(bottleneck_dim=4, placement="attn"), _prefix()]
    model = tiny(family)
    base = output(model, family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, configs)
    record = get_record(model)
    assert record.config == configs and record.methods == "adapter + lora + parallel_adapter + prefix_tuning"
    perturb_trainables(model)
    expected = output(model, family)
    kadapt.save_adapter(model, tmp_path / "adapter")
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert get_record(fresh).config == configs
    assert torch.equal(output(fresh, family), expected)
    kadapt.unpatch(model)
    assert torch.equal(output(model, family), base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5", "llama"])
def test_composite_merge(family):
    model = tiny(family)
    kadapt.patch(model, [kadapt.LoRAConfig(r=2, targets=("q", "k", "v", "o"), lora_bias=family != "t5",
                                           init="houlsby"), KERNEL_MIX])
    perturb_trainables(model)
    check_merge(model, family)


def test_merge_refuses_a_composite_with_a_non_mergeable_part():
    model = tiny("gpt2")
    kadapt.patch(model, [kadapt.LoRAConfig(r=2), kadapt.AdapterConfig(bottleneck_dim=8)])
    with pytest.raises(ValueError, match=r"patched with method 'adapter' \(AdapterConfig\), which cannot be merged"):
        kadapt.merge(model)
    assert is_patched(model)


def test_composite_eject():
    model = tiny("roberta")
    kadapt.patch(model, [kadapt.LoRAConfig(r=2), _prefix()])
    perturb_trainables(model)
    before = output(model, "roberta")
    kadapt.eject(model)
    assert get_record(model).config[1].reparameterize is False
    assert not any("kadapt_prefix" in n for n, _ in model.named_modules())
    torch.testing.assert_close(output(model, "roberta"), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("configs, match", [
    ([kadapt.LoRAConfig(), kadapt.LoRAConfig(r=4)], r"methods '\[0\] lora' and '\[1\] lora' both attach 'kadapt_lora'"),
    ([kadapt.AdapterConfig(bottleneck_dim=8), kadapt.CompacterConfig(bottleneck_dim=8)],
     r"methods '\[0\] adapter' and '\[1\] compacter' both attach 'kadapt_adapter'"),
    ([_prefix(), kadapt.MAMConfig(prefix=_prefix())],
     r"methods '\[0\] prefix_tuning' and '\[1\] mam.prefix_tuning' both (attach|change)"),
    ([_inducer(), _inducer()], r"methods '\[0\] inducer_tuning' and '\[1\] inducer_tuning' both change attention"),
    ([kadapt.BitFitConfig(), kadapt.BitFitConfig()], r"methods '\[0\] bitfit' and '\[1\] bitfit' both add 'bias'"),
    ([], r"config: an empty list"),
    ([kadapt.LoRAConfig(), "lora"], r"config\[1\]: expected a kadapt \*Config instance, got str"),
], ids=["two-lora", "two-adapters", "two-prefixes", "two-inducers", "two-bitfit-t5", "empty", "not-a-config"])
def test_conflicts_name_both_methods_and_leave_the_model_untouched(configs, match):
    model = tiny("t5")
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        kadapt.patch(model, configs)
    assert not is_patched(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(state[n], p) for n, p in model.state_dict().items()) and len(state) == len(model.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not any("kadapt" in n for n, _ in model.named_modules())


def test_merge_of_an_fp64_model_is_exact_and_touches_only_corrected_columns():
    """The fold accumulates in the wider of fp32 and the weight's dtype: an fp64 merge equals W + s·A B computed in
    fp64 (no rounding through fp32), and GPT-2's c_attn K columns (no LoRA on K) stay bit-identical."""
    model = tiny("gpt2").double()
    kadapt.patch(model, kadapt.LoRAConfig(r=4, alpha=16, targets=("q", "v"), lora_bias=True, init="houlsby"))
    perturb_trainables(model)
    attn = model.transformer.h[0].attn
    w0, b0 = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    branches = attn.c_attn.kadapt_lora.branches
    want_w, want_b = w0.clone(), b0.clone()
    for br in branches.values():
        want_w[:, br.start:br.stop] += br.scaling * (br.lora_a.detach() @ br.lora_b.detach())
        want_b[br.start:br.stop] += br.scaling * br.lora_bias.detach()
    kadapt.merge(model)
    d = 64
    assert torch.equal(attn.c_attn.weight[:, d:2 * d], w0[:, d:2 * d])
    assert torch.equal(attn.c_attn.bias[d:2 * d], b0[d:2 * d])
    assert torch.equal(attn.c_attn.weight, want_w)
    assert torch.equal(attn.c_attn.bias, want_b)
