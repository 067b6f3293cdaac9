"""The API's shapes as ninja Schemas: what it answers, and the bodies and query parameters
it takes. The OpenAPI document is generated from these.

Response schemas read model rows; fields that are not plain columns (URLs, numbers of
related rows) are ``resolve_*`` methods, given the request through the context.
"""

from datetime import datetime
from typing import Any, Literal

from django.urls import reverse
from ninja import Field, Schema
from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from workflows.models import AttemptStatus, CheckpointKind, NodeRunStatus, Run, RunEventKind

MAX_ID = 2**63 - 1  # a BigAutoField; larger ids would overflow the database's integer
MAX_WAIT_SECONDS = 180
DEFAULT_WAIT_SECONDS = 10

RunStatus = Literal[tuple(Run.Status.values)]  # type: ignore[valid-type]
Priority = Literal[tuple(Run.Priority.values)]  # type: ignore[valid-type]


def api_url(request, name: str, *args) -> str:
    return request.build_absolute_uri(reverse(f"api:{name}", args=args))


# Stands for a node key in a reversed URL: "~" is in no node key (spec.NODE_KEY_PATTERN)
# and in no host name, and reverse() leaves it as it is.
NODE_KEY_MARK = "~key~"


def node_url(request, name: str, run_id: int, node_key: str) -> str:
    """``api_url`` of a node's URL, reversed once per run and request: a 1 000-node run's
    2 000 reverse() calls took half its answer's time. Node keys need no quoting."""
    reversed_once = request.__dict__.setdefault("_keel_node_urls", {})
    if (name, run_id) not in reversed_once:
        reversed_once[(name, run_id)] = api_url(request, name, run_id, NODE_KEY_MARK)
    return reversed_once[(name, run_id)].replace(NODE_KEY_MARK, node_key)


def seconds_between(start, end) -> float | None:
    if start and end:
        return round((end - start).total_seconds(), 3)
    return None


def check_text(value):
    """Refuse text the database cannot store: NUL characters and unpaired surrogates
    (valid JSON escapes, but PostgreSQL rejects both). Walks nested JSON values."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise PydanticCustomError("text", "must not contain NUL (\\u0000) characters.")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise PydanticCustomError(
                    "text", "must be valid Unicode (it has an unpaired surrogate)."
                ) from None
    return value


# --- Errors -----------------------------------------------------------------------------------


class ErrorDetail(Schema):
    code: str
    message: str = Field(description="What went wrong and what to do.")
    field: str | None = Field(None, description="The input field at fault (400 only).")


class Error(Schema):
    error: ErrorDetail


# --- Workflows --------------------------------------------------------------------------------


class WorkflowSummary(Schema):
    slug: str
    name: str
    description: str
    latest_version: int | None
    url: str
    runs_url: str

    @staticmethod
    def resolve_latest_version(workflow) -> int | None:
        return workflow.latest_number

    @staticmethod
    def resolve_url(workflow, context) -> str:
        return api_url(context["request"], "workflow-detail", workflow.slug)

    @staticmethod
    def resolve_runs_url(workflow, context) -> str:
        return api_url(context["request"], "workflow-runs", workflow.slug)


class LatestVersion(Schema):
    number: int
    created_at: datetime
    created_by: str
    note: str
    checksum: str
    timeout: int | None = Field(description="The whole run's timeout in seconds.")
    params: dict[str, Any] = Field(description="Declared run params and their defaults.")
    nodes: list[str]

    @staticmethod
    def resolve_timeout(version) -> int | None:
        return version.spec.get("timeout")

    @staticmethod
    def resolve_params(version) -> dict:
        return version.spec.get("params") or {}

    @staticmethod
    def resolve_nodes(version) -> list[str]:
        return list(version.spec.get("nodes") or {})


class WorkflowDetail(WorkflowSummary):
    created_at: datetime
    updated_at: datetime
    latest: LatestVersion | None


class WorkflowPage(Schema):
    results: list[WorkflowSummary]
    next: str | None = Field(description="The next page, or null on the last one.")


# --- Runs and nodes ---------------------------------------------------------------------------


class RunSummary(Schema):
    id: int
    url: str
    web_url: str = Field(description="The run's page in the dashboard.")
    workflow: str = Field(description="The workflow's slug.")
    version: int = Field(description="The version number the run is pinned to.")
    status: RunStatus
    finished: bool = Field(description="True once the status is terminal.")
    reason: str = Field(description="Why the run failed or was cancelled.")
    trigger: str = Field(description="Who or what started it.")
    priority: Priority
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime | None
    duration_seconds: float | None
    deployment: int | None = Field(
        description="The deployment that chose its version (null: asked for by number)."
    )

    @staticmethod
    def resolve_deployment(run) -> int | None:
        return run.deployment_id

    @staticmethod
    def resolve_url(run, context) -> str:
        return api_url(context["request"], "run-detail", run.pk)

    @staticmethod
    def resolve_web_url(run, context) -> str:
        return context["request"].build_absolute_uri(run.get_absolute_url())

    @staticmethod
    def resolve_workflow(run) -> str:
        return run.workflow.slug

    @staticmethod
    def resolve_version(run) -> int:
        return run.version.number

    @staticmethod
    def resolve_finished(run) -> bool:
        return run.is_finished

    @staticmethod
    def resolve_duration_seconds(run) -> float | None:
        return seconds_between(run.started_at, run.finished_at)


# The columns a node's answer is read from, under the answer's names.
NODE_COLUMNS = {
    "key": "node_key",
    "type": "node_type",
    "status": "status",
    "attempt": "attempt",
    "max_attempts": "max_attempts",
    "queue": "queue",
    "pool": "pool",
    "after": "upstream",
    "reason": "reason",
    "progress": "progress",
    "output": "output",
    "heartbeat_at": "heartbeat_at",
    "queued_at": "queued_at",
    "started_at": "started_at",
    "finished_at": "finished_at",
    "retry_at": "retry_at",
}


class Node(BaseModel):
    """A pydantic model, not a ninja Schema: it is validated from the dicts ``node_answer``
    builds, in pydantic-core (ninja's per-field getter took half a 1 000-node run's answer)."""

    key: str
    type: str = Field(description="The registered node type.")
    status: Literal[tuple(NodeRunStatus.values)]  # type: ignore[valid-type]
    attempt: int = Field(description="The current attempt's number (0: never queued).")
    max_attempts: int
    queue: str
    pool: str = Field(description="The resource pool it takes a slot of ('' for none).")
    after: list[str] = Field(description="Upstream node keys.")
    reason: str = Field(description="Why the node waits or failed.")
    progress: Any
    output: Any
    heartbeat_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    retry_at: datetime | None
    duration_seconds: float | None
    attempts_url: str
    logs_url: str


def node_answer(request, run_id: int, row: dict) -> dict:
    """A node's answer from the values of its ``NODE_COLUMNS``."""
    answer = {name: row[column] for name, column in NODE_COLUMNS.items()}
    answer["duration_seconds"] = seconds_between(row["started_at"], row["finished_at"])
    answer["attempts_url"] = node_url(request, "node-attempts", run_id, row["node_key"])
    answer["logs_url"] = node_url(request, "node-logs", run_id, row["node_key"])
    return answer


