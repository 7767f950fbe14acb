"""The fused adapter op (kadapt.ops.fused_adapter) against its reference.

For every backend (triton and cuda; reference too, which also checks that the tolerances are
attainable), ≥ 200 random configurations compare the forward and the gradient of every tensor that
requires one (x, residual, every weight factor incl. A, s, t, B, l, r, both biases, a shared A summed
over its uses) with the reference computed in float64 from float64 copies of the same inputs.
Triton's output buffers are NaN-poisoned so that an element the kernels never write fails; the CUDA
extension allocates in C++, so there every output is checked to be finite.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET)
in fp32 on small shapes and the CUDA backend is skipped; on a GPU every backend runs every dtype.
Also here: dispatch (auto, forced backends, fallbacks), bad inputs, torch.compile.
"""
from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

import kadapt
from kadapt import backends
from kadapt.ops import AdapterWeight, fused_adapter, fused_adapter_reference

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["gelu_new", "gelu_tanh", "gelu", "relu", "swish"]
KINDS = ["dense", "lowrank", "phm", "compacter"]
FUSED_BACKENDS = ["triton", "cuda"]

# ---------------------------------------------------------------------------------------------
# helpers shared by the op tests (tests/ops/test_phm.py imports them from here)

# Tolerance rule (assert_matches): with ref the float64 result and ref_lp the same reference formula
# evaluated by PyTorch in the test dtype (same inputs, same device), a result passes when every
# element is finite and
#     max |got - ref| <= TOL[dtype] * max |ref|  +  2 * max |ref_lp - ref|
# The first term is the error relative to the largest magnitude of that reference tensor; the second
# admits what rounding in the test dtype costs PyTorch itself, which matters only where a tensor is
# far smaller than the terms summed into it (e.g. a bias gradient whose per-token terms cancel).
# fp32 kernels accumulate in fp32 without TF32; fp16/bf16 ones round operands, the weight tiles they
# form from the factors, and the stored intermediates.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_matches(got: torch.Tensor, ref: torch.Tensor, ref_lp: torch.Tensor | None, dtype: torch.dtype,
                   what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    got, ref = got.detach().to("cpu", torch.float64), ref.detach()
    bad = ~torch.isfinite(got)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite elements (unwritten output?), first at " \
                          f"{tuple(bad.nonzero()[0].tolist())}"
    scale = ref.abs().max().item()
    lp_err = 0.0 if ref_lp is None else (ref_lp.detach().to("cpu", torch.float64) - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    allowed = TOL[dtype] * scale + 2 * lp_err
    assert err <= allowed, (f"{what}: max error {err:.3g} > {allowed:.3g} = {TOL[dtype]} x max|ref| {scale:.3g} "
                            f"+ 2 x PyTorch's {dtype} error {lp_err:.3g}")


def skip_unless_runnable(backend: str, dtype: torch.dtype) -> None:
    """Skip a (backend, dtype) that this machine cannot run."""
    if backend == "cuda":
        if not GPU:
            pytest.skip("the cuda backend needs a CUDA GPU (and the built kadapt._C extension)")
        if not backends.cuda_extension_built():
            msg = "the cuda backend needs the built kadapt._C extension"
            if os.environ.get("KADAPT_REQUIRE_EXTENSION") == "1":
                pytest.fail(msg + ", and KADAPT_REQUIRE_EXTENSION=1")
            pytest.skip(msg)
    if backend == "triton":
        if not backends.triton_importable():
            pytest.skip("triton is not installed")
        if not GPU:
            if not backends.triton_interpret():
                pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set by tests/conftest.py)")
            if dtype != torch.float32:
                pytest.skip("without a GPU Triton runs in its interpreter, fp32 only")


@pytest.fixture(autouse=True)
def _auto_backend():
    """Every test starts and ends on "auto"; fp32 matmuls stay fp32 (the tolerance rule compares with
    PyTorch's own error, which TF32 would inflate)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    kadapt.set_backend("auto")
    yield
    kadapt.set_backend("auto")
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every buffer the Triton host functions allocate; the returned list records the shapes
    (so a test can tell that the Triton kernels really ran)."""
    calls: list[tuple] = []
    if not backends.triton_importable():
        return calls
    from kadapt.ops.triton import fused_adapter as kernels

    def nan_empty(shape, *, device, dtype):
        calls.append(tuple(shape))
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kernels, "_empty", nan_empty)
    return calls


