"""patch / unpatch / save / load behaviour on tiny models of every family (docs/methods.md §2–§3)."""
import copy

import pytest
import torch

import kadapt
from kadapt.methods.bottleneck import LowRankProjection, PHMProjection, PHMRule
from kadapt.patching import is_patched
from _models import FAMILIES, inputs, output, tiny, tiny_configs
from _models import perturb_trainables as _perturb_trainables

METHODS = list(tiny_configs())
ADAPTER_METHODS = [m for m in METHODS if m not in ("bitfit", "full_finetune")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adapter", "pfeiffer", "adapterdrop", "phm_adapter", "compacter", "compacter++"])
def test_near_identity_at_init(family, method):
    model = tiny(family)
    base = output(model, family)
    kadapt.patch(model, tiny_configs()[method])
    rel = ((output(model, family) - base).abs().max() / base.abs().max()).item()
    # Compacter's shared rule starts at N(0, 1e-8), so it is identity to ~1e-6; N(0, 0.01²) weights to ~1e-2.
    assert rel < (1e-4 if method.startswith("compacter") else 5e-2), rel


@pytest.mark.parametrize("family", FAMILIES)
def test_bitfit_identity_at_init(family):
    model = tiny(family)
    base = output(model, family)
    kadapt.patch(model, kadapt.BitFitConfig())
    if family == "t5":  # added zero biases: Linear takes addmm instead of mm, equal to rounding
        torch.testing.assert_close(output(model, family), base, rtol=1e-5, atol=1e-5)
    else:  # existing biases only change their requires_grad flag
        assert torch.equal(output(model, family), base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_unpatch_restores_bit_exactly(family, method):
    model = tiny(family)
    base = output(model, family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    kadapt.patch(model, tiny_configs()[method])
    if method != "full_finetune":  # full fine-tuning keeps what it trained (documented)
        _perturb_trainables(model)  # also moves the unfrozen LayerNorms / BitFit biases
    kadapt.unpatch(model)
    assert not is_patched(model)
    assert torch.equal(output(model, family), base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    assert all(not n.startswith("kadapt") for n, _ in model.named_modules() for n in n.split("."))
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_bit_identical(tmp_path, family, method):
    model = tiny(family)
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, tiny_configs()[method])
    _perturb_trainables(model)
    expected = output(model, family)
    kadapt.save_adapter(model, tmp_path / "adapter")

    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    assert not torch.equal(output(fresh, family), expected)
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, family), expected)
    assert kadapt.trainable_parameters(fresh) == kadapt.trainable_parameters(model)
    # Loading into a model already patched with the same config also works.
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, family), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_only_method_parameters_get_gradients(family, method):
    model = tiny(family)
    before = {n for n, _ in model.named_parameters()}
    kadapt.patch(model, tiny_configs()[method])
    model.train()
    output(model, family).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"trainable {name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    new = {n for n, _ in model.named_parameters()} - before
    head = {n for n in before if n.split(".")[0] in ("classifier", "score")}
    if method == "full_finetune":
        assert trainable == {n for n, _ in model.named_parameters()}
        return
    if method == "intrinsic_said":  # the task head is projected like every other tensor, not trained
        assert trainable == new == {"kadapt_said.z", "kadapt_said.lam"}
        return
    if method == "bitfit":
        expected = new | {n for n in before if n.endswith(".bias")} if family != "t5" else new
        if family in ("roberta", "bert"):
            expected = {n for n in expected if ".pooler." not in n}
        assert trainable == expected | head
        return
    norms = {n for n in before if any(k in n for k in ("ln_", "LayerNorm", "layer_norm"))}
    if not getattr(tiny_configs()[method], "unfreeze_layer_norms", False):  # LoRA, parallel adapters
        norms = set()
    assert new and trainable == new | norms | head  # the Compacter family unfreezes the backbone LNs