class RunDetail(RunSummary):
    events_url: str
    checkpoints_url: str
    nodes: list[Node] = Field(description="In definition order.")

    @staticmethod
    def resolve_events_url(run, context) -> str:
        return api_url(context["request"], "run-events", run.pk)

    @staticmethod
    def resolve_checkpoints_url(run, context) -> str:
        return api_url(context["request"], "run-checkpoints", run.pk)

    @staticmethod
    def resolve_nodes(run, context) -> list[dict]:
        return [node_answer(context["request"], run.pk, row) for row in run.api_nodes]


class RunPage(Schema):
    results: list[RunSummary]
    next: str | None = Field(description="The next page, or null on the last one.")


class Event(Schema):
    id: int
    at: datetime
    kind: Literal[tuple(RunEventKind.values)]  # type: ignore[valid-type]
    actor: str
    reason: str
    node: str | None
    before: Any
    after: Any

    @staticmethod
    def resolve_node(event) -> str | None:
        return event.node_run.node_key if event.node_run_id else None


class EventPage(Schema):
    run: int
    results: list[Event]
    next: str | None


class Checkpoint(Schema):
    id: int
    node: str | None
    kind: Literal[tuple(CheckpointKind.values)]  # type: ignore[valid-type]
    sequence: int
    attempt: int
    created_at: datetime
    state: Any

    @staticmethod
    def resolve_node(checkpoint) -> str | None:
        return checkpoint.node_run.node_key if checkpoint.node_run_id else None


class CheckpointPage(Schema):
    run: int
    results: list[Checkpoint]
    next: str | None


class Attempt(Schema):
    number: int
    status: Literal[tuple(AttemptStatus.values)]  # type: ignore[valid-type]
    queue: str
    rq_job_id: str
    worker: str
    host: str
    pid: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    error_type: str
    error_message: str
    traceback: str
    cpu_percent: float | None
    rss_bytes: int | None
    io_wait_percent: float | None

    @staticmethod
    def resolve_duration_seconds(attempt) -> float | None:
        return seconds_between(attempt.started_at, attempt.finished_at)


