"""End to end: a 30-step Hugging Face ``Trainer`` run on a tiny, randomly initialised model lowers the
training loss for every method in ``kadapt.METHODS`` on every supported family (GPT-2 causal LM,
RoBERTa and BERT sequence classification, T5 seq2seq), every trainable tensor moves, and every
frozen tensor is bit-identical afterwards.

Everything is built from configs (nothing is downloaded) and runs on the CPU; seeds are fixed, so
the run is deterministic.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

import kadapt  # noqa: E402
from _models import tiny_configs  # noqa: E402  (bottleneck_dim=8, phm_dim=4 for hidden 64)

VOCAB = 100
HIDDEN = 64
STEPS = 30
BATCH = 8
N_EXAMPLES = 32
WINDOW = 5  # losses averaged at the start and at the end of the run
MAX_RATIO = 0.9  # mean(last WINDOW losses) must be below MAX_RATIO * mean(first WINDOW losses)
# Weight init std of the GPT-2 / RoBERTa / BERT builders. HF's default 0.02 gives a random backbone
# whose logits (GPT-2, tied LM head) and pooled features (BERT) are so small that a method training
# only adapters, LayerNorms or biases barely moves the loss in 30 steps; 0.2 gives features to work
# with. (T5's own init is already scaled by d_model and is kept.)
INIT_RANGE = 0.2

FAMILIES = ("gpt2", "roberta", "bert", "t5")
METHOD_NAMES = tuple(kadapt.METHODS)

# Learning rates: adapters, LayerNorms, biases and heads start near a no-op and need a large step;
# full fine-tuning moves every weight and is stable at a smaller one.
LR = {name: 1e-2 for name in METHOD_NAMES}
LR["full_finetune"] = 1e-3
LR["intrinsic_said"] = 3e-2  # the Compacter paper's SAID rate (docs/methods.md §8); z moves every tensor
# Prompt tuning on T5 learns slowly at 1e-2 (4 prompt vectors in front of a random encoder): the Compacter
# paper's PT-T setting instead, vocabulary init at lr 3e-1 (docs/methods.md §7).
FAMILY_SETTINGS = {("t5", "prompt_tuning"): (3e-1, {"init": "vocab"})}


# ----------------------------------------------------------------------------------------------
# Tiny models (random weights, built from configs) and synthetic data sets
# ----------------------------------------------------------------------------------------------

def tiny_model(family: str) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, initializer_range=INIT_RANGE)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return transformers.GPT2LMHeadModel(cfg)
    if family in ("roberta", "bert"):
        kw = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * HIDDEN,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=2, **common)
        if family == "roberta":
            cfg = transformers.RobertaConfig(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **kw)
            return transformers.RobertaForSequenceClassification(cfg)
        cfg = transformers.BertConfig(pad_token_id=0, **kw)
        return transformers.BertForSequenceClassification(cfg)
    if family == "t5":
        cfg = transformers.T5Config(d_model=HIDDEN, d_kv=16, d_ff=2 * HIDDEN, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                    eos_token_id=1, vocab_size=VOCAB)
        return transformers.T5ForConditionalGeneration(cfg)
    raise ValueError(family)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def tiny_dataset(family: str) -> DictDataset:
    """A fixed, learnable data set (its own generator, so it does not depend on the global seed)."""
    g = torch.Generator().manual_seed(1234)
    rows = []
    if family == "gpt2":
        # Causal LM on periodic sequences: a period-4 pattern over tokens 10..25, repeated to length 16.
        for _ in range(N_EXAMPLES):
            period = torch.randint(10, 26, (4,), generator=g)
            ids = period.repeat(4)
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    elif family in ("roberta", "bert"):
        # Classification: the label says which of two disjoint token ranges the sequence is drawn from.
        cls_id, sep_id = (0, 2) if family == "roberta" else (3, 4)
        for i in range(N_EXAMPLES):
            label = i % 2
            lo = 10 if label == 0 else 50
            body = torch.randint(lo, lo + 40, (10,), generator=g)
            ids = torch.cat([torch.tensor([cls_id]), body, torch.tensor([sep_id])])
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(label)})
    elif family == "t5":
        # Seq2seq copy task over tokens 10..25 (0 = pad / decoder start, 1 = eos are never used).
        for _ in range(N_EXAMPLES):
            ids = torch.randint(10, 26, (8,), generator=g)
            rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    else:
        raise ValueError(family)
    return DictDataset(rows)


def method_config(name: str, family: str | None = None) -> kadapt.KadaptConfig:
    """The shared tiny config of ``name`` (tests/_models.py): bottleneck m = 8, phm_dim = 4."""
    config = tiny_configs()[name]
    assert config.method == name
    for field, value in FAMILY_SETTINGS.get((family, name), (None, {}))[1].items():
        setattr(config, field, value)
    return config


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------

def run_trainer(family: str, method: str, output_dir) -> tuple[torch.nn.Module, list[float], dict, dict]:
    torch.manual_seed(0)
    model = tiny_model(family)
    kadapt.patch(model, method_config(method, family))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=FAMILY_SETTINGS.get((family, method), (LR[method],))[0],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=tiny_dataset(family))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer.model, losses, frozen, trained


TASK_HEAD_PREFIX = "classifier."  # the new classification head of RoBERTa / BERT trains with every method


def is_norm(name: str) -> bool:
    """A LayerNorm parameter of GPT-2 (ln_1, ln_2, ln_f), RoBERTa / BERT (LayerNorm) or T5 (layer_norm)."""
    return any(key in name for key in ("ln_1.", "ln_2.", "ln_f.", "LayerNorm.", "layer_norm."))


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_lowers_loss_and_keeps_frozen_weights(family, method, tmp_path):
    model, losses, frozen, trained = run_trainer(family, method, tmp_path)

    # The loss went down: one logged loss per step, the last WINDOW clearly below the first WINDOW.
    assert len(losses) == STEPS, f"expected {STEPS} logged losses, got {len(losses)}: {losses}"
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first = sum(losses[:WINDOW]) / WINDOW
    last = sum(losses[-WINDOW:]) / WINDOW
    print(f"{family}/{method}: first {first:.4f} last {last:.4f} ratio {last / first:.3f}")
    assert last < MAX_RATIO * first, (
        f"{family}/{method}: loss did not drop: mean of first {WINDOW} = {first:.4f}, "
        f"mean of last {WINDOW} = {last:.4f} (ratio {last / first:.3f} >= {MAX_RATIO}); losses {losses}")

    # Only trainable tensors changed: every frozen tensor is bit-identical after training.
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(frozen) <= set(params)
    changed = [n for n, before in frozen.items() if not torch.equal(params[n].detach().cpu(), before)]
    assert not changed, f"{family}/{method}: frozen parameters changed during training: {changed}"
    unfrozen = [n for n in frozen if params[n].requires_grad]
    assert not unfrozen, f"{family}/{method}: frozen parameters became trainable: {unfrozen}"

    # ... and training moved every trainable one (gradients reach all of them).
    assert trained, f"{family}/{method}: nothing is trainable"
    stuck = [n for n, before in trained.items() if torch.equal(params[n].detach().cpu(), before)]
    assert not stuck, f"{family}/{method}: trainable parameters did not change (no gradient?): {stuck}"

    # The trainable set is the method's own (no backbone weight leaks out of the freezing).
    n_trainable, n_total = kadapt.trainable_parameters(model)
    if method == "full_finetune":
        assert not frozen and n_trainable == n_total
        return
    assert frozen and 0 < n_trainable < n_total
    own = [n for n in trained if ("kadapt_" in n if method != "bitfit" else n.endswith(".bias"))]
    assert own, f"{family}/{method}: none of the method's own parameters is trainable: {sorted(trained)}"
    allowed = (lambda n: n.endswith(".bias")) if method == "bitfit" else is_norm
    leaks = sorted(n for n in trained if n not in own and not allowed(n) and not n.startswith(TASK_HEAD_PREFIX))
    assert not leaks, f"{family}/{method}: backbone parameters left trainable: {leaks}"
