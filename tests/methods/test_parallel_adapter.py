"""Parallel adapter (He et al.; docs/methods.md §11): counts, the §1 addition sites, init, gradients,
patch/unpatch, save/load and bad configs on tiny models of every family. Nothing is downloaded."""
import pytest
import torch

import kadapt
from kadapt.methods.parallel import ParallelAdapter
from kadapt.patching import is_patched
from _models import (FAMILIES, check_save_load, check_unpatch_restores, gpt2_small_meta, inputs, lm_losses, output,
                     roberta_base_meta, t5_base_meta, tiny)


def _adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ParallelAdapter)}


# ------------------------------------------------------------------------------------------- counts

def test_gpt2_small_ffn_m42_ln_pre():
    """§9 inducer-mam: parallel FFN adapter m = 42 with LN_pre → 66,858 per layer."""
    model = gpt2_small_meta()
    kadapt.patch(model, kadapt.ParallelAdapterConfig(reduction_factor=18.2, ln_pre=True, scale=1.0,
                                                     init="torch_default"))
    adapters = _adapters(model)
    assert sorted(adapters) == sorted(f"h.{i}.mlp.c_proj.kadapt_parallel" for i in range(12))
    assert all(a.bottleneck == 42 and sum(p.numel() for p in a.parameters()) == 66_858 for a in adapters.values())
    assert kadapt.trainable_parameters(model)[0] == 12 * 66_858 == 802_296


@pytest.mark.parametrize("m, per_layer", [(12, 19_212), (16, 25_360)])
def test_roberta_base_ffn(m, per_layer):
    """§9 NLU: parallel FFN adapter, s = 2, "lora" init, m = 12 → 19,212 and m = 16 → 25,360 per layer."""
    model = roberta_base_meta()
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=m))
    adapters = _adapters(model)
    assert len(adapters) == 12
    assert all(sum(p.numel() for p in a.parameters()) == per_layer for a in adapters.values())
    assert kadapt.trainable_parameters(model)[0] == 12 * per_layer
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=m, learnable_scale=True))
    assert kadapt.trainable_parameters(model)[0] == 12 * (per_layer + 1)  # one scalar s per adapter


def test_t5_base_never_cross_attention():
    model = t5_base_meta()
    kadapt.patch(model, kadapt.ParallelAdapterConfig(placement="both", bottleneck_dim=16))
    names = list(_adapters(model))
    assert len(names) == 48 and not any("EncDecAttention" in n or "layer.1." in n and "decoder" in n for n in names)


# ---------------------------------------------------------------------------------------- placement

def test_placement_per_family():
    expected = {
        "gpt2": {"ffn": "transformer.h.0.mlp.c_proj", "attn": "transformer.h.0.attn.c_proj"},
        "roberta": {"ffn": "roberta.encoder.layer.0.output.dropout",
                    "attn": "roberta.encoder.layer.0.attention.output.dropout"},
        "bert": {"ffn": "bert.encoder.layer.0.output.dropout", "attn": "bert.encoder.layer.0.attention.output.dropout"},
        "t5": {"ffn": "encoder.block.0.layer.1.DenseReluDense", "attn": "encoder.block.0.layer.0.SelfAttention.o"},
    }
    for family, sites in expected.items():
        for placement in ("ffn", "attn"):
            model = tiny(family)
            kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement=placement))
            got = [n.rsplit(".", 1)[0] for n in _adapters(model)]
            assert got[0] == sites[placement], (family, placement)
            assert len(got) == (4 if family == "t5" else 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["ffn", "attn"])
def test_adds_the_formula_at_the_addition_site(family, placement):
    """Δ = s·(φ(LN_pre(x) W_d + b_d) W_u + b_u) with x the sub-layer input, added to the site output."""
    model = tiny(family)
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement=placement, ln_pre=True,
                                                     activation="gelu_new", init="torch_default", scale=3.0))
    name, adapter = next(iter(_adapters(model).items()))
    target = model.get_submodule(name.rsplit(".", 1)[0])
    seen = {}
    target.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))  # runs after kadapt's hook
    x_src = {}
    sources = [mod for mod in model.modules()  # the module whose pre-hook hands x to this adapter
               if any(getattr(h, "args", (None,))[0] is adapter for h in mod._forward_pre_hooks.values())]
    for mod in sources or [target]:  # none: the target reads x itself (T5's DenseReluDense)
        mod.register_forward_pre_hook(lambda m, a: x_src.setdefault("x", a[0]))
    removed = {}

    def capture_f(mod, args, out):  # the original output f, captured before kadapt's hook
        removed.setdefault("f", out)
    target._forward_hooks[-1] = capture_f
    target._forward_hooks.move_to_end(-1, last=False)
    with torch.no_grad():
        output(model, family)
    x, f = x_src["x"], removed["f"]
    z = torch.nn.functional.gelu(adapter.ln_pre(x) @ adapter.w_down + adapter.b_down, approximate="tanh")
    torch.testing.assert_close(seen["out"], f + 3.0 * (z @ adapter.w_up + adapter.b_up), rtol=1e-5, atol=1e-5)


