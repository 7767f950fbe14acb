"""The README's "Adding a method" example works as written: one module + one registry line."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import kadapt
from _models import inputs, output, tiny
from kadapt.methods import base

README = Path(__file__).resolve().parents[2] / "README.md"


def test_adding_a_method_example_registers_and_patches():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Adding a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "kadapt_readme_example"}
    try:
        exec(compile(code, "README.md", "exec", dont_inherit=True), namespace)
        config_cls = namespace["ScaledOutputConfig"]
        assert kadapt.METHODS["scaled_output"] is config_cls
        model = tiny("gpt2")
        base_out = output(model, "gpt2")
        kadapt.patch(model, config_cls(init=1.0))
        assert torch.allclose(output(model, "gpt2"), base_out, atol=1e-6)  # scale 1: the same function
        assert kadapt.trainable_parameters(model)[0] == 2 * 64
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(0.5)
        assert not torch.allclose(output(model, "gpt2"), base_out)
        output(model, "gpt2", **inputs("gpt2")).sum().backward()
        kadapt.unpatch(model)
        assert torch.equal(output(model, "gpt2"), base_out)
    finally:  # leave the registry as the other tests expect it
        cls = namespace.get("ScaledOutputConfig")
        base.METHODS.pop("scaled_output", None)
        if cls is not None:
            base._IMPLEMENTATIONS.pop(cls, None)
