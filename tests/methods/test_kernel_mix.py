"""Kernel-mix (docs/methods.md §9, §9): exact budgets, placement, the per-part formulas against a direct
computation, init, gradients, patch/unpatch, kadapt.merge equality, save/load and bad configs on tiny
models of every family. Nothing is downloaded."""
import math

import pytest
import torch

import kadapt
from kadapt.methods.kernel_mix import KernelMix
from kadapt.patching import is_patched
from _models import (FAMILIES, cache_kwargs, returned_cache, check_merge, check_save_load, check_unpatch_restores, gpt2_small_meta, inputs, lm_losses,
                     output, perturb_trainables as _perturb, roberta_base_meta, t5_base_meta, tiny)

PARTS = {  # parameter names of each §6 part
    "q_head": ("q_a", "q_b", "q_bias"), "q_shared": ("qs_a", "qs_b"),
    "v_head": ("v_a", "v_b", "v_bias"), "v_shared": ("vs_a", "vs_b"),
    "o_head": ("o_a", "o_b", "o_bias"), "o_shared": ("os_a", "os_b"),
}


def _mixes(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, KernelMix)}


def _part_counts(km):
    params = dict(km.named_parameters())
    return [sum(params[n].numel() for n in names if n in params) for names in PARTS.values()]


# ------------------------------------------------------------------------------------------- counts

def test_gpt2_small_nlg_budget():
    """§9 GPT-2 small NLG `kernel-mix`: 30,720 + 18,432 + 13,056 + 12,288 + 80,640 + 12,288 per layer."""
    model = gpt2_small_meta()
    kadapt.patch(model, kadapt.KernelMixConfig())  # the defaults are the NLG preset ranks
    mixes = _mixes(model)
    assert sorted(mixes) == sorted(f"h.{i}.attn.kadapt_kernel_mix" for i in range(12))
    for km in mixes.values():
        assert _part_counts(km) == [30_720, 18_432, 13_056, 12_288, 80_640, 12_288]
        assert sum(p.numel() for p in km.parameters()) == 167_424
    assert kadapt.trainable_parameters(model)[0] == 2_009_088
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.preset("kernel_adapters.nlg.kernel-mix"))
    assert kadapt.trainable_parameters(model)[0] == 2_009_088
    kadapt.unpatch(model)
    assert kadapt.trainable_parameters(model) == (124_439_808, 124_439_808)


def test_roberta_base_nlu_budget():
    """§9 RoBERTa-base NLU kernel-mix (intended ranks): 10,752 + 3,072 + 3,840 + 6,144 + 20,736 + 6,144."""
    model = roberta_base_meta()
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=2, r_vs=4))
    mixes = _mixes(model)
    assert len(mixes) == 12
    for km in mixes.values():
        assert _part_counts(km) == [10_752, 3_072, 3_840, 6_144, 20_736, 6_144]
    assert kadapt.trainable_parameters(model)[0] == 608_256
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.preset("kernel_adapters.nlu.kernel-mix"))
    assert kadapt.trainable_parameters(model)[0] == 608_256


def test_t5_base_self_attention_and_opt_in_cross():
    model = t5_base_meta()
    kadapt.patch(model, kadapt.KernelMixConfig())
    assert len(_mixes(model)) == 24  # encoder self + decoder self
    assert kadapt.trainable_parameters(model)[0] == 24 * 167_424
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.KernelMixConfig(cross_attention=True))
    mixes = _mixes(model)
    assert len(mixes) == 36 and sum("EncDecAttention" in n for n in mixes) == 12


def test_rank_zero_disables_its_part():
    model = gpt2_small_meta()
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=0, r_qs=12, r_v=8, r_vs=0))
    km = next(iter(_mixes(model).values()))
    assert _part_counts(km) == [0, 18_432, 13_056, 0, 80_640, 0]
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=3, r_qs=0, r_v=0, r_vs=0))
    km = next(iter(_mixes(model).values()))
    assert _part_counts(km) == [30_720, 0, 0, 0, 0, 0]
    assert not model.h[0].attn.c_proj._forward_hooks  # no O part, no O hook


# ---------------------------------------------------------------------------------------- placement

