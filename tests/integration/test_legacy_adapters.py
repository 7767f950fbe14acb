"""Adapter files written by an earlier kadapt (main at af8c7e5, format_version 1) still load, bit for bit.

The fixtures under tests/fixtures/adapters_af8c7e5/ were saved by that commit from tiny models built with
``_models.tiny(family, hidden=32)`` (trainables perturbed, prefixes ejected where the name says so).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kadapt
from _models import inputs, tiny

FIXTURES = Path(__file__).parent / "fixtures" / "adapters_af8c7e5"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_fixtures_present():
    assert len(CASES) == 6


@pytest.mark.parametrize("name", CASES)
def test_legacy_adapter_loads_bit_exact(name):
    directory = FIXTURES / name
    meta = json.loads((directory / "adapter_config.json").read_text())
    family = name.split("_")[0]
    assert meta["model_type"] == family
    model = tiny(family, hidden=32)
    kadapt.load_adapter(model, directory)
    saved = load_file(str(directory / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    assert saved, "empty fixture"
    for key, tensor in saved.items():
        assert key in params, f"{key} not in the loaded model"
        assert torch.equal(params[key].detach().cpu(), tensor), key
    trainable, _ = kadapt.trainable_parameters(model)
    assert trainable == sum(t.numel() for k, t in saved.items() if params[k].requires_grad)
    with torch.no_grad():
        logits = model(**inputs(family)).logits
    assert torch.isfinite(logits).all()
    # Saving again writes the same tensors under the same names.
    kadapt.unpatch(model)
    fresh = tiny(family, hidden=32)
    kadapt.load_adapter(fresh, directory)
    out = {k: v.detach() for k, v in kadapt.api.adapter_state(fresh).items()}
    assert sorted(out) == sorted(saved)