def randn(gen: torch.Generator, shape, scale: float = 1.0) -> torch.Tensor:
    """float64 N(0, scale²) on the CPU (rounded to the test dtype by the caller)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def base_shape(shape: tuple, layout: str) -> tuple:
    """Shape of the storage tensor from which ``view(base, layout)`` makes a non-contiguous ``shape``."""
    if layout == "transposed":
        return (shape[1], shape[0], *shape[2:])
    if layout == "sliced":
        return (*shape[:-1], shape[-1] + 3)
    if layout == "strided":
        return (2 * shape[0], *shape[1:])
    return tuple(shape)


def view(base: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return base.transpose(0, 1)
    if layout == "sliced":
        return base[..., 1:base.shape[-1] - 2]
    if layout == "strided":
        return base[::2]
    return base


def to64(leaves: dict) -> dict:
    """float64 CPU copies of the leaves (same values), with the same requires_grad."""
    return {k: v.detach().to("cpu", torch.float64).requires_grad_(v.requires_grad) for k, v in leaves.items()}


def clone_leaves(leaves: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items()}


def check_grads(fused, reference, leaves: dict, dy: torch.Tensor, dtype: torch.dtype, label: str) -> None:
    """Run ``fused(leaves)`` and ``reference`` (float64 copies; and in the test dtype, for the tolerance),
    then compare the forward and the gradient of every leaf that requires one, for upstream gradient dy."""
    names = [k for k, v in leaves.items() if v.requires_grad]

    def run(fn, lv, dy):
        y = fn(lv)
        return y, torch.autograd.grad(y, [lv[k] for k in names], dy)

    y, grads = run(fused, leaves, dy)
    assert y.dtype == dtype and y.device == dy.device, label
    y64, grads64 = run(reference, to64(leaves), dy.detach().to("cpu", torch.float64))
    y_lp, grads_lp = run(reference, clone_leaves(leaves), dy)
    assert_matches(y, y64, y_lp, dtype, f"forward ({label})")
    for name, g, g64, g_lp in zip(names, grads, grads64, grads_lp):
        assert g.dtype == leaves[name].dtype, f"d{name}: dtype {g.dtype} ({label})"
        assert_matches(g, g64, g_lp, dtype, f"d{name} ({label})")


# ---------------------------------------------------------------------------------------------
# random configurations

@dataclass(frozen=True)
class Config:
    index: int
    lead: tuple          # leading dims of x: (T,), (B, T) or (B, S, T)
    D: int
    m: int
    n: int               # PHM dimension (1 when neither weight is phm/compacter)
    down: str            # weight kinds
    up: str
    r_down: int          # rank of a lowrank/compacter weight
    r_up: int
    shared_rule: bool    # down and up use the same A tensor
    act: str
    add_input: bool
    residual: bool
    x_layout: str        # contiguous | transposed | sliced | strided
    res_layout: str
    dense_transposed: tuple  # (down, up): a dense W given as the transpose of an (out, in) tensor
    freeze: tuple        # leaves that do not require grad: "rule" (every A), "x", "down"/"up" (a projection)
    rule_fp32: bool      # with fp16/bf16 compute, A stored in fp32 (the rule may differ in dtype)


def _lead(rng: random.Random) -> tuple:
    if rng.random() < 0.03:
        return ()  # x is a single (D,) vector
    while True:
        nd = rng.choice([1, 1, 2, 3])
        if nd == 1:
            lead = (rng.randint(1, 90),)
        elif nd == 2:
            lead = (rng.randint(1, 4), rng.randint(1, 23))
        else:
            lead = (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 8))
        if math.prod(lead) % 16:  # never a multiple of 16 (or 32, 64) tokens
            return lead


def draw_config(index: int) -> Config:
    rng = random.Random(7919 * index + 17)
    down, up = rng.choice(KINDS), rng.choice(KINDS)
    phm_like = {down, up} & {"phm", "compacter"}
    n = rng.choice([1, 2, 3, 4]) if phm_like else 1
    if phm_like:
        D = n * rng.randint(max(1, -(-8 // n)), 96 // n)
        m = n * rng.choice([1, rng.randint(1, 8 // n), rng.randint(1, 40 // n)])
    else:
        D = rng.choice([37, rng.randint(8, 96)])
        m = rng.choice([1, rng.randint(1, 8), rng.randint(1, 40)])
    if rng.random() < 0.06:  # the larger-bottleneck tiles (BM 64..256)
        m = n * rng.randint(-(-41 // n), 256 // n)
    x_layout = rng.choice(["contiguous", "contiguous", "transposed", "sliced", "strided"])
    freeze = []
    if phm_like and rng.random() < 0.15:
        freeze.append("rule")  # learn_phm=False
    if rng.random() < 0.1:
        freeze.append("x")
    if rng.random() < 0.06:
        freeze.append(rng.choice(["down", "up"]))  # a frozen projection: its factors get no gradient
    lead = _lead(rng)
    return Config(
        index=index, lead=lead, D=D, m=m, n=n, down=down, up=up,
        r_down=rng.randint(1, 3), r_up=rng.randint(1, 3),
        shared_rule=down in ("phm", "compacter") and up in ("phm", "compacter") and rng.random() < 0.6,
        act=rng.choice(ACTS), add_input=rng.random() < 0.5, residual=rng.random() < 0.5,
        x_layout="sliced" if not lead and x_layout == "transposed" else x_layout,
        res_layout=rng.choice(["contiguous", "contiguous", "transposed" if lead else "sliced"]),
        dense_transposed=(rng.random() < 0.3, rng.random() < 0.3), freeze=tuple(freeze),
        rule_fp32=bool(phm_like) and rng.random() < 0.35)


N_CHUNKS, PER_CHUNK = 10, 24          # 240 configurations per backend and dtype
CONFIGS = [draw_config(i) for i in range(N_CHUNKS * PER_CHUNK)]


def weight_leaves(prefix: str, kind: str, d_in: int, d_out: int, n: int, r: int, gen, transposed: bool) -> dict:
    """float64 factors of a d_in×d_out weight scaled so that W's entries have variance 1/d_in
    (activations stay O(1)); the rule A is named ``prefix + "A"``."""
    s = d_in ** -0.5
    if kind == "dense":
        return {prefix + "W": randn(gen, (d_out, d_in) if transposed else (d_in, d_out), s)}
    if kind == "lowrank":
        return {prefix + "l": randn(gen, (d_in, r), s), prefix + "r": randn(gen, (r, d_out), r ** -0.5)}
    out = {prefix + "A": randn(gen, (n, n, n), n ** -0.5)}
    if kind == "phm":
        out[prefix + "B"] = randn(gen, (n, d_in // n, d_out // n), s)
    else:
        out[prefix + "s"] = randn(gen, (n, d_in // n, r), s)
        out[prefix + "t"] = randn(gen, (n, r, d_out // n), r ** -0.5)
    return out


def make_weight(leaves: dict, prefix: str, kind: str, rule_name: str, transposed: bool) -> AdapterWeight:
    if kind == "dense":
        w = leaves[prefix + "W"]
        return AdapterWeight.dense(w.t() if transposed else w)
    if kind == "lowrank":
        return AdapterWeight.lowrank(leaves[prefix + "l"], leaves[prefix + "r"])
    if kind == "phm":
        return AdapterWeight.phm(leaves[rule_name], leaves[prefix + "B"])
    return AdapterWeight.compacter(leaves[rule_name], leaves[prefix + "s"], leaves[prefix + "t"])


def relu_safe_bias(z0: torch.Tensor) -> torch.Tensor:
    """A bias b_down per column that puts the ReLU kink in the widest gap of that column's pre-activations
    (within [-1.5, 1.5]), so that rounding (fp16/bf16 weight tiles) cannot flip φ'(z) between the
    kernel and the float64 reference; away from the kink both compute the same function."""
    cols = []
    for col in z0.t():
        pts = sorted(col.tolist())
        cands = [-1.5, 1.5] + [(a + b) / 2 for a, b in itertools.pairwise(pts)]
        cands = [c for c in cands if -1.5 <= c <= 1.5]
        theta = max(cands, key=lambda c: min(abs(c - p) for p in pts))
        cols.append(-theta)
    return torch.tensor(cols, dtype=torch.float64)


def make_case(cfg: Config, dtype: torch.dtype, device: str):
    """Leaves (device, dtype; what the op differentiates) and a builder turning leaves into the op's args."""
    gen = torch.Generator().manual_seed(cfg.index)
    x_shape = (*cfg.lead, cfg.D)
    raw = {"x": randn(gen, base_shape(x_shape, cfg.x_layout))}
    if cfg.residual:
        raw["residual"] = randn(gen, base_shape(x_shape, cfg.res_layout))
    down_rule = "A" if cfg.shared_rule else "down.A"
    up_rule = "A" if cfg.shared_rule else "up.A"
    wd = weight_leaves("down.", cfg.down, cfg.D, cfg.m, cfg.n, cfg.r_down, gen, cfg.dense_transposed[0])
    wu = weight_leaves("up.", cfg.up, cfg.m, cfg.D, cfg.n, cfg.r_up, gen, cfg.dense_transposed[1])
    if cfg.shared_rule:
        raw["A"] = wd.pop("down.A")
        wu.pop("up.A")
    raw.update(wd)
    raw.update(wu)
    raw["b_up"] = randn(gen, (cfg.D,), 0.5)
    rules = {k for k in raw if k.endswith("A")}
    low = dtype != torch.float32
    leaves = {k: v.to(torch.float32 if (k in rules and cfg.rule_fp32 and low) else dtype) for k, v in raw.items()}
    if cfg.act == "relu":
        lv = to64(leaves)
        x = view(lv["x"], cfg.x_layout)
        w = make_weight(lv, "down.", cfg.down, down_rule, cfg.dense_transposed[0]).materialize()
        leaves["b_down"] = relu_safe_bias((x @ w).reshape(-1, cfg.m)).to(dtype)
    else:
        leaves["b_down"] = randn(gen, (cfg.m,), 0.5).to(dtype)
    frozen = {"rule": rules, "x": {"x"}, "down": {k for k in leaves if k.startswith("down.")} | {"b_down"},
              "up": {k for k in leaves if k.startswith("up.")} | {"b_up"}}
    off = set().union(*(frozen[f] for f in cfg.freeze)) if cfg.freeze else set()
    leaves = {k: v.to(device).requires_grad_(k not in off) for k, v in leaves.items()}

    def build(lv: dict) -> tuple:
        x = view(lv["x"], cfg.x_layout)
        res = view(lv["residual"], cfg.res_layout) if cfg.residual else None
        return (x, make_weight(lv, "down.", cfg.down, down_rule, cfg.dense_transposed[0]), lv["b_down"],
                make_weight(lv, "up.", cfg.up, up_rule, cfg.dense_transposed[1]), lv["b_up"], res)

    dy = randn(gen, x_shape).to(dtype).to(device)
    return leaves, build, dy


