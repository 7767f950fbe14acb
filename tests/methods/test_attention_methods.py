"""Prefix tuning, inducer-tuning and MAM in the models: what the attention interface integration must keep.

- Prefix tuning equals an independent formulation: the unpatched model given the prefixes as a pre-filled
  KV cache with explicit positions (GPT-2), on the SDPA and the eager implementation.
- The inducer layer equals the seed's concat-softmax formulation written here from docs/methods.md §14
  (column 0 = the inducer, softmax over T_k + 1 columns), for every option, with causal and padding masks
  and an additive (T5) bias.
- Reference and Triton backends agree through the whole model, forward and every trainable gradient.
- Padding, KV-cache greedy generation, gradient checkpointing, eager vs SDPA, torch.compile, eject, errors.
"""
import copy

import pytest
import torch
from transformers import DynamicCache

import kadapt
from _models import (assert_triton_equals_reference, cache_kwargs, enable_checkpointing, inputs, output,
                     perturb_trainables, tiny)
from kadapt.methods.attention import KadaptMask
from kadapt.methods.inducer import InducerAttention

FAMILIES = ("gpt2", "roberta", "bert", "t5")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # forced Triton: the GPU, or the interpreter on CPU
CONFIGS = {
    "prefix": lambda: kadapt.PrefixTuningConfig(prefix_length=5, hidden_size=16),
    "inducer": lambda: kadapt.InducerTuningConfig(key_width=3, value_width=4),
    "inducer_gated_noext": lambda: kadapt.InducerTuningConfig(key_width=0, value_width=3, value_extension=False,
                                                              gating=True),
    "inducer_share_lora": lambda: kadapt.InducerTuningConfig(
        key_width=2, value_width=3, head_share=True, lora=kadapt.LoRAConfig(r=2, targets=("q",), init="houlsby")),
    "inducer_prefix_kernel_mix": lambda: kadapt.InducerTuningConfig(
        key_width=2, value_width=3, prefix=kadapt.PrefixTuningConfig(prefix_length=3, hidden_size=8),
        kernel_mix=kadapt.KernelMixConfig(r_q=1, r_qs=2, r_v=1, r_vs=2)),
    "inducer_mh_adapter": lambda: kadapt.InducerTuningConfig(key_width=0, value_width=3, ablation="mh_adapter"),
    "inducer_value_gating": lambda: kadapt.InducerTuningConfig(key_width=0, value_width=3, ablation="value_gating"),
    "mam": lambda: kadapt.MAMConfig(
        prefix=kadapt.PrefixTuningConfig(prefix_length=4, hidden_size=8),
        parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8, init="torch_default")),
}


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if type(m).__name__ == "T5Attention":
            m.dropout = 0.0
    return model


def _bump(model):
    """Move every trainable tensor off its init (zero-initialised LoRA B / parallel W_u included)."""
    perturb_trainables(model, std=0.1)


# ----------------------------------------------------------------------------------------------------------
# prefix tuning = the prefixes as a pre-filled KV cache (positions unchanged), SDPA and eager

@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_prefix_equals_prefilled_cache(implementation, padded):
    model = tiny("gpt2")
    model.set_attn_implementation(implementation)
    kw = inputs("gpt2")
    if padded:
        kw["attention_mask"][0, -3:] = 0  # right padding: positions of the valid tokens are unchanged
    P = 5
    kadapt.patch(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=16))
    got = output(model, "gpt2", **kw)
    prefixes = [blk.attn.kadapt_attention.prefix() for blk in model.transformer.h]
    kadapt.unpatch(model)
    assert model.config._attn_implementation == implementation

    B, T = kw["input_ids"].shape
    cache = DynamicCache(config=model.config)
    for layer, (kp, vp) in enumerate(prefixes):
        cache.update(kp.detach().expand(B, -1, -1, -1), vp.detach().expand(B, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(B, P, dtype=kw["attention_mask"].dtype), kw["attention_mask"]], 1)
    want = model(input_ids=kw["input_ids"], attention_mask=mask, **cache_kwargs(model, cache),
                 position_ids=torch.arange(T)[None].expand(B, T)).logits
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# the inducer layer = the concat-softmax formulation (docs/methods.md §14), written independently here

