"""Plain LoRA (docs/methods.md §9) and kadapt.merge: counts, placement, init, gradients, patch/unpatch,
merge equality, save/load and bad configs on tiny models of every family. Nothing is downloaded."""
import math

import pytest
import torch

import kadapt
from kadapt.methods.lora import LoRA, LoRABranch
from kadapt.patching import is_patched
from _models import (FAMILIES, check_merge, check_save_load, check_unpatch_restores, gpt2_small_meta, inputs, lm_losses,
                     output, perturb_trainables as _perturb, roberta_base_meta, t5_base_meta, tiny)

ALL_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")


def _branches(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRABranch)}


# ------------------------------------------------------------------------------------------- counts

def test_gpt2_small_lora_q_with_bias_r24():
    """§6 / §9: GPT-2 Q-only with bias at r = 24 → 37,632 per layer."""
    model = gpt2_small_meta()
    kadapt.patch(model, kadapt.LoRAConfig(r=24, alpha=32.0, targets=("q",), lora_bias=True))
    branches = _branches(model)
    assert sorted(branches) == sorted(f"h.{i}.attn.c_attn.kadapt_lora.branches.q" for i in range(12))
    assert all(sum(p.numel() for p in b.parameters()) == 37_632 for b in branches.values())
    assert kadapt.trainable_parameters(model)[0] == 12 * 37_632 == 451_584
    kadapt.unpatch(model)
    assert kadapt.trainable_parameters(model) == (124_439_808, 124_439_808)


def test_roberta_base_lora_q_r4():
    """§9 NLU: loralib-style LoRA-Q at r = 4 without bias → 6,144 per layer."""
    model = roberta_base_meta()
    kadapt.patch(model, kadapt.LoRAConfig(r=4, alpha=32.0, targets=("q",)))
    branches = _branches(model)
    assert len(branches) == 12
    assert all(sum(p.numel() for p in b.parameters()) == 6_144 for b in branches.values())
    assert kadapt.trainable_parameters(model)[0] == 12 * 6_144 == 73_728


def test_gpt2_small_default_and_all_targets():
    model = gpt2_small_meta()
    kadapt.patch(model, kadapt.LoRAConfig())  # r = 8, q and v: 2 · 8 · (768 + 768) per layer
    assert kadapt.trainable_parameters(model)[0] == 12 * 2 * 8 * 1536 == 294_912
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.LoRAConfig(targets=ALL_TARGETS, lora_bias=True))
    per_layer = 4 * (8 * 1536 + 768) + (8 * (768 + 3072) + 3072) + (8 * (3072 + 768) + 768)
    assert kadapt.trainable_parameters(model)[0] == 12 * per_layer


def test_t5_base_every_attention_module():
    """T5: q and v of encoder self, decoder self and cross-attention (§1 placement matrix)."""
    model = t5_base_meta()
    kadapt.patch(model, kadapt.LoRAConfig())
    branches = _branches(model)
    assert len(branches) == 2 * (12 + 24)
    assert sum(n.endswith("EncDecAttention.q.kadapt_lora.branches.q") for n in branches) == 12
    assert kadapt.trainable_parameters(model)[0] == 72 * 8 * 1536 == 884_736


# ---------------------------------------------------------------------------------------- placement

def test_placement_per_family():
    expected = {
        "gpt2": ["transformer.h.0.attn.c_attn"],
        "roberta": ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"],
        "bert": ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"],
        "t5": [f"{p}.{t}" for p in ("encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention",
                                    "decoder.block.0.layer.1.EncDecAttention") for t in ("q", "v")],
    }
    for family, names in expected.items():
        model = tiny(family)
        kadapt.patch(model, kadapt.LoRAConfig(r=2))
        got = sorted(n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, LoRA))
        first_block = [n for n in got if any(k in n for k in (".h.0.", "encoder.layer.0.", "block.0."))]
        assert first_block == sorted(names), family
        assert len(got) == 2 * len(names), family


