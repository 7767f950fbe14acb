"""The Llama family (Llama, Qwen2, Mistral): grouped-query attention (4 query heads over 2 KV heads in the tiny
models), rotary positions, pre-RMSNorm blocks with a gated FFN and no sub-layer dropout.

- Placement (docs/methods.md §2): the bottleneck family at attn_out (o_proj output) and ffn_out (MLP output) before
  the residual add, f ← f + a(f); LoRA on q/k/v/o, ffn_in (gate_proj and up_proj) and ffn_out (down_proj) adds
  s·(x A B + b_L) to exactly those outputs; BitFit trains Qwen2's q/k/v biases and adds zero biases elsewhere
  (projections, an additive bias after each RMSNorm, the LM head); unfreeze_layer_norms trains the RMSNorms.
- Kernel-mix under GQA (§10): the head-wise V term per KV head, Q and O per query head, against the formulas
  computed here from the module's parameters; merge = unmerged.
- Prefix tuning under GQA (§11): (H_kv, P, d) prefixes, no rotary on prefix keys: the patched model = the unpatched
  model given the prefixes as a pre-filled DynamicCache (post-rotary keys) with real-token positions 0..T−1.
- Inducer-tuning under GQA (§14 item 11): the layer = the concat softmax with the KV heads repeated per group.
- Padding (left and right), cached greedy generation, gradient checkpointing, the attention implementation,
  torch.compile(fullgraph=True), on LlamaModel / LlamaForCausalLM / LlamaForSequenceClassification too.
- Exact parameter counts on a Llama-3.2-1B-shaped model built on the meta device.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel)

import kadapt
from _models import (LLAMA_FAMILIES, assert_triton_equals_reference, cache_kwargs, check_merge, enable_checkpointing,
                     inputs, output, perturb_trainables, returned_cache, tiny)
from kadapt.methods.attention import KadaptMask
from kadapt.methods.inducer import InducerAttention
from test_attention_methods import _concat_inducer

FAMILIES = LLAMA_FAMILIES
H, H_KV, D, HEAD_DIM, LAYERS, VOCAB = 4, 2, 64, 16, 2, 100  # the tiny models of tests/_models.py
G = H // H_KV

CONFIGS = {
    "adapter": lambda: kadapt.AdapterConfig(bottleneck_dim=8),
    "lora": lambda: kadapt.LoRAConfig(r=2, targets=("q", "k", "v", "o", "ffn_in", "ffn_out"), lora_bias=True),
    "kernel_mix": lambda: kadapt.KernelMixConfig(r_q=2, r_qs=3, r_v=2, r_vs=3),
    "prefix": lambda: kadapt.PrefixTuningConfig(prefix_length=5, hidden_size=16),
    "mam": lambda: kadapt.MAMConfig(prefix=kadapt.PrefixTuningConfig(prefix_length=4, hidden_size=8),
                                    parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8)),
    "inducer": lambda: kadapt.InducerTuningConfig(key_width=3, value_width=4),
    "inducer_prefix_lora": lambda: kadapt.InducerTuningConfig(
        key_width=2, value_width=3, prefix=kadapt.PrefixTuningConfig(prefix_length=3, hidden_size=8),
        lora=kadapt.LoRAConfig(r=2, targets=("q",), lora_bias=True)),
}
INDUCER = ("inducer", "inducer_prefix_lora")


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    return model


def _bump(model):
    """Move every trainable tensor off its init (zero-initialised LoRA B / parallel W_u included)."""
    perturb_trainables(model, std=0.1)


def _tiny_as(model_cls, family: str = "llama", seed: int = 0, **overrides):
    """The tiny model's config under another head class (LlamaModel, LlamaForSequenceClassification)."""
    cfg = tiny(family).config
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


# GQA variants beyond the tiny models' 4-over-2: multi-query (H_kv = 1) and a head width with H·d ≠ D
VARIANTS = {"llama_mqa": dict(num_key_value_heads=1), "qwen2_hd24": dict(head_dim=24)}


def _model(name: str):
    """tiny(family), or a variant: the same config with VARIANTS[name] changed."""
    if name not in VARIANTS:
        return tiny(name)
    base = tiny(name.split("_")[0])
    cfg = base.config
    for k, v in VARIANTS[name].items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return type(base)(cfg).eval()


def _heads(model) -> tuple[int, int, int]:
    """(H, H_kv, d) of a model."""
    attn = _layers(model)[0].self_attn
    return model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim


def _layers(model):
    """The decoder layers of a bare model (LlamaModel) or of one with a head."""
    return list(getattr(model, "model", model).layers)


def _capture(modules: dict, store: dict) -> list:
    """Forward hooks recording (input, output) of each module under its key; returns the handles."""
    handles = []
    for name, mod in modules.items():
        def hook(m, args, out, name=name):
            store[name] = (args[0].detach().clone(), out.detach().clone())
        handles.append(mod.register_forward_hook(hook))
    return handles


# ----------------------------------------------------------------------------------------------------------
# placement: the bottleneck family, LoRA, BitFit, the norms