def _concat_inducer(layer: InducerAttention, q, k, v, scale, keep, bias):
    """Logits [s0 | s] over T_k + 1 columns; w = column 0; O = real columns renormalised (or, gated, the
    real columns of the concat softmax); value term per §8 items 6–8. q, k, v (B, H, T, d) in float64."""
    f = lambda t: t.double()  # noqa: E731
    if layer.key_width:
        h = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, f(layer.key_a)) + f(layer.key_a_bias)[:, None])
        p_key = q + torch.einsum("bhtm,hmd->bhtd", h, f(layer.key_b)) + f(layer.key_b_bias)[:, None]
    else:
        p_key = q
    s0 = scale * (q * p_key).sum(-1, keepdim=True)
    s = scale * q @ k.transpose(-1, -2) + (0 if bias is None else f(bias))
    s = s.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(torch.cat([s0, s], -1), -1)
    w = probs[..., 0]
    real = probs[..., 1:] if layer.gating else torch.softmax(s, -1)
    o = real @ v
    u = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, f(layer.value_a)) + f(layer.value_a_bias)[:, None])
    if not layer.value_extension:
        pv = torch.einsum("bhtm,hme->bhte", u, f(layer.value_b)) + f(layer.value_b_bias)[:, None]
        return o + w[..., None] * pv, None
    if layer.head_share:
        delta = torch.einsum("bhtm,mD->btD", w[..., None] * u, f(layer.value_b))
    else:
        delta = torch.einsum("bhtm,hmD->btD", w[..., None] * u, f(layer.value_b))
    return o, delta + f(layer.value_b_bias)


@pytest.mark.parametrize("options", [
    dict(key_width=3, value_width=4), dict(key_width=0, value_width=5), dict(key_width=2, value_width=3, gating=True),
    dict(key_width=4, value_width=3, head_share=True), dict(key_width=1, value_width=2, value_extension=False),
    dict(key_width=3, value_width=2, value_extension=False, gating=True),
])
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "causal+padding+decode", "bias"])
def test_inducer_layer_equals_concat_softmax(options, mask_kind):
    torch.manual_seed(0)
    B, H, d, D = 2, 3, 8, 24
    Tq, Tk = (3, 11) if "decode" in mask_kind else (9, 9)
    layer = InducerAttention(D, H, d, options.get("key_width"), options.get("value_width"),
                             options.get("value_extension", True), options.get("head_share", False),
                             options.get("gating", False), None, {"dtype": torch.float32}).eval()
    q, k, v = (torch.randn(B, H, T, d) for T in (Tq, Tk, Tk))
    pad = torch.ones(B, Tk, dtype=torch.bool)
    pad[1, :4] = False
    causal = "causal" in mask_kind
    mask = KadaptMask(causal, pad if ("padding" in mask_kind or mask_kind == "bias") else None)
    bias = torch.randn(1, H, Tq, Tk) if mask_kind == "bias" else None
    kwargs = {} if bias is None else {"position_bias": bias}
    scale = 0.35
    o, _ = layer(None, q, k, v, mask, scaling=scale, dropout=0.0, **kwargs)
    keep = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    if causal:
        keep &= torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    if mask.key_padding is not None:
        keep &= mask.key_padding[:, None, None, :]
    want_o, want_delta = _concat_inducer(layer, q.double(), k.double(), v.double(), scale, keep, bias)
    torch.testing.assert_close(o.double(), want_o.transpose(1, 2), rtol=1e-5, atol=1e-5)
    if want_delta is not None:
        torch.testing.assert_close(layer.take_delta().double(), want_delta, rtol=1e-5, atol=1e-5)