def test_gpt2_slices_touch_only_their_columns():
    """Q and V of the fused c_attn: the K columns [D:2D] are unchanged, Q and V move."""
    model = tiny("gpt2")
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 5, 64)
    base = attn.c_attn(x)
    kadapt.patch(model, kadapt.LoRAConfig(r=2, init="bert", lora_bias=True))
    lora = attn.c_attn.kadapt_lora
    assert {k: (b.start, b.stop) for k, b in lora.branches.items()} == {"q": (0, 64), "v": (128, 192)}
    y = attn.c_attn(x)
    assert torch.equal(y[..., 64:128], base[..., 64:128])
    for name, (a, b) in (("q", (0, 64)), ("v", (128, 192))):
        br = lora.branches[name]
        expected = base[..., a:b] + br.scaling * (x @ br.lora_a @ br.lora_b + br.lora_bias)
        torch.testing.assert_close(y[..., a:b], expected)


def test_scaling_and_math_on_a_linear():
    model = tiny("roberta")
    query = model.roberta.encoder.layer[1].attention.self.query
    x = torch.randn(3, 64)
    base = query(x)
    kadapt.patch(model, kadapt.LoRAConfig(r=4, alpha=32.0, init="houlsby", lora_bias=True, targets=("q",)))
    br = query.kadapt_lora.branches["q"]
    assert br.scaling == 8.0
    torch.testing.assert_close(query(x), base + 8.0 * (x @ br.lora_a @ br.lora_b + br.lora_bias))


# ----------------------------------------------------------------------------------------- init

def test_init_distributions():
    torch.manual_seed(0)
    lora = LoRABranch(768, 0, 768, kadapt.LoRAConfig(r=24, lora_bias=True), {})
    bound = 1 / math.sqrt(768)  # kaiming√5 with fan_in = in, whatever the storage layout
    assert 0.9 * bound < lora.lora_a.abs().max() <= bound
    assert not lora.lora_b.any() and not lora.lora_bias.any()
    h = LoRABranch(768, 0, 768, kadapt.LoRAConfig(r=24, lora_bias=True, init="houlsby"), {})
    for p in (h.lora_a, h.lora_b, h.lora_bias):
        assert 0.015 < p.abs().max() < 0.02 and p.abs().min() > 0
    b = LoRABranch(768, 0, 768, kadapt.LoRAConfig(r=24, lora_bias=True, init="bert"), {})
    assert abs(b.lora_a.std().item() - 0.02) < 1e-3 and abs(b.lora_b.std().item() - 0.02) < 2e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family):
    model = tiny(family)
    model.requires_grad_(False)  # T5's output moves by ~1e-6 when its weights are frozen: compare frozen to frozen
    base = output(model, family)
    kadapt.patch(model, kadapt.LoRAConfig(r=4, targets=ALL_TARGETS, lora_bias=True))
    assert torch.equal(output(model, family), base)


# ----------------------------------------------------------------------------- training / gradients

@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_trains_and_both_factors_get_gradients(family):
    model = tiny(family)
    before = {n for n, _ in model.named_parameters()}
    kadapt.patch(model, kadapt.LoRAConfig(r=4, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in before if n.split(".")[0] in ("classifier", "score")}
    assert trainable == ({n for n, _ in model.named_parameters()} - before) | head  # no backbone LN trains
    assert all("kadapt_lora" in n for n in trainable - head)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    kw = inputs(family)
    for step in range(2):
        opt.zero_grad()
        output(model, family, **kw).pow(2).mean().backward()
        a_grads = [b.lora_a.grad for b in _branches(model).values()]
        b_grads = [b.lora_b.grad for b in _branches(model).values()]
        assert all(g is not None for g in a_grads + b_grads)
        assert all(g.abs().sum() > 0 for g in b_grads)
        if step == 0:  # B = 0: A's gradient is zero until B has moved
            assert all(not g.any() for g in a_grads)
        else:
            assert all(g.abs().sum() > 0 for g in a_grads)
        opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_short_training_loop_lowers_loss():
    torch.manual_seed(0)
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.LoRAConfig(r=4, alpha=16.0, targets=ALL_TARGETS))
    losses = lm_losses(model)
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------------------- patch / unpatch

@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_exactly(family):
    check_unpatch_restores(family, kadapt.LoRAConfig(r=4, targets=ALL_TARGETS, lora_bias=True))