def test_placement_per_family():
    expected = {
        "gpt2": [f"transformer.h.{i}.attn" for i in range(2)],
        "roberta": [f"roberta.encoder.layer.{i}.attention" for i in range(2)],
        "bert": [f"bert.encoder.layer.{i}.attention" for i in range(2)],
        "t5": [f"{s}.block.{i}.layer.0.SelfAttention" for s in ("encoder", "decoder") for i in range(2)],
    }
    for family, names in expected.items():
        model = tiny(family)
        kadapt.patch(model, kadapt.KernelMixConfig(r_q=1, r_qs=1, r_v=1, r_vs=1))
        got = sorted(n.rsplit(".", 1)[0] for n in _mixes(model))
        assert got == sorted(names), family


# ------------------------------------------------------------------------------ per-part formulas

def _projections(model, family, layer=1):
    """(q, k, v, o) as (module, column slice) of one self-attention layer, and (H, d)."""
    if family == "gpt2":
        a = model.transformer.h[layer].attn
        return (a.c_attn, slice(0, 64)), (a.c_attn, slice(64, 128)), (a.c_attn, slice(128, 192)), \
            (a.c_proj, slice(0, 64)), 4, 16
    if family == "roberta":
        att = model.roberta.encoder.layer[layer].attention
        s = slice(0, 64)
        return (att.self.query, s), (att.self.key, s), (att.self.value, s), (att.output.dense, s), 4, 16
    a = model.decoder.block[layer].layer[0].SelfAttention
    s = slice(0, 64)
    return (a.q, s), (a.k, s), (a.v, s), (a.o, s), 4, 16


def _record(module, store, key):
    def hook(mod, args, out):
        store[key] = (args[0].detach().clone(), out.detach().clone())
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
def test_each_part_matches_a_direct_computation(family):
    """Every projection's correction equals the §6 formula computed head by head with plain matmuls."""
    model = tiny(family).float().eval()
    (qm, qs), (km_, ks), (vm, vs), (om, os_), H, d = _projections(model, family)
    before, after = {}, {}
    handles = [_record(m, before, n) for n, m in (("q", qm), ("k", km_), ("v", vm), ("o", om))]
    config = kadapt.KernelMixConfig(r_q=2, r_qs=3, r_v=2, r_vs=3, scale_head=0.5, scale_shared=2.0, dropout=0.3)
    kadapt.patch(model, config)
    _perturb(model)
    handles += [_record(m, after, n) for n, m in (("q", qm), ("k", km_), ("v", vm), ("o", om))]
    with torch.no_grad():
        output(model, family)  # eval mode: dropout off
    mix = [m for n, m in _mixes(model).items()][1 if family != "t5" else 3]  # layer 1 (T5: decoder block 1)
    p = {n: t.detach() for n, t in mix.named_parameters()}
    sh, ss = 0.5, 2.0

    x, q0 = before["q"][0], before["q"][1][..., qs]
    k0 = before["k"][1][..., ks]
    v0 = before["v"][1][..., vs]
    o_in, o0 = before["o"]
    q1, v1, o1 = after["q"][1][..., qs], after["v"][1][..., vs], after["o"][1][..., os_]
    assert torch.equal(after["k"][1][..., ks], k0)  # K is never corrected

    dq = torch.cat([x @ p["q_a"][h] @ p["q_b"][h] + p["q_bias"][h] for h in range(H)], -1)
    torch.testing.assert_close(q1 - q0, sh * dq + ss * (x @ p["qs_a"] @ p["qs_b"]), rtol=1e-4, atol=1e-5)
    dv = torch.cat([k0[..., h * d:(h + 1) * d] @ p["v_a"][h] @ p["v_b"][h] + p["v_bias"][h] for h in range(H)], -1)
    torch.testing.assert_close(v1 - v0, sh * dv + ss * (x @ p["vs_a"] @ p["vs_b"]), rtol=1e-4, atol=1e-5)
    r = p["o_a"].shape[-1]
    do = sum(o_in[..., h * d:(h + 1) * d] @ p["o_a"][h] @ p["o_b"][h * r:(h + 1) * r] for h in range(H)) + p["o_bias"]
    torch.testing.assert_close(o1 - o0, sh * do + ss * (o_in @ p["os_a"] @ p["os_b"]), rtol=1e-4, atol=1e-5)
    for h in handles:
        h.remove()


