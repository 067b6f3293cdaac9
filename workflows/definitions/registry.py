"""The node-type registry: the only code a definition can name.

A definition names a node type by its registered name; it never names an import path
and nothing in it is evaluated. Node types register themselves at import time with
``@node_type``; the modules listed in ``settings.KEEL_NODE_MODULES`` are imported when
Django starts, in web processes and workers alike.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

_MISSING = object()


class NodeError(Exception):
    """Base class for errors a node raises on purpose."""


class PermanentError(NodeError):
    """An error retrying cannot fix (bad input, a missing file): never retried."""


class SoftTimeout(NodeError):
    """Raised by a node that stopped because ``ctx.should_stop()`` turned true.

    The engine records the attempt as timed out; the next attempt resumes from the
    node's latest checkpoint.
    """


@dataclass(frozen=True)
class Param:
    """A declared parameter: its type and, when optional, its default."""

    type: type
    default: Any = _MISSING
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass
class NodeType:
    name: str
    func: Callable
    params: dict[str, Param]
    description: str = ""
    # True when running the node changes something outside Keel (files, tables, APIs):
    # previews warn before re-running such a node without a compensate hook.
    side_effects: bool = False
    compensate_func: Callable | None = field(default=None)

    def __call__(self, ctx):
        return self.func(ctx)

    def compensate(self, func: Callable) -> Callable:
        """Register the undo hook used by rollback: ``func(ctx, output)``."""
        self.compensate_func = func
        return func

    def check_params(self, given: dict) -> dict[str, str]:
        """Return {param: problem} for params that do not match the declared schema."""
        problems = {}
        for name in given:
            if name not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                problems[name] = f"unknown parameter for {self.name} (known: {known})"
        for name, param in self.params.items():
            if name not in given:
                if param.required:
                    problems[name] = f"required by {self.name}"
                continue
            if not _is_instance(given[name], param.type):
                problems[name] = (
                    f"must be {param.type.__name__}, got {type(given[name]).__name__} "
                    f"{given[name]!r}"
                )
        return problems

    def resolve_params(self, given: dict) -> dict:
        """The params a node sees: the given ones plus declared defaults."""
        resolved = {
            name: param.default for name, param in self.params.items() if not param.required
        }
        resolved.update(given)
        return resolved


def _is_instance(value, expected: type) -> bool:
    # JSON and YAML give bool for true/false; a bool is not a number here.
    if isinstance(value, bool) and expected is not bool:
        return False
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


_registry: dict[str, NodeType] = {}


def node_type(
    name: str,
    *,
    params: dict[str, Any] | None = None,
    description: str = "",
    side_effects: bool = False,
):
    """Register a function as a node type.

    ``params`` maps each parameter to a type (required) or a ``Param`` (with a default).
    ``side_effects`` says the node changes things outside Keel (see NodeType).
    """

    def register(func: Callable) -> NodeType:
        schema = {
            key: value if isinstance(value, Param) else Param(type=value)
            for key, value in (params or {}).items()
        }
        registered = NodeType(
            name=name,
            func=func,
            params=schema,
            side_effects=side_effects,
            description=description or (func.__doc__ or "").strip().split("\n")[0],
        )
        existing = _registry.get(name)
        if existing is not None and existing.func.__qualname__ != func.__qualname__:
            raise ValueError(
                f"Node type {name!r} is registered twice ({existing.func} and {func})."
            )
        _registry[name] = registered
        return registered

    return register


def get(name: str) -> NodeType:
    try:
        return _registry[name]
    except KeyError:
        raise LookupError(f"No node type named {name!r} is registered.") from None


def is_registered(name: str) -> bool:
    return name in _registry


def names() -> list[str]:
    return sorted(_registry)


def load_node_modules() -> None:
    for module in settings.KEEL_NODE_MODULES:
        importlib.import_module(module)