def test_inducer_dropout_on_w_is_one_mask_per_query():
    """§8 item 4: w̃ = Drop_p(w), one scalar per (batch, head, query), p = the attention dropout by default."""
    torch.manual_seed(0)
    layer = InducerAttention(8, 2, 4, 2, 3, False, False, False, None, {"dtype": torch.float64}).train()
    q, k, v = (torch.randn(1, 2, 64, 4, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        layer.value_b.zero_()
        layer.value_b_bias.fill_(1.0)  # P^v = 1: O − O_plain = w̃ in every coordinate
    torch.manual_seed(1)
    o, _ = layer(None, q, k, v, KadaptMask(False, None), scaling=0.5, dropout=0.5)
    # with the attention dropout off, only w̃'s dropout (p = 0.5 via w_dropout) acts
    layer_w = InducerAttention(8, 2, 4, 2, 3, False, False, False, 0.5, {"dtype": torch.float64}).train()
    layer_w.load_state_dict(layer.state_dict())
    o_w, _ = layer_w(None, q, k, v, KadaptMask(False, None), scaling=0.5, dropout=0.0)
    with torch.no_grad():
        layer_w.value_b_bias.zero_()
    o_attn, _ = layer_w(None, q, k, v, KadaptMask(False, None), scaling=0.5, dropout=0.0)  # no value term
    extra = o_w - o_attn  # (B, T, H, d): w̃ broadcast over d
    assert torch.allclose(extra, extra[..., :1].expand_as(extra))
    dropped = extra[..., 0] == 0
    assert 0.3 < dropped.double().mean() < 0.7  # about half the (head, query) scalars are dropped
    kept = extra[..., 0][~dropped]
    assert (kept > 0).all() and (kept <= 2.0).all()  # w / (1 − p) with w ∈ (0, 1)
    assert o.shape == o_w.shape and not torch.equal(o, o_w)


# ----------------------------------------------------------------------------------------------------------
# whole models

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["inducer", "inducer_gated_noext", "inducer_share_lora", "inducer_value_gating"])
def test_inducer_model_triton_equals_reference(family, name):
    """The fused (Triton; interpreter on CPU) path through the patched model = the reference, forward and
    every trainable gradient (T5: the relative position bias enters the kernels as an additive logit bias)."""
    model = _no_dropout(tiny(family).float())
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    model.train().to(DEVICE)
    kw = {k: v.to(DEVICE) for k, v in inputs(family).items()}
    kw["attention_mask"][1, -2:] = 0
    assert_triton_equals_reference(model, family, kw)


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_does_not_leak(family, name):
    """A right-padded row gives, at its valid positions, what the row alone gives."""
    model = tiny(family)
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    kw = inputs(family, batch=2, length=9)
    kw["attention_mask"][0, 6:] = 0
    kw["input_ids"][0, 6:] = 1
    both = output(model, family, **kw)
    alone = {k: v[:1, :6] if k != "decoder_input_ids" else v[:1] for k, v in kw.items()}
    single = output(model, family, **alone)
    if family == "roberta":  # sequence classification: the <s> token's logits
        torch.testing.assert_close(both[:1], single, rtol=1e-5, atol=1e-5)
    elif family == "t5":
        torch.testing.assert_close(both[:1], single, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(both[:1, :6], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,name", [(f, n) for f in ("gpt2", "t5") for n in CONFIGS] + [("t5", "inducer_cross")])
def test_greedy_generate_with_cache_equals_without(family, name):
    model = tiny(family)
    config = (kadapt.InducerTuningConfig(key_width=2, value_width=3, cross_attention=True) if name == "inducer_cross"
              else CONFIGS[name]())
    kadapt.patch(model, config)
    _bump(model)
    kw = inputs(family, batch=2, length=7)
    kw.pop("decoder_input_ids", None)
    if family == "gpt2":
        kw["attention_mask"][0, :2] = 0  # left padding, as for batched decoding
    else:
        kw["attention_mask"][0, -2:] = 0
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**kw, use_cache=True, **gen)
    without = model.generate(**kw, use_cache=False, **gen)
    assert torch.equal(with_cache, without)
    assert with_cache.shape[1] > kw["input_ids"].shape[1] or family == "t5"


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
@pytest.mark.parametrize("name", ["prefix", "inducer", "mam"])
def test_gradient_checkpointing_gives_the_same_gradients(family, name):
    model = _no_dropout(tiny(family))
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    model.train()
    kw = inputs(family)
    params = [p for p in model.parameters() if p.requires_grad]
    out = output(model, family, **kw)
    g_plain = torch.autograd.grad(out.square().sum(), params)
    enable_checkpointing(model)
    out_ckpt = output(model, family, **kw)
    g_ckpt = torch.autograd.grad(out_ckpt.square().sum(), params)
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(g_ckpt, g_plain):  # recomputation may take another SDPA kernel: rounding-level differences
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_and_sdpa_models_agree(family, name):
    outs = []
    for implementation in ("sdpa", "eager"):
        model = tiny(family)
        model.set_attn_implementation(implementation)
        torch.manual_seed(5)
        kadapt.patch(model, CONFIGS[name]())
        _bump(model)
        kw = inputs(family)
        kw["attention_mask"][1, -3:] = 0
        outs.append(output(model, family, **kw))
        kadapt.unpatch(model)
        assert model.config._attn_implementation == implementation
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_methods_without_custom_attention_leave_sdpa_in_place():
    model = tiny("gpt2")
    for config in (kadapt.LoRAConfig(), kadapt.KernelMixConfig(), kadapt.ParallelAdapterConfig(bottleneck_dim=8),
                   kadapt.AdapterConfig(bottleneck_dim=8)):
        kadapt.patch(model, config)
        assert model.config._attn_implementation == "sdpa"
        kadapt.unpatch(model)
    kadapt.patch(model, kadapt.InducerTuningConfig())
    assert model.config._attn_implementation == "kadapt"
    kadapt.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_t5_inducer_cross_attention_is_opt_in():
    model = tiny("t5")
    kadapt.patch(model, kadapt.InducerTuningConfig(key_width=2, value_width=3))
    names = [n for n, _ in model.named_modules() if n.endswith("kadapt_attention")]
    assert names and not any("EncDecAttention" in n for n in names)
    kadapt.unpatch(model)
    kadapt.patch(model, kadapt.InducerTuningConfig(key_width=2, value_width=3, cross_attention=True))
    names = [n for n, _ in model.named_modules() if n.endswith("kadapt_attention")]
    assert sum("EncDecAttention" in n for n in names) == 2
    output(model, "t5").sum().backward()


def test_eject_keeps_the_function_and_round_trips(tmp_path):
    model = tiny("roberta")
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, kadapt.MAMConfig(prefix=kadapt.PrefixTuningConfig(prefix_length=4, hidden_size=8)))
    _bump(model)
    before = output(model, "roberta")
    kadapt.eject(model)
    assert not any("kadapt_prefix" in n for n, _ in model.named_modules())
    torch.testing.assert_close(output(model, "roberta"), before, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already ejected"):
        kadapt.eject(model)
    kadapt.save_adapter(model, tmp_path / "adapter")
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, "roberta"), output(model, "roberta"))
    assert kadapt.patching.get_record(fresh).config.prefix.reparameterize is False


