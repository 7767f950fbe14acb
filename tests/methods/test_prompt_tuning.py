"""Prompt tuning (docs/methods.md §7) on every family: what the spec places, checked against independent
formulations written here.

- The patched model equals the unpatched model fed inputs_embeds = [P_emb; E(ids)] with P leading ones in the
  attention mask (T5: the encoder input, the same mask for the decoder's cross-attention); the prompt takes
  positions 0..P−1 (GPT-2 wpe, RoBERTa/BERT learned positions, Llama rotary, T5 relative buckets).
- Labels are ignored at the prompt positions; classification heads read the right position (RoBERTa/BERT:
  position 0, the first prompt vector; GPT-2/Llama: the last real token, shifted by P, right padding too).
- The prompt enters the KV cache at prefill: greedy generate with the cache = without (GPT-2 left-padded,
  Llama, T5), and a left-padded row generates what it generates alone.
- T5's cross-attention mask covers the prompt: the decoder ignores what padded encoder positions hold.
- init "random" / "vocab" (given rows, the default rows, quirk 1), counts, unpatch, save/load, composition,
  config and position-limit errors, positional arguments, inputs_embeds, torch.compile.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          RobertaConfig, RobertaForTokenClassification)

import kadapt
from _models import (ALL_FAMILIES, cache_kwargs, check_save_load, check_unpatch_restores, gpt2_small_meta, inputs,
                     perturb_trainables, returned_cache, roberta_base_meta, t5_base_meta, tiny)
from kadapt.patching import get_backbone, is_patched

P = 4


def _patch(model, **fields):
    return kadapt.patch(model, kadapt.PromptTuningConfig(prompt_length=P, **fields))


def _prompt(model) -> torch.Tensor:
    return model.kadapt_prompt.weight.detach().clone()


def _embedding(model):
    return get_backbone(model).prompt_site().embedding


def _padded_inputs(family: str, length: int = 9) -> dict:
    """Two rows, the second right-padded by 3 (T5 / RoBERTa / BERT / GPT-2 / Llama alike)."""
    kw = inputs(family, length=length)
    kw["attention_mask"][1, -3:] = 0
    return kw


def _prompted(model, prompt: torch.Tensor, kw: dict) -> dict:
    """The independent formulation: inputs_embeds = [P_emb; E(ids)], P leading ones in the mask."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    B = ids.shape[0]
    embeds = torch.cat([prompt.expand(B, -1, -1), _embedding(model)(ids)], dim=1)
    out = {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")}
    return {**out, "inputs_embeds": embeds, "attention_mask": torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1)}


# --------------------------------------------------------------------------- the independent formulation

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_equals_unpatched_model_fed_the_prompted_embeddings(family):
    model = tiny(family)
    kw = _padded_inputs(family)
    _patch(model)
    with torch.no_grad():
        out = model(**kw, output_hidden_states=family != "t5")
        prompt = _prompt(model)
        kadapt.unpatch(model)
        ref = model(**_prompted(model, prompt, kw), output_hidden_states=family != "t5")
    if family == "t5":  # encoder: P + T positions; the decoder sees them through the extended cross mask
        assert out.encoder_last_hidden_state.shape[1] == P + kw["input_ids"].shape[1]
        torch.testing.assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
        return
    real = kw["attention_mask"].bool()
    hidden, ref_hidden = out.hidden_states[-1], ref.hidden_states[-1]
    assert hidden.shape[1] == P + kw["input_ids"].shape[1]
    torch.testing.assert_close(hidden[:, :P], ref_hidden[:, :P], rtol=0, atol=1e-6)  # the prompt positions
    torch.testing.assert_close(hidden[:, P:][real], ref_hidden[:, P:][real], rtol=0, atol=1e-6)  # real tokens
    if family in ("roberta", "bert"):  # the head reads position 0 in both
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    else:
        assert out.logits.shape[1] == P + kw["input_ids"].shape[1]
        torch.testing.assert_close(out.logits[:, P:][real], ref.logits[:, P:][real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_labels_are_ignored_at_prompt_positions(family):
    model = tiny(family)
    kw = inputs(family)
    ids = kw["input_ids"]
    _patch(model)
    out = model(**kw, labels=ids)
    # The loss of the prompted sequence with labels -100 at the P prompt positions: the last prompt vector
    # predicts the first token, and nothing is predicted for the prompt itself.
    logits = out.logits[:, P - 1:-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    prompt = _prompt(model)
    kadapt.unpatch(model)
    labels = torch.cat([torch.full((ids.shape[0], P), -100), ids], 1)
    ref = model(**_prompted(model, prompt, kw), labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_token_classification_labels_and_outputs_cover_the_prompt():
    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=80, num_labels=3)
    model = RobertaForTokenClassification(cfg).eval()
    kw = inputs("roberta")
    labels = torch.randint(0, 3, kw["input_ids"].shape)
    _patch(model)
    out = model(**kw, labels=labels)
    assert out.logits.shape[:2] == (2, P + 9)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, P:].reshape(-1, 3), labels.reshape(-1)))


