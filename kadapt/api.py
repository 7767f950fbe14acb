"""Counting, saving and loading the trainable state of a patched model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from kadapt.methods.base import KadaptConfig
from kadapt.patching import added_parameters, get_backbone, get_record, patch, unpatch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts over unique parameters (a tied or shared tensor counts once)."""
    params = list(dict.fromkeys(model.parameters()))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every trainable parameter plus every parameter kadapt added
    (frozen ones too, e.g. PHM rules with learn_phm=False), each shared tensor once under its first name."""
    record = get_record(model)
    added = added_parameters(record) if record is not None else set()
    return {name: p for name, p in model.named_parameters() if p.requires_grad or p in added}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` (method config + model identity) and ``adapter_model.safetensors``
    (the trainable state plus kadapt's added tensors) into ``directory``."""
    from safetensors.torch import save_file

    record = get_record(model)
    if record is None:
        raise ValueError("model is not patched by kadapt: patch it (kadapt.patch) before save_adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "config": _config_dict(record.config),
        "model_type": model.config.model_type,
        "family": record.family,
        "hidden_size": record.hidden_size,
        "shapes": {k: list(v.shape) for k, v in state.items()},
    }
    if record.state_checks:  # JSON state a method keeps beside its tensors (SAID: the base model's identity)
        meta["method_state"] = {name: save() for name, (save, _) in record.state_checks.items()}
    save_file(state, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "kadapt": str(FORMAT_VERSION), "kadapt_methods": _methods(record.config)})
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _config_dict(config: KadaptConfig | list[KadaptConfig]) -> dict | list[dict]:
    """A config's dict, or a list of them for a composite patch."""
    return [c.to_dict() for c in config] if isinstance(config, list) else config.to_dict()


def _config_from(data: dict | list) -> KadaptConfig | list[KadaptConfig]:
    if isinstance(data, list):
        if not data:
            raise ValueError("an empty list of configs")
        return [KadaptConfig.from_dict(d) for d in data]
    return KadaptConfig.from_dict(data)


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} not found: not a kadapt adapter directory "
                         f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); the adapter file is corrupt or not a kadapt adapter") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter file is truncated or corrupt") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object; the adapter file is truncated "
                         f"or corrupt")
    for key in ("format_version", "config", "model_type", "hidden_size", "shapes"):
        if key not in meta:
            raise ValueError(f"{path}: missing field {key!r}; the adapter file is truncated or corrupt")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={meta['format_version']!r}; this kadapt reads: {FORMAT_VERSION}")
    return meta


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors metadata."""
    from safetensors import safe_open

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"{path} not found: the adapter directory lacks its weights file {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for truncated headers or data
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the adapter file is truncated or "
                         f"corrupt") from e


def _methods(config: KadaptConfig | list[KadaptConfig]) -> str:
    return " + ".join(c.method for c in config) if isinstance(config, list) else config.method


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by ``save_adapter``: patch ``model`` with the saved config if it is not
    patched yet, then copy the tensors in. Every check (method, model type, hidden size, names,
    shapes, dtype castability) runs before anything is written; on failure the model is unchanged.

    Existing model tensors the file holds (a user unfroze e.g. the input embeddings after patching, so
    save_adapter wrote them) are loaded too and made trainable again; ``unpatch`` restores their values."""
    directory = Path(directory)
    meta = _read_meta(directory)
    try:
        config = _config_from(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: the saved config is invalid: {e}") from e
    weights, metadata = _read_weights(directory)
    saved_methods = metadata.get("kadapt_methods")
    if saved_methods is not None and saved_methods != _methods(config):
        raise ValueError(f"{directory}: {CONFIG_NAME} names method {_methods(config)!r} but {WEIGHTS_NAME} was saved "
                         f"by method {saved_methods!r}; the two files do not belong together")
    backbone = get_backbone(model)
    if meta["model_type"] != model.config.model_type or meta["hidden_size"] != backbone.hidden_size:
        raise ValueError(f"model: the adapter was saved for model_type={meta['model_type']!r} with hidden size "
                         f"{meta['hidden_size']}; this model is model_type={model.config.model_type!r} with hidden "
                         f"size {backbone.hidden_size}")
    record = get_record(model)
    if record is not None and record.config != config:
        raise ValueError(f"config: the adapter was saved with {config!r}, but the model is patched with "
                         f"{record.config!r}; call kadapt.unpatch(model) first or load into an unpatched model")
    patched_here = record is None
    if patched_here:
        patch(model, config)
    try:
        target = adapter_state(model)
        params = dict(model.named_parameters())
        extra = sorted(n for n in set(weights) - set(target) if n in params)  # existing tensors a user trained
        target.update({n: params[n] for n in extra})
        missing, unexpected = sorted(set(target) - set(weights)), sorted(set(weights) - set(target))
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match the patched model: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''} (config {_methods(config)!r})")
        for name, p in target.items():
            if tuple(weights[name].shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(weights[name].shape)}; the patched "
                                 f"model expects {tuple(p.shape)}")
            if not weights[name].dtype.is_floating_point:
                raise ValueError(f"adapter tensor {name!r} has dtype {weights[name].dtype}; expected a float dtype")
        record = get_record(model)
        saved_state = meta.get("method_state", {})
        for name, (_, check) in record.state_checks.items():
            try:
                check(saved_state.get(name) if isinstance(saved_state, dict) else None)
            except ValueError as e:
                raise ValueError(f"{directory}: {e}") from e
        known = {id(p) for p, _ in record.snapshots}
        record.snapshots += [(params[n], params[n].detach().to("cpu", copy=True)) for n in extra
                             if id(params[n]) not in known]
        with torch.no_grad():
            for name, p in target.items():
                p.copy_(weights[name].to(device=p.device, dtype=p.dtype))
        for name in extra:
            params[name].requires_grad_(True)
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model