class AttemptPage(Schema):
    run: int
    node: str
    results: list[Attempt]
    next: str | None


class LogLine(Schema):
    seq: int
    at: datetime
    level: str
    message: str


class LogPage(Schema):
    run: int
    node: str
    attempt: int | None = Field(description="null when the node never ran.")
    results: list[LogLine]
    next: str | None


# --- Operator actions -------------------------------------------------------------------------


class PreviewNode(Schema):
    key: str
    type: str
    status: str
    will: str = Field(description="What the action does to it, in words.")
    queue: str
    pool: str
    side_effects: bool
    has_compensate: bool
    warning: str


class Preview(Schema):
    action: str
    run_id: int
    workflow: str
    version: int
    run_status: RunStatus
    noop_message: str = Field(description="Non-empty when the action has nothing to do now.")
    warnings: list[str]
    nodes: list[PreviewNode]


class ActionResult(Schema):
    changed: bool = Field(
        description="False when there was nothing to do, or this Idempotency-Key was "
        "already applied."
    )
    message: str
    run: RunDetail


class PreviewResult(Schema):
    preview: Preview


# --- Requests ---------------------------------------------------------------------------------


class StartRun(Schema):
    """Run params, priority, version and how long to wait."""

    model_config = ConfigDict(extra="forbid", strict=True)

    params: dict[str, Any] = Field(
        default_factory=dict, description="Run parameters declared by the definition."
    )
    priority: Priority = Field(
        "default", description="Queue priority of the run's nodes (a node's own priority wins)."
    )
    version: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="Run this version number, outside any deployment (default: the version "
        "the workflow's deployments give new runs).",
    )
    wait: float = Field(
        DEFAULT_WAIT_SECONDS,
        ge=0,
        le=MAX_WAIT_SECONDS,
        allow_inf_nan=False,
        description=f"Seconds to wait for the run to finish before answering (at most "
        f"{MAX_WAIT_SECONDS}, and never longer than the workflow's own timeout).",
    )

    _text = field_validator("params")(classmethod(lambda cls, value: check_text(value)))


def _limit(default: int, maximum: int):
    return Field(default, ge=1, le=maximum, description="How many results per page.")


AFTER_DESCRIPTION = "Return results after this one (the next link sets it)."
# A workflow's slug (workflows/definitions/spec.py); the database never sees anything else.
SLUG = r"^[a-z0-9][a-z0-9_\-]{0,99}$"


class WorkflowQuery(Schema):
    after: str | None = Field(
        None,
        pattern=SLUG,
        description="Return workflows whose slug sorts after this one (the next link sets it).",
    )
    limit: int = _limit(50, 200)


class RunQuery(Schema):
    status: str | None = Field(
        None,
        description="Only runs in these states, comma-separated (e.g. failed,cancelled).",
        max_length=200,
    )
    q: str | None = Field(
        None,
        max_length=200,
        description="Search, case-insensitive: a number finds the run with that id; other "
        "text matches the workflow's slug or name, the run's reason, or an attempt's error "
        "type or message.",
    )
    cursor: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Where the page starts; copy it from the previous page's next link.",
    )
    limit: int = _limit(50, 200)

    _q_text = field_validator("q")(classmethod(lambda cls, value: check_text(value)))

    @field_validator("status")
    @classmethod
    def _statuses(cls, value):
        if value is None:
            return None
        values = [part.strip() for part in value.split(",") if part.strip()]
        if not values or any(v not in Run.Status.values for v in values):
            raise PydanticCustomError(
                "status",
                "must be one or more of {states}, comma-separated (got {got}).",
                {"states": ", ".join(Run.Status.values), "got": repr(value)},
            )
        return values


class AllRunsQuery(RunQuery):
    workflow: str | None = Field(
        None, pattern=SLUG, description="Only runs of this workflow (its slug)."
    )


class AfterQuery(Schema):
    after: int | None = Field(None, ge=0, le=MAX_ID, description=AFTER_DESCRIPTION)
    limit: int = _limit(100, 500)


class AttemptQuery(AfterQuery):
    limit: int = _limit(50, 200)


class LogQuery(AfterQuery):
    attempt: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="Which attempt's log (default: the node's current attempt).",
    )
    limit: int = _limit(200, 1000)


class ActionQuery(Schema):
    dry_run: bool = Field(
        False,
        description="Answer with the preview of what the action would do, and change nothing "
        "(reason is then optional).",
    )


def errors(*codes: int) -> dict:
    """The error responses of an operation: ``codes`` and those every operation can give."""
    return {frozenset({401, 403, 503, *codes}): Error}