def run_config(cfg: Config, backend: str, dtype: torch.dtype) -> None:
    leaves, build, dy = make_case(cfg, dtype, DEVICE)

    def call(op):
        def f(lv):
            x, wd, bd, wu, bu, res = build(lv)
            return op(x, wd, bd, wu, bu, cfg.act, residual=res, add_input=cfg.add_input)
        return f

    kadapt.set_backend(backend)
    try:
        check_grads(call(fused_adapter), call(fused_adapter_reference), leaves, dy, dtype, f"{backend} {dtype} {cfg}")
    finally:
        kadapt.set_backend("auto")


# ---------------------------------------------------------------------------------------------
# fused vs reference on random configurations

@pytest.mark.parametrize("chunk", range(N_CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_random_configs_match_reference(backend, dtype, chunk, poisoned):
    skip_unless_runnable(backend, dtype)
    for cfg in CONFIGS[chunk * PER_CHUNK:(chunk + 1) * PER_CHUNK]:
        del poisoned[:]
        run_config(cfg, backend, dtype)
        if backend == "triton":
            assert poisoned, "the Triton kernels did not run"


def test_config_coverage():
    """The random configurations cover what the sweep promises (all of them run on every backend)."""
    cfgs = CONFIGS
    assert len(cfgs) >= 200
    tokens = {math.prod(c.lead) for c in CONFIGS}
    assert not any(t % 16 == 0 for t in tokens) and min(tokens) == 1 and max(tokens) > 64
    assert {len(c.lead) for c in cfgs} == {0, 1, 2, 3}
    assert {(c.down, c.up) for c in cfgs} == {(a, b) for a in KINDS for b in KINDS}
    assert {c.n for c in cfgs if {c.down, c.up} & {"phm", "compacter"}} == {1, 2, 3, 4}
    assert {c.r_down for c in cfgs if c.down in ("lowrank", "compacter")} == {1, 2, 3}
    assert {c.act for c in cfgs} == set(ACTS)
    assert {c.x_layout for c in cfgs} == {"contiguous", "transposed", "sliced", "strided"}
    assert sum(c.lead == () for c in cfgs) >= 3
    x_meta = [view(torch.empty(base_shape((*c.lead, c.D), c.x_layout), device="meta"), c.x_layout) for c in cfgs]
    assert sum(not x.is_contiguous() for x in x_meta) >= 80
    assert any(c.shared_rule and c.down == c.up == "compacter" for c in cfgs)
    assert any(c.D % 2 and c.down in ("dense", "lowrank") for c in cfgs) and any(c.D > 64 for c in cfgs)
    assert {c.add_input for c in cfgs} == {c.residual for c in cfgs} == {True, False}
    assert {f for c in cfgs for f in c.freeze} == {"rule", "x", "down", "up"}
    assert {1, 40} <= {c.m for c in cfgs} and sum(c.m > 128 for c in cfgs) >= 3


# ---------------------------------------------------------------------------------------------
# one A shared by the compacter/PHM weights of stacked adapters (like the layers of a model)

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_shared_rule_gradient_sums_over_layers(backend, dtype, poisoned):
    skip_unless_runnable(backend, dtype)
    n, D, m, r = 4, 36, 12, 2
    gen = torch.Generator().manual_seed(11)
    raw = {"x": randn(gen, (3, 7, D)), "A": randn(gen, (n, n, n), 0.5)}
    kinds = [("compacter", "compacter"), ("phm", "compacter"), ("compacter", "phm")]
    for layer, (kd, ku) in enumerate(kinds):
        for pre, kind, di, do in ((f"{layer}.down.", kd, D, m), (f"{layer}.up.", ku, m, D)):
            w = weight_leaves(pre, kind, di, do, n, r, gen, False)
            w.pop(pre + "A")
            raw.update(w)
        raw[f"{layer}.b_down"] = randn(gen, (m,), 0.5)
        raw[f"{layer}.b_up"] = randn(gen, (D,), 0.5)
    leaves = {k: v.to(DEVICE, dtype).requires_grad_() for k, v in raw.items()}
    dy = randn(gen, (3, 7, D)).to(DEVICE, dtype)

    def model(lv, op):
        h = lv["x"]
        for layer, (kd, ku) in enumerate(kinds):
            wd = make_weight(lv, f"{layer}.down.", kd, "A", False)
            wu = make_weight(lv, f"{layer}.up.", ku, "A", False)
            h = op(h, wd, lv[f"{layer}.b_down"], wu, lv[f"{layer}.b_up"], "gelu_new", add_input=True)
        return h

    kadapt.set_backend(backend)
    check_grads(lambda lv: model(lv, fused_adapter), lambda lv: model(lv, fused_adapter_reference), leaves, dy,
                dtype, f"{backend} {dtype}")
    if backend == "triton":
        assert poisoned


# ---------------------------------------------------------------------------------------------
# edge shapes

@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3, 5)])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_no_tokens(backend, lead, poisoned):
    skip_unless_runnable(backend, torch.float32)
    gen = torch.Generator().manual_seed(3)
    n, D, m = 2, 10, 6
    raw = {"x": randn(gen, (*lead, D)), "b_down": randn(gen, (m,)), "b_up": randn(gen, (D,))}
    raw.update(weight_leaves("down.", "compacter", D, m, n, 1, gen, False))
    raw.update(weight_leaves("up.", "dense", m, D, n, 1, gen, False))
    leaves = {k: v.to(DEVICE, torch.float32).requires_grad_() for k, v in raw.items()}
    wd = make_weight(leaves, "down.", "compacter", "down.A", False)
    wu = make_weight(leaves, "up.", "dense", "", False)
    kadapt.set_backend(backend)
    y = fused_adapter(leaves["x"], wd, leaves["b_down"], wu, leaves["b_up"], "swish", add_input=True)
    assert y.shape == leaves["x"].shape
    grads = torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))
    for (name, leaf), g in zip(leaves.items(), grads):
        assert g.shape == leaf.shape and not g.any(), name


