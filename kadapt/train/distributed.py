"""Multi-process training of a patched model: DDP, or FSDP2 (``torch.distributed.fsdp.fully_shard``).

Patch first, then distribute. ``shard`` gives every transformer block its own FSDP2 group (the blocks are
found from the sites the backbone family declares, so no class name is hard-coded) and the model root a last
group holding everything else (embeddings, final norm, task heads). kadapt's modules added inside a block (adapters, LoRA, attention methods)
shard with that block; what kadapt shares between blocks (Compacter's shared PHM rule, prefix-tuning
encoders, prompts) is registered once on the model root and held by reference in the blocks, so it lands in
the root group: sharded once, all-gathered once per step, its gradient summed over every block before the
reduce-scatter.

Under FSDP2 the parameters are sharded ``DTensor`` s, which ``kadapt.save_adapter`` / ``load_adapter`` cannot
write or fill. ``save_adapter`` and ``load_adapter`` here take a plain, DDP-wrapped or sharded model: they
gather only the adapter's tensors (never the frozen backbone), and only rank 0 writes the file. Both are
collective: call them on every rank.

    rank, world = init_distributed()                  # torchrun's environment; gloo on CPU, nccl on CUDA
    model = kadapt.patch(model, kadapt.CompacterConfig())
    model = shard(model)                              # or torch.nn.parallel.DistributedDataParallel(model)
    ...train...
    save_adapter(model, "out/adapter")                # every rank calls; rank 0 writes
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist
from torch import nn

import kadapt
from kadapt.api import adapter_state
from kadapt.patching import get_backbone, get_record

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

# Methods that cannot run with sharded parameters, and why.
UNSHARDABLE = {
    "intrinsic_said": "it re-parameterises every tensor of the model through references to the original "
                      "parameters, which FSDP replaces with shards; train it with DDP instead",
}


# --------------------------------------------------------------------------------------- process group

def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from the launcher's environment (``torchrun``, ``accelerate
    launch``: RANK, WORLD_SIZE, MASTER_ADDR, ...) unless it exists; return ``(rank, world_size)``.

    ``backend`` defaults to nccl when CUDA is available (and then selects the GPU ``LOCAL_RANK``), gloo
    otherwise. Without a launcher's environment nothing is initialised and ``(0, 1)`` is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run a single process")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------- structure

def unwrap(model: nn.Module) -> nn.Module:
    """The patched model inside a DDP (or similar ``.module``) wrapper; ``model`` itself otherwise."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or (
            get_record(model) is None and isinstance(getattr(model, "module", None), nn.Module)):
        model = model.module
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a supported model (every stack, model order), found from the family's
    declared sites: a block is the entry of the ``nn.ModuleList`` holding the site whose index is the site's
    block number. ValueError if the declared stacks are not all found."""
    model = unwrap(model)
    backbone = get_backbone(model)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    found: dict[tuple[str, int], nn.Module] = {}
    for site in backbone.adapter_sites():
        name = names.get(id(site.target))
        if name is None:
            raise ValueError(f"site {site.stack}[{site.block}] ({type(site.target).__name__}) is not a submodule of "
                             f"{type(model).__name__}")
        parts = name.split(".")
        block = None
        for end in range(1, len(parts)):  # the shortest prefix "<ModuleList>.<site.block>"
            parent = model.get_submodule(".".join(parts[:end - 1])) if end > 1 else model
            if isinstance(parent, nn.ModuleList) and parts[end - 1] == str(site.block):
                block = parent[site.block]
                break
        if block is None:
            raise ValueError(f"cannot find the block of site {site.stack}[{site.block}] ({name}) in "
                             f"{type(model).__name__}: no nn.ModuleList entry {site.block} on its path")
        held = found.setdefault((site.stack, site.block), block)
        if held is not block:
            raise ValueError(f"the sites of {site.stack}[{site.block}] lie in two different blocks of "
                             f"{type(model).__name__}")
    expected = backbone.stacks()
    for stack, count in expected.items():
        got = sorted(i for s, i in found if s == stack)
        if got != list(range(count)):
            raise ValueError(f"{type(model).__name__}: found blocks {got} of stack {stack!r}, expected {count}")
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(found.values(), key=lambda m: order[id(m)])


def _check_groups(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Every parameter in at most one block (a tensor registered in two blocks cannot be in two FSDP groups)."""
    owner: dict[int, int] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            if owner.setdefault(id(p), i) != i:
                raise ValueError(f"parameter {names.get(id(p), '?')} is registered in blocks {owner[id(p)]} and {i}; "
                                 f"FSDP2 needs every tensor in one group: register shared tensors on the model root "
                                 f"and hold them by reference in the blocks")


# ------------------------------------------------------------------------------------------------ FSDP2

def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the model in its wrapper) is an FSDP2 root."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(unwrap(model), FSDPModule)