@pytest.mark.parametrize("family", FAMILIES)
def test_placement(family):
    model = tiny(family)
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8))
    sites = sorted(n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith("kadapt_adapter"))
    expected = {
        "gpt2": [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_proj", "mlp.c_proj")],
        # RoBERTa/BERT: after the sub-layer dropout (Houlsby BERT order)
        "roberta": [f"roberta.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dropout",
                                                                                 "output.dropout")],
        "bert": [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dropout",
                                                                           "output.dropout")],
        # T5: self-attention o and the FFN output; never cross-attention (layer.1 of decoder blocks)
        "t5": [f"{st}.block.{i}.{s}" for st in ("encoder", "decoder") for i in range(2)
               for s in ("layer.0.SelfAttention.o", f"layer.{2 if st == 'decoder' else 1}.DenseReluDense")],
    }[family]
    assert sites == sorted(expected)


def test_t5_adapterdrop_layers_per_stack():
    model = tiny("t5")
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8, placement="ffn", layers={"decoder": [1]}))
    sites = [n for n, _ in model.named_modules() if n.endswith("kadapt_adapter")]
    assert sites == ["decoder.block.1.layer.2.DenseReluDense.kadapt_adapter"]


def test_t5_bitfit_biases():
    model = tiny("t5")
    kadapt.patch(model, kadapt.BitFitConfig())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.bias" in names and "decoder.block.0.layer.1.EncDecAttention.q.bias" in names
    assert "encoder.final_layer_norm.bias" in names
    kadapt.unpatch(model)
    model = tiny("t5")
    kadapt.patch(model, kadapt.BitFitConfig(compat_bitfit_skip_final_ln=True))
    assert "encoder.final_layer_norm.bias" not in {n for n, _ in model.named_parameters()}


def test_phm_weight_is_sum_of_kronecker_products():
    torch.manual_seed(0)
    for rank in (None, 1, 3):
        proj = PHMProjection(24, 12, 4, rank, {}, own_rule=PHMRule(4, "uniform", 1.0, {}))
        a, b = proj.rule_tensor(), proj.factors()
        expected = sum(torch.kron(a[i], b[i]) for i in range(4))
        torch.testing.assert_close(proj.weight(), expected, rtol=0, atol=1e-6)
        x = torch.randn(5, 24)
        # Structured form (docs/methods.md §17): y_t = Σ_i A_iᵀ X_t B_i with X_t the (n, in/n) reshape.
        structured = torch.einsum("ica,tck,ikp->tap", a, x.view(5, 4, 6), b).reshape(5, 12)
        torch.testing.assert_close(x @ proj.weight(), structured, rtol=1e-5, atol=1e-5)


def test_init_bounds_match_spec():
    torch.manual_seed(0)
    # Compacter on T5-base: s_i 192×1 within ±0.2494, t_i 1×6 within ±1.3093 (docs/methods.md §3).
    p = PHMProjection(768, 24, 4, 1, {}, own_rule=PHMRule(4, "normal", 1e-4, {}))
    assert 0.2 < p.phm_s.abs().max() <= 0.2494 and 1.0 < p.phm_t.abs().max() <= 1.3093
    assert p.rule_tensor().std() < 1e-3
    lr = LowRankProjection(768, 24, 1, {})
    assert 0.1 < lr.left.abs().max() <= 0.1249 and 0.5 < lr.right.abs().max() <= 0.6928
    q = PHMProjection(768, 24, 12, None, {}, own_rule=PHMRule(12, "normal", 0.01, {}))
    assert 0.4 < q.phm_b.abs().max() <= 0.4264


def test_low_rank_any_rank_is_a_product():
    torch.manual_seed(0)
    proj = LowRankProjection(32, 8, 3, {})
    assert torch.linalg.matrix_rank(proj.weight()) == 3
    torch.testing.assert_close(proj.weight(), proj.left @ proj.right)