# ---------------------------------------------------------------------------------------------
# dispatch

def _small(dtype=torch.float32, device="cpu", m=6, D=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, (3, 4, D)).to(device, dtype)
    return (x, randn(gen, (D, m), D ** -0.5).to(device, dtype), randn(gen, (m,)).to(device, dtype),
            randn(gen, (m, D), m ** -0.5).to(device, dtype), randn(gen, (D,)).to(device, dtype))


def test_auto_on_cpu_tensors_is_the_reference():
    x, wd, bd, wu, bu = _small()
    res = torch.randn_like(x)
    for args in [(x, wd, bd, wu, bu, "gelu_new"), (x, wd, bd, wu, bu, "relu", res, True)]:
        assert torch.equal(fused_adapter(*args), fused_adapter_reference(*args))
    assert backends.resolve("fused_adapter", x) == "reference"


def test_forced_cuda_on_cpu_tensors_raises():
    kadapt.set_backend("cuda")
    with pytest.raises(RuntimeError, match="'cuda' is forced.*not CUDA tensors"):
        fused_adapter(*_small(), "gelu_new")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(3, 4)
    kadapt.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'triton' is forced.*TRITON_INTERPRET=1"):
        backends.resolve("fused_adapter", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backends.triton_importable():
        assert backends.resolve("fused_adapter", x) == "triton"
    kadapt.set_backend("auto")
    assert backends.resolve("fused_adapter", x) == "reference"  # auto never interprets CPU tensors


def forced_backends_here() -> list[str]:
    """The fused backends that this machine can force (on some tensors)."""
    return [b for b in FUSED_BACKENDS
            if (b == "triton" and backends.triton_importable() and (GPU or backends.triton_interpret()))
            or (b == "cuda" and GPU and backends.cuda_extension_built())]


def test_mixed_dtypes_raise_naming_the_field():
    x, wd, bd, wu, bu = _small(device=DEVICE)
    args = (x, wd.double(), bd, wu.double(), bu, "gelu_new")  # weights fp64, x fp32
    for backend in ["auto", "reference"] + forced_backends_here():
        kadapt.set_backend(backend)
        with pytest.raises(ValueError, match="has dtype torch.float64 but x has torch.float32"):
            fused_adapter(*args)


def test_bottleneck_beyond_the_kernels():
    x, wd, bd, wu, bu = _small(device=DEVICE, m=257)
    args = (x, wd, bd, wu, bu, "relu")
    assert torch.equal(fused_adapter(*args), fused_adapter_reference(*args))
    for backend in forced_backends_here():
        kadapt.set_backend(backend)
        with pytest.raises(RuntimeError, match="m=257 exceeds"):
            fused_adapter(*args)


# ---------------------------------------------------------------------------------------------
# bad inputs: ValueError naming the field, whatever the backend (checked before dispatch)

def _bad_inputs():
    x, wd, bd, wu, bu = _small()
    A, s, t = torch.randn(2, 2, 2), torch.randn(2, 5, 1), torch.randn(2, 1, 3)
    return {
        "act": ((x, wd, bd, wu, bu, "tanh"), "act='tanh' is not allowed"),
        "w_down vs D": ((x, torch.randn(11, 6), bd, wu, bu), r"w_down must map D=10"),
        "w_down 3-D": ((x, torch.randn(10, 6, 1), bd, wu, bu), r"w_down must be a 2-D"),
        "w_up": ((x, wd, bd, torch.randn(6, 9), bu), r"w_up must be \(6, 10\)"),
        "w_up vs m": ((x, wd, bd, torch.randn(5, 10), bu), r"w_up must be \(6, 10\)"),
        "b_down": ((x, wd, torch.randn(7), wu, bu), r"b_down must have shape \(6,\)"),
        "b_up": ((x, wd, bd, wu, torch.randn(10, 1)), r"b_up must have shape \(10,\)"),
        "residual": ((x, wd, bd, wu, bu, "gelu_new", x[:2]), "residual shape"),
        "tensor count": ((x, AdapterWeight("compacter", (A, s)), bd, wu, bu),
                         "w_down: a compacter weight has 3 factor tensors, got 2"),
        "kind": ((x, wd, bd, AdapterWeight("kron", (wu,)), bu), "w_up.kind='kron' is not allowed"),
        "factor dims": ((x, AdapterWeight.lowrank(torch.randn(10), torch.randn(1, 6)), bd, wu, bu),
                        r"w_down.tensors\[0\] of a lowrank weight must be a 2-D"),
        "rule shape": ((x, AdapterWeight.phm(torch.randn(2, 2, 3), torch.randn(2, 5, 3)), bd, wu, bu),
                       r"w_down: the PHM rule A must be \(n, n, n\)"),
        "factor n": ((x, AdapterWeight.compacter(A, torch.randn(3, 5, 1), t), bd, wu, bu),
                     "w_down: every factor's first dim must be n=2"),
        "ranks": ((x, AdapterWeight.compacter(A, s, torch.randn(2, 2, 3)), bd, wu, bu),
                  "w_down: compacter factors s .* differ in rank"),
    }


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cuda"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error(case, backend):
    args, match = _bad_inputs()[case]
    kadapt.set_backend(backend)
    with pytest.raises(ValueError, match=match):
        fused_adapter(*args)


# ---------------------------------------------------------------------------------------------
# torch.compile (fullgraph) of the Triton-backed op: same forward and gradients as eager

COMPILE_CONFIGS = {
    "compacter-phm-shared-A": Config(
        index=5, lead=(2, 5), D=12, m=6, n=2, down="compacter", up="phm", r_down=2, r_up=1, shared_rule=True,
        act="gelu_new", add_input=True, residual=True, x_layout="transposed", res_layout="contiguous",
        dense_transposed=(False, False), freeze=(), rule_fp32=False),
    "lowrank-dense": Config(
        index=6, lead=(7,), D=11, m=5, n=1, down="lowrank", up="dense", r_down=2, r_up=1, shared_rule=False,
        act="swish", add_input=False, residual=False, x_layout="sliced", res_layout="contiguous",
        dense_transposed=(False, True), freeze=(), rule_fp32=False),
}


@pytest.mark.parametrize("name", list(COMPILE_CONFIGS) + ["residual-is-x"])
def test_compiles_fullgraph_with_triton(name, poisoned, monkeypatch):
    """torch.compile traces the one autograd.Function of the op, whose forward and backward call the custom
    ops kadapt::fused_adapter / kadapt::fused_adapter_backward: the same forward and gradients as eager (which
    the sweep checks against float64), with the factor gradients from the same Triton kernel in both modes."""
    skip_unless_runnable("triton", torch.float32)
    from kadapt.ops.triton import fused_adapter as kernels

    torch._dynamo.reset()
    cfg = COMPILE_CONFIGS[name if name in COMPILE_CONFIGS else "lowrank-dense"]
    leaves, build, dy = make_case(cfg, torch.float32, DEVICE)
    names = list(leaves)

    def f(*tensors):
        x, wd, bd, wu, bu, res = build(dict(zip(names, tensors)))
        if name == "residual-is-x":  # one tensor in two roles: Dynamo takes it only passed once
            res = x
        return fused_adapter(x, wd, bd, wu, bu, cfg.act, residual=res, add_input=cfg.add_input)

    factor_grad_calls = []
    real_factor_grads = kernels.kron_factor_grads
    monkeypatch.setattr(kernels, "kron_factor_grads",
                        lambda *a: factor_grad_calls.append(1) or real_factor_grads(*a))
    kadapt.set_backend("triton")
    y_eager = f(*leaves.values())
    g_eager = torch.autograd.grad(y_eager, list(leaves.values()), dy)
    calls, eager_factor_grads = len(poisoned), len(factor_grad_calls)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    y = compiled(*leaves.values())
    g = torch.autograd.grad(y, list(leaves.values()), dy)
    assert len(poisoned) > calls, "the compiled function did not run the Triton kernels"
    assert len(factor_grad_calls) == 2 * eager_factor_grads, "eager and compiled factor gradients differ in kind"
    if "compacter" in name:
        assert eager_factor_grads == 2  # one Triton launch per Kronecker projection, in both modes
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for leaf, a, b in zip(names, g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, leaf=leaf: f"d{leaf}: {m}")