def test_dropout_masks_are_independent_per_part():
    """Train mode with p = 0.5: the Q head-wise and Q shared parts see different masks of X."""
    torch.manual_seed(0)
    km = KernelMix(8, 2, 4, kadapt.KernelMixConfig(r_q=1, r_qs=1, r_v=0, r_vs=0, dropout=0.5), {}).train()
    x = torch.ones(1, 200, 8)
    seen = []
    km.dropout.register_forward_hook(lambda m, a, out: seen.append(out != 0))
    km.delta_q(x)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    km.eval()
    torch.testing.assert_close(km.delta_q(x), km.delta_q(x))


# ----------------------------------------------------------------------------------------- init

def test_init_distributions():
    torch.manual_seed(0)
    h = KernelMix(768, 12, 64, kadapt.KernelMixConfig(), {})
    for n, p in h.named_parameters():
        assert 0.01 < p.abs().max() < 0.02 and p.abs().min() > 0, n  # tn01 everywhere
    lo = KernelMix(768, 12, 64, kadapt.KernelMixConfig(init="lora"), {})
    fan_in = {"q_a": 768, "qs_a": 768, "v_a": 64, "vs_a": 768, "o_a": 64, "os_a": 768}
    for n, p in lo.named_parameters():
        if n in fan_in:
            bound = 1 / math.sqrt(fan_in[n])
            assert 0.9 * bound < p.abs().max() <= bound, n
        else:
            assert not p.any(), n


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_init_leaves_the_output_unchanged(family):
    model = tiny(family)
    model.requires_grad_(False)  # compare frozen to frozen (see test_lora)
    base = output(model, family)
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=2, r_v=2, r_vs=2, init="lora", cross_attention=True))
    assert torch.equal(output(model, family), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_init_perturbs_step_zero(family):
    """§6: under "houlsby" B is not zero, so the output moves at step 0 (by a bounded amount)."""
    model = tiny(family)
    base = output(model, family)
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=2, r_v=2, r_vs=2))
    out = output(model, family)
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    assert ((out - base).abs().max() / base.abs().max()).item() < 0.5


# ----------------------------------------------------------------------------- training / gradients

@pytest.mark.parametrize("family", FAMILIES)
def test_only_kernel_mix_trains(family):
    model = tiny(family)
    before = {n for n, _ in model.named_parameters()}
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=2, r_v=2, r_vs=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in before if n.split(".")[0] in ("classifier", "score")}
    assert trainable == ({n for n, _ in model.named_parameters()} - before) | head  # no backbone LN trains
    assert all("kadapt_kernel_mix" in n for n in trainable - head)
    model.train()
    output(model, family).pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n


def test_short_training_loop_lowers_loss():
    torch.manual_seed(0)
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=4, r_v=4, r_vs=4, dropout=0.0))
    losses = lm_losses(model)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_kv_cache_decoding_matches_the_full_forward(family):
    """The corrected V is cached (exact: ΔV depends only on K), so step-by-step decoding with a cache
    gives the full forward's logits."""
    model = tiny(family).eval()
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=2, r_v=2, r_vs=2, cross_attention=True))
    _perturb(model)
    kw = inputs(family, batch=1, length=8)
    with torch.no_grad():
        full = output(model, family, **kw)
        ids = kw["decoder_input_ids"] if family == "t5" else kw["input_ids"]
        extra = {"input_ids": kw["input_ids"]} if family == "t5" else {}
        past, steps = None, []
        for t in range(ids.shape[1]):
            key = "decoder_input_ids" if family == "t5" else "input_ids"
            out = model(**extra, **{key: ids[:, t:t + 1]}, **cache_kwargs(model, past), use_cache=True)
            past = returned_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- patch / unpatch

@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_exactly(family):
    check_unpatch_restores(family, kadapt.KernelMixConfig(r_q=2, r_qs=2, r_v=2, r_vs=2, cross_attention=True))


# --------------------------------------------------------------------------------------------- merge