def test_shared_rule_gradient_sums_over_layers():
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.CompacterConfig(bottleneck_dim=8, phm_c_init="uniform"))
    kw = inputs("gpt2")
    output(model, "gpt2", **kw).pow(2).mean().backward()
    shared = model.kadapt_phm_rule.weight.grad.clone()
    projections = [m for m in model.modules() if isinstance(m, PHMProjection)]
    assert len(projections) == 8
    clones = []
    for proj in projections:  # give every layer its own copy of the rule: their grads must add up
        holder = copy.deepcopy(model.kadapt_phm_rule)
        holder.weight.grad = None
        proj._shared = [holder]
        clones.append(holder)
    output(model, "gpt2", **kw).pow(2).mean().backward()
    torch.testing.assert_close(sum(c.weight.grad for c in clones), shared, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_follow_model_dtype(dtype):
    model = tiny("gpt2").to(dtype)
    kadapt.patch(model, kadapt.CompacterConfig(bottleneck_dim=8))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert output(model, "gpt2").dtype == dtype


def test_patch_returns_model_and_deepcopy_works():
    model = tiny("roberta")
    assert kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8)) is model
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert not torch.equal(output(twin, "roberta"), output(model, "roberta"))


@pytest.mark.parametrize("family", ["gpt2", "roberta", "t5"])
def test_patched_model_compiles_fullgraph(family):
    """No graph breaks through the hooks and the op dispatch (dynamo only; no codegen needed)."""
    torch._dynamo.reset()
    model = tiny(family)
    kadapt.patch(model, kadapt.CompacterConfig(bottleneck_dim=8))
    kw = inputs(family)
    eager = output(model, family, **kw)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(compiled(**kw).logits, eager)


@pytest.mark.parametrize("family,config", [
    ("gpt2", kadapt.CompacterConfig(bottleneck_dim=8)),
    ("roberta", kadapt.AdapterConfig(bottleneck_dim=8)),
    ("t5", kadapt.LowRankAdapterConfig(bottleneck_dim=8)),
    ("gpt2", kadapt.PHMAdapterConfig(bottleneck_dim=8, phm_dim=4)),
])
def test_patched_model_compiles_fullgraph_on_the_fused_path(family, config):
    """torch.compile(fullgraph=True) of a model on the Triton backend (the interpreter on CPU): the
    fused custom ops trace whole and match eager, forward and every trainable gradient. Inductor
    generates code on a GPU; on the CPU the graph is checked with the aot_eager backend."""
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny(family).float().to(device)
    kadapt.patch(model, config)
    kadapt.set_backend("triton")
    try:
        kw = {k: v.to(device) for k, v in inputs(family).items()}
        params = [p for p in model.parameters() if p.requires_grad]
        eager = output(model, family, **kw)
        g_eager = torch.autograd.grad(eager.square().sum(), params)
        compiled = torch.compile(model, fullgraph=True,
                                 backend="inductor" if torch.cuda.is_available() else "aot_eager")
        out = compiled(**kw).logits
        g = torch.autograd.grad(out.square().sum(), params)
    finally:
        kadapt.set_backend("auto")
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_debug_log_names_the_backend(caplog):
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.AdapterConfig(bottleneck_dim=8))
    with caplog.at_level("DEBUG", logger="kadapt"):
        output(model, "gpt2")
    assert "fused_adapter: reference backend" in caplog.text


def _variants():
    import transformers as tf

    gpt2 = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, num_labels=3,
                         pad_token_id=0)
    bert = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
                max_position_embeddings=80, num_labels=3)
    t5 = tf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     decoder_start_token_id=0, num_labels=3)
    return [
        (tf.GPT2Model, gpt2, None), (tf.GPT2ForSequenceClassification, gpt2, "score"),
        (tf.GPT2ForTokenClassification, gpt2, "classifier"), (tf.RobertaModel, tf.RobertaConfig(**bert), None),
        (tf.RobertaForTokenClassification, tf.RobertaConfig(**bert), "classifier"),
        (tf.BertModel, tf.BertConfig(**bert), None),
        (tf.BertForQuestionAnswering, tf.BertConfig(**{**bert, "num_labels": 2}), "qa_outputs"),
        (tf.T5Model, t5, None), (tf.T5EncoderModel, t5, None),
        (tf.T5ForSequenceClassification, t5, "classification_head"),
    ]


