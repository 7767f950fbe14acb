"""Float64 finite-difference gradient check: every registered method (``kadapt.METHODS`` via tiny_configs())
x every model family, so a wrong gradient anywhere shows.

Per case: ``tiny(family).double()``, patch with the method's tiny config, ``perturb_trainables`` (zero-initialised
factors such as LoRA B become non-zero, so every path carries gradient), eval mode (dropout off: several tiny
configs have p > 0). The loss is a fixed random projection of the logits, L = sum(logits * R), on a batch of two
sequences, the second right-padded by one token (the padding paths of the attention methods run too). Autograd's
dL/dθ is compared, for three coordinates of every trainable tensor (first, middle and last flat index), with the
central difference (L(θ + εe_i) − L(θ − εe_i)) / 2ε, ε = 1e-5, |Δ| <= ATOL + RTOL·max(|autograd|, |FD|) with
RTOL = 1e-5, ATOL = 1e-8. (At ε = 1e-6 the loss's own float64 rounding, ~10 ulp of L, already shows as ~1e-8 in
the difference; the truncation error at 1e-5 is below 1e-10. Correct gradients use at most ~12 % of the
tolerance; a 1e-4 relative error in one op's backward fails.) CPU float64 tensors run kadapt's pure-PyTorch
reference path under the default "auto" backend.

Every trainable tensor is checked, task heads and unfrozen norms included, except under full fine-tuning (every
backbone tensor trains): there a fixed, evenly spaced sample of FULL_FINETUNE_SAMPLE tensors (first and last
included) is checked; the sample is named in the test, not skipped silently.

The RMS norms of T5 and the Llama family compute in float32 whatever the input dtype (an upcast meant for fp16),
which quantises a float64 loss at ~1e-7 relative and swamps any small-ε difference (T5 full fine-tuning then
"fails" with no kadapt module involved). The test runs them with the same formula in the input dtype
(``_float64_norms``); kadapt's own code is not touched.
"""
from __future__ import annotations

import pytest
import torch

from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

import kadapt
from _models import ALL_FAMILIES, inputs, output, perturb_trainables, tiny, tiny_configs

EPS = 1e-5
RTOL = 1e-5
ATOL = 1e-8
FULL_FINETUNE_SAMPLE = 10

METHODS = list(kadapt.METHODS)

# (method, family) -> reason, for known failures left visible (xfail, not strict). None at present: grouped-query
# inducer attention (llama / qwen2 / mistral) passes.
XFAIL: dict[tuple[str, str], str] = {}

# The largest error seen per case, for the summary printed at the end of the module (pytest -s).
ERRORS: dict[str, tuple[float, float, int, float]] = {}


def _cases():
    for method in METHODS:
        for family in ALL_FAMILIES:
            marks = [pytest.mark.xfail(strict=False, reason=XFAIL[method, family])] if (method, family) in XFAIL else []
            yield pytest.param(method, family, id=f"{method}-{family}", marks=marks)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if ERRORS:
        worst_rel = max(ERRORS.items(), key=lambda kv: kv[1][0])
        worst_abs = max(ERRORS.items(), key=lambda kv: kv[1][1])
        worst_use = max(ERRORS.items(), key=lambda kv: kv[1][3])
        checked = sum(v[2] for v in ERRORS.values())
        print(f"\ngradcheck: {len(ERRORS)} cases, {checked} coordinates; max relative error (|grad| >= 1e-4) "
              f"{worst_rel[1][0]:.3g} ({worst_rel[0]}), max absolute error {worst_abs[1][1]:.3g} ({worst_abs[0]}), max share of the "
              f"tolerance used {worst_use[1][3]:.3g} ({worst_use[0]})")


def _rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """T5LayerNorm / *RMSNorm in the input's dtype (the originals go through float32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(autouse=True)
def _float64_norms(monkeypatch):
    for cls in (T5LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm):
        monkeypatch.setattr(cls, "forward", _rms_norm)


def test_every_method_has_a_tiny_config():
    missing = sorted(set(METHODS) - set(tiny_configs()))
    assert not missing, f"registered method(s) {missing} have no entry in tests/_models.py tiny_configs()"


def _batch(family: str) -> dict:
    kw = inputs(family, batch=2, length=5)
    mask = kw["attention_mask"].clone()
    mask[1, -1] = 0  # right padding on the second sequence
    kw["attention_mask"] = mask
    return kw


def _checked_tensors(method: str, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # shared tensors once
    if method != "full_finetune":
        return named
    n = len(named)
    picks = sorted({round(i * (n - 1) / (FULL_FINETUNE_SAMPLE - 1)) for i in range(FULL_FINETUNE_SAMPLE)})
    return [named[i] for i in picks]


def _coordinates(numel: int) -> list[int]:
    return sorted({0, numel // 2, numel - 1})


@pytest.mark.parametrize("method,family", list(_cases()))
def test_gradcheck(method, family):
    configs = tiny_configs()
    if method not in configs:
        pytest.fail(f"method {method!r} has no tiny config in tests/_models.py tiny_configs()")
    torch.manual_seed(0)
    model = tiny(family).double()
    kadapt.patch(model, configs[method])
    perturb_trainables(model)
    model.eval()
    kw = _batch(family)

    with torch.no_grad():
        shape = output(model, family, **kw).shape
    g = torch.Generator().manual_seed(7)
    proj = torch.randn(shape, generator=g, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (output(model, family, **kw) * proj).sum()

    tensors = _checked_tensors(method, model)
    assert tensors, f"{method} on {family}: nothing trains"
    model.zero_grad(set_to_none=True)
    value = loss()
    assert torch.isfinite(value)
    value.backward()

    worst_rel = worst_abs = worst_use = 0.0
    failures, count = [], 0
    for name, p in tensors:
        assert p.dtype == torch.float64 and p.is_contiguous(), f"{name}: {p.dtype}, contiguous={p.is_contiguous()}"
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        flat = p.detach().view(-1)  # shares p's version counter (``.data`` would not): cached state sees the edit
        for i in _coordinates(p.numel()):
            original = flat[i].item()
            with torch.no_grad():
                flat[i] = original + EPS
                up = loss().item()
                flat[i] = original - EPS
                down = loss().item()
                flat[i] = original
            fd = (up - down) / (2 * EPS)
            ad = grad.view(-1)[i].item()
            err = abs(fd - ad)
            scale = max(abs(fd), abs(ad))
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / scale if scale >= 1e-4 else 0.0)  # noise dominates below
            worst_use = max(worst_use, err / (ATOL + RTOL * scale))
            count += 1
            if not err <= ATOL + RTOL * scale:
                failures.append(f"{name}[{i}] (grad {'None' if p.grad is None else 'set'}): autograd {ad:.10g}, "
                                f"finite difference {fd:.10g}, |diff| {err:.3g}")
    ERRORS[f"{method}-{family}"] = (worst_rel, worst_abs, count, worst_use)
    assert not failures, (f"{method} on {family}: {len(failures)} of {count} coordinates disagree with the central "
                          f"difference (eps {EPS}, rtol {RTOL}, atol {ATOL}):\n" + "\n".join(failures[:20]))