def shard(model: nn.Module, *, mesh: DeviceMesh | None = None, reshard_after_forward: bool | int = True,
          mp_policy: MixedPrecisionPolicy | None = None, offload_policy: OffloadPolicy | None = None) -> nn.Module:
    """Apply FSDP2 to a patched model in place: ``fully_shard`` on every transformer block, then on the root.

    Parameters kadapt registers on the model root (a shared Compacter rule, prefix encoders, prompts), the
    embeddings, final norm and heads form the root's group. ``mesh`` (default: every rank),
    ``reshard_after_forward`` (blocks; the root keeps its parameters gathered between forward and backward),
    ``mp_policy`` (``MixedPrecisionPolicy``) and ``offload_policy`` (``CPUOffloadPolicy``) go to
    ``fully_shard``. Needs an initialised process group (``init_distributed``) and, on GPUs, the model on
    this rank's GPU; returns ``model``. ValueError for an unpatched, wrapped or already sharded model, or a
    method that cannot run sharded.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(model, FSDPModule):
        raise ValueError("shard: the model is already sharded (fully_shard was applied)")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("shard: the model is wrapped in DistributedDataParallel; shard the patched model itself")
    record = get_record(model)
    if record is None:
        raise ValueError("shard: the model is not patched; call kadapt.patch(model, config) before shard(model) "
                         "so that the method's modules are sharded with their blocks")
    for config in record.configs:
        if config.method in UNSHARDABLE:
            raise ValueError(f"shard: method {config.method!r} cannot be sharded: {UNSHARDABLE[config.method]}")
    blocks = transformer_blocks(model)
    _check_groups(model, blocks)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard: no process group; launch with torchrun (or accelerate launch) and call "
                           "kadapt.train.distributed.init_distributed() first")
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
              "offload_policy": offload_policy or OffloadPolicy()}
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=None, **kwargs)  # None: the root stays gathered for backward
    return model


# ------------------------------------------------------------------------------------- saving / loading

@contextlib.contextmanager
def _gathered(model: nn.Module, write_back: bool) -> Iterator[nn.Module]:
    """Inside: the adapter's sharded parameters replaced by full ones (collective all-gather, adapter tensors
    only). On exit the sharded ones are put back, first filled from the full ones when ``write_back``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = {id(p): p for p in adapter_state(model).values() if isinstance(p, DTensor)}
    full = {i: nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
            for i, p in sharded.items()}
    slots = [(m, name, id(p)) for m in model.modules() for name, p in m._parameters.items()
             if p is not None and id(p) in sharded]
    try:
        for module, name, i in slots:
            module._parameters[name] = full[i]
        yield model
    finally:
        for module, name, i in slots:
            module._parameters[name] = sharded[i]
    if write_back:
        with torch.no_grad():
            for i, p in sharded.items():
                local = distribute_tensor(full[i].detach().to(p.device), p.device_mesh, p.placements,
                                          src_data_rank=None)  # every rank holds the full tensor: no traffic
                p.to_local().copy_(local.to_local())


def gather_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (``kadapt.api.adapter_state``) as full, detached tensors on every rank:
    all-gathered when the model is sharded (collective: call it on every rank), as they are otherwise."""
    model = unwrap(model)
    if not is_sharded(model):
        return {k: v.detach() for k, v in adapter_state(model).items()}
    with _gathered(model, write_back=False):
        return {k: v.detach() for k, v in adapter_state(model).items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """``kadapt.save_adapter`` for a plain, DDP-wrapped or FSDP2-sharded model: rank 0 writes, every rank
    must call it (a sharded model gathers the adapter's tensors; the frozen backbone is never gathered).
    Returns after the file is complete on rank 0 (a barrier), so any rank may read it afterwards."""
    model = unwrap(model)
    if get_record(model) is None:
        raise ValueError("save_adapter: the model is not patched by kadapt")
    if is_sharded(model):
        with _gathered(model, write_back=False):
            if get_rank() == 0:
                kadapt.save_adapter(model, directory)
    elif get_rank() == 0:
        kadapt.save_adapter(model, directory)
    _barrier()


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """``kadapt.load_adapter`` for a plain, DDP-wrapped or FSDP2-sharded model; every rank reads
    ``directory`` (a shared path) and must call it. A sharded model must already be patched with the saved
    config (patch, then shard, then load); its shards are filled from the file."""
    inner = unwrap(model)
    if not is_sharded(inner):
        kadapt.load_adapter(inner, directory)
        return model
    if get_record(inner) is None:
        raise ValueError("load_adapter: a sharded model must be patched before it is sharded; patch, shard, then "
                         "load the adapter")
    if not Path(directory).is_dir():
        raise ValueError(f"load_adapter: {directory} is not a directory")
    with _gathered(inner, write_back=True):
        kadapt.load_adapter(inner, directory)
    return model
