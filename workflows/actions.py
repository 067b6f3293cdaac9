"""The registry of operator actions: what each is called, what it takes, who may do it.

The dashboard, the admin, the management commands and the API all read it, so an
action's name, options, preview and permission are written once. Performing an action
always goes through its audited operation (workflows/operations.py, or
diagnostics/operations.py for the queue actions that diagnostics registers).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pydantic
from pydantic import ConfigDict, Field, create_model, field_validator

from workflows import operations

MAX_REASON = 2000


class UnknownAction(LookupError):
    pass


class ActionInputError(ValueError):
    """Bad input for an action; ``field`` names the option (or ``reason``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Option:
    name: str
    kind: Any  # str, bool, int, or Any (any JSON value)
    required: bool = False
    default: object = None
    help: str = ""


@dataclass(frozen=True)
class Action:
    name: str
    label: str
    target: str  # "run" or "queue"
    description: str
    options: tuple[Option, ...] = ()
    permission: str = operations.OPERATE_PERMISSION
    # perform(target, *, actor, reason, request_key=None, **options) -> an outcome with
    # .changed and .message; preview(target, **options) -> operations.Preview, or None.
    perform: Callable = field(repr=False, default=None)
    preview: Callable | None = field(repr=False, default=None)
    danger: bool = False

    @property
    def slug(self) -> str:
        """The action's name in URLs: ``mark-succeeded``."""
        return self.name.replace("_", "-")

    @property
    def acts_on_node(self) -> bool:
        return any(option.name == "node" for option in self.options)

    def input_model(self) -> type[pydantic.BaseModel]:
        return _input_models[self.name]

    def clean(self, data: dict) -> dict:
        """The reason and options, checked; raises ActionInputError naming the field."""
        try:
            model = self.input_model().model_validate(data)
        except pydantic.ValidationError as error:
            first = error.errors(include_url=False)[0]
            name = ".".join(str(part) for part in first["loc"]) or None
            raise ActionInputError(f"{name}: {first['msg']}", field=name) from None
        return {
            name: value
            for name, value in model.model_dump().items()
            if value is not None or name in data
        }

    @cached_property
    def _model(self) -> type[pydantic.BaseModel]:
        fields: dict[str, Any] = {
            "reason": (
                str,
                Field(
                    min_length=1,
                    max_length=MAX_REASON,
                    description="Why: kept in the run's history and the audit log.",
                ),
            )
        }
        for option in self.options:
            kind = option.kind if option.required else option.kind | None
            default = ... if option.required else option.default
            fields[option.name] = (kind, Field(default, description=option.help))
        return create_model(
            f"{self.name.title().replace('_', '')}Input",
            __config__=ConfigDict(extra="forbid", strict=True),
            __validators__={"reason_has_words": field_validator("reason")(_reason_has_words)},
            **fields,
        )


def _reason_has_words(cls, value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty; say why, it is kept in the run's history.")
    return value


_registry: dict[str, Action] = {}
_input_models: dict[str, type[pydantic.BaseModel]] = {}


def register(action: Action) -> None:
    _registry[action.name] = action
    _input_models[action.name] = action._model


def get(name: str) -> Action:
    try:
        return _registry[name.replace("-", "_")]
    except KeyError:
        raise UnknownAction(
            f"No action {name!r}; the actions are: {', '.join(sorted(_registry))}."
        ) from None


def for_target(target: str) -> list[Action]:
    return [action for action in _registry.values() if action.target == target]


# --- The run actions ----------------------------------------------------------------------------

NODE = Option("node", str, required=True, help="The node's key in the run's definition.")


def _preview(name: str) -> Callable:
    return lambda run_id, **options: operations.preview(name, run_id, **options)


register(
    Action(
        "resume",
        "Resume run",
        "run",
        "Resume a failed or cancelled run: succeeded nodes are kept, the rest run again from "
        "their checkpoints.",
        perform=operations.resume_run,
        preview=_preview("resume"),
    )
)
register(
    Action(
        "retry",
        "Retry node",
        "run",
        "Give one node a new attempt (ending a stuck one); with downstream, also reset the "
        "nodes after it.",
        (
            NODE,
            Option("downstream", bool, default=False, help="Also reset every node after it."),
            Option(
                "expected_attempt",
                int,
                help="Refuse if the node has moved past this attempt (a stale page).",
            ),
        ),
        perform=lambda run_id, node, **kwargs: operations.retry_node(run_id, node, **kwargs),
        preview=_preview("retry"),
    )
)
register(
    Action(
        "rollback",
        "Roll back",
        "run",
        "Back to a checkpoint, or to just before a node: compensate what completed after it, "
        "newest first, reset those nodes, then resume (unless resume is false).",
        (
            Option("to_checkpoint", int, help="A checkpoint id of the run."),
            Option("to_node", str, help="A node key: roll back to just before it."),
            Option(
                "resume",
                bool,
                default=True,
                help="Resume the run afterwards; false leaves it cancelled until resumed.",
            ),
        ),
        perform=operations.rollback_run,
        preview=_preview("rollback"),
        danger=True,
    )
)
register(
    Action(
        "cancel",
        "Cancel run",
        "run",
        "Stop every node that has not finished and close the run as cancelled.",
        perform=operations.cancel_run,
        preview=_preview("cancel"),
        danger=True,
    )
)
register(
    Action(
        "skip",
        "Skip node",
        "run",
        "Mark a node that has not succeeded as skipped: the nodes after it stay blocked.",
        (NODE,),
        perform=lambda run_id, node, **kwargs: operations.skip_node(run_id, node, **kwargs),
        preview=_preview("skip"),
    )
)
register(
    Action(
        "mark_succeeded",
        "Mark succeeded",
        "run",
        "Mark a node succeeded with the output you give: the nodes after it run with it.",
        (
            NODE,
            Option(
                "output",
                Any,
                default=None,
                help="The node's output, as JSON: downstream nodes receive it as their input.",
            ),
        ),
        perform=lambda run_id, node, output=None, **kwargs: operations.mark_node_succeeded(
            run_id, node, output={} if output is None else output, **kwargs
        ),
        preview=_preview("mark_succeeded"),
    )
)
register(
    Action(
        "stop_node",
        "Stop node",
        "run",
        "Stop a running node now: its attempt fails with your reason and is not retried, and "
        "its worker is told to stop the job. The run goes on, or fails, as after any node "
        "failure; retry the node later to run it again.",
        (
            NODE,
            Option(
                "expected_attempt",
                int,
                help="Refuse if the node has moved past this attempt (a stale page).",
            ),
        ),
        perform=lambda run_id, node, **kwargs: operations.stop_node(run_id, node, **kwargs),
        preview=_preview("stop_node"),
        danger=True,
    )
)
