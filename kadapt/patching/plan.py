"""The plan: what methods ask the patcher to do, collected before the model is touched.

A method's ``plan`` builds its modules and records here where they go (``add_module``), which hooks to
register, which existing parameters to train, which parameters to add, which attention layers run a
method module, and how it merges or ejects. ``kadapt.patch`` then attaches the whole plan at once (and
rolls it back on failure). Two methods claiming the same slot raise a ValueError naming both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kadapt.methods.base import KadaptConfig, implementation
from kadapt.methods.common import factory
from kadapt.patching.base import Backbone


@dataclass
class Part:
    """One planned method (a composed or nested config), in plan order."""

    name: str            # path of the config: "lora", "inducer_tuning.prefix", "[1] kernel_mix"
    config: KadaptConfig
    mergeable: bool


@dataclass
class Hook:
    kind: str            # "forward" | "pre"
    module: nn.Module
    fn: Callable
    owner: str           # the part that asked for it
    with_kwargs: bool = False  # fn also takes (and a pre-hook returns) the forward's keyword arguments
    always_call: bool = False  # a forward hook that runs even when the forward raises (restores state)


class Plan:
    """Modules built and validated before the model is touched, and where they go."""

    def __init__(self, model: nn.Module, backbone: Backbone):
        self.model, self.backbone = model, backbone
        self.parts: list[Part] = []
        self.modules: dict[tuple[int, str], tuple[nn.Module, str, nn.Module, str]] = {}
        self.hooks: list[Hook] = []
        self.train_existing: list[nn.Parameter] = []
        self.params: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter, str]] = {}
        self.attention: dict[int, tuple[nn.Module, nn.Module, str]] = {}  # layer id -> (layer, module, owner)
        self.merges: list[tuple[Callable[[], list[nn.Module]], Callable[[], list[nn.Module]] | None]] = []
        self.ejects: list[Callable[["object"], None]] = []
        self.state_checks: dict[str, tuple[Callable[[], dict], Callable[[dict | None], None]]] = {}
        self.restores: list[Callable[[], None]] = []
        self._current: str = ""

    # ------------------------------------------------------------------------------ running methods

    def include(self, config: KadaptConfig, name: str | None = None) -> None:
        """Plan ``config``'s method (also used by a method for the configs nested in its own)."""
        method = implementation(config)
        outer = self._current
        self._current = name if name is not None else (f"{outer}.{config.method}" if outer else config.method)
        self.parts.append(Part(self._current, config, method.mergeable))
        try:
            method.plan(config, self)
        finally:
            self._current = outer

    @property
    def current(self) -> str:
        """The part being planned (for messages)."""
        return self._current

    # --------------------------------------------------------------------------------- what to do

    def factory(self, ref: torch.Tensor) -> dict:
        return factory(ref)

    def add_module(self, owner: nn.Module, name: str, module: nn.Module) -> None:
        """Register ``module`` as child ``name`` of ``owner`` (its parameters train)."""
        key = (id(owner), name)
        if key in self.modules or name in owner._modules:
            other = self.modules[key][3] if key in self.modules else "the model itself"
            raise ValueError(f"methods {other!r} and {self._current!r} both attach {name!r} to the same "
                             f"{type(owner).__name__}; they cannot be composed")
        self.modules[key] = (owner, name, module, self._current)

    def forward_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False,
                     always_call: bool = False) -> None:
        """``fn(module, args, output)`` after ``module``'s forward (hooks run in plan order);
        ``with_kwargs``: ``fn(module, args, kwargs, output)``; ``always_call``: also when the forward raises."""
        self.hooks.append(Hook("forward", module, fn, self._current, with_kwargs, always_call))

    def forward_pre_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        """``fn(module, args)`` before ``module``'s forward; ``with_kwargs``: ``fn(module, args, kwargs)``,
        returning None or the new ``(args, kwargs)``."""
        self.hooks.append(Hook("pre", module, fn, self._current, with_kwargs))

    def train(self, params) -> None:
        """Existing parameters that train (restored to their values by ``unpatch``)."""
        self.train_existing += list(params)

    def add_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> None:
        """A new parameter ``name`` on an existing ``module`` (BitFit's added biases)."""
        key = (id(module), name)
        if key in self.params:
            raise ValueError(f"methods {self.params[key][3]!r} and {self._current!r} both add {name!r} to the "
                             f"same {type(module).__name__}; they cannot be composed")
        self.params[key] = (module, name, param, self._current)

    def attend(self, layer: nn.Module, module: nn.Module) -> None:
        """Run ``module`` in attention layer ``layer`` (switches the model to kadapt's attention function).

        One method module per layer; a key extension (a module with ``extend``, e.g. a prefix) composes
        with a core method that takes one (``accepts_extension``)."""
        key = id(layer)
        if key not in self.attention:
            self.attention[key] = (layer, module, self._current)
            return
        _, held, owner = self.attention[key]
        for core, ext in ((held, module), (module, held)):
            if getattr(core, "accepts_extension", False) and hasattr(ext, "extend") and core.extension is None \
                    and not getattr(ext, "accepts_extension", False):
                core.set_extension(ext)
                self.attention[key] = (layer, core, owner if core is held else self._current)
                return
        raise ValueError(f"methods {owner!r} and {self._current!r} both change attention in the same layer in ways "
                         f"that cannot be composed (at most one prefix and one inducer per layer)")

    def on_merge(self, fold: Callable[[], list[nn.Module]],
                 new_biases: Callable[[], list[nn.Module]] | None = None) -> None:
        """``fold()`` writes the method into the frozen weights and returns the linears it touched;
        ``new_biases()`` names the linears the fold would give a bias they do not have (checked first)."""
        self.merges.append((fold, new_biases))

    def on_eject(self, fn: Callable) -> None:
        """``fn(record)`` for ``kadapt.eject``."""
        self.ejects.append(fn)

    def on_save_state(self, save: Callable[[], dict], check: Callable[[dict | None], None]) -> None:
        """JSON state the adapter file carries beside the tensors (``save()``, at ``save_adapter``) and its
        check at ``load_adapter`` (``check(saved)`` raises ValueError before anything is loaded)."""
        self.state_checks[self._current] = (save, check)

    def on_restore(self, fn: Callable[[], None]) -> None:
        """``fn()`` first when ``unpatch`` / ``merge`` take the methods out (e.g. put back tensors a method
        swapped in for a forward that an interrupt cut short)."""
        self.restores.append(fn)
