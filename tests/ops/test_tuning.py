"""kadapt/ops/tuning.py: the per-architecture tables of Triton launch configurations, their validation, the
defaults, the launchers honouring a table entry (Triton in its interpreter on the CPU), and the dry-run sweep of
scripts/tune_triton.py writing a table the library accepts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kadapt
from kadapt import backends
from kadapt.info import info
from kadapt.ops import AdapterWeight, fused_adapter, fused_adapter_reference, inducer_attention, tuning
from kadapt.ops import inducer_attention_reference

ROOT = Path(__file__).resolve().parents[2]
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ARCH = "sm_test"  # tables of a made-up architecture, in a temporary TABLE_DIR

ADAPTER_BUCKET = {"down": "dense", "up": "dense", "bm": 16, "dtype": "32bit"}
ATTN_BUCKET = {"dtype": "32bit", "bd": 16, "bias": False, "dropout": False}


def needs_kernels():
    if not backends.triton_importable():
        pytest.skip("triton is not installed")
    if not GPU and not backends.triton_interpret():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set by tests/conftest.py)")


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """An empty TABLE_DIR and no cached lookups before and after every test."""
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path / "tables")
    monkeypatch.delenv("KADAPT_TUNING", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


def make_table(kernels: dict, arch: str = ARCH, **header) -> dict:
    return {"format": 1, "arch": arch, "device": "test GPU", "date": "2026-01-01", "kernels": kernels, **header}


def install(data: dict, monkeypatch, arch: str = ARCH) -> Path:
    """Write ``data`` as the table of ``arch`` and make every device look like that architecture."""
    path = tuning.table_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    monkeypatch.setattr(tuning, "device_arch", lambda device: arch)
    tuning.clear_cache()
    return path


def entry(bucket: dict, config: dict, **extra) -> dict:
    return {"bucket": bucket, "config": config, **extra}


# ---------------------------------------------------------------------------------------------
# loading and validation

def test_shipped_tables_are_valid():
    """Every table in the package loads (a committed table must never break the ops on its GPU)."""
    shipped = Path(tuning.__file__).resolve().parent / "tuning_tables"  # absent from a wheel until a table exists
    for path in shipped.glob("*.json"):
        table = tuning.load_table(path)
        assert table.arch == path.stem and len(table) > 0, path


def test_a_valid_table_loads(tmp_path):
    data = make_table({
        "fused_adapter_fwd": [entry(ADAPTER_BUCKET, {"BT": 16, "BK": 64, "num_warps": 2, "num_stages": 3},
                                    us=10.5, default_us=12.0)],
        "inducer_attention_fwd": [entry({**ATTN_BUCKET, "mlp": True, "L": 1024}, {"BM": 128, "BN": 64,
                                                                                  "num_warps": 8})],
        "fastfood_schedule": [entry({}, {"TR": 64, "TC": 64, "RO": 32, "OC": 64})]})
    path = tmp_path / f"{ARCH}.json"
    path.write_text(json.dumps(data))
    table = tuning.load_table(path)
    assert len(table) == 3 and table.arch == ARCH and table.meta["device"] == "test GPU"
    assert table.entries["fused_adapter_fwd"] == [(ADAPTER_BUCKET, {"BT": 16, "BK": 64, "num_warps": 2,
                                                                    "num_stages": 3})]


GOOD = entry(ADAPTER_BUCKET, {"BT": 32, "BK": 128, "num_warps": 4})


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["config"].update(BX=16),
     "kernels.fused_adapter_fwd[0].config", "unknown key 'BX'"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["config"].update(BT=48),
     "kernels.fused_adapter_fwd[0].config", "BT=48 is not a power of two"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["config"].update(BK=8),
     "kernels.fused_adapter_fwd[0].config", "BK=8 is not a power of two in [16"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["config"].pop("num_warps"),
     "kernels.fused_adapter_fwd[0].config", "missing 'num_warps'"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["config"].update(num_warps=3),
     "kernels.fused_adapter_fwd[0].config", "num_warps=3"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["config"].update(num_stages=0),
     "kernels.fused_adapter_fwd[0].config", "num_stages=0"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["bucket"].update(bm=24),
     "kernels.fused_adapter_fwd[0].bucket.bm", "24 is not a power of two"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["bucket"].update(down="kron"),
     "kernels.fused_adapter_fwd[0].bucket.down", "'kron' is not one of"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0]["bucket"].pop("dtype"),
     "kernels.fused_adapter_fwd[0].bucket", "exactly the fields"),
    (lambda d: d["kernels"]["fused_adapter_fwd"][0].update(speed=1),
     "kernels.fused_adapter_fwd[0].speed", "unknown key"),
    (lambda d: d["kernels"]["fused_adapter_fwd"].append(dict(GOOD)),
     "kernels.fused_adapter_fwd[1].bucket", "duplicates"),
    (lambda d: d["kernels"].update(flash_attention=[]), "kernels.flash_attention", "unknown kernel"),
    (lambda d: d.update(arch="sm_80"), "arch", "does not match the file name"),
    (lambda d: d.update(format=2), "format", "must be 1"),
    (lambda d: d.update(owner="me"), "owner", "unknown key"),
    (lambda d: d["kernels"].update(fastfood_schedule=[entry({}, {"TR": 128, "TC": 128, "RO": 64, "OC": 64})]),
     "kernels.fastfood_schedule[0].config", "TR·TC and RO·OC <="),
])
def test_a_bad_entry_raises_naming_the_file_and_the_field(tmp_path, mutate, field, words):
    data = json.loads(json.dumps(make_table({"fused_adapter_fwd": [GOOD]})))
    mutate(data)
    path = tmp_path / f"{ARCH}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(tuning.TuningTableError) as exc:
        tuning.load_table(path)
    msg = str(exc.value)
    assert str(path) in msg and f": {field}: " in msg and words in msg, msg


def test_unreadable_table_raises(tmp_path):
    path = tmp_path / f"{ARCH}.json"
    path.write_text("{not json")
    with pytest.raises(tuning.TuningTableError, match="cannot be read"):
        tuning.load_table(path)


def test_a_bad_table_in_force_fails_the_launch_clearly(monkeypatch):
    data = make_table({"fused_adapter_fwd": [entry(ADAPTER_BUCKET, {"BT": 48, "BK": 128, "num_warps": 4})]})
    path = install(data, monkeypatch)
    with pytest.raises(tuning.TuningTableError, match=f"{path}.*BT=48"):
        tuning.launch_config("fused_adapter_fwd", DEVICE, down="dense", up="dense", bm=16, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when asked: the report of a compiled-kernel machine
    assert tuning.status(torch.device("cuda", 0)).startswith(f"INVALID table for {ARCH}")


# ---------------------------------------------------------------------------------------------
# lookup

def test_no_table_means_the_defaults(monkeypatch):
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_99")  # no sm_99.json in the empty TABLE_DIR
    cfg = tuning.launch_config("fused_adapter_fwd", DEVICE, down="dense", up="dense", bm=64, dtype=torch.bfloat16)
    assert cfg == {"BT": 32, "BK": 128, "num_warps": 4}
    assert tuning.launch_config("fused_adapter_bwd", DEVICE, down="lowrank", up="lowrank", bm=128,
                                dtype=torch.float16) == {"BT": 64, "BK": 64, "num_warps": 8}
    assert tuning.config_source("fused_adapter_fwd", DEVICE, down="dense", up="dense", bm=64,
                                dtype=torch.bfloat16) == "default"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "no table for sm_99" in tuning.status(torch.device("cuda", 0))


def test_cpu_and_interpreter_never_read_a_table(monkeypatch):
    real = tuning.device_arch  # None on the CPU and under TRITON_INTERPRET
    install(make_table({"inducer_attention_keep_mask": [entry({}, {"BM": 64, "BN": 64, "num_warps": 8})]}),
            monkeypatch)
    monkeypatch.setattr(tuning, "device_arch", real)
    assert tuning.device_arch(torch.device("cpu")) is None
    assert tuning.launch_config("inducer_attention_keep_mask", torch.device("cpu")) == {"BM": 16, "BN": 16,
                                                                                         "num_warps": 4}
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert tuning.device_arch(torch.device("cuda", 0)) is None


def test_table_entries_match_by_bucket(monkeypatch):
    fwd = [entry({**ATTN_BUCKET, "mlp": True, "L": 1024}, {"BM": 128, "BN": 64, "num_warps": 4}),
           entry({**ATTN_BUCKET, "mlp": True, "L": 4096}, {"BM": 128, "BN": 128, "num_warps": 8})]
    install(make_table({"inducer_attention_fwd": fwd,
                        "fused_adapter_fwd": [entry(ADAPTER_BUCKET, {"BT": 16, "BK": 64, "num_warps": 2})]}),
            monkeypatch)

    def attn(L, **kw):
        bucket = {"dtype": torch.float32, "bd": 16, "bias": False, "dropout": False, "mlp": True, "L": L, **kw}
        return tuning.launch_config("inducer_attention_fwd", DEVICE, **bucket)["BN"]

    # lengths by the nearest power of two (a tie goes to the larger); every other field exactly
    assert [attn(L) for L in (24, 1000, 1500, 2048, 3000, 100_000)] == [64, 64, 64, 128, 128, 128]
    default = tuning.SPECS["inducer_attention_fwd"].default(GPU, **{**ATTN_BUCKET, "mlp": True, "L": 1024})
    assert attn(1024, bias=True) == attn(1024, mlp=False) == default["BN"]  # no entry for these variants
    assert tuning.launch_config("inducer_attention_fwd", DEVICE, dtype=torch.bfloat16, bd=16, bias=False,
                                dropout=False, mlp=True, L=1024) == default  # 16-bit: no entry either
    got = tuning.launch_config("fused_adapter_fwd", DEVICE, down="dense", up="dense", bm=16, dtype=torch.float32)
    assert got == {"BT": 16, "BK": 64, "num_warps": 2}
    assert tuning.config_source("fused_adapter_fwd", DEVICE, down="dense", up="dense", bm=16,
                                dtype=torch.float32).startswith("table ")
    monkeypatch.setenv("KADAPT_TUNING", "0")
    tuning.clear_cache()
    assert tuning.launch_config("fused_adapter_fwd", DEVICE, down="dense", up="dense", bm=16,
                                dtype=torch.float32) == {"BT": 32, "BK": 128, "num_warps": 4}


def test_wrong_bucket_fields_are_refused():
    with pytest.raises(TypeError, match="bucket fields"):
        tuning.launch_config("fused_adapter_fwd", DEVICE, bm=16, dtype=torch.float32)
    with pytest.raises(KeyError, match="unknown Triton kernel"):
        tuning.launch_config("flash_fwd", DEVICE)


def test_override_is_checked_and_restored():
    with pytest.raises(tuning.TuningTableError, match="override of kron_weight: BR=24"):
        with tuning.override({"kron_weight": {"BR": 24, "BC": 32, "num_warps": 4}}):
            pass
    with tuning.override({"kron_weight": {"BR": 16, "BC": 16, "num_warps": 2}}):
        assert tuning.launch_config("kron_weight", DEVICE, kind="phm", dtype=torch.float32)["BR"] == 16
        assert tuning.config_source("kron_weight", DEVICE, kind="phm", dtype=torch.float32) == "override"
    assert "kron_weight" not in tuning.OVERRIDES
    assert tuning.launch_config("kron_weight", DEVICE, kind="phm", dtype=torch.float32)["BR"] == 32


def test_info_names_the_table_in_force(monkeypatch):
    path = install(make_table({"fused_adapter_fwd": [GOOD]}), monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when asked: the report of a compiled-kernel machine
    line = tuning.status(torch.device("cuda", 0))
    assert f"{ARCH} table {path} (1 entries; test GPU, 2026-01-01)" == line
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_98")
    assert "no table for sm_98" in tuning.status(torch.device("cuda", 0))
    assert "\ntuning:       " in info()


# ---------------------------------------------------------------------------------------------
# the launchers honour a table entry

class Spy:
    """Stands in for a Triton kernel object: records each launch's grid and keyword arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_fused_adapter_runs_the_tuned_config(monkeypatch):
    needs_kernels()
    from kadapt.ops.triton import fused_adapter as K

    tuned = {"BT": 16, "BK": 64, "num_warps": 2}  # the default is BT 32, BK 128
    bucket = {**ADAPTER_BUCKET, "dtype": tuning.dtype_class(torch.float32)}
    install(make_table({"fused_adapter_fwd": [entry(bucket, tuned)]}), monkeypatch)
    spy = Spy(K._fused_adapter_fwd_kernel)
    monkeypatch.setattr(K, "_fused_adapter_fwd_kernel", spy)
    g = torch.Generator().manual_seed(0)
    T, D, m = 40, 80, 12  # neither a multiple of the tiles
    x = torch.randn(T, D, generator=g).to(DEVICE)
    wd, wu = (torch.randn(D, m, generator=g) * 0.1).to(DEVICE), (torch.randn(m, D, generator=g) * 0.1).to(DEVICE)
    bd, bu = torch.randn(m, generator=g).to(DEVICE), torch.randn(D, generator=g).to(DEVICE)
    kadapt.set_backend("triton")
    try:
        y = fused_adapter(x, AdapterWeight.dense(wd), bd, AdapterWeight.dense(wu), bu, add_input=True)
    finally:
        kadapt.set_backend("auto")
    ((grid, kwargs),) = spy.launches
    assert grid == (3,) and {k: kwargs[k] for k in tuned} == tuned and kwargs["BM"] == 16
    ref = fused_adapter_reference(x, wd, bd, wu, bu, add_input=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_attention_backward_runs_the_tuned_configs(monkeypatch):
    needs_kernels()
    from kadapt.ops.triton import inducer_attention as A

    dkdv = {"BM": 32, "BN": 16, "num_warps": 2}  # the interpreter default is 16 x 16
    dq = {"BM": 16, "BN": 32, "num_warps": 4, "num_stages": 2}
    L = 40
    install(make_table({"inducer_attention_bwd_dkdv": [entry({**ATTN_BUCKET, "L": 64}, dkdv)],
                        "inducer_attention_bwd_dq": [entry({**ATTN_BUCKET, "mlp": True, "L": 32}, dq)]}),
            monkeypatch)
    spies = {name: Spy(getattr(A, name)) for name in ("_bwd_dkdv", "_bwd_dq")}
    for name, spy in spies.items():
        monkeypatch.setattr(A, name, spy)
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(1, 2, L, 16, generator=g) for _ in range(3)]
    leaves += [torch.randn(*s, generator=g) * 0.1 for s in ((2, 16, 4), (2, 4), (2, 4, 16), (2, 16))]
    leaves = [t.to(DEVICE).requires_grad_() for t in leaves]
    kadapt.set_backend("triton")
    try:
        o, lse, w = inducer_attention(*leaves, causal=True)
        grads = torch.autograd.grad((o * o).sum() + w.sum(), leaves)
    finally:
        kadapt.set_backend("auto")
    ((grid_kv, kw_kv),) = spies["_bwd_dkdv"].launches
    ((grid_q, kw_q),) = spies["_bwd_dq"].launches
    assert grid_kv == (3, 2) and {k: kw_kv[k] for k in dkdv} == dkdv  # cdiv(40, BN=16) key tiles
    assert grid_q == (3, 2) and {k: kw_q[k] for k in dq} == dq  # cdiv(40, BM=16) query tiles
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    o_r, _, w_r = inducer_attention_reference(*ref, causal=True)
    grads_r = torch.autograd.grad((o_r * o_r).sum() + w_r.sum(), ref)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the sweep

