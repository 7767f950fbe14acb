"""The compiled CUDA extension ``kadapt._C``: loading, fake (meta) kernels and build information.

Importing this module is cheap and never raises; ``load()`` imports ``kadapt._C`` once (which
registers the ops under ``torch.ops.kadapt``) and registers the fake implementations that let
``torch.compile`` and meta tensors trace the ops.
"""
from __future__ import annotations

import json
import threading
from importlib import resources

_lock = threading.Lock()
_attempted = False
_loaded = False
_error: str | None = None
_build_info: dict | None = None

OPS = ("fused_adapter_fwd", "fused_adapter_bwd", "kron_weight", "inducer_attention_fwd", "fastfood_fwd",
       "fastfood_bwd")

# The largest bottleneck m that kadapt::fused_adapter_fwd / _bwd take (csrc/fused_adapter.cu,
# kMaxBottleneck); larger m is refused with a RuntimeError naming this limit.
FUSED_ADAPTER_MAX_M = 256

# kadapt::inducer_attention_fwd (csrc/inducer_attention.cu): the head dims it is compiled for; any
# d in 1..INDUCER_ATTENTION_MAX_HEAD_DIM runs, zero-padded to the next of these. The key-MLP width
# m_k is limited to INDUCER_ATTENTION_MAX_KEY_MLP (kInducerMaxKeyMlp); wider is refused with a
# RuntimeError naming the limit.
INDUCER_ATTENTION_HEAD_DIMS = (32, 64, 96, 128)
INDUCER_ATTENTION_MAX_HEAD_DIM = 128
INDUCER_ATTENTION_MAX_KEY_MLP = 128


def _register_fakes() -> None:
    import torch

    @torch.library.register_fake("kadapt::fused_adapter_fwd")
    def _fused_adapter_fwd_fake(x, residual, add_input, w_down, b_down, w_up, b_up, activation):
        torch._check(x.dim() == 2, lambda: f"kadapt::fused_adapter_fwd: x must be 2-D (T, D), got {tuple(x.shape)}")
        T, D = x.shape
        m = w_down.shape[1]
        return x.new_empty((T, D)), x.new_empty((T, m), dtype=torch.float32)

    @torch.library.register_fake("kadapt::fused_adapter_bwd")
    def _fused_adapter_bwd_fake(dy, z, w_down, w_up, add_input, activation):
        torch._check(dy.dim() == 2, lambda: f"kadapt::fused_adapter_bwd: dy must be 2-D (T, D), got {tuple(dy.shape)}")
        T, D = dy.shape
        m = w_down.shape[1]
        return (dy.new_empty((T, D)), dy.new_empty((T, m)), dy.new_empty((T, m)),
                dy.new_empty((D,), dtype=torch.float32))

    @torch.library.register_fake("kadapt::kron_weight")
    def _kron_weight_fake(A, B, t):
        n = A.shape[0]
        out = (t.shape[2] if t is not None else B.shape[2])
        return B.new_empty((n * B.shape[1], n * out))

    @torch.library.register_fake("kadapt::inducer_attention_fwd")
    def _inducer_attention_fwd_fake(q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal):
        torch._check(q.dim() == 4, lambda: f"kadapt::inducer_attention_fwd: q must be 4-D (B, H, Tq, d), got "
                                           f"{tuple(q.shape)}")
        stats = q.shape[:-1]
        return (q.new_empty(q.shape), q.new_empty(stats, dtype=torch.float32),
                q.new_empty(stats, dtype=torch.float32))

    # meta: the schedule of kadapt/ops/triton/fastfood.py (meta[0] = d_z, meta[1] = ΣN)
    @torch.library.register_fake("kadapt::fastfood_fwd")
    def _fastfood_fwd_fake(z, tables, meta):
        return z.new_empty((meta[1],), dtype=torch.float32)

    @torch.library.register_fake("kadapt::fastfood_bwd")
    def _fastfood_bwd_fake(grad, tables, meta):
        return grad.new_empty((meta[0],), dtype=torch.float32)


def load() -> bool:
    """Import kadapt._C once; True when it imported. Never raises."""
    global _attempted, _loaded, _error
    if _attempted:
        return _loaded
    with _lock:
        if _attempted:
            return _loaded
        try:
            import torch  # noqa: F401 - libc10/libtorch must be loaded before _C

            from kadapt import _C  # noqa: F401 - registers torch.ops.kadapt.*
        except (ImportError, OSError) as exc:
            _error = f"{type(exc).__name__}: {exc}"
        else:
            try:
                _register_fakes()
            except Exception as exc:  # noqa: BLE001 - keep kadapt importable whatever happens
                _error = f"kadapt._C imported but registering its fake kernels failed: {exc!r}"
            else:
                _loaded = True
        _attempted = True
    return _loaded


def is_built() -> bool:
    """True iff kadapt._C imports and registered every op in OPS under torch.ops.kadapt."""
    if not load():
        return False
    import torch

    try:
        return all(hasattr(torch.ops.kadapt, op) for op in OPS)
    except Exception:  # noqa: BLE001
        return False


def import_error() -> str | None:
    """Why kadapt._C could not be imported (None when it imported)."""
    load()
    return _error


def build_info() -> dict:
    """Contents of kadapt/_build_info.json, written by setup.py at build time."""
    global _build_info
    if _build_info is None:
        info = None
        try:
            res = resources.files("kadapt").joinpath("_build_info.json")
            if res.is_file():
                info = json.loads(res.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001
            info = {"cuda_extension": False, "reason": f"unreadable _build_info.json: {exc!r}"}
        if not isinstance(info, dict):
            info = {"cuda_extension": False, "reason": "not built (source tree)"}
        _build_info = info
    return dict(_build_info)


def built_archs() -> list[str]:
    """CUDA archs kadapt._C was compiled for (empty when it was not built)."""
    info = build_info()
    return list(info.get("archs") or []) if info.get("cuda_extension") else []