@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_adapter_at_attn_out_and_ffn_out_before_the_residual_add(family):
    """f ← f + φ(f W_d + b_d) W_u + b_u at o_proj's output and the MLP's output, and that corrected f is exactly
    what the residual stream adds (no sub-layer dropout in the family)."""
    model = tiny(family)
    raw, stream = {}, {}
    handles = []
    for i, layer in enumerate(_layers(model)):  # registered before the patch: these see the raw f
        handles += _capture({("attn", i): layer.self_attn.o_proj, ("ffn", i): layer.mlp}, raw)
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8, init="torch_default"))
    names = sorted(n for n, _ in model.named_modules() if n.endswith("kadapt_adapter"))
    assert names == sorted(f"model.layers.{i}.{s}.kadapt_adapter" for i in range(LAYERS)
                           for s in ("self_attn.o_proj", "mlp"))
    final = {}
    for i, layer in enumerate(_layers(model)):  # registered after: these see f after the adapter
        handles += _capture({("attn", i): layer.self_attn.o_proj, ("ffn", i): layer.mlp}, final)
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kw, i=i: stream.__setitem__(("in", i), args[0] if args else kw["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, args, i=i: stream.__setitem__(("mid", i), args[0])))
        handles.append(layer.register_forward_hook(lambda m, args, out, i=i: stream.__setitem__(
            ("out", i), out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        output(model, family, **inputs(family))
    for h in handles:
        h.remove()
    for i, layer in enumerate(_layers(model)):
        for kind, site in (("attn", layer.self_attn.o_proj), ("ffn", layer.mlp)):
            a = site.kadapt_adapter
            f = raw[(kind, i)][1]
            want = f + F.gelu(f @ a.down.w + a.down.bias, approximate="tanh") @ a.up.w + a.up.bias  # gelu_new
            torch.testing.assert_close(final[(kind, i)][1], want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(want, f)
        # before the residual add: the stream gains exactly the corrected attn_out, then the corrected ffn_out
        torch.testing.assert_close(stream[("mid", i)] - stream[("in", i)], final[("attn", i)][1], rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(stream[("out", i)] - stream[("mid", i)], final[("ffn", i)][1], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config,sites", [
    (kadapt.PfeifferConfig(bottleneck_dim=8), ["mlp"]),
    (kadapt.PfeifferConfig(bottleneck_dim=8, placement="attn"), ["self_attn.o_proj"]),
    (kadapt.CompacterPlusPlusConfig(bottleneck_dim=8), ["mlp"]),
    (kadapt.LowRankAdapterConfig(bottleneck_dim=8, rank=2, drop_first=1), ["self_attn.o_proj", "mlp"]),
])
def test_bottleneck_family_sites(family, config, sites):
    model = tiny(family)
    kadapt.patch(model, config)
    first = 1 if getattr(config, "drop_first", 0) else 0
    names = sorted(n for n, _ in model.named_modules() if n.endswith("kadapt_adapter"))
    assert names == sorted(f"model.layers.{i}.{s}.kadapt_adapter" for i in range(first, LAYERS) for s in sites)


LINEARS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
           "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
           "down": ("mlp", "down_proj")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets,corrected", [
    (("q", "k", "v", "o", "ffn_in", "ffn_out"), ("q", "k", "v", "o", "gate", "up", "down")),
    (("q", "v"), ("q", "v")),
    (("ffn_in",), ("gate", "up")),
    (("k", "ffn_out"), ("k", "down")),
])
def test_lora_adds_its_correction_to_exactly_its_targets(family, targets, corrected):
    """y' = x Wᵀ + b + s·(x A B + b_L) on the targeted linears (k/v: out = H_kv·d), y' = x Wᵀ + b elsewhere."""
    model = tiny(family)
    cfg = kadapt.LoRAConfig(r=3, alpha=6.0, targets=targets, lora_bias=True, init="houlsby")
    kadapt.patch(model, cfg)
    _bump(model)
    seen = {}
    handles = []
    for i, layer in enumerate(_layers(model)):
        mods = {(i, name): getattr(getattr(layer, part), attr) for name, (part, attr) in LINEARS.items()}
        handles += _capture(mods, seen)
    with torch.no_grad():
        output(model, family, **inputs(family))
    for h in handles:
        h.remove()
    assert not any("kadapt_lora" in n for n, _ in model.named_modules()
                   if not n.startswith("model.layers."))  # no embedding / LM head branch
    for (i, name), (x, y) in seen.items():
        part, attr = LINEARS[name]
        lin = getattr(getattr(_layers(model)[i], part), attr)
        base = F.linear(x, lin.weight, lin.bias)
        if name not in corrected:
            assert not hasattr(lin, "kadapt_lora")
            torch.testing.assert_close(y, base, rtol=0, atol=0)
            continue
        (branch,) = lin.kadapt_lora.branches.values()
        assert branch.lora_b.shape == (3, lin.out_features)
        if name in ("k", "v"):
            assert lin.out_features == H_KV * HEAD_DIM
        want = base + 2.0 * (x @ branch.lora_a @ branch.lora_b + branch.lora_bias)  # s = α / r = 6 / 3
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_adapter_reads_the_sublayer_input_and_adds_at_its_output(family):
    """f ← f + s·(relu(x W_d + b_d) W_u + b_u): ffn: x = the MLP input, f = its (down_proj) output; attn: x = the
    normed hidden state (q_proj's input), f = o_proj's output."""
    model = tiny(family)
    raw = {}
    handles = []
    for i, layer in enumerate(_layers(model)):
        handles += _capture({("attn", i): layer.self_attn.o_proj, ("ffn", i): layer.mlp,
                             ("x", i): layer.self_attn.q_proj}, raw)
    kadapt.patch(model, kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement="both", scale=1.5,
                                                     init="torch_default"))
    final = {}
    for i, layer in enumerate(_layers(model)):
        handles += _capture({("attn", i): layer.self_attn.o_proj, ("ffn", i): layer.mlp}, final)
    with torch.no_grad():
        output(model, family, **inputs(family))
    for h in handles:
        h.remove()
    for i, layer in enumerate(_layers(model)):
        for kind, site, x in (("attn", layer.self_attn.o_proj, raw[("x", i)][0]),
                              ("ffn", layer.mlp, raw[("ffn", i)][0])):
            a = site.kadapt_parallel
            f = raw[(kind, i)][1]
            want = f + 1.5 * (torch.relu(x @ a.w_down + a.b_down) @ a.w_up + a.b_up)
            torch.testing.assert_close(final[(kind, i)][1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bitfit_biases(family):
    """Qwen2's q/k/v biases (the existing tensors) train; every other projection, an additive bias after each
    RMSNorm (the final one too) and the LM head get zero biases that train. Count per layer:
    q H·d + k H_kv·d + v H_kv·d + o D + gate 2D + up 2D + down D + 2 norms·D = 64 + 32 + 32 + 64 + 128 + 128 + 64
    + 128 = 640; total 2·640 + D (final norm) + V (LM head) = 1,280 + 64 + 100 = 1,444."""
    model = tiny(family)
    base = output(model, family)
    layers = _layers(model)
    existing = {(i, n): getattr(layer.self_attn, n + "_proj").bias for i, layer in enumerate(layers)
                for n in "qkv"}
    assert all((b is not None) == (family == "qwen2") for b in existing.values())
    saved = {k: b.detach().clone() for k, b in existing.items() if b is not None}
    kadapt.patch(model, kadapt.BitFitConfig())
    assert kadapt.trainable_parameters(model)[0] == 1_444 == LAYERS * 640 + D + VOCAB
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"model.layers.{i}.{part}.{attr}.bias" for i in range(LAYERS) for part, attr in LINEARS.values()}
    want |= {f"model.layers.{i}.{norm}.bias" for i in range(LAYERS)
             for norm in ("input_layernorm", "post_attention_layernorm")}
    want |= {"model.norm.bias", "lm_head.bias"}
    assert trainable == want
    for k, b in existing.items():
        if b is not None:  # the same tensor trains, nothing is added on top of it
            assert getattr(layers[k[0]].self_attn, k[1] + "_proj").bias is b and b.requires_grad
    # zero biases: the function is unchanged at init
    torch.testing.assert_close(output(model, family), base, rtol=1e-6, atol=1e-6)
    # the RMSNorm bias is added after the norm's scale
    bare = {}
    h = model.model.norm.register_forward_hook(lambda m, a, o: bare.__setitem__("x", a[0]))
    with torch.no_grad():
        model.model.norm.bias.copy_(torch.linspace(-1, 1, D))
        hidden = model(**inputs(family), output_hidden_states=True).hidden_states[-1]
    h.remove()
    x = bare["x"].float()
    norm = model.model.norm
    normed = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    torch.testing.assert_close(hidden, normed + model.model.norm.bias, rtol=1e-5, atol=1e-5)
    _bump(model)
    assert not torch.allclose(output(model, family), base)
    kadapt.unpatch(model)
    assert all(getattr(layers[i].self_attn, n + "_proj").bias is b for (i, n), b in existing.items())
    assert all(torch.equal(existing[k], v) for k, v in saved.items())  # Qwen2's trained biases restored
    assert layers[0].self_attn.o_proj.bias is None and "bias" not in dict(model.model.norm.named_parameters())
    torch.testing.assert_close(output(model, family), base, rtol=0, atol=0)


def test_bitfit_counts_on_the_other_heads():
    """LlamaModel: no LM head bias (2·640 + 64 = 1,344); LlamaForSequenceClassification: the new `score` head
    (num_labels·D = 2·64 = 128, no bias) trains too: 1,344 + 128 = 1,472. compat_bitfit_skip_final_ln drops
    the final norm's bias (−64)."""
    bare = _tiny_as(LlamaModel)
    kadapt.patch(bare, kadapt.BitFitConfig())
    assert kadapt.trainable_parameters(bare)[0] == 1_344 == LAYERS * 640 + D
    kadapt.unpatch(bare)
    kadapt.patch(bare, kadapt.BitFitConfig(compat_bitfit_skip_final_ln=True))
    assert kadapt.trainable_parameters(bare)[0] == 1_280
    cls = _tiny_as(LlamaForSequenceClassification, num_labels=2)
    kadapt.patch(cls, kadapt.BitFitConfig())
    assert kadapt.trainable_parameters(cls)[0] == 1_472 == LAYERS * 640 + D + 2 * D
    assert cls.score.weight.requires_grad and cls.score.bias is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make", [lambda **kw: kadapt.CompacterConfig(bottleneck_dim=8, **kw),
                                  lambda **kw: kadapt.CompacterPlusPlusConfig(bottleneck_dim=8, **kw),
                                  lambda **kw: kadapt.AdapterConfig(bottleneck_dim=8, **kw)])
def test_unfreeze_layer_norms_trains_the_rmsnorm_weights(family, make):
    """(2N_b + 1)·D = 5·64 = 320 RMSNorm weights train (default on for the family), none with the flag off."""
    model = tiny(family)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * LAYERS + 1
    kadapt.patch(model, make())
    on = kadapt.trainable_parameters(model)[0]
    assert all(n.weight.requires_grad for n in norms)
    kadapt.unpatch(model)
    kadapt.patch(model, make(unfreeze_layer_norms=False))
    assert not any(n.weight.requires_grad for n in norms)
    assert on - kadapt.trainable_parameters(model)[0] == 320 == (2 * LAYERS + 1) * D


# ----------------------------------------------------------------------------------------------------------
# kernel-mix under grouped-query attention

@pytest.mark.parametrize("family", [*FAMILIES, *VARIANTS])
def test_kernel_mix_grouped_query_formulas(family):
    """docs/methods.md §10, grouped-query form: ΔV_g = δ(K_g) A^V_g B^V_g + b^V_g per KV head g (H_kv = 2, K_g
    the k_proj output before rotary, Qwen2's key bias included) + X A^Vs B^Vs; ΔQ_h = X A^Q_h B^Q_h + b^Q_h per
    query head (H = 4) + X A^Qs B^Qs; ΔO = Σ_h o^h A^O_h B^O_[h] + b^O + o A^Os B^Os. Head-wise terms × scale_head,
    shared × scale_shared. Each computed here, head by head, from the module's parameters."""
    model = _model(family)
    H, H_KV, d = _heads(model)
    family = family.split("_")[0]
    sh, ss = 0.5, 2.0
    kadapt.patch(model, kadapt.KernelMixConfig(r_q=2, r_qs=3, r_v=2, r_vs=3, scale_head=sh, scale_shared=ss,
                                               dropout=0.1))  # eval: no dropout
    _bump(model)
    seen = {}
    handles = []
    for i, layer in enumerate(_layers(model)):
        a = layer.self_attn
        handles += _capture({(i, "q"): a.q_proj, (i, "k"): a.k_proj, (i, "v"): a.v_proj, (i, "o"): a.o_proj}, seen)
    with torch.no_grad():
        output(model, family, **inputs(family))
    for h in handles:
        h.remove()
    for i, layer in enumerate(_layers(model)):
        a = layer.self_attn
        km = a.kadapt_kernel_mix
        assert (km.heads, km.kv_heads, km.head_dim) == (H, H_KV, d)
        assert km.v_a.shape == (H_KV, d, 2) and km.v_b.shape == (H_KV, 2, d) and km.v_bias.shape == (H_KV, d)
        assert km.vs_b.shape == (3, H_KV * d) and km.qs_b.shape == (3, H * d)
        assert km.q_a.shape == (H, D, 2) and km.o_a.shape == (H, d, 2) and km.o_b.shape == (H * 2, D)
        x, q = seen[(i, "q")]
        _, k = seen[(i, "k")]
        _, v = seen[(i, "v")]
        o_in, o = seen[(i, "o")]
        torch.testing.assert_close(k, F.linear(x, a.k_proj.weight, a.k_proj.bias), rtol=0, atol=0)  # K unchanged
        dv = torch.cat([k[..., g * d:(g + 1) * d] @ km.v_a[g] @ km.v_b[g] + km.v_bias[g] for g in range(H_KV)], -1)
        dv = sh * dv + ss * (x @ km.vs_a @ km.vs_b)
        torch.testing.assert_close(v - F.linear(x, a.v_proj.weight, a.v_proj.bias), dv, rtol=1e-4, atol=1e-6)
        dq = torch.cat([x @ km.q_a[h] @ km.q_b[h] + km.q_bias[h] for h in range(H)], -1)
        dq = sh * dq + ss * (x @ km.qs_a @ km.qs_b)
        torch.testing.assert_close(q - F.linear(x, a.q_proj.weight, a.q_proj.bias), dq, rtol=1e-4, atol=1e-6)
        do = sum(o_in[..., h * d:(h + 1) * d] @ km.o_a[h] @ km.o_b[h * 2:(h + 1) * 2] for h in range(H)) + km.o_bias
        do = sh * do + ss * (o_in @ km.os_a @ km.os_b)
        torch.testing.assert_close(o - F.linear(o_in, a.o_proj.weight, a.o_proj.bias), do, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", [*FAMILIES, *VARIANTS])
@pytest.mark.parametrize("ranks", [dict(r_q=2, r_qs=3, r_v=2, r_vs=3), dict(r_q=0, r_qs=0, r_v=3, r_vs=0)])
def test_kernel_mix_merge_equals_unmerged(family, ranks):
    """ΔW_V[:, block g] = W_K[:, g] A^V_g B^V_g (+ shared), Δb_V[g] = b_K[g] A^V_g B^V_g + b^V_g (b_K: Qwen2)."""
    model = _model(family)
    family = family.split("_")[0]
    kadapt.patch(model, kadapt.KernelMixConfig(**ranks, scale_head=0.7, scale_shared=1.3))
    _bump(model)
    check_merge(model, family)


# ----------------------------------------------------------------------------------------------------------
# prefix tuning under grouped-query attention

@pytest.mark.parametrize("family", [*FAMILIES, *VARIANTS])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_prefix_equals_prefilled_cache(family, implementation, padded):
    """Prefix keys/values have H_kv heads, no rotary position; real tokens keep positions 0..T−1. The cache holds
    post-rotary keys, so pre-filling it with the raw prefix keys is exactly 'no rotary on the prefix'."""
    model = _model(family)
    _, H_KV, d = _heads(model)
    family = family.split("_")[0]
    model.set_attn_implementation(implementation)
    kw = inputs(family)
    if padded:
        kw["attention_mask"][0, -3:] = 0
    P = 5
    kadapt.patch(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=16))
    _bump(model)
    got = output(model, family, **kw)
    prefixes = [layer.self_attn.kadapt_attention.prefix() for layer in _layers(model)]
    assert all(kp.shape == vp.shape == (H_KV, P, d) for kp, vp in prefixes)
    # nothing of the prefix lands in the KV cache object
    out = model(**kw, use_cache=True)
    assert returned_cache(out).get_seq_length() == kw["input_ids"].shape[1]
    kadapt.unpatch(model)
    assert model.config._attn_implementation == implementation

    B, T = kw["input_ids"].shape
    mask = torch.cat([torch.ones(B, P, dtype=kw["attention_mask"].dtype), kw["attention_mask"]], 1)
    positions = torch.arange(T)[None].expand(B, T)
    want = model(input_ids=kw["input_ids"], attention_mask=mask, position_ids=positions,
                 **cache_kwargs(model, _prefilled(model, prefixes, B))).logits
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    # and the positions matter: the same cache with real tokens shifted to P..P+T−1 is another function
    shifted = model(input_ids=kw["input_ids"], attention_mask=mask, position_ids=positions + P,
                    **cache_kwargs(model, _prefilled(model, prefixes, B))).logits
    assert not torch.allclose(shifted[valid], got[valid], atol=1e-4)


def _prefilled(model, prefixes, B):
    """A DynamicCache holding each layer's (K_P, V_P), expanded over the batch, as its past keys/values."""
    cache = DynamicCache(config=model.config)
    for layer, (kp, vp) in enumerate(prefixes):
        cache.update(kp.detach().expand(B, -1, -1, -1), vp.detach().expand(B, -1, -1, -1), layer)
    return cache


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_eject_shapes_and_function(family):
    """After eject every layer holds K_P, V_P ∈ R^{H_kv×P×d} as parameters:
    2·N_b·P·H_kv·d = 2·2·5·2·16 = 640."""
    model = tiny(family)
    P = 5
    kadapt.patch(model, kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=16))
    # training count: P·D + D·m_p + m_p + 2m_p·N_b·H_kv·d + 2N_b·H_kv·d = 320 + 1,024 + 16 + 2,048 + 128 = 3,536
    assert kadapt.trainable_parameters(model)[0] == 3_536 == (P * D + D * 16 + 16 + 2 * 16 * LAYERS * H_KV * HEAD_DIM
                                                               + 2 * LAYERS * H_KV * HEAD_DIM)
    _bump(model)
    before = output(model, family)
    kadapt.eject(model)
    torch.testing.assert_close(output(model, family), before, rtol=1e-6, atol=1e-6)
    for layer in _layers(model):
        pa = layer.self_attn.kadapt_attention
        assert pa.key.shape == pa.value.shape == (H_KV, P, HEAD_DIM)
        assert pa.key.requires_grad and pa.value.requires_grad
    assert kadapt.trainable_parameters(model)[0] == 640 == 2 * LAYERS * P * H_KV * HEAD_DIM


# ----------------------------------------------------------------------------------------------------------
# inducer-tuning under grouped-query attention: the query heads of a group share their KV head

@pytest.mark.parametrize("options", [dict(key_width=3, value_width=4), dict(key_width=0, value_width=3, gating=True),
                                     dict(key_width=2, value_width=3, value_extension=False),
                                     dict(key_width=2, value_width=3, head_share=True)])
@pytest.mark.parametrize("mask_kind", ["causal", "causal+padding", "causal+padding+decode"])
def test_inducer_layer_grouped_query_equals_concat_softmax_over_repeated_kv(options, mask_kind):
    """Query head h attends with KV head h // G (transformers' repeat_kv); s0, w, the key MLP and the value term
    stay per query head. k, v given with H_kv = 2 heads to 4 query heads."""
    torch.manual_seed(0)
    B, d = 2, 8
    Tq, Tk = (3, 11) if "decode" in mask_kind else (9, 9)
    layer = InducerAttention(24, H, d, options.get("key_width"), options.get("value_width"),
                             options.get("value_extension", True), options.get("head_share", False),
                             options.get("gating", False), None, {"dtype": torch.float32}).eval()
    q = torch.randn(B, H, Tq, d)
    k, v = (torch.randn(B, H_KV, Tk, d) for _ in range(2))
    pad = torch.ones(B, Tk, dtype=torch.bool)
    pads = slice(0, 4) if "decode" in mask_kind else slice(Tk - 3, Tk)  # no fully masked query row (NaN here)
    pad[1, pads] = False
    mask = KadaptMask(True, pad if "padding" in mask_kind else None)
    o, _ = layer(None, q, k, v, mask, scaling=0.35, dropout=0.0)
    keep = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    keep &= torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    if mask.key_padding is not None:
        keep &= mask.key_padding[:, None, None, :]
    kr, vr = (t.repeat_interleave(G, dim=1) for t in (k, v))
    want_o, want_delta = _concat_inducer(layer, q.double(), kr.double(), vr.double(), 0.35, keep, None)
    torch.testing.assert_close(o.double(), want_o.transpose(1, 2), rtol=1e-5, atol=1e-5)
    if want_delta is not None:
        torch.testing.assert_close(layer.take_delta().double(), want_delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_inducer_parameters_per_query_head(family):
    """Every inducer parameter is per query head (H = 4), none per KV head; value_gating (one KV head per query
    head) is refused under grouped-query attention."""
    model = tiny(family)
    kadapt.patch(model, kadapt.InducerTuningConfig(key_width=3, value_width=4))
    for layer in _layers(model):
        ind = layer.self_attn.kadapt_attention
        assert ind.key_a.shape == (H, HEAD_DIM, 3) and ind.key_b.shape == (H, 3, HEAD_DIM)
        assert ind.value_a.shape == (H, HEAD_DIM, 4) and ind.value_b.shape == (H, 4, D)
    # key MLP H(2d m_k + m_k + d) = 4·115 = 460; value H(d m_v + m_v) + H m_v D + D = 272 + 1,024 + 64 = 1,360
    assert kadapt.trainable_parameters(model)[0] == 2 * (460 + 1_360) == 3_640
    kadapt.unpatch(model)
    with pytest.raises(ValueError, match="grouped-query attention"):
        kadapt.patch(model, kadapt.InducerTuningConfig(key_width=0, value_width=3, ablation="value_gating"))
    assert not kadapt.patching.is_patched(model)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # forced Triton: the GPU, or the interpreter on CPU


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # mistral: a sliding window covering every key
@pytest.mark.parametrize("name", INDUCER)
def test_inducer_model_triton_equals_reference(family, name):
    """The fused path (Triton reading the shared KV head in place; interpreter on CPU) through the patched model
    = the reference (KV heads expanded), forward and every trainable gradient."""
    model = _no_dropout(tiny(family).float())
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    model.train().to(DEVICE)
    kw = {k: v.to(DEVICE) for k, v in inputs(family).items()}
    kw["attention_mask"][1, :2] = 0
    assert_triton_equals_reference(model, family, kw)


# ----------------------------------------------------------------------------------------------------------
# padding, cached generation, gradient checkpointing, the attention implementation, torch.compile

PAD_METHODS = ["adapter", "lora", "kernel_mix", "prefix", "mam", *INDUCER]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PAD_METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_leak(family, name, side):
    """Outputs at real positions do not depend on what the pad tokens are; a right-padded row = the row alone."""
    model = tiny(family)
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    kw = inputs(family, batch=2, length=9)
    pads = slice(0, 3) if side == "left" else slice(6, 9)
    kw["attention_mask"][0, pads] = 0
    kw["input_ids"][0, pads] = 0
    first = output(model, family, **kw)
    kw["input_ids"][0, pads] = torch.tensor([57, 3, 91])
    second = output(model, family, **kw)
    real = kw["attention_mask"].bool()
    assert torch.isfinite(first[real]).all()
    torch.testing.assert_close(second[real], first[real], rtol=1e-5, atol=1e-5)
    if side == "right":
        alone = output(model, family, input_ids=kw["input_ids"][:1, :6], attention_mask=kw["attention_mask"][:1, :6])
        torch.testing.assert_close(first[:1, :6], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adapter", "lora", "prefix", "inducer"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification_reads_the_last_real_token(name, side):
    """LlamaForSequenceClassification (score on the last non-pad token) gives a padded row what the row alone
    gives."""
    model = _tiny_as(LlamaForSequenceClassification, num_labels=3)
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    kw = inputs("llama", batch=2, length=9)
    pads = slice(0, 3) if side == "left" else slice(6, 9)
    kw["attention_mask"][0, pads] = 0
    kw["input_ids"][0, pads] = model.config.pad_token_id
    both = model(**kw).logits
    real = kw["attention_mask"][0].bool()
    first = 3 if side == "left" else 0  # where the padded row's real tokens sit (positions 0..T−1 by default)
    alone = model(input_ids=kw["input_ids"][:1, real], position_ids=torch.arange(first, first + 6)[None]).logits
    assert both.shape == (2, 3)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PAD_METHODS)
def test_greedy_generate_with_cache_equals_without(family, name):
    model = tiny(family)
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    kw = inputs(family, batch=2, length=7)
    kw["attention_mask"][0, :2] = 0  # left padding, as for batched decoding
    kw["input_ids"][0, :2] = 0
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**kw, use_cache=True, **gen)
    without = model.generate(**kw, use_cache=False, **gen)
    assert with_cache.shape[1] > 7
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["prefix", "mam", *INDUCER])
def test_gradient_checkpointing_gives_the_same_gradients(family, name):
    """PEFT's prefix tuning refuses gradient checkpointing; kadapt's stores nothing in the cache, so it works."""
    model = _no_dropout(tiny(family))
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    model.train()
    kw = inputs(family)
    kw["attention_mask"][1, :2] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    out = output(model, family, **kw)
    g_plain = torch.autograd.grad(out.square().sum(), params)
    enable_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    out_ckpt = output(model, family, **kw)
    g_ckpt = torch.autograd.grad(out_ckpt.square().sum(), params)
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_implementation_switch_and_restore(family, implementation):
    model = tiny(family)
    model.set_attn_implementation(implementation)
    for name in ("adapter", "lora", "kernel_mix"):
        kadapt.patch(model, CONFIGS[name]())
        assert model.config._attn_implementation == implementation, name
        assert all(layer.self_attn.config._attn_implementation == implementation for layer in _layers(model))
        kadapt.unpatch(model)
    for name in ("prefix", "inducer", "mam"):
        kadapt.patch(model, CONFIGS[name]())
        assert model.config._attn_implementation == "kadapt", name
        assert all(layer.self_attn.config._attn_implementation == "kadapt" for layer in _layers(model))
        kadapt.unpatch(model)
        assert model.config._attn_implementation == implementation, name
        assert all(layer.self_attn.config._attn_implementation == implementation for layer in _layers(model))