def test_dry_run_sweep_writes_a_valid_table(tmp_path):
    """scripts/tune_triton.py --dry-run (Triton's interpreter, tiny shapes, 2 candidates) end to end: checks, timing,
    a table the library loads, the summary; the check record is reused by a second run."""
    needs_kernels()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KADAPT_TUNING", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "tune_triton.py"), "--dry-run", "--out", str(tmp_path),
           "--kernels", "fused_adapter_fwd", "inducer_attention_bwd_dq", "--checks", str(tmp_path / "checks.jsonl"),
           "--summary", str(tmp_path / "summary.md")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = tuning.load_table(tmp_path / "cpu.json")
    assert set(table.entries) == {"fused_adapter_fwd", "inducer_attention_bwd_dq"}
    (bucket, cfg), = table.entries["fused_adapter_fwd"]
    assert bucket == ADAPTER_BUCKET and set(cfg) >= {"BT", "BK", "num_warps"}
    assert table.entries["inducer_attention_bwd_dq"][0][0] == {**ATTN_BUCKET, "mlp": True, "L": 24}
    assert "checks: 4/4 passed" in proc.stdout
    assert "| fused_adapter_fwd | down=dense up=dense bm=16 dtype=32bit | T=40 D=32 m=16 | 2/2 |" in \
        (tmp_path / "summary.md").read_text()
    assert len((tmp_path / "checks.jsonl").read_text().splitlines()) == 4
    again = subprocess.run([*cmd, "--check-only"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0 and "4 check results reused" in again.stdout, again.stdout[-2000:]
