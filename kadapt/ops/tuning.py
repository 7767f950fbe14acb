"""Launch configurations (tile sizes, num_warps, num_stages) of the Triton kernels, tuned per GPU architecture.

Every Triton launch in kadapt/ops/triton/ asks ``launch_config(kernel, device, **bucket)`` for its configuration,
which comes from, in order:

1. ``OVERRIDES[kernel]`` when set: tests force small tiles this way, and scripts/tune_triton.py its candidates;
2. on a CUDA device (not under TRITON_INTERPRET, not with KADAPT_TUNING=0), the table of the device's
   architecture, ``tuning_tables/sm_<major><minor>.json`` next to this file (written by scripts/tune_triton.py,
   which keeps only candidates that compiled and matched the reference): the entry of this kernel whose bucket
   matches, the fields of ``KernelSpec.numeric`` (sequence lengths) by the nearest power of two, every other
   field exactly, so a configuration is only used for the kernel variant (dtype width, constexpr switches) it
   was compiled and checked for;
3. else the kernel's default (``SPECS`` below: the hand-picked configurations, valid on every GPU; the
   interpreter ones are small so that the tiny test shapes span several tiles).

Results are cached per (kernel, device, bucket), so a launch pays one dict lookup. The dict returned is shared:
pass it as ``**config`` to the launch, never modify it.

Table format (JSON; ``load_table`` validates it and raises ``TuningTableError`` naming the file and the field):

    {"format": 1, "arch": "sm_90", "device": "NVIDIA H200", "triton": "3.8.0", "torch": "...", "commit": "...",
     "date": "...", "command": "...",
     "kernels": {"fused_adapter_fwd": [{"bucket": {"down": "dense", "up": "dense", "bm": 64, "dtype": "16bit"},
                                        "config": {"BT": 32, "BK": 128, "num_warps": 4, "num_stages": 3},
                                        "us": 11.9, "default_us": 12.4}, ...], ...}}

A config holds every tile parameter of its kernel (powers of two, 16 to 4096) and ``num_warps`` (1 to 32; not
for ``fastfood_schedule``, which is not a launch); ``num_stages`` (1 to 8) is optional (Triton's default
otherwise). ``us`` / ``default_us`` (the tuned and the default time at the bucket's shape) are informational.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kadapt.ops.weights import WEIGHT_KINDS

FORMAT = 1
TABLE_DIR = Path(__file__).resolve().parent / "tuning_tables"
Config = dict[str, int]

_WARPS = (1, 2, 4, 8, 16, 32)
_MIN_TILE, _MAX_TILE = 16, 4096  # tl.dot needs every dim >= 16 on a GPU
_MAX_STAGES = 8
_ENTRY_KEYS = {"bucket", "config", "us", "default_us"}
_HEADER_KEYS = {"format", "arch", "device", "triton", "torch", "commit", "date", "command", "kernels"}


class TuningTableError(ValueError):
    """A tuning table (or an override) that cannot be used: the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# kernels: tunable parameters, bucket fields, defaults

def _pow2(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


# bucket field -> (check of a table value, description for the error message)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "down": (lambda v: v in WEIGHT_KINDS, f"one of {', '.join(WEIGHT_KINDS)}"),
    "up": (lambda v: v in WEIGHT_KINDS, f"one of {', '.join(WEIGHT_KINDS)}"),
    "kind": (lambda v: v in WEIGHT_KINDS, f"one of {', '.join(WEIGHT_KINDS)}"),
    "dtype": (lambda v: v in ("16bit", "32bit", "64bit"), "'16bit', '32bit' or '64bit'"),
    "bm": (_pow2, "a power of two"),
    "bf": (_pow2, "a power of two"),
    "bd": (_pow2, "a power of two"),
    "tile": (_pow2, "a power of two"),
    "L": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "mlp": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (lambda v: isinstance(v, bool), "true or false"),
}


@dataclass(frozen=True)
class KernelSpec:
    """One tunable launch: its tile parameters (constexprs), its bucket fields and its default config."""

    tiles: tuple[str, ...]
    bucket: tuple[str, ...]
    default: Callable[..., Config]  # (on_gpu, **bucket) -> config
    numeric: tuple[str, ...] = ()  # bucket fields matched by the nearest power of two
    warps: bool = True  # a launch: num_warps required, num_stages allowed
    check: Callable[[Config], str | None] | None = field(default=None)  # extra constraint: None or the problem