@pytest.mark.parametrize("name", ["prefix", "inducer"])
def test_eager_and_sdpa_agree(name):
    outs = []
    for implementation in ("sdpa", "eager"):
        model = tiny("qwen2")
        model.set_attn_implementation(implementation)
        torch.manual_seed(5)
        kadapt.patch(model, CONFIGS[name]())
        _bump(model)
        kw = inputs("qwen2")
        kw["attention_mask"][1, :3] = 0
        outs.append(output(model, "qwen2", **kw)[kw["attention_mask"].bool()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adapter", "lora", "kernel_mix", "prefix", "inducer"])
def test_compile_fullgraph_equals_eager(name):
    """torch.compile(model, fullgraph=True) of the patched model (aot_eager on CPU, inductor on a GPU): forward
    and every trainable gradient = eager."""
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _no_dropout(tiny("llama").to(device))
    kadapt.patch(model, CONFIGS[name]())
    _bump(model)
    kw = {k: v.to(device) for k, v in inputs("llama").items()}
    kw["attention_mask"][0, :2] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    eager = output(model, "llama", **kw)
    g_eager = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled(**kw).logits
    g = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["adapter", "lora", "prefix", "inducer"])
def test_llama_model_and_heads(name):
    """LlamaModel (no head) patches like the LM: the same hidden states as LlamaForCausalLM's backbone."""
    lm = tiny("llama")
    bare = _tiny_as(LlamaModel)
    bare.load_state_dict(lm.model.state_dict())
    for m in (lm, bare):
        torch.manual_seed(2)
        kadapt.patch(m, CONFIGS[name]())
        _bump(m)
    kw = inputs("llama")
    kw["attention_mask"][0, :2] = 0
    hidden = lm(**kw, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(bare(**kw).last_hidden_state, hidden, rtol=1e-5, atol=1e-5)
    strip = lambda n: n[len("model."):] if n.startswith("model.") else n  # noqa: E731
    assert {n for n, p in bare.named_parameters() if p.requires_grad} == \
        {strip(n) for n, p in lm.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------
# exact counts on a Llama-3.2-1B-shaped model (meta device)

# D = 2048, D_ff = 8192, N_b = 16, H = 32, H_kv = 8, d = 64, V = 128,256 (tied): 1,235,814,400 parameters.
L_D, L_FF, L_NB, L_H, L_HKV, L_d, L_V = 2048, 8192, 16, 32, 8, 64, 128_256
L_NORMS = (2 * L_NB + 1) * L_D  # 33·2048 = 67,584 RMSNorm weights


@pytest.fixture(scope="module")
def llama_1b():
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    # embeddings V·D + 16 layers·(q D·D + k, v 2·D·H_kv·d + o D·D + 3·D·D_ff + 2D) + final norm D
    total = L_V * L_D + L_NB * (2 * L_D * L_D + 2 * L_D * L_HKV * L_d + 3 * L_D * L_FF + 2 * L_D) + L_D
    assert kadapt.trainable_parameters(model) == (1_235_814_400, 1_235_814_400) == (total, total)
    return model


def _count(model, config, eject=False) -> int:
    kadapt.patch(model, config)
    try:
        if eject:
            kadapt.eject(model)
        return kadapt.trainable_parameters(model)[0]
    finally:
        kadapt.unpatch(model)


def test_llama_1b_lora(llama_1b):
    # r = 8 on q, v: per layer r(D + H·d) + r(D + H_kv·d) = 8·4,096 + 8·2,560 = 53,248; ×16
    n = _count(llama_1b, kadapt.LoRAConfig(r=8, targets=("q", "v")))
    assert n == 851_968 == L_NB * (8 * (L_D + L_H * L_d) + 8 * (L_D + L_HKV * L_d))
    # every target, with bias: q 8·4,096 + 2,048; k, v 8·2,560 + 512 each; o 8·4,096 + 2,048;
    # gate, up 8·(2,048 + 8,192) + 8,192 each; down 8·(8,192 + 2,048) + 2,048 = 375,808 per layer
    n = _count(llama_1b, kadapt.LoRAConfig(r=8, targets=("q", "k", "v", "o", "ffn_in", "ffn_out"), lora_bias=True))
    per_layer = (2 * (8 * (L_D + L_H * L_d) + L_H * L_d) + 2 * (8 * (L_D + L_HKV * L_d) + L_HKV * L_d)
                 + 2 * (8 * (L_D + L_FF) + L_FF) + 8 * (L_FF + L_D) + L_D)
    assert n == 6_012_928 == L_NB * per_layer


def test_llama_1b_bottleneck_family(llama_1b):
    # Houlsby, rf 32 → m = 64: 2Dm + m + D = 264,256 per adapter, 32 adapters = 8,456,192; + 67,584 norms
    m = 64
    assert _count(llama_1b, kadapt.AdapterConfig()) == 8_523_776 == 2 * L_NB * (2 * L_D * m + m + L_D) + L_NORMS
    assert _count(llama_1b, kadapt.AdapterConfig(unfreeze_layer_norms=False)) == 8_456_192
    adapters = {n: sum(p.numel() for p in mod.parameters()) for n, mod in _named(llama_1b, kadapt.AdapterConfig(),
                                                                                 "kadapt_adapter")}
    assert len(adapters) == 32 and set(adapters.values()) == {264_256}
    # Pfeiffer (ffn_out only): 16·264,256 + 67,584 norms
    assert _count(llama_1b, kadapt.PfeifferConfig()) == 4_295_680 == L_NB * (2 * L_D * m + m + L_D) + L_NORMS
    # Compacter, n = 4, r = 1, m = 64: per adapter down s n·(D/n)·r + t n·r·(m/n) + b m = 2,048 + 64 + 64 and
    # up s n·(m/n)·r + t n·r·(D/n) + b D = 64 + 2,048 + 2,048: 2r(D + m) + m + D = 6,336; 32 adapters = 202,752;
    # + the shared rule n³ = 64 + 67,584 norms
    n = 4
    assert _count(llama_1b, kadapt.CompacterConfig()) == 270_400 == (2 * L_NB * (2 * (L_D + m) + m + L_D) + n ** 3
                                                                     + L_NORMS)
    # Compacter++ (ffn_out only): 16·6,336 + 64 + 67,584
    assert _count(llama_1b, kadapt.CompacterPlusPlusConfig()) == 169_024 == L_NB * 6_336 + 64 + L_NORMS


def _named(model, config, suffix):
    kadapt.patch(model, config)
    try:
        return [(n, mod) for n, mod in model.named_modules() if n.endswith(suffix)]
    finally:
        kadapt.unpatch(model)


def test_llama_1b_bitfit(llama_1b):
    # per layer: q H·d 2,048 + k H_kv·d 512 + v 512 + o D 2,048 + gate D_ff 8,192 + up 8,192 + down D 2,048
    # + two RMSNorm biases 2·2,048 = 27,648; ×16 = 442,368; + final norm 2,048 + LM head V 128,256
    per_layer = L_H * L_d + 2 * L_HKV * L_d + L_D + 2 * L_FF + L_D + 2 * L_D
    assert _count(llama_1b, kadapt.BitFitConfig()) == 572_672 == L_NB * per_layer + L_D + L_V
    assert _count(llama_1b, kadapt.preset("compacter_paper.bitfit")) == 570_624 == L_NB * per_layer + L_V


def test_llama_1b_kernel_mix(llama_1b):
    rq, rqs, rv, rvs = 3, 12, 8, 8  # the defaults (GPT-2 NLG preset ranks)
    parts = {
        "q_head": (204_800, L_H * (L_D * rq + L_d * rq + L_d)),      # 32·(6,144 + 192 + 64)
        "q_shared": (49_152, rqs * (L_D + L_H * L_d)),              # 12·4,096 (= 2D·r_qs, H·d = D)
        "v_head": (8_704, L_HKV * (2 * L_d * rv + L_d)),            # 8·(1,024 + 64)
        "v_shared": (20_480, rvs * (L_D + L_HKV * L_d)),            # 8·2,560
        "o_head": (542_720, L_H * L_d * rv + L_H * rv * L_D + L_D),  # 16,384 + 524,288 + 2,048
        "o_shared": (32_768, rvs * (L_H * L_d + L_D)),              # 8·4,096
    }
    assert all(lit == formula for lit, formula in parts.values()), parts
    per_layer = sum(lit for lit, _ in parts.values())
    assert per_layer == 858_624
    assert _count(llama_1b, kadapt.KernelMixConfig()) == 13_737_984 == L_NB * per_layer
    # V alone (r_v = 8 brings O head-wise with it): 16·(8,704 + 542,720)
    v_only = kadapt.KernelMixConfig(r_q=0, r_qs=0, r_v=8, r_vs=0)
    assert _count(llama_1b, v_only) == 8_822_784 == L_NB * (8_704 + 542_720)


def test_llama_1b_prefix(llama_1b):
    P, mp = 16, 800
    cfg = kadapt.PrefixTuningConfig(prefix_length=P, hidden_size=mp)
    # training: P·D + D·m_p + m_p + 2m_p·N_b·H_kv·d + 2N_b·H_kv·d
    #   = 32,768 + 1,638,400 + 800 + 13,107,200 + 16,384
    assert _count(llama_1b, cfg) == 14_795_552 == (P * L_D + L_D * mp + mp + 2 * mp * L_NB * L_HKV * L_d
                                                   + 2 * L_NB * L_HKV * L_d)
    # after eject: 2·N_b·P·H_kv·d = 2·16·16·8·64
    assert _count(llama_1b, cfg, eject=True) == 262_144 == 2 * L_NB * P * L_HKV * L_d
    kadapt.patch(llama_1b, cfg)
    try:
        kadapt.eject(llama_1b)
        pa = llama_1b.model.layers[0].self_attn.kadapt_attention
        assert pa.key.shape == pa.value.shape == (L_HKV, P, L_d)
    finally:
        kadapt.unpatch(llama_1b)


def test_llama_1b_inducer(llama_1b):
    mk, mv = 10, 15  # the defaults
    key = L_H * (2 * L_d * mk + mk + L_d)                    # 32·(1,280 + 10 + 64) = 43,328
    value = L_H * (L_d * mv + mv) + L_H * mv * L_D + L_D     # 32·975 + 983,040 + 2,048 = 1,016,288
    assert (key, value) == (43_328, 1_016_288)
    assert _count(llama_1b, kadapt.InducerTuningConfig()) == 16_953_856 == L_NB * (key + value)
    # head share: H(d m_v + m_v) + m_v·D + D = 31,200 + 30,720 + 2,048 = 63,968; no key MLP
    share = L_H * (L_d * mv + mv) + mv * L_D + L_D
    assert share == 63_968
    assert _count(llama_1b, kadapt.InducerTuningConfig(key_width=0, head_share=True)) == 1_023_488 == L_NB * share
    # without extension: H(2d m_v + m_v + d) = 32·(1,920 + 15 + 64) = 63,968 per layer, + key MLP 43,328
    noext = L_H * (2 * L_d * mv + mv + L_d)
    assert noext == 63_968
    assert _count(llama_1b, kadapt.InducerTuningConfig(value_extension=False)) == 1_716_736 == L_NB * (key + noext)


def test_llama_1b_parallel_and_mam(llama_1b):
    m = 64  # rf 32
    # parallel FFN adapter: 2Dm + m + D = 264,256 per layer, no norms
    assert _count(llama_1b, kadapt.ParallelAdapterConfig()) == 4_228_096 == L_NB * (2 * L_D * m + m + L_D)
    # placement both: 32 adapters
    assert _count(llama_1b, kadapt.ParallelAdapterConfig(placement="both")) == 8_456_192
    # MAM defaults (P = 30, m_p = 512; parallel FFN m = 64): prefix P·D + D·m_p + m_p + 2m_p·N_b·H_kv·d +
    # 2N_b·H_kv·d = 61,440 + 1,048,576 + 512 + 8,388,608 + 16,384 = 9,515,520, + 4,228,096
    P, mp = 30, 512
    prefix = P * L_D + L_D * mp + mp + 2 * mp * L_NB * L_HKV * L_d + 2 * L_NB * L_HKV * L_d
    assert prefix == 9_515_520
    assert _count(llama_1b, kadapt.MAMConfig()) == 13_743_616 == prefix + 4_228_096
    # after eject: 2·N_b·P·H_kv·d = 491,520, + 4,228,096
    assert _count(llama_1b, kadapt.MAMConfig(), eject=True) == 4_719_616 == 2 * L_NB * P * L_HKV * L_d + 4_228_096


@pytest.mark.parametrize("window, plain", [(4096, True), (9, True), (8, False), (3, False)])
def test_sliding_window_mask_is_plain_causal_only_when_it_covers_every_key(window, plain):
    """Mistral's sliding-window mask function is the O(T) causal mask when the window covers the call's keys (the
    fused inducer path), else transformers' 4-D mask (the reference path), which then equals sdpa_mask exactly."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    from kadapt.methods.attention import KadaptMask
    from kadapt.patching.attention import kadapt_mask

    fn = sliding_window_causal_mask_function(window)
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :2] = 0
    got = kadapt_mask(2, 9, 9, 0, 0, mask_function=fn, attention_mask=pad)
    assert isinstance(got, KadaptMask) == plain
    want = sdpa_mask(batch_size=2, q_length=9, kv_length=9, mask_function=fn, attention_mask=pad,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if plain:
        assert got.causal and torch.equal(got.key_padding, pad.bool())
        full = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None] & pad.bool()[:, None, None, :]
        assert torch.equal(full, want)
    else:
        assert torch.equal(got, want)