MERGE_CONFIGS = {
    "all": dict(r_q=2, r_qs=3, r_v=2, r_vs=3, scale_head=0.5, scale_shared=2.0),
    "head_only": dict(r_q=2, r_qs=0, r_v=3, r_vs=0),
    "shared_only": dict(r_q=0, r_qs=2, r_v=0, r_vs=2, scale_shared=1.5),
    "cross": dict(r_q=1, r_qs=2, r_v=2, r_vs=1, cross_attention=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(MERGE_CONFIGS))
def test_merge_computes_the_same_function(family, name):
    model = tiny(family).float().eval()
    config = kadapt.KernelMixConfig(dropout=0.1, **MERGE_CONFIGS[name])
    kadapt.patch(model, config)
    _perturb(model)
    check_merge(model, family)
    if family == "t5":  # head-wise biases create q / v / o biases; k never gets one
        a = model.decoder.block[0].layer[0].SelfAttention
        assert a.k.bias is None
        assert (a.q.bias is not None) == (config.r_q > 0)
        assert (a.v.bias is not None) == (a.o.bias is not None) == (config.r_v > 0)
        cross = model.decoder.block[0].layer[1].EncDecAttention
        assert (cross.v.bias is not None) == (config.cross_attention and config.r_v > 0)


def test_merge_on_gpt2_changes_only_q_and_v_columns():
    model = tiny("gpt2")
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    b = model.transformer.h[0].attn.c_attn.bias.detach().clone()
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=2, r_v=2, r_vs=2))
    kadapt.merge(model)
    w2, b2 = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.bias
    assert torch.equal(w2[:, 64:128], w[:, 64:128]) and torch.equal(b2[64:128], b[64:128])
    assert not torch.equal(w2[:, :64], w[:, :64]) and not torch.equal(w2[:, 128:], w[:, 128:])


def test_merge_value_bias_uses_the_key_bias():
    """Δb_V[h] = s_h (b_K[h] A^V_h B^V_h + b^V_h) (§6), checked on RoBERTa's biased key."""
    model = tiny("roberta")
    sa = model.roberta.encoder.layer[0].attention.self
    bv, bk = sa.value.bias.detach().clone(), sa.key.bias.detach().clone()
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=0, r_qs=0, r_v=2, r_vs=1, scale_head=0.5))
    km = model.roberta.encoder.layer[0].attention.kadapt_kernel_mix
    expected = bv + 0.5 * torch.cat([bk[h * 16:(h + 1) * 16] @ km.v_a[h] @ km.v_b[h] + km.v_bias[h]
                                     for h in range(4)]).detach()
    kadapt.merge(model)
    torch.testing.assert_close(sa.value.bias, expected)


def test_merge_in_bf16_keeps_the_dtype():
    model = tiny("roberta").to(torch.bfloat16)
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=1, r_qs=1, r_v=1, r_vs=1))
    kadapt.merge(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ----------------------------------------------------------------------------------------- save/load

@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    config = kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=3, r_vs=1, scale_head=0.5, init="lora", cross_attention=True)
    check_save_load(tmp_path, family, config)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, match", [
    ({"r_q": -1}, r"r_q=-1 must be an integer >= 0"),
    ({"r_qs": -3}, r"r_qs=-3 must be an integer >= 0"),
    ({"r_v": -2}, r"r_v=-2 must be an integer >= 0"),
    ({"r_vs": -1}, r"r_vs=-1 must be an integer >= 0"),
    ({"r_v": 2.0}, r"r_v=2\.0 must be an integer >= 0"),
    ({"r_q": True}, r"r_q=True must be an integer >= 0"),
    ({"r_q": 0, "r_qs": 0, "r_v": 0, "r_vs": 0}, r"r_q, r_qs, r_v, r_vs are all 0"),
    ({"scale_head": 0}, r"scale_head=0 must be a finite number > 0"),
    ({"scale_shared": float("nan")}, r"scale_shared=nan must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout=1\.0 must be a number in \[0, 1\)"),
    ({"init": "bert"}, r"init='bert' is not allowed; allowed values: 'houlsby', 'lora'$"),
    ({"cross_attention": 1}, r"cross_attention=1 must be a bool \(True or False\)"),
], ids=lambda v: str(v))
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        kadapt.KernelMixConfig(**kw)


def test_mutated_config_is_rechecked_by_patch():
    model = tiny("gpt2")
    config = kadapt.KernelMixConfig()
    config.r_v = -1
    with pytest.raises(ValueError, match=r"r_v=-1 must be an integer >= 0"):
        kadapt.patch(model, config)
    assert not is_patched(model) and not any("kadapt" in n for n, _ in model.named_modules())