def test_roberta_adds_after_the_dropout():
    """He et al. RoBERTa order: f′ = Drop(f) + Δ (Δ itself is not dropped)."""
    model = tiny("roberta")
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, init="torch_default"))
    layer = model.roberta.encoder.layer[0]
    x = torch.randn(2, 5, 64)
    f = torch.randn(2, 5, 64)
    layer.output.dropout.train()
    adapter = layer.output.dropout.kadapt_parallel
    layer.intermediate.dense(x)  # stashes x
    out = layer.output.dropout(f)
    delta = 2.0 * (torch.relu(x @ adapter.w_down + adapter.b_down) @ adapter.w_up + adapter.b_up)
    kept = (out - delta) != 0
    torch.testing.assert_close((out - delta)[kept], f[kept] / 0.9)  # Drop(f) + Δ
    assert 0 < kept.float().mean() < 1


# ----------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["ffn", "attn", "both"])
def test_identity_at_init(family, placement):
    model = tiny(family)
    model.requires_grad_(False)  # T5's output moves by ~1e-6 when its weights are frozen: compare frozen to frozen
    base = output(model, family)
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement=placement, ln_pre=True))
    assert torch.equal(output(model, family), base)


def test_init_values():
    torch.manual_seed(0)
    a = ParallelAdapter(768, 16, kadapt.ParallelAdapterConfig(), {})
    assert 0.9 / 768 ** 0.5 < a.w_down.abs().max() <= 1 / 768 ** 0.5
    assert not a.w_up.any() and not a.b_down.any() and not a.b_up.any() and a.scale == 2.0
    t = ParallelAdapter(768, 16, kadapt.ParallelAdapterConfig(init="torch_default"), {})
    assert 0.9 / 4 < t.w_up.abs().max() <= 1 / 4 and 0.9 / 4 < t.b_up.abs().max() <= 1 / 4
    assert t.b_down.abs().max() <= 1 / 768 ** 0.5 and t.b_down.any()


# ----------------------------------------------------------------------------- training / gradients

@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_trains_and_gradients_flow(family):
    model = tiny(family)
    before = {n for n, _ in model.named_parameters()}
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement="both", dropout=0.1,
                                                     learnable_scale=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in before if n.split(".")[0] in ("classifier", "score")}
    assert trainable == ({n for n, _ in model.named_parameters()} - before) | head  # no backbone LN trains
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    kw = inputs(family)
    for step in range(2):
        opt.zero_grad()
        output(model, family, **kw).pow(2).mean().backward()
        for a in _adapters(model).values():
            assert a.w_up.grad.abs().sum() > 0 and a.b_up.grad.abs().sum() > 0
            # W_u = 0: W_d and s see no gradient until W_u has moved
            assert (a.w_down.grad.abs().sum() > 0) == (step == 1)
            assert (a.scale.grad.abs() > 0) == (step == 1)
        opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_path_matches_fused_path_in_eval(family):
    """dropout > 0 uses the reference math in training; in eval both paths compute the same function."""
    model = tiny(family)
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, dropout=0.3, init="torch_default"))
    a = next(iter(_adapters(model).values()))
    x = torch.randn(2, 3, 64)
    fused = a.delta(x)
    a.dropout.p = 0.0
    a.train()
    torch.testing.assert_close(a.delta(x), fused, rtol=1e-5, atol=1e-6)


def test_short_training_loop_lowers_loss():
    torch.manual_seed(0)
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=16, placement="both"))
    losses = lm_losses(model)
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------------------- patch / unpatch

@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_exactly(family):
    check_unpatch_restores(family, kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement="both", ln_pre=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    config = kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement="both", ln_pre=True, learnable_scale=True)
    check_save_load(tmp_path, family, config)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, match", [
    ({"bottleneck_dim": 0}, r"bottleneck_dim=0 must be an integer >= 1"),
    ({"reduction_factor": 0}, r"reduction_factor=0 must be a finite number > 0"),
    ({"scale": 0}, r"scale=0 must be a finite number > 0"),
    ({"scale": float("nan")}, r"scale=nan must be a finite number > 0"),
    ({"learnable_scale": "yes"}, r"learnable_scale='yes' must be a bool \(True or False\)"),
    ({"ln_pre": 1}, r"ln_pre=1 must be a bool \(True or False\)"),
    ({"activation": "tanh"}, r"activation='tanh' is not allowed; allowed values: 'gelu_new', "),
    ({"init": "normal"}, r"init='normal' is not allowed; allowed values: 'lora', 'torch_default'$"),
    ({"placement": "cross"}, r"placement='cross' is not allowed; allowed values: 'attn', 'ffn', 'both'$"),
    ({"dropout": 1}, r"dropout=1 must be a number in \[0, 1\)"),
], ids=lambda v: str(v))
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        kadapt.ParallelAdapterConfig(**kw)


def test_reduction_factor_too_large_leaves_model_unchanged():
    model = tiny("roberta")
    with pytest.raises(ValueError, match=r"reduction_factor=1000 gives a bottleneck of 0 on hidden size 64; "
                                         r"allowed: 0 < reduction_factor <= 64$"):
        kadapt.patch(model, kadapt.ParallelAdapterConfig(reduction_factor=1000))
    assert not is_patched(model) and not any("kadapt" in n for n, _ in model.named_modules())