# ----------------------------------------------------------------------------------- classification heads

@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_encoder_classification_head_reads_the_first_prompt_vector(family):
    model = tiny(family)
    kw = _padded_inputs(family)
    _patch(model)
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True)
        last = out.hidden_states[-1]
        if family == "roberta":  # RobertaClassificationHead reads features[:, 0]
            head = lambda pos: model.classifier(last[:, pos:pos + 1])  # noqa: E731
        else:  # BERT: pooler(position 0) -> classifier
            head = lambda pos: model.classifier(model.bert.pooler(last[:, pos:pos + 1]))  # noqa: E731
        torch.testing.assert_close(out.logits, head(0), rtol=0, atol=1e-6)
        assert (out.logits - head(P)).abs().max() > 1e-4  # not the first real token (<s> / [CLS])
        model.kadapt_prompt.weight[0] += 1.0  # position 0 is the first prompt vector
        assert not torch.equal(model(**kw).logits, out.logits)


def _decoder_classifier(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, num_labels=3, pad_token_id=0)
        return GPT2ForSequenceClassification(cfg).eval()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_classification_reads_the_last_real_token_shifted_by_p(family):
    model = _decoder_classifier(family)
    kw = inputs(family)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    ids[0, -3:] = 0  # right padding (pad id 0)
    mask[0, -3:] = 0
    ids[1, :2] = 0  # left padding
    mask[1, :2] = 0
    _patch(model)
    with torch.no_grad():
        logits = model(**kw).logits
        prompt = _prompt(model)
        kadapt.unpatch(model)
        body = model.transformer if family == "gpt2" else model.model
        hidden = body(**_prompted(model, prompt, kw)).last_hidden_state
    last = torch.tensor([P + 9 - 4, P + 9 - 1])  # row 0: the 6th real token; row 1: the last one
    torch.testing.assert_close(logits, model.score(hidden[torch.arange(2), last]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- generation

def _generate(model, kw, use_cache: bool):
    return model.generate(**kw, use_cache=use_cache, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_greedy_generate_with_cache_equals_without(family):
    model = tiny(family)
    _patch(model)
    perturb_trainables(model, std=0.5)
    kw = inputs(family, length=7)
    kw.pop("decoder_input_ids", None)
    if family == "t5":
        kw["attention_mask"][0, -2:] = 0  # right padding
    else:
        kw["input_ids"][0, :2] = 0  # left padding, as for batched decoding
        kw["attention_mask"][0, :2] = 0
    with torch.no_grad():
        cached, uncached = _generate(model, kw, True), _generate(model, kw, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if family != "t5":  # the left-padded row generates what it generates alone
        alone = {"input_ids": kw["input_ids"][:1, 2:], "attention_mask": kw["attention_mask"][:1, 2:]}
        with torch.no_grad():
            single = _generate(model, alone, True)
        assert torch.equal(single.sequences[0], cached.sequences[0, 2:])
        for a, b in zip(single.scores, cached.scores):
            torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_enters_the_cache_at_prefill(family):
    model = tiny(family)
    _patch(model)
    kw = inputs(family, length=6)
    ids = kw["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], use_cache=True)
        cache = returned_cache(first)
        assert cache.get_seq_length() == P + 4
        rest = model(input_ids=ids[:, 4:], attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache))
    torch.testing.assert_close(rest.logits, full[:, -2:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ T5

def test_t5_cross_attention_mask_covers_the_prompt():
    model = tiny("t5")
    _patch(model)
    perturb_trainables(model, std=0.5)
    kw = _padded_inputs("t5")
    other = {**kw, "input_ids": kw["input_ids"].clone()}
    other["input_ids"][1, -3:] = torch.tensor([57, 58, 59])  # what the padded positions hold
    with torch.no_grad():
        a, b = model(**kw), model(**other)
        encoder = model.get_encoder()(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"])
        unmasked = model(**{**other, "attention_mask": torch.ones_like(kw["attention_mask"])})
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert not torch.allclose(a.logits, unmasked.logits)  # the pads would matter if they were visible
    assert encoder.last_hidden_state.shape[1] == P + 9  # generate's direct encoder call is prompted too
    torch.testing.assert_close(encoder.last_hidden_state, a.encoder_last_hidden_state, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("family,default", [("t5", [2, 3, 4, 5]), ("roberta", [3, 4, 5, 6]), ("gpt2", [1, 2, 3, 4]),
                                            ("llama", [1, 2, 3, 4])])
def test_vocab_init_copies_the_loaded_rows(family, default):
    model = tiny(family)
    rows = _embedding(model).weight.detach().clone()
    _patch(model, init="vocab", vocab_ids=[7, 11, 7, 99])
    assert torch.equal(_prompt(model), rows[[7, 11, 7, 99]])
    kadapt.unpatch(model)
    _patch(model, init="vocab")  # default: the first P ids the config does not name as special
    assert torch.equal(_prompt(model), rows[default])


def test_random_init_and_the_compat_quirk():
    model = tiny("t5")
    rows = _embedding(model).weight.detach()
    _patch(model)
    w = _prompt(model)
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.2  # U(-0.5, 0.5)
    kadapt.unpatch(model)
    torch.manual_seed(0)
    kadapt.patch(model, kadapt.PromptTuningConfig(prompt_length=64, init="vocab", compat_prompt_t_random_init=True))
    w = _prompt(model)
    assert not any(torch.equal(w[i], rows[j]) for i in range(64) for j in range(100))
    assert 0.9 < w.std() < 1.1 and abs(w.mean()) < 0.1  # N(0, 1) rows, not pretrained ones


def test_vocab_ids_out_of_range_is_refused_at_patch_time():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match=r"vocab_ids.*0\.\.99"):
        _patch(model, init="vocab", vocab_ids=[0, 1, 2, 100])
    assert not is_patched(model) and all(not m._forward_pre_hooks for m in model.modules())


# -------------------------------------------------------------------------------------- counts, lifecycle

def test_counts():
    model = t5_base_meta()
    kadapt.patch(model, kadapt.PromptTuningConfig())
    assert kadapt.trainable_parameters(model) == (76_800, 222_882_048 + 76_800)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["kadapt_prompt.weight"]
    for build in (gpt2_small_meta, roberta_base_meta):
        model = build()
        kadapt.patch(model, kadapt.PromptTuningConfig(prompt_length=100))
        assert kadapt.trainable_parameters(model)[0] == 100 * 768


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unpatch_is_exact(family):
    check_unpatch_restores(family, kadapt.PromptTuningConfig(prompt_length=P))


@pytest.mark.parametrize("family", ["gpt2", "t5", "llama"])
def test_save_load_round_trip(tmp_path, family):
    check_save_load(tmp_path, family, kadapt.PromptTuningConfig(prompt_length=P, init="vocab", vocab_ids=[5, 6, 7, 8]))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_composes_with_lora(family):
    lora = kadapt.LoRAConfig(r=2, targets=("q", "v"))
    model = tiny(family)
    kadapt.patch(model, [kadapt.PromptTuningConfig(prompt_length=P), lora])
    perturb_trainables(model)
    kw = _padded_inputs(family)
    with torch.no_grad():
        both = model(**kw).logits
    state = {k: v.clone() for k, v in model.state_dict().items() if "kadapt_lora" in k}
    prompt = _prompt(model)
    kadapt.unpatch(model)
    kadapt.patch(model, lora)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        ref = model(**_prompted(model, prompt, kw)).logits
    real = kw["attention_mask"].bool()
    if family == "t5":
        torch.testing.assert_close(both, ref, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(both[:, P:][real], ref[:, P:][real], rtol=0, atol=1e-6)


def test_two_prompts_are_refused_naming_both():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match=r"\[0\] prompt_tuning.*\[1\] prompt_tuning"):
        kadapt.patch(model, [kadapt.PromptTuningConfig(prompt_length=2), kadapt.PromptTuningConfig(prompt_length=3)])
    assert not is_patched(model) and all(not m._forward_pre_hooks for m in model.modules())


# -------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("field,value,extra", [
    ("prompt_length", 0, {}), ("prompt_length", 2.5, {}), ("prompt_length", True, {}),
    ("init", "xavier", {}),
    ("vocab_ids", [1, 2], {"init": "vocab"}), ("vocab_ids", [1, 2, -3, 4], {"init": "vocab"}),
    ("vocab_ids", "abcd", {"init": "vocab"}), ("vocab_ids", [1, 2, 3, 4], {"init": "random"}),
    ("compat_prompt_t_random_init", "yes", {}), ("compat_prompt_t_random_init", True, {"init": "random"}),
])
def test_bad_config_names_the_field(field, value, extra):
    fields = {"prompt_length": P, **extra, field: value}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        kadapt.PromptTuningConfig(**fields)


@pytest.mark.parametrize("family,limit", [("gpt2", 64), ("roberta", 78)])
def test_position_limit(family, limit):
    model = tiny(family)  # GPT-2: n_positions 64; RoBERTa: 80 positions minus the padding offset 2
    with pytest.raises(ValueError, match=rf"prompt_length={limit}\b.*\b{limit}\b"):
        kadapt.patch(model, kadapt.PromptTuningConfig(prompt_length=limit))
    assert not is_patched(model)
    kadapt.patch(model, kadapt.PromptTuningConfig(prompt_length=limit - 5))
    model(**inputs(family, length=5))  # exactly at the limit
    with pytest.raises(ValueError, match=rf"\b{limit}\b"):
        model(**inputs(family, length=6))


# ------------------------------------------------------------------------------------------- call forms

def test_positional_arguments_inputs_embeds_and_position_ids():
    model = tiny("gpt2")
    _patch(model)
    kw = inputs("gpt2")
    ids, mask = kw["input_ids"], kw["attention_mask"]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, None, mask).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(model(inputs_embeds=model.transformer.wte(ids), attention_mask=mask).logits, ref,
                                   rtol=0, atol=1e-6)
        positions = torch.arange(9).expand(2, -1)  # the caller's positions exclude the prompt
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, ref,
                                   rtol=0, atol=1e-6)


def test_compiles_fullgraph():
    model = tiny("gpt2")
    _patch(model)
    kw = _padded_inputs("gpt2")
    with torch.no_grad():
        eager = model(**kw).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(**kw).logits, eager, rtol=1e-6, atol=1e-6)