def test_patched_inducer_model_compiles_fullgraph():
    torch._dynamo.reset()
    model = tiny("gpt2")
    kadapt.patch(model, CONFIGS["inducer_share_lora"]())
    kw = inputs("gpt2")
    kw["attention_mask"][0, -2:] = 0
    eager = output(model, "gpt2", **kw)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**kw).logits, eager)


# ----------------------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("make,field", [
    (lambda: kadapt.InducerTuningConfig(key_width=-1), "key_width"),
    (lambda: kadapt.InducerTuningConfig(value_width=0), "value_width"),
    (lambda: kadapt.InducerTuningConfig(value_extension=False, head_share=True), "head_share"),
    (lambda: kadapt.InducerTuningConfig(w_dropout=1.0), "w_dropout"),
    (lambda: kadapt.InducerTuningConfig(lora=kadapt.LoRAConfig(targets=("query",))), "targets"),
    (lambda: kadapt.InducerTuningConfig(lora={"r": 0}), "r"),
    (lambda: kadapt.InducerTuningConfig(lora=kadapt.ParallelAdapterConfig()), "lora"),
    (lambda: kadapt.PrefixTuningConfig(prefix_length=0), "prefix_length"),
    (lambda: kadapt.InducerTuningConfig(ablation="mh"), "ablation"),
    (lambda: kadapt.InducerTuningConfig(ablation="value_gating"), "key_width"),
    (lambda: kadapt.InducerTuningConfig(key_width=0, ablation="mh_adapter", gating=True), "gating"),
    (lambda: kadapt.PrefixTuningConfig(hidden_size=-2), "hidden_size"),
    (lambda: kadapt.MAMConfig(parallel_adapter=kadapt.ParallelAdapterConfig(placement="attn")), "placement"),
    (lambda: kadapt.MAMConfig(prefix={"method": "lora"}), "prefix"),
])
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_unsupported_attention_implementation_leaves_the_model_untouched():
    model = tiny("gpt2")
    model.config._attn_implementation_internal = "flex_attention"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="_attn_implementation"):
        kadapt.patch(model, kadapt.InducerTuningConfig())
    assert not kadapt.patching.is_patched(model) and model.config._attn_implementation == "flex_attention"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_configs_round_trip_through_dicts():
    for make in CONFIGS.values():
        cfg = make()
        again = kadapt.KadaptConfig.from_dict(cfg.to_dict())
        assert again == cfg and type(again) is type(cfg)
    import json
    cfg = kadapt.preset("kernel_adapters.nlg.inducer-mam")
    assert kadapt.KadaptConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_deepcopy_of_a_prefix_model_keeps_the_shared_encoder():
    model = tiny("gpt2")
    kadapt.patch(model, CONFIGS["prefix"]())
    twin = copy.deepcopy(model)
    enc = twin.kadapt_prefix_decoder_self
    assert all(blk.attn.kadapt_attention._encoder is enc for blk in twin.transformer.h)
    torch.testing.assert_close(output(twin, "gpt2"), output(model, "gpt2"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_t5_with_inner_width_other_than_d_model(name):
    """T5 allows num_heads·d_kv ≠ d_model: prefixes use the inner width, the value extension maps to D."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=3, decoder_start_token_id=0)).eval()
    kadapt.patch(model, CONFIGS[name]())
    out = output(model, "t5", **inputs("t5"))
    out.sum().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
def test_inducer_model_compiles_fullgraph_on_the_fused_path(family):
    """torch.compile(fullgraph=True) through kadapt's attention function and the inducer custom ops (Triton;
    the interpreter and aot_eager on CPU, inductor on a GPU): forward and every trainable gradient = eager."""
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _no_dropout(tiny(family).float().to(device))
    kadapt.patch(model, CONFIGS["inducer_share_lora"]())
    _bump(model)
    kadapt.set_backend("triton")
    try:
        kw = {k: v.to(device) for k, v in inputs(family).items()}
        kw["attention_mask"][0, -2:] = 0
        params = [p for p in model.parameters() if p.requires_grad]
        eager = output(model, family, **kw)
        g_eager = torch.autograd.grad(eager.square().sum(), params)
        backend = "inductor" if torch.cuda.is_available() else "aot_eager"
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = compiled(**kw).logits
        g = torch.autograd.grad(out.square().sum(), params)
    finally:
        kadapt.set_backend("auto")
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inducer_training_with_attention_dropout_runs_fused():
    """The backbone's attention dropout (0.1) stays on: the Triton kernels drop probabilities themselves
    (Philox mask keyed from torch's generator), so a forced Triton trains and torch.manual_seed repeats it."""
    model = tiny("gpt2").float().train().to(DEVICE)
    assert model.config.attn_pdrop > 0
    kadapt.patch(model, CONFIGS["inducer"]())
    kw = {k: v.to(DEVICE) for k, v in inputs("gpt2").items()}
    params = [p for p in model.parameters() if p.requires_grad]
    kadapt.set_backend("triton")
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(4)
            out = output(model, "gpt2", **kw)
            runs.append((out, torch.autograd.grad(out.square().sum(), params)))
    finally:
        kadapt.set_backend("auto")
    (a, ga), (b, gb) = runs
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert all(torch.isfinite(g).all() for g in ga)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("name", ["prefix", "mam"])
def test_prefix_models_compile_fullgraph(family, name):
    """No graph breaks through kadapt's attention function, its mask and the prefix MLP."""
    torch._dynamo.reset()
    model = tiny(family)
    kadapt.patch(model, CONFIGS[name]())
    kw = inputs(family)
    kw["attention_mask"][0, -2:] = 0
    eager = output(model, family, **kw)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**kw).logits, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_inducer_with_prefix_layer_equals_concat_softmax(causal):
    """§9: with prefix tuning alongside, the prefix keys are real columns of the inducer's softmax (LSE)."""
    from kadapt.methods.prefix import PrefixAttention, PrefixEncoder
    torch.manual_seed(0)
    B, H, d, D, P, T = 2, 3, 8, 24, 4, 7
    layer = InducerAttention(D, H, d, 2, 3, True, False, False, None, {"dtype": torch.float32}).eval()
    layer.prefix = PrefixAttention(PrefixEncoder(P, D, D, 5, 1, {"dtype": torch.float32}), 0, H, d)
    q, k, v = (torch.randn(B, H, T, d) for _ in range(3))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, :2] = False
    o, _ = layer(None, q, k, v, KadaptMask(causal, pad), scaling=0.3, dropout=0.0)
    kp, vp = (t.detach().expand(B, -1, -1, -1) for t in layer.prefix.prefix())
    keep = pad[:, None, None, :].expand(B, 1, T, T)
    if causal:
        keep = keep & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    keep = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), keep], -1)
    want_o, want_delta = _concat_inducer(layer, q.double(), torch.cat([kp, k], 2).double(),
                                         torch.cat([vp, v], 2).double(), 0.3, keep, None)
    torch.testing.assert_close(o.double(), want_o.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.take_delta().double(), want_delta, rtol=1e-5, atol=1e-5)