def _adapter_default(on_gpu: bool, *, down: str, up: str, bm: int, dtype: str) -> Config:
    # Best of a BT×BK×warps sweep on an H100 (T=8192, D=1024, m=64, bf16) for bm <= 64; wider bottlenecks
    # trade BT and BK for the larger h tile held in registers. The interpreter runs the same tiles.
    if bm <= 64:
        return {"BT": 32, "BK": 128, "num_warps": 4}
    if bm <= 128:
        return {"BT": 64, "BK": 64, "num_warps": 8}
    return {"BT": 64, "BK": 32, "num_warps": 8}


def _kron_weight_default(on_gpu: bool, *, kind: str, dtype: str) -> Config:
    return {"BR": 32, "BC": 32, "num_warps": 4}


def _factor_grads_default(on_gpu: bool, *, kind: str, bf: int, dtype: str) -> Config:
    # BF (the short side of a block, held whole) is fixed by the shape; BC rows per step keep BC·BF <= 4096.
    return {"BC": max(16, min(64, 4096 // bf)), "num_warps": 4}


def _attention_tiles(on_gpu: bool, bd: int) -> Config:
    # FA2-typical GPU tiles; the interpreter uses 16×16 so that the tiny test shapes span several tiles.
    if not on_gpu:
        return {"BM": 16, "BN": 16, "num_warps": 4}
    return {"BM": 64, "BN": 64 if bd <= 64 else 32, "num_warps": 4}


def _attention_default(on_gpu: bool, *, dtype: str, bd: int, L: int, bias: bool, dropout: bool,
                       mlp: bool = False) -> Config:
    return _attention_tiles(on_gpu, bd)


def _preprocess_default(on_gpu: bool, *, dtype: str, bd: int) -> Config:
    return {"BM": _attention_tiles(on_gpu, bd)["BM"], "num_warps": 4}


def _keep_mask_default(on_gpu: bool) -> Config:
    return _attention_tiles(on_gpu, 16)


def _fastfood_schedule_default(on_gpu: bool) -> Config:
    # GPU: inner tile T = TR·TC = 2^13 (tl.dot needs every dim >= 16); the interpreter's T = 32 makes small tests
    # run one to three outer levels.
    if on_gpu:
        return {"TR": 64, "TC": 128, "RO": 64, "OC": 64}
    return {"TR": 4, "TC": 8, "RO": 4, "OC": 4}


def _fastfood_pass_default(on_gpu: bool, *, tile: int) -> Config:
    return {"num_warps": (8 if tile >= 8192 else 4) if on_gpu else 1}


def _fastfood_reduce_default(on_gpu: bool) -> Config:
    return {"BJ": 256, "num_warps": 4}


def _fastfood_schedule_check(cfg: Config) -> str | None:
    from kadapt.ops.fastfood import CUDA_MAX_TILE  # the CUDA kernel runs the same schedule

    if cfg["RO"] < 2 or cfg["OC"] > cfg["TR"] * cfg["TC"]:
        return "needs RO >= 2 and OC <= TR·TC"
    if cfg["TR"] * cfg["TC"] > CUDA_MAX_TILE or cfg["RO"] * cfg["OC"] > CUDA_MAX_TILE:
        return f"needs TR·TC and RO·OC <= {CUDA_MAX_TILE} (the CUDA kernel runs the same schedule)"
    return None


_ATTN = ("dtype", "bd", "L", "bias", "dropout")
SPECS: dict[str, KernelSpec] = {
    # kadapt/ops/triton/fused_adapter.py (BM = next_pow2(max(m, 16)) is the bucket's bm, not tuned)
    "fused_adapter_fwd": KernelSpec(("BT", "BK"), ("down", "up", "bm", "dtype"), _adapter_default),
    "fused_adapter_bwd": KernelSpec(("BT", "BK"), ("down", "up", "bm", "dtype"), _adapter_default),
    "kron_weight": KernelSpec(("BR", "BC"), ("kind", "dtype"), _kron_weight_default),
    "kron_factor_grads": KernelSpec(("BC",), ("kind", "bf", "dtype"), _factor_grads_default),
    # kadapt/ops/triton/inducer_attention.py (L = Tk; BD, BMK follow d and m_k)
    "inducer_attention_fwd": KernelSpec(("BM", "BN"), (*_ATTN, "mlp"), _attention_default, numeric=("L",)),
    "inducer_attention_bwd_preprocess": KernelSpec(("BM",), ("dtype", "bd"), _preprocess_default),
    "inducer_attention_bwd_dkdv": KernelSpec(("BM", "BN"), _ATTN, _attention_default, numeric=("L",)),
    "inducer_attention_bwd_dq": KernelSpec(("BM", "BN"), (*_ATTN, "mlp"), _attention_default, numeric=("L",)),
    "inducer_attention_keep_mask": KernelSpec(("BM", "BN"), (), _keep_mask_default),
    # kadapt/ops/triton/fastfood.py (the schedule's tiles; the passes' warps by tile size)
    "fastfood_schedule": KernelSpec(("TR", "TC", "RO", "OC"), (), _fastfood_schedule_default, warps=False,
                                    check=_fastfood_schedule_check),
    "fastfood_inner": KernelSpec((), ("tile",), _fastfood_pass_default),
    "fastfood_outer": KernelSpec((), ("tile",), _fastfood_pass_default),
    "fastfood_reduce": KernelSpec(("BJ",), (), _fastfood_reduce_default),
}

# Forced configs by kernel name, ahead of tables and defaults. Tests set them with monkeypatch.setitem (unchecked);
# ``override`` checks them.
OVERRIDES: dict[str, Config] = {}


def dtype_class(dtype: torch.dtype | str) -> str:
    """The ``dtype`` bucket value: fp16 and bf16 share tiles ("16bit"), fp32 ("32bit") and fp64 have their own."""
    if isinstance(dtype, str):
        return dtype
    return f"{torch.finfo(dtype).bits}bit"


# ---------------------------------------------------------------------------------------------
# validation and loading

def _config_problem(spec: KernelSpec, cfg: Any) -> str | None:
    """Why ``cfg`` is not a valid config of ``spec`` (None when it is)."""
    if not isinstance(cfg, dict):
        return f"must be an object, got {type(cfg).__name__}"
    allowed = set(spec.tiles) | ({"num_warps", "num_stages"} if spec.warps else set())
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        return f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
    missing = [k for k in (*spec.tiles, *(["num_warps"] if spec.warps else [])) if k not in cfg]
    if missing:
        return f"missing {missing[0]!r}"
    for k in spec.tiles:
        v = cfg[k]
        if not _pow2(v) or not _MIN_TILE <= v <= _MAX_TILE:
            return f"{k}={v!r} is not a power of two in [{_MIN_TILE}, {_MAX_TILE}]"
    if spec.warps and cfg["num_warps"] not in _WARPS:
        return f"num_warps={cfg['num_warps']!r} is not one of {_WARPS}"
    stages = cfg.get("num_stages")
    if stages is not None and (not isinstance(stages, int) or isinstance(stages, bool)
                               or not 1 <= stages <= _MAX_STAGES):
        return f"num_stages={stages!r} is not an integer in [1, {_MAX_STAGES}]"
    return spec.check(cfg) if spec.check else None


def check_config(kernel: str, cfg: Mapping[str, int], where: str = "config") -> Config:
    """``cfg`` as a plain dict if it is a valid config of ``kernel``, else TuningTableError naming ``where``."""
    spec = SPECS.get(kernel)
    if spec is None:
        raise TuningTableError(f"{where}: unknown kernel {kernel!r} (known: {', '.join(SPECS)})")
    cfg = dict(cfg)
    problem = _config_problem(spec, cfg)
    if problem:
        raise TuningTableError(f"{where}: {problem}")
    return cfg


@dataclass(frozen=True)
class Table:
    """A validated tuning table: ``entries[kernel]`` = [(bucket, config), ...]; ``meta`` its header fields."""

    path: Path
    arch: str
    meta: dict[str, Any]
    entries: dict[str, list[tuple[dict[str, Any], Config]]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


def parse_table(data: Any, path: str | Path) -> Table:
    """Validate the decoded JSON ``data`` of the table file ``path`` (TuningTableError naming the field)."""
    path = Path(path)

    def fail(where: str, problem: str) -> TuningTableError:
        return TuningTableError(f"tuning table {path}: {where}: {problem}")

    if not isinstance(data, dict):
        raise fail("top level", f"must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - _HEADER_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (allowed: {', '.join(sorted(_HEADER_KEYS))})")
    if data.get("format") != FORMAT:
        raise fail("format", f"must be {FORMAT}, got {data.get('format')!r}")
    arch = data.get("arch")
    if not isinstance(arch, str) or arch != path.stem:
        raise fail("arch", f"{arch!r} does not match the file name {path.name!r} (<arch>.json)")
    kernels = data.get("kernels")
    if not isinstance(kernels, dict):
        raise fail("kernels", "must be an object {kernel: [entries]}")
    entries: dict[str, list[tuple[dict[str, Any], Config]]] = {}
    for kernel, rows in kernels.items():
        spec = SPECS.get(kernel)
        if spec is None:
            raise fail(f"kernels.{kernel}", f"unknown kernel (known: {', '.join(SPECS)})")
        if not isinstance(rows, list):
            raise fail(f"kernels.{kernel}", "must be a list of entries")
        seen = set()
        for i, row in enumerate(rows):
            where = f"kernels.{kernel}[{i}]"
            if not isinstance(row, dict):
                raise fail(where, "must be an object")
            extra = sorted(set(row) - _ENTRY_KEYS)
            if extra:
                raise fail(f"{where}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
            bucket = row.get("bucket")
            if not isinstance(bucket, dict) or set(bucket) != set(spec.bucket):
                raise fail(f"{where}.bucket", f"must have exactly the fields {list(spec.bucket)}, got "
                                              f"{sorted(bucket) if isinstance(bucket, dict) else bucket!r}")
            for name in spec.bucket:
                ok, what = _FIELDS[name]
                if not ok(bucket[name]):
                    raise fail(f"{where}.bucket.{name}", f"{bucket[name]!r} is not {what}")
            problem = _config_problem(spec, row.get("config"))
            if problem:
                raise fail(f"{where}.config", problem)
            for name in ("us", "default_us"):
                if name in row and not isinstance(row[name], (int, float)):
                    raise fail(f"{where}.{name}", "must be a number")
            key = tuple(bucket[n] for n in spec.bucket)
            if key in seen:
                raise fail(f"{where}.bucket", "duplicates an earlier entry's bucket")
            seen.add(key)
            entries.setdefault(kernel, []).append((dict(bucket), dict(row["config"])))
    meta = {k: v for k, v in data.items() if k != "kernels"}
    return Table(path, arch, meta, entries)


def load_table(path: str | Path) -> Table:
    """Read and validate one table file (TuningTableError naming the file and the field)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TuningTableError(f"tuning table {path}: cannot be read: {exc}") from exc
    return parse_table(data, path)


def table_path(arch: str) -> Path:
    """Where the table of ``arch`` (e.g. "sm_90") is read from."""
    return TABLE_DIR / f"{arch}.json"


# ---------------------------------------------------------------------------------------------
# lookup

_tables: dict[str, Table | None] = {}
_archs: dict[int, str] = {}
_cache: dict[tuple, Config] = {}


def clear_cache() -> None:
    """Forget loaded tables and resolved configs (after a table file or TABLE_DIR changed)."""
    _tables.clear()
    _archs.clear()
    _cache.clear()


def tables_enabled() -> bool:
    """False when KADAPT_TUNING=0 (defaults everywhere, e.g. to measure what a table gains)."""
    return os.environ.get("KADAPT_TUNING", "1") != "0"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_arch(device: torch.device) -> str | None:
    """"sm_<major><minor>" of a CUDA device whose Triton kernels are compiled (not interpreted), else None."""
    if device.type != "cuda" or _interpret():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _archs.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _archs[index] = f"sm_{major}{minor}"
    return arch


def table_for(arch: str) -> Table | None:
    """The validated table of ``arch`` (None when there is none or KADAPT_TUNING=0); loaded once."""
    if not tables_enabled():
        return None
    if arch not in _tables:
        path = table_path(arch)
        _tables[arch] = load_table(path) if path.is_file() else None
    return _tables[arch]


def _distance(name: str, spec: KernelSpec, want: Any, have: Any) -> float | None:
    """How far a table bucket value is from the call's: 0 exact, None no match (numeric: |Δ log2|)."""
    if name in spec.numeric:
        return abs(math.log2(max(want, 1)) - math.log2(have))
    return 0.0 if want == have else None


def _from_table(table: Table, kernel: str, spec: KernelSpec, bucket: dict[str, Any]) -> Config | None:
    best, best_key = None, None
    for entry_bucket, cfg in table.entries.get(kernel, ()):
        dist = 0.0
        for name in spec.bucket:
            d = _distance(name, spec, bucket[name], entry_bucket[name])
            if d is None:
                break
            dist += d
        else:
            # nearest; on a tie the larger bucket (its tiles also fit the smaller problem)
            key = (dist, -sum(entry_bucket[n] for n in spec.numeric))
            if best_key is None or key < best_key:
                best, best_key = cfg, key
    return best


def _resolve(kernel: str, device: torch.device, bucket: dict[str, Any]) -> tuple[Config, str]:
    """(config, source) for a call: source is "table <path>" or "default"."""
    spec = SPECS.get(kernel)
    if spec is None:
        raise KeyError(f"unknown Triton kernel {kernel!r} (known: {', '.join(SPECS)})")
    if set(bucket) != set(spec.bucket):
        raise TypeError(f"launch_config({kernel!r}) takes the bucket fields {list(spec.bucket)}, got {sorted(bucket)}")
    if "dtype" in bucket:
        bucket = {**bucket, "dtype": dtype_class(bucket["dtype"])}
    arch = device_arch(device)
    table = table_for(arch) if arch else None
    if table is not None:
        cfg = _from_table(table, kernel, spec, bucket)
        if cfg is not None:
            return cfg, f"table {table.path}"
    return spec.default(device.type == "cuda", **bucket), "default"


def launch_config(kernel: str, device: torch.device, **bucket: Any) -> Config:
    """The launch configuration of ``kernel`` on ``device`` for a call in ``bucket`` (the kernel's bucket fields,
    ``dtype`` as a torch.dtype): tile constexprs, num_warps and optionally num_stages, to pass as ``**config``.
    Read-only (shared)."""
    forced = OVERRIDES.get(kernel)
    if forced is not None:
        return forced
    key = (kernel, device, *bucket.items())
    cfg = _cache.get(key)
    if cfg is None:
        cfg = _cache[key] = _resolve(kernel, device, bucket)[0]
    return cfg


def config_source(kernel: str, device: torch.device, **bucket: Any) -> str:
    """Where ``launch_config`` takes this call's config from: "override", "table <path>" or "default"."""
    if kernel in OVERRIDES:
        return "override"
    return _resolve(kernel, device, bucket)[1]


@contextmanager
def override(configs: Mapping[str, Mapping[str, int]]) -> Iterator[None]:
    """Force ``configs`` ({kernel: config}, each checked) inside the block, ahead of tables and defaults."""
    checked = {k: check_config(k, c, f"override of {k}") for k, c in configs.items()}
    saved = {k: OVERRIDES.get(k) for k in checked}
    OVERRIDES.update(checked)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                OVERRIDES.pop(k, None)
            else:
                OVERRIDES[k] = old


def status(device: torch.device | None = None) -> str:
    """One line for ``kadapt info``: which table (if any) is in force for ``device`` (default: CUDA device 0)."""
    if not tables_enabled():
        return "default launch configs (KADAPT_TUNING=0)"
    if device is None:
        if not torch.cuda.is_available():
            return "default launch configs (no CUDA device)"
        device = torch.device("cuda", 0)
    if _interpret():
        return "default launch configs (TRITON_INTERPRET=1)"
    arch = device_arch(device)
    if arch is None:
        return f"default launch configs ({device} is not a CUDA device)"
    try:
        table = table_for(arch)
    except TuningTableError as exc:
        return f"INVALID table for {arch}, Triton launches will fail: {exc}"
    if table is None:
        return f"default launch configs (no table for {arch} in {TABLE_DIR})"
    made = ", ".join(str(table.meta[k]) for k in ("device", "date", "commit") if table.meta.get(k))
    return f"{arch} table {table.path} ({len(table)} entries{'; ' + made if made else ''})"
