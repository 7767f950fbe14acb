"""torch.library.opcheck of kadapt's Python custom ops (schema, fake kernel, autograd registration,
AOT dispatch) on the Triton backend: the interpreter on CPU tensors, the GPU when there is one."""
import pytest
import torch

import kadapt  # noqa: F401 - registers the ops
from kadapt.ops import fused_adapter as _fa  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _r(*shape, scale=0.3):
    return (torch.randn(*shape, dtype=torch.float64) * scale).float().to(DEVICE)


def _adapter_args(kinds):
    t, d, m = 7, 12, 6
    weights = {
        0: lambda i, o: [_r(i, o)],
        1: lambda i, o: [_r(2, 2, 2), _r(2, i // 2, o // 2)],
        2: lambda i, o: [_r(2, 2, 2), _r(2, i // 2, 2), _r(2, 2, o // 2)],
        3: lambda i, o: [_r(i, 2), _r(2, o)],
    }
    dk, uk = kinds
    return (_r(t, d, scale=1.0), None, True, weights[dk](d, m), dk, _r(m), weights[uk](m, d), uk, _r(d), 0, "triton")


@pytest.mark.parametrize("kinds", [(0, 0), (3, 2), (1, 1)])
def test_fused_adapter_op(kinds):
    args = _adapter_args(kinds)
    for a in args:
        if isinstance(a, torch.Tensor):
            a.requires_grad_(True)
        elif isinstance(a, list):
            for t in a:
                t.requires_grad_(True)
    torch.library.opcheck(torch.ops.kadapt.fused_adapter.default, args)


def test_fused_adapter_backward_op():
    x, _, add, wd, dk, _, wu, uk, _, act, backend = _adapter_args((2, 0))
    dy, z = _r(7, 12, scale=1.0), _r(7, 6, scale=1.0)
    torch.library.opcheck(torch.ops.kadapt.fused_adapter_backward.default,
                          (x, dy, z, wd, dk, wu, uk, add, act, backend))


@pytest.mark.parametrize("compacter", [False, True])
def test_phm_ops(compacter):
    rule = _r(2, 2, 2).requires_grad_(True)
    b = (_r(2, 5, 3) if compacter else _r(2, 5, 4)).requires_grad_(True)
    t = _r(2, 3, 4).requires_grad_(True) if compacter else None
    x = _r(6, 10).requires_grad_(True)
    bias = _r(8).requires_grad_(True)
    torch.library.opcheck(torch.ops.kadapt.phm_weight.default, (rule, b, t, "triton"))
    torch.library.opcheck(torch.ops.kadapt.phm_linear.default, (x, rule, b, t, bias, "triton"))