@pytest.mark.parametrize("cls,config,head", _variants(), ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("method", ["compacter", "bitfit"])
def test_bare_and_task_head_model_classes(cls, config, head, method):
    torch.manual_seed(0)
    model = cls(config).eval()
    ids = torch.randint(3, 100, (2, 7))
    ids[:, -1] = 1  # T5's EOS: T5ForSequenceClassification pools there
    kw = {"input_ids": ids}
    if cls.__name__ in ("T5Model", "T5ForSequenceClassification"):
        kw["decoder_input_ids"] = ids
    first = lambda out: out[0]  # noqa: E731 - last_hidden_state / logits / start_logits
    base = first(model(**kw))
    kadapt.patch(model, tiny_configs()[method])
    first(model(**kw)).float().pow(2).mean().backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if head is not None:
        assert {n for n, _ in getattr(model, head).named_parameters(prefix=head)} <= names
    n_adapters = sum(n.endswith("kadapt_adapter") for n, _ in model.named_modules())
    if method == "compacter":
        blocks = 4 if cls.__name__ in ("T5Model", "T5ForSequenceClassification") else 2
        assert n_adapters == 2 * blocks
    kadapt.unpatch(model)
    assert torch.equal(first(model(**kw)), base)


@pytest.mark.parametrize("config", [kadapt.CompacterConfig(bottleneck_dim=8, learn_phm=False, phm_c_init="uniform"),
                                    kadapt.PHMAdapterConfig(bottleneck_dim=8, phm_dim=4, learn_phm=False)],
                         ids=["compacter", "phm_adapter"])
def test_save_load_keeps_frozen_added_tensors(tmp_path, config):
    """learn_phm=False freezes the random PHM rules: the adapter file must still carry them."""
    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, config)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("rule.weight"))
    expected = output(model, "gpt2")
    kadapt.save_adapter(model, tmp_path / "adapter")
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    torch.manual_seed(123)  # a different draw of the rules at patch time
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, "gpt2"), expected)


def test_compacter_on_mixed_precision_t5():
    """HF keeps T5's `wo` in fp32 when loading in half precision: the shared rule serves both dtypes."""
    model = tiny("t5").to(torch.bfloat16)
    for block in list(model.encoder.block) + list(model.decoder.block):
        block.layer[-1].DenseReluDense.wo.float()
    kadapt.patch(model, kadapt.CompacterConfig(bottleneck_dim=8))
    kw = inputs("t5")
    model(**kw).logits.float().sum().backward()
    assert model.kadapt_phm_rule.weight.grad is not None


def test_low_rank_rank_above_bottleneck_is_allowed():
    model = tiny("roberta")
    kadapt.patch(model, kadapt.LowRankAdapterConfig(bottleneck_dim=4, rank=6))
    assert torch.isfinite(output(model, "roberta")).all()


def test_record_keeps_its_own_config_copy(tmp_path):
    model = tiny("gpt2")
    config = kadapt.AdapterConfig(bottleneck_dim=8)
    kadapt.patch(model, config)
    config.bottleneck_dim = 4  # a later edit must not change what save_adapter records
    kadapt.save_adapter(model, tmp_path)
    assert '"bottleneck_dim": 8' in (tmp_path / "adapter_config.json").read_text()


def test_compacter_without_sites_adds_no_rule():
    model = tiny("gpt2")
    kadapt.patch(model, kadapt.CompacterConfig(bottleneck_dim=8, layers=[]))
    assert not hasattr(model, "kadapt_phm_rule")
    assert kadapt.trainable_parameters(model)[0] == sum(
        p.numel() for n, p in model.named_parameters() if "ln_" in n)
