"""What every method shares: the config base class, the field checks and the method registry.

A method is one module under kadapt/methods/ holding its config dataclass, its nn.Modules and a
``Method`` subclass that plans it on a backbone (``plan``), registered with ``@register``. The registry
is what ``kadapt.METHODS``, ``KadaptConfig.from_dict`` / ``load_adapter`` and ``kadapt.patch`` read.
Every check raises ``ValueError`` naming the field and the allowed values.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the plan builder lives with the generic patching mechanics
    from kadapt.patching.plan import Plan


# ------------------------------------------------------------------------------------------- field checks

def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a bool (True or False)")


def is_real(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_integral(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_positive(name: str, value: Any, hint: str = "") -> None:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0{hint}")


def check_int(name: str, value: Any, low: int) -> None:
    if not is_integral(value) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def check_dropout(name: str, value: Any) -> None:
    if not is_real(value) or not 0 <= value < 1:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1)")


# ---------------------------------------------------------------------------------------------- configs

@dataclass
class KadaptConfig:
    """Base of every method config. ``method`` is the registry name used in saved adapters."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Field checks; subclasses extend. ``patch`` calls it again to catch later edits."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nested configs as dicts, tuples as lists, numpy scalars as Python numbers."""
        return {"method": self.method, **_plain(dataclasses.asdict(self))}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "KadaptConfig":
        """Rebuild a config from ``to_dict`` output; unknown methods or fields raise ValueError."""
        if not isinstance(data, dict) or "method" not in data:
            raise ValueError("config must be a dict with a 'method' key")
        data = dict(data)
        method = data.pop("method")
        check_choice("method", method, tuple(sorted(METHODS)))
        cls = METHODS[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for method {method!r}; allowed fields: {sorted(names)}")
        return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if is_integral(value):
        return int(value)
    if is_real(value):
        return float(value)
    return value


def sub_config(name: str, value: Any, cls: type[KadaptConfig], optional: bool) -> Any:
    """A nested method config given as an instance or as its ``to_dict`` output (JSON round trips)."""
    if value is None and optional:
        return None
    if isinstance(value, dict):
        data = dict(value)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{name}: expected a {cls.__name__} (method {cls.method!r}), got method {method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {unknown} for {cls.__name__}; allowed fields: {sorted(names)}")
        return cls(**data)
    if not isinstance(value, cls):
        allowed = f"a {cls.__name__}" + (" or None" if optional else "")
        raise ValueError(f"{name}={value!r} must be {allowed}")
    value.__post_init__()
    return value


# ---------------------------------------------------------------------------------------------- methods

class Method:
    """How one method attaches: ``plan`` builds its modules against the backbone's declared sites and
    records, on the ``Plan``, what to add and hook. Nothing may touch the model here: the patcher
    attaches the plan afterwards (and rolls it back on failure).

    ``mergeable``: its plan registers folds (``plan.on_merge``) so ``kadapt.merge`` can take it out.
    ``ejectable``: its plan may register ``plan.on_eject`` (e.g. prefix tuning dropping its MLP).
    ``exclusive``: it re-parameterises every tensor of the model (task heads included), so it composes with
    no other method and the patcher does not train task heads beside it.
    """

    config_class: ClassVar[type[KadaptConfig]]
    mergeable: ClassVar[bool] = False
    ejectable: ClassVar[bool] = False
    exclusive: ClassVar[bool] = False

    def plan(self, config: KadaptConfig, plan: "Plan") -> None:
        raise NotImplementedError


METHODS: dict[str, type[KadaptConfig]] = {}   # registry name -> config class
_IMPLEMENTATIONS: dict[type[KadaptConfig], Method] = {}


def register(*config_classes: type[KadaptConfig]):
    """Class decorator: register a ``Method`` for each config class (a family shares one)."""

    def wrap(method_cls: type[Method]) -> type[Method]:
        for cls in config_classes:
            if cls.method in METHODS:
                raise RuntimeError(f"method name {cls.method!r} registered twice")
            METHODS[cls.method] = cls
            _IMPLEMENTATIONS[cls] = method_cls()
        return method_cls

    return wrap


def registered_with(flag: str) -> list[str]:
    """Names of the registered methods whose Method sets ``flag`` ("mergeable", "ejectable")."""
    return [cls.method for cls, m in _IMPLEMENTATIONS.items() if getattr(m, flag)]


def implementation(config: KadaptConfig) -> Method:
    """The registered Method for ``config``; ValueError for an unregistered config class."""
    method = _IMPLEMENTATIONS.get(type(config))
    if method is None:
        raise ValueError(f"config: {type(config).__name__} is not a registered kadapt method; registered methods: "
                         f"{', '.join(sorted(METHODS))}")
    return method
