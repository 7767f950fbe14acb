"""Mixed precision as users train: every method on every family under bf16 autocast (what Trainer(bf16=True) does),
and models whose modules mix dtypes (T5 loaded in fp16 keeps each FFN ``wo`` in fp32)."""
from __future__ import annotations

import pytest
import torch
from transformers import T5ForConditionalGeneration

import kadapt
from _models import ALL_FAMILIES, LLAMA_FAMILIES, inputs, tiny, tiny_configs

METHODS = sorted(tiny_configs())


def _loss(model, family: str, kw: dict) -> torch.Tensor:
    if family in ("roberta", "bert"):
        return model(**kw, labels=torch.tensor([0, 2], device=kw["input_ids"].device)).loss
    if family == "t5":
        return model(**kw, labels=kw["decoder_input_ids"].contiguous()).loss
    return model(**kw, labels=kw["input_ids"]).loss


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_training_steps_under_bf16_autocast(method, family):
    model = tiny(family).train()
    for m in model.modules():  # deterministic steps: the check is about dtypes, not regularisation
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    kadapt.patch(model, tiny_configs()[method])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3 if method != "full_finetune" else 1e-3)
    kw = inputs(family)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, family, kw)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[1:]) < losses[0], losses  # bf16 steps are noisy: some later step improved
    assert all(p.dtype == torch.float32 for p in params)  # parameters stay in their own dtype


@pytest.mark.parametrize("config", [
    kadapt.ParallelAdapterConfig(bottleneck_dim=8, placement="both"),
    kadapt.MAMConfig(prefix=kadapt.PrefixTuningConfig(prefix_length=3, hidden_size=8),
                     parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8)),
    kadapt.InducerTuningConfig(key_width=2, value_width=3, lora=kadapt.LoRAConfig(r=2, targets=("q",)),
                               parallel_adapter=kadapt.ParallelAdapterConfig(bottleneck_dim=8, ln_pre=True)),
    kadapt.AdapterConfig(bottleneck_dim=8),
    kadapt.CompacterConfig(bottleneck_dim=8),
    kadapt.LoRAConfig(r=2, targets=("q", "v", "ffn_in", "ffn_out")),
], ids=["parallel", "mam", "inducer-mam", "adapter", "compacter", "lora"])
def test_t5_in_fp16_with_fp32_ffn_output_projections(tmp_path, config):
    """transformers keeps T5's FFN ``wo`` in fp32 when loading in fp16: one model, two module dtypes."""
    tiny("t5").save_pretrained(tmp_path)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    wo = model.encoder.block[0].layer[-1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and model.shared.weight.dtype == torch.float16
    kadapt.patch(model, config)
    kw = inputs("t5")
    loss = model(**kw, labels=kw["decoder_input_ids"].contiguous()).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_no_family_is_left_out():
    assert set(LLAMA_FAMILIES) <= set(ALL_FAMILIES)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (fp16/bf16 autocast on CUDA: the GPU check)")


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_training_steps_under_cuda_autocast(method, family, dtype):
    """The same steps on the GPU (fused kernels under auto), fp16 with a GradScaler."""
    model = tiny(family).cuda().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    kadapt.patch(model, tiny_configs()[method])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3 if method != "full_finetune" else 1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    kw = {k: v.cuda() for k, v in inputs(family).items()}
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = _loss(model, family, kw)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[1:]) < losses[0], losses
