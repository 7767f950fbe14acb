"""The kernel-boundary custom ops of kadapt/ops (kadapt/ops/_common.py: schema, CPU/CUDA kernel, fake kernel,
no autograd of their own) under torch.library.opcheck, on the Triton backend: the interpreter on CPU tensors,
the GPU when there is one. Their autograd is one autograd.Function per op; here it is checked that eager calls
through the dispatcher (``EAGER_DISPATCH``) and the direct eager calls compute bit-identical results."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kadapt
from kadapt.ops import AdapterWeight, _common, fused_adapter, phm_linear, phm_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = "triton"


def _r(*shape, scale=0.3):
    return (torch.randn(*shape, dtype=torch.float64) * scale).float().to(DEVICE)


def _factors(kind, i, o):
    return {
        0: lambda: [_r(i, o)],
        1: lambda: [_r(2, 2, 2), _r(2, i // 2, o // 2)],
        2: lambda: [_r(2, 2, 2), _r(2, i // 2, 2), _r(2, 2, o // 2)],
        3: lambda: [_r(i, 2), _r(2, o)],
    }[kind]()


@pytest.fixture(autouse=True)
def _triton():
    if not (torch.cuda.is_available() or kadapt.backends.triton_interpret()):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    yield
    _common.EAGER_DISPATCH = False


@pytest.mark.parametrize("kinds,residual", [((0, 0), False), ((3, 2), True), ((1, 1), False), ((2, 0), True)])
def test_fused_adapter_ops(kinds, residual):
    t, d, m = 7, 12, 6
    dk, uk = kinds
    x, factors = _r(t, d, scale=1.0), _factors(dk, d, m) + _factors(uk, m, d)
    spec = [1, dk, uk, 0]
    args = (x, _r(t, d) if residual else None, _r(m), _r(d), factors, spec, TRITON)
    torch.library.opcheck(torch.ops.kadapt.fused_adapter.default, args)
    y, z, *built = torch.ops.kadapt.fused_adapter.default(*args)
    dy = _r(t, d, scale=1.0)
    for need in ([1, 1], [0, 1], [1, 0]):
        torch.library.opcheck(torch.ops.kadapt.fused_adapter_backward.default,
                              (x, dy, z, factors + built, spec + need, TRITON))


@pytest.mark.parametrize("compacter", [False, True])
def test_phm_ops(compacter):
    rule = _r(2, 2, 2)
    b = _r(2, 5, 3) if compacter else _r(2, 5, 4)
    t = _r(2, 3, 4) if compacter else None
    x, bias, dy = _r(6, 10), _r(8), _r(6, 8)
    torch.library.opcheck(torch.ops.kadapt.phm_weight.default, (rule, b, t, TRITON))
    torch.library.opcheck(torch.ops.kadapt.phm_weight_backward.default, (rule, b, t, _r(10, 8), TRITON))
    torch.library.opcheck(torch.ops.kadapt.phm_linear.default, (x, rule, b, t, bias, TRITON))
    for spec in ([1, 1, 1], [0, 1, 0], [1, 0, 1]):
        torch.library.opcheck(torch.ops.kadapt.phm_linear_backward.default, (x, dy, rule, b, t, spec, TRITON))


def _grads_both_ways(fn, leaves, dy):
    out = []
    for dispatch in (False, True):
        _common.EAGER_DISPATCH = dispatch
        y = fn()
        out.append((y, *torch.autograd.grad(y, leaves, dy)))
    _common.EAGER_DISPATCH = False
    return out


def test_eager_dispatcher_and_direct_calls_agree():
    """The direct eager call of a kernel-boundary function and the call through the dispatcher run the same
    kernels: bit-identical forward and gradients (fused adapter with a shared rule, phm_linear, phm_weight)."""
    kadapt.set_backend("triton")
    try:
        x = _r(3, 5, 12, scale=1.0).requires_grad_()
        rule = _r(2, 2, 2).requires_grad_()
        s, t, b = _r(2, 6, 2).requires_grad_(), _r(2, 2, 3).requires_grad_(), _r(2, 3, 6).requires_grad_()
        b2, bias = _r(2, 6, 4).requires_grad_(), _r(8).requires_grad_()
        bd, bu = _r(6).requires_grad_(), _r(12).requires_grad_()
        wd, wu = AdapterWeight.compacter(rule, s, t), AdapterWeight.phm(rule, b)
        cases = [
            (lambda: fused_adapter(x, wd, bd, wu, bu, "gelu_new", residual=x, add_input=True),
             [x, rule, s, t, b, bd, bu]),
            (lambda: phm_linear(x, rule, b2, None, bias), [x, rule, b2, bias]),
            (lambda: phm_weight(rule, s, t), [rule, s, t]),
        ]
        for fn, leaves in cases:
            direct, dispatched = _grads_both_ways(fn, leaves, torch.randn_like(fn()))
            for a, b_ in zip(direct, dispatched):
                assert torch.equal(a, b_)
    finally:
        kadapt.set_backend("auto")


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_ops_are_dispatched_under_a_dispatch_mode():
    """Eager calls skip the dispatcher only when nothing needs it: a TorchDispatchMode (FakeTensorMode,
    FlopCounterMode, ...) sees the custom ops of the forward and of the backward."""
    kadapt.set_backend("triton")
    try:
        x = _r(4, 12).requires_grad_()
        wd = AdapterWeight.phm(_r(2, 2, 2), _r(2, 6, 3)).tensors
        args = (x, AdapterWeight.phm(*wd), _r(6), _r(6, 12), _r(12), "relu")
        with _Record() as rec:
            y = fused_adapter(*args)
            torch.autograd.grad(y, [x], torch.ones_like(y))
            phm_weight(*wd)
        assert {"kadapt.fused_adapter.default", "kadapt.fused_adapter_backward.default",
                "kadapt.phm_weight.default"} <= set(rec.ops), rec.ops
    finally:
        kadapt.set_backend("auto")


def _inducer_args(with_mlp=True, H=4, H_kv=2, dropout_p=0.0, bias=False):
    B, Tq, Tk, d, m = 2, 5, 7, 8, 3
    q, k, v = _r(B, H, Tq, d, scale=1.0), _r(B, H_kv, Tk, d, scale=1.0), _r(B, H_kv, Tk, d, scale=1.0)
    mlp = [_r(H, d, m), _r(H, m), _r(H, m, d), _r(H, d)] if with_mlp else [None] * 4
    kpm = torch.ones(B, Tk, dtype=torch.int8, device=DEVICE)
    kpm[1, 5:] = 0
    seed = torch.tensor(11, dtype=torch.int64) if dropout_p > 0 else None
    return (q, k, v, *mlp, kpm, 0.4, True, TRITON, dropout_p, seed, _r(1, H, Tq, Tk) if bias else None)


@pytest.mark.parametrize("with_mlp,H_kv,dropout_p,bias", [(True, 2, 0.0, False), (False, 4, 0.25, True),
                                                          (True, 1, 0.25, True)])
def test_inducer_attention_ops(with_mlp, H_kv, dropout_p, bias):
    args = _inducer_args(with_mlp, H_kv=H_kv, dropout_p=dropout_p, bias=bias)
    torch.library.opcheck(torch.ops.kadapt.inducer_attention.default, args)
    o, lse, w = torch.ops.kadapt.inducer_attention.default(*args)
    q, k, v, A_k, a_k, B_k, b_k, kpm, scale, causal, _, p, seed, bias_t = args
    ups = (_r(*o.shape, scale=1.0), _r(*lse.shape), _r(*w.shape))
    torch.library.opcheck(torch.ops.kadapt.inducer_attention_backward.default,
                          (q, k, v, A_k, a_k, B_k, b_k, kpm, o, lse, w, *ups, scale, causal, p, seed, bias_t))


@pytest.mark.parametrize("with_mlp,gating,dropout_p", [(True, True, 0.0), (False, False, 0.25)])
def test_inducer_attention_eager_and_compiled_gradients_are_bit_identical(with_mlp, gating, dropout_p):
    """One autograd path: torch.compile(fullgraph=True) runs the same autograd.Function and kernels as eager
    mode, so forward and gradients agree bit for bit (Triton; GQA, key padding, gating, dropout)."""
    from kadapt.ops import inducer_attention

    q, k, v, *mlp, kpm, _, _, _, _, _, _ = _inducer_args(with_mlp)
    leaves = [t.requires_grad_() for t in (q, k, v, *mlp) if t is not None]
    mask = kpm.bool()

    def f(*xs):
        o, lse, w = inducer_attention(*xs, scale=0.4, causal=True, key_padding_mask=mask, gating=gating,
                                      dropout_p=dropout_p)
        return o, torch.where(torch.isinf(lse), 0, lse), w

    kadapt.set_backend("triton")
    try:
        torch._dynamo.reset()
        torch.manual_seed(5)
        outs = f(*leaves)
        ups = [torch.randn_like(t) for t in outs]
        g_eager = torch.autograd.grad(outs, leaves, ups)
        torch.manual_seed(5)  # the same dropout seed
        outs_c = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")(*leaves)
        g_compiled = torch.autograd.grad(outs_c, leaves, ups)
        for a, b in zip((*outs, *g_eager), (*outs_c, *g_compiled)):
            assert torch.equal(a, b)
    finally:
        kadapt.set_backend("auto")
        torch._dynamo.reset()


def test_inducer_attention_eager_dispatcher_and_direct_calls_agree():
    """inducer_attention's direct eager kernel calls and the calls through the dispatcher (EAGER_DISPATCH):
    bit-identical outputs and gradients; a TorchDispatchMode sees both ops."""
    from kadapt.ops import inducer_attention

    q, k, v, *mlp, kpm, _, _, _, _, _, _ = _inducer_args(True)
    leaves = [t.requires_grad_() for t in (q, k, v, *mlp)]
    mask = kpm.bool()
    kadapt.set_backend("triton")
    try:
        def fn():
            o, lse, w = inducer_attention(*leaves, causal=True, key_padding_mask=mask, gating=True)
            return o * 2 + torch.where(torch.isinf(lse), 0, lse)[..., None] + w[..., None]

        direct, dispatched = _grads_both_ways(fn, leaves, torch.randn_like(fn()))
        for a, b_ in zip(direct, dispatched):
            assert torch.equal(a, b_)
        with _Record() as rec:
            torch.autograd.grad(fn(), [q], torch.ones_like(q))
        assert {"kadapt.inducer_attention.default", "kadapt.inducer_attention_backward.default"} <= set(rec.ops)
    finally:
        kadapt.set_backend("auto")