# --------------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora_bias", [False, True])
def test_merge_computes_the_same_function(family, lora_bias):
    model = tiny(family).float().eval()
    kadapt.patch(model, kadapt.LoRAConfig(r=4, alpha=16.0, dropout=0.1, targets=ALL_TARGETS, lora_bias=lora_bias))
    _perturb(model)
    check_merge(model, family)
    with pytest.raises(ValueError, match=r"model is not patched by kadapt \(nothing to unpatch\)"):
        kadapt.unpatch(model)
    with pytest.raises(ValueError, match=r"model is not patched by kadapt \(nothing to merge\)"):
        kadapt.merge(model)
    if family == "t5":  # bias-free q/k/v/o/wi/wo get a bias only when the LoRA had one (§6)
        q = model.encoder.block[0].layer[0].SelfAttention.q
        assert (q.bias is not None) == lora_bias


def test_merge_on_gpt2_changes_only_the_target_columns():
    model = tiny("gpt2")
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    kadapt.patch(model, kadapt.LoRAConfig(r=2, init="bert"))
    br = model.transformer.h[0].attn.c_attn.kadapt_lora.branches["q"]
    delta = (br.scaling * br.lora_a @ br.lora_b).detach()
    kadapt.merge(model)
    w2 = model.transformer.h[0].attn.c_attn.weight
    torch.testing.assert_close(w2[:, :64], w[:, :64] + delta)
    assert torch.equal(w2[:, 64:128], w[:, 64:128])


def test_merge_in_bf16_accumulates_in_fp32():
    model = tiny("roberta").to(torch.bfloat16)
    kadapt.patch(model, kadapt.LoRAConfig(r=2, init="bert", targets=("q",)))
    query = model.roberta.encoder.layer[0].attention.self.query
    br = query.kadapt_lora.branches["q"]
    expected = (query.weight.float() + (br.scaling * br.lora_a.float() @ br.lora_b.float()).t()).to(torch.bfloat16)
    kadapt.merge(model)
    assert query.weight.dtype == torch.bfloat16 and torch.equal(query.weight, expected)


@pytest.mark.parametrize("config", [kadapt.AdapterConfig(bottleneck_dim=8), kadapt.BitFitConfig(),
                                    kadapt.ParallelAdapterConfig(bottleneck_dim=8)],
                         ids=["adapter", "bitfit", "parallel_adapter"])
def test_merge_refuses_non_linear_methods(config):
    model = tiny("gpt2")
    kadapt.patch(model, config)
    with pytest.raises(ValueError, match=rf"patched with method '{config.method}' .* cannot be merged into the "
                                         r"weights; mergeable methods: 'lora', 'kernel_mix', 'intrinsic_said'$"):
        kadapt.merge(model)
    assert is_patched(model)  # unchanged
    kadapt.unpatch(model)


# ----------------------------------------------------------------------------------------- save/load

@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    config = kadapt.LoRAConfig(r=4, alpha=16.0, targets=("q", "k", "o", "ffn_in"), lora_bias=True, init="houlsby")
    check_save_load(tmp_path, family, config)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, match", [
    ({"r": 0}, r"r=0 must be an integer >= 1"),
    ({"r": -2}, r"r=-2 must be an integer >= 1"),
    ({"r": 2.0}, r"r=2\.0 must be an integer >= 1"),
    ({"alpha": 0}, r"alpha=0 must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout=1\.0 must be a number in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout=-0\.1 must be a number in \[0, 1\)"),
    ({"targets": ("q", "query")}, r"targets contains 'query'; allowed values: 'q', 'k', 'v', 'o', 'ffn_in', "
                                  r"'ffn_out'$"),
    ({"targets": "q"}, r"targets='q' must be a non-empty list of target names; allowed values: 'q', "),
    ({"targets": ()}, r"targets=\(\) must be a non-empty list of target names; allowed values: 'q', "),
    ({"targets": ("q", "q")}, r"targets=\('q', 'q'\) names a target twice"),
    ({"lora_bias": 1}, r"lora_bias=1 must be a bool \(True or False\)"),
    ({"init": "xavier"}, r"init='xavier' is not allowed; allowed values: 'lora', 'houlsby', 'bert'$"),
], ids=lambda v: str(v))
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        kadapt.LoRAConfig(**kw)


def test_mutated_config_is_rechecked_by_patch():
    model = tiny("gpt2")
    config = kadapt.LoRAConfig()
    config.targets = ("q", "x")
    with pytest.raises(ValueError, match=r"targets contains 'x'"):
        kadapt.patch(model, config)
    assert not is_patched(model) and not any("kadapt" in n for n, _ in model.named_modules())