def test_inducer_with_prefix_and_kernel_mix_budget_and_eject():
    model = tiny("gpt2")
    cfg = CONFIGS["inducer_prefix_kernel_mix"]()
    alone = {}
    for name, part in (("inducer", kadapt.InducerTuningConfig(key_width=2, value_width=3)),
                       ("prefix", cfg.prefix), ("kernel_mix", cfg.kernel_mix)):
        kadapt.patch(model, part)
        alone[name] = kadapt.trainable_parameters(model)[0]
        kadapt.unpatch(model)
    kadapt.patch(model, cfg)
    assert kadapt.trainable_parameters(model)[0] == sum(alone.values())  # methods compose additively
    _bump(model)
    before = output(model, "gpt2")
    kadapt.eject(model)
    torch.testing.assert_close(output(model, "gpt2"), before, rtol=1e-6, atol=1e-6)
    P, D, layers = 3, 64, 2
    assert kadapt.trainable_parameters(model)[0] == alone["inducer"] + alone["kernel_mix"] + 2 * layers * P * D


@pytest.mark.parametrize("gating", [False, True])
def test_compat_inducer_lse_with_padding(gating):
    """Quirk 7 (parity flag): w = σ(s0 − LSE*) with LSE* over the padded keys too; O over the valid keys."""
    torch.manual_seed(0)
    B, H, d, D, T = 2, 3, 8, 24, 9
    args = (D, H, d, 2, 3, True, False, gating, None, {"dtype": torch.float64})
    plain = InducerAttention(*args).eval()
    compat = InducerAttention(*args, lse_with_padding=True).eval()
    compat.load_state_dict(plain.state_dict())
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :4] = False
    mask = KadaptMask(False, pad)
    o_plain, _ = plain(None, q, k, v, mask, scaling=0.3, dropout=0.0)
    o, _ = compat(None, q, k, v, mask, scaling=0.3, dropout=0.0)
    h = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, compat.key_a) + compat.key_a_bias[:, None])
    p_key = q + torch.einsum("bhtm,hmd->bhtd", h, compat.key_b) + compat.key_b_bias[:, None]
    s0 = 0.3 * (q * p_key).sum(-1)
    s = 0.3 * q @ k.transpose(-1, -2)
    w_all = torch.sigmoid(s0 - torch.logsumexp(s, -1))  # padded keys inflate LSE*
    w_valid = torch.sigmoid(s0 - torch.logsumexp(s.masked_fill(~pad[:, None, None], float("-inf")), -1))
    assert (w_all[1] < w_valid[1]).all() and torch.allclose(w_all[0], w_valid[0])
    u = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, compat.value_a) + compat.value_a_bias[:, None])
    want = torch.einsum("bhtm,hmD->btD", w_all[..., None] * u, compat.value_b) + compat.value_b_bias
    torch.testing.assert_close(compat.take_delta(), want)
    if gating:  # O ← (1 − w*) O_valid
        scale = ((1 - w_all) / (1 - w_valid)).transpose(1, 2)[..., None]
        torch.testing.assert_close(o, o_plain * scale)
    else:
        torch.testing.assert_close(o, o_plain)


