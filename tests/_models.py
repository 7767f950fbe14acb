"""Model builders for tests: tiny random models per family, and base-sized ones on the meta device
(parameter counting only). Nothing is downloaded."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, GPT2Model,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, RobertaConfig, RobertaForSequenceClassification, RobertaModel, T5Config,
                          T5ForConditionalGeneration)

import kadapt

FAMILIES = ("gpt2", "roberta", "bert", "t5")
LLAMA_FAMILIES = ("llama", "qwen2", "mistral")  # grouped-query attention: 4 query heads over 2 KV heads
ALL_FAMILIES = FAMILIES + LLAMA_FAMILIES
_LLAMA = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
          "mistral": (MistralConfig, MistralForCausalLM)}


def tiny(family: str, hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    if family == "roberta":
        cfg = RobertaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                            vocab_size=100, max_position_embeddings=80, num_labels=3)
        return RobertaForSequenceClassification(cfg).eval()
    if family == "bert":
        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                         vocab_size=100, max_position_embeddings=80, num_labels=3)
        return BertForSequenceClassification(cfg).eval()
    if family == "t5":
        cfg = T5Config(vocab_size=100, d_model=hidden, d_kv=16, d_ff=2 * hidden, num_layers=2, num_heads=4,
                       decoder_start_token_id=0)
        return T5ForConditionalGeneration(cfg).eval()
    if family in _LLAMA:
        config_cls, model_cls = _LLAMA[family]
        cfg = config_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
        return model_cls(cfg).eval()
    raise KeyError(family)


def inputs(family: str, batch: int = 2, length: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        kw["decoder_input_ids"] = ids[:, : max(1, length // 2)]
    return kw


def output(model: torch.nn.Module, family: str, **kw) -> torch.Tensor:
    out = model(**(kw or inputs(family)))
    return out.logits


def tiny_configs() -> dict[str, kadapt.KadaptConfig]:
    """One config per method, sized for hidden 64 (m = 8 so that phm_dim = 4 divides D and m)."""
    return {
        "adapter": kadapt.AdapterConfig(bottleneck_dim=8),
        "pfeiffer": kadapt.PfeifferConfig(bottleneck_dim=8),
        "adapterdrop": kadapt.AdapterConfig(bottleneck_dim=8, drop_first=1),
        "low_rank_adapter": kadapt.LowRankAdapterConfig(bottleneck_dim=8, rank=2),
        "phm_adapter": kadapt.PHMAdapterConfig(bottleneck_dim=8, phm_dim=4),
        "compacter": kadapt.CompacterConfig(bottleneck_dim=8),
        "compacter++": kadapt.CompacterPlusPlusConfig(bottleneck_dim=8),
        "bitfit": kadapt.BitFitConfig(),
        "full_finetune": kadapt.FullFinetuneConfig(),
        "lora": kadapt.LoRAConfig(r=4, targets=("q", "v", "ffn_out"), lora_bias=True),
        "parallel_adapter": kadapt.ParallelAdapterConfig(bottleneck_dim=8),
        "kernel_mix": kadapt.KernelMixConfig(r_q=2, r_qs=4, r_v=2, r_vs=4),
        "prefix_tuning": kadapt.PrefixTuningConfig(prefix_length=5, hidden_size=16),
        "inducer_tuning": kadapt.InducerTuningConfig(key_width=3, value_width=4,
                                                     lora=kadapt.LoRAConfig(r=2, targets=("q",), lora_bias=True)),
        "mam": kadapt.MAMConfig(prefix=kadapt.PrefixTuningConfig(prefix_length=4, hidden_size=8),
                                parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8)),
        "prompt_tuning": kadapt.PromptTuningConfig(prompt_length=4),
        "intrinsic_said": kadapt.IntrinsicSAIDConfig(intrinsic_dim=300, seed=5),
    }


def t5_base_meta() -> torch.nn.Module:
    """T5-base shape after the vocabulary resize (V = 32,100, tied): 222,882,048 parameters."""
    cfg = T5Config(vocab_size=32100, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                   num_heads=12, feed_forward_proj="relu", tie_word_embeddings=True)
    with torch.device("meta"):
        return T5ForConditionalGeneration(cfg)


def gpt2_small_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return GPT2Model(GPT2Config())


def roberta_base_meta() -> torch.nn.Module:
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    with torch.device("meta"):
        return RobertaModel(cfg)


def perturb_trainables(model: torch.nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Move every trainable tensor off its init (e.g. zero LoRA B) by N(0, std²) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g).to(p.dtype))


def check_unpatch_restores(family: str, config: kadapt.KadaptConfig) -> None:
    """patch, perturb, unpatch: bit-identical outputs, state-dict keys and requires_grad flags, no hooks."""
    model = tiny(family)
    base = output(model, family)
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kadapt.patch(model, config)
    perturb_trainables(model)
    assert not torch.equal(output(model, family), base)
    kadapt.unpatch(model)
    assert not kadapt.patching.is_patched(model)
    assert torch.equal(output(model, family), base)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def check_save_load(tmp_path, family: str, config: kadapt.KadaptConfig) -> None:
    """A perturbed adapter saved and loaded into a fresh copy of the base model gives bit-identical outputs,
    and the loaded record has an equal config (tuples survive the JSON round trip)."""
    model = tiny(family)
    model.save_pretrained(tmp_path / "base")
    kadapt.patch(model, config)
    perturb_trainables(model)
    expected = output(model, family)
    kadapt.save_adapter(model, tmp_path / "adapter")
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    kadapt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, family), expected)
    assert kadapt.patching.get_record(fresh).config == config


def check_merge(model: torch.nn.Module, family: str) -> None:
    """kadapt.merge of a patched eval-mode model: the same outputs (atol 1e-5), no kadapt module or hook
    left, trained task heads kept, the original requires_grad flags (all trainable) back."""
    kw = inputs(family)
    with torch.no_grad():
        unmerged = output(model, family, **kw)
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "kadapt" not in n}
    assert kadapt.merge(model, allow_new_biases=True) is model  # T5 / Llama: biases the architecture lacks
    assert not kadapt.patching.is_patched(model)
    assert not any("kadapt" in n for n, _ in model.named_modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(output(model, family, **kw), unmerged, rtol=0, atol=1e-5)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in head.items())  # trained task heads are kept
    assert all(p.requires_grad for p in model.parameters())  # the original flags (all trainable)


def lm_losses(model: torch.nn.Module, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """Train a GPT-2 LM head model's trainable parameters with Adam on one tiny batch; the losses."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = inputs("gpt2")["input_ids"]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The KV cache as the model's forward takes it: ``cache=`` (transformers ≥ 5.2x; ``past_key_values`` is
    deprecated for removal in 5.40) or ``past_key_values=`` (older 5.x, e.g. 5.17 on the GPU machine)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def returned_cache(out):
    """The cache a forward returned (``cache`` where the output has it, else ``past_key_values``)."""
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def enable_checkpointing(model: torch.nn.Module, options: dict | None = None) -> None:
    """Activation (gradient) checkpointing under the name this transformers has: activation_checkpointing_enable
    (5.2x; gradient_checkpointing_enable is deprecated for v6) or gradient_checkpointing_enable (5.17).
    ``options`` go to torch.utils.checkpoint (default non-reentrant)."""
    options = {"use_reentrant": False} if options is None else options
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def assert_triton_equals_reference(model: torch.nn.Module, family: str, kw: dict) -> None:
    """The patched model on the Triton backend (the interpreter on the CPU) = on the reference: the output and
    the gradient of every trainable tensor (loss = sum of squared outputs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for backend in ("reference", "triton"):
        kadapt.set_backend(backend)
        try:
            out = output(model, family, **kw)
            results.append((out, torch.autograd.grad(out.square().sum(), params)))
        finally:
            kadapt.set_backend("auto")
    (ref, g_ref), (tri, g_tri) = results
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

