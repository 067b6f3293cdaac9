"""INTERIM: the agreed interface of workflows/actions.py (the action registry another change
adds), over workflows/operations.py, so the API serves its actions until that file lands.
Delete this file when it does: workflows/api/actions.py then imports the real registry.
"""

from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field, create_model, field_validator


class UnknownAction(KeyError):
    pass


class ActionInputError(ValueError):
    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Option:
    name: str
    kind: str
    required: bool = False
    default: Any = None
    help: str = ""


KINDS = {"bool": bool, "int": int, "str": str, "json": Any}


@dataclass(frozen=True)
class Action:
    name: str
    label: str
    target: str
    description: str
    options: tuple = ()
    permission: str = "workflows.operate_run"
    call: Any = None

    def input_model(self):
        fields = {"reason": (str, Field(min_length=1, max_length=2000, description="Why"))}
        for o in self.options:
            t = KINDS[o.kind]
            fields[o.name] = (
                t if o.required else (t | None),
                Field(... if o.required else o.default, description=o.help),
            )

        def strip(cls, v):
            if isinstance(v, str) and not v.strip():
                raise ValueError("must not be empty; say why, it is kept in the run's history.")
            return v

        return create_model(
            f"{self.name}_input",
            __config__=ConfigDict(extra="forbid", strict=True),
            __validators__={"r": field_validator("reason")(classmethod(strip))},
            **fields,
        )

    def clean(self, data):
        m = self.input_model().model_validate(data)
        return {k: v for k, v in m.model_dump().items() if v is not None or k in data}

    def perform(self, target, *, actor, reason, request_key=None, **options):
        return self.call(target, actor=actor, reason=reason, request_key=request_key, **options)

    def preview(self, target, **options):
        from workflows import operations

        return operations.preview(self.name, target, **options)


def _build():
    from workflows import operations as op

    A = []
    A.append(
        Action("resume", "Resume", "run", "Resume.", (), call=lambda t, **k: op.resume_run(t, **k))
    )
    A.append(
        Action("cancel", "Cancel", "run", "Cancel.", (), call=lambda t, **k: op.cancel_run(t, **k))
    )
    A.append(
        Action(
            "rollback",
            "Roll back",
            "run",
            "Roll back.",
            (
                Option("to_checkpoint", "int"),
                Option("to_node", "str"),
                Option("resume", "bool", default=True),
            ),
            call=lambda t, to_checkpoint=None, to_node=None, resume=True, **k: op.rollback_run(
                t, to_checkpoint=to_checkpoint, to_node=to_node, resume=resume, **k
            ),
        )
    )
    A.append(
        Action(
            "retry",
            "Retry",
            "run",
            "Retry.",
            (
                Option("node", "str", True),
                Option("downstream", "bool", default=False),
                Option("expected_attempt", "int"),
            ),
            call=lambda t, node, downstream=False, expected_attempt=None, **k: op.retry_node(
                t, node, downstream=downstream, expected_attempt=expected_attempt, **k
            ),
        )
    )
    A.append(
        Action(
            "skip",
            "Skip",
            "run",
            "Skip.",
            (Option("node", "str", True),),
            call=lambda t, node, **k: op.skip_node(t, node, **k),
        )
    )
    A.append(
        Action(
            "mark_succeeded",
            "Mark succeeded",
            "run",
            "Mark.",
            (Option("node", "str", True), Option("output", "json", default=None)),
            call=lambda t, node, output=None, **k: op.mark_node_succeeded(
                t, node, output=output or {}, **k
            ),
        )
    )
    return {a.name: a for a in A}


_cache = {}


def get(name):
    _cache.setdefault("a", _build())
    try:
        return _cache["a"][name]
    except KeyError:
        raise UnknownAction(name) from None


def for_target(target):
    _cache.setdefault("a", _build())
    return [a for a in _cache["a"].values() if a.target == target]