def test_gpt2_prefix_shift_positions_equals_peft_style_cache():
    """Quirk 17 parity flag: real-token positions start at P, exactly as the unpatched model computes them
    when the prefixes come in as past_key_values without explicit position ids (PEFT)."""
    model = tiny("gpt2")
    kw = inputs("gpt2")
    P = 4
    kadapt.patch(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=8, compat_prefix_shift_positions=True))
    got = output(model, "gpt2", **kw)
    prefixes = [blk.attn.kadapt_attention.prefix() for blk in model.transformer.h]
    kadapt.unpatch(model)
    B = kw["input_ids"].shape[0]
    cache = DynamicCache(config=model.config)
    for layer, (kp, vp) in enumerate(prefixes):
        cache.update(kp.detach().expand(B, -1, -1, -1), vp.detach().expand(B, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(B, P, dtype=kw["attention_mask"].dtype), kw["attention_mask"]], 1)
    want = model(input_ids=kw["input_ids"], attention_mask=mask, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compat_prefix_shift_positions=True needs learned absolute positions"):
        kadapt.patch(tiny("t5"), kadapt.PrefixTuningConfig(compat_prefix_shift_positions=True))


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_roberta_bert_prefix_shift_positions_as_peft(family):
    """PEFT feeds the prefix through past_key_values, so RoBERTa/BERT compute real-token positions with
    past_key_values_length = P (RoBERTa: padding_idx + P + 1.., pads kept at padding_idx; BERT: P, P + 1, ..).
    The flag equals the unshifted model given exactly those position ids."""
    P = 3
    model = tiny(family)
    kw = inputs(family)
    kw["input_ids"][0, -2:] = model.config.pad_token_id  # right padding in row 0
    kw["attention_mask"][0, -2:] = 0
    torch.manual_seed(0)
    kadapt.patch(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=8, compat_prefix_shift_positions=True))
    _bump(model)
    got = output(model, family, **kw)
    record = kadapt.patching.get_record(model)
    record.config.compat_prefix_shift_positions = False
    shifted_hooks = [h for h in record.hooks]
    for h in shifted_hooks:  # drop only the position pre-hook: the rest of the method stays
        h.remove()
    ids = kw["input_ids"]
    if family == "roberta":
        pad = model.config.pad_token_id
        keep = ids.ne(pad).int()
        positions = (torch.cumsum(keep, 1) + P) * keep + pad
    else:
        positions = torch.arange(P, P + ids.shape[1]).expand_as(ids)
    want = output(model, family, **kw, position_ids=positions)
    assert not torch.allclose(output(model, family, **kw), got)  # the shift matters
    real = kw["attention_mask"].bool()
    torch.testing.assert_close(got[real] if got.dim() > 2 else got, want[real] if want.dim() > 2 else want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ablation", ["mh_adapter", "value_gating"])
@pytest.mark.parametrize("causal", [False, True])
def test_inducer_ablations_equal_their_formulas(ablation, causal):
    """§8 item 12. mh_adapter: w ≡ 1 (standard attention + Σ_h u^h B^v_h + c_v). value_gating: key = q,
    Δ = Σ_h w^h u^h B^v_h + c_v + Σ_h (1 − w^h) (Σ_j P_hj g_h(k_j)) B′_h + b′ with the undropped w."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    B, H, d, D, T, m = 2, 3, 8, 24, 9, 4
    layer = InducerAttention(D, H, d, 0, m, True, False, False, None, {"dtype": torch.float64},
                             ablation=ablation).eval()
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, -3:] = False  # right padding: no query row is fully masked (SDPA gives NaN there)
    o, _ = layer(None, q, k, v, KadaptMask(causal, pad), scaling=0.3, dropout=0.0, base=sdpa_attention_forward)
    keep = pad[:, None, None, :].expand(B, 1, T, T)
    if causal:
        keep = keep & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    s = (0.3 * q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1)
    torch.testing.assert_close(o, (p @ v).transpose(1, 2))
    u = torch.tanh(torch.einsum("bhtd,hdm->bhtm", q, layer.value_a) + layer.value_a_bias[:, None])
    w = torch.ones(B, H, T, dtype=torch.float64)
    if ablation == "value_gating":
        w = torch.sigmoid(0.3 * (q * q).sum(-1) - torch.logsumexp(s, -1))
    want = torch.einsum("bhtm,hmD->btD", w[..., None] * u, layer.value_b) + layer.value_b_bias
    if ablation == "value_gating":
        g = torch.tanh(torch.einsum("bhtd,hdm->bhtm", k, layer.gate_a) + layer.gate_a_bias[:, None])
        mixed = (1 - w)[..., None] * (p @ g)
        want = want + torch.einsum("bhtm,hmD->btD", mixed, layer.gate_b) + layer.gate_b_bias
    torch.testing.assert_close(layer.take_delta(), want)


def test_inducer_ablation_parameter_counts():
    """value_gating adds A′ (H, d, m), a′ (H, m), B′ (H, m, D), b′ (D) per layer; mh_adapter has no key MLP."""
    model = tiny("gpt2", hidden=64)
    H, d, D, m = 4, 16, 64, 3
    base = H * (d * m + m) + H * m * D + D
    for ablation, extra in (("mh_adapter", 0), ("value_gating", H * (d * m + m) + H * m * D + D)):
        kadapt.patch(model, kadapt.InducerTuningConfig(key_width=0, value_width=m, ablation=ablation))
        sizes = {sum(p.numel() for p in mod.parameters()) for n, mod in model.named_modules()
                 if n.endswith("kadapt_attention")}
        kadapt.unpatch(model)
        assert sizes == {base + extra}, (ablation, sizes)
