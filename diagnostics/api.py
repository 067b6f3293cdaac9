"""The API's diagnostics: findings (open, or recent), workers, and the queue actions.

Mounted with the workflows routers by config/api.py; the queue actions call
diagnostics/operations.py like the dashboard and admin do.
"""

from datetime import datetime, timedelta
from typing import Any, Literal

from django.conf import settings
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from ninja import Field, Query, Router, Schema
from pydantic import ConfigDict

from diagnostics import operations
from diagnostics import workers as worker_selector
from diagnostics.models import Finding
from workflows import actions
from workflows.api import pages
from workflows.api.auth import VIEW_PERMISSION, require
from workflows.api.errors import ApiError
from workflows.api.schemas import MAX_ID, errors

router = Router(tags=["diagnostics"])

VIEW_FINDINGS = "diagnostics.view_finding"
# "recent" findings: open ones, and those resolved within this window.
RECENT = timedelta(hours=24)


class FindingOut(Schema):
    id: int
    code: str = Field(description="The cause, e.g. heartbeat_stale, job_lost.")
    severity: Literal[tuple(Finding.Severity.values)]  # type: ignore[valid-type]
    title: str
    subject: str
    run: int | None
    node: str | None
    queue: str
    worker: str
    evidence: Any
    suggestion: str = Field(description="What to do about it.")
    action: Any = Field(description="The one-click action that fits, if any.")
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None = Field(description="null while the finding is open.")
    repaired_at: datetime | None
    repair: str = Field(description="What the watchdog did about it automatically.")

    @staticmethod
    def resolve_run(finding) -> int | None:
        return finding.run_id

    @staticmethod
    def resolve_node(finding) -> str | None:
        return finding.node_run.node_key if finding.node_run_id else None


class FindingPage(Schema):
    results: list[FindingOut]
    next: str | None = Field(description="The next (older) page, or null on the last one.")


class FindingQuery(Schema):
    state: Literal["open", "recent"] = Field(
        "open", description="open: still holding; recent: open or resolved within 24 hours."
    )
    run: int | None = Field(None, ge=1, le=MAX_ID, description="Only findings about this run.")
    code: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_]{0,49}$", description="Only findings with this code."
    )
    before: int | None = Field(
        None, ge=1, le=MAX_ID, description="Findings older than this id (the next link sets it)."
    )
    limit: int = Field(50, ge=1, le=200, description="How many results per page.")


class CurrentNodeOut(Schema):
    job_id: str = Field(description="The RQ job the worker runs (keel-<node run>-<attempt>).")
    run: int
    workflow: str
    node: str = Field(description="The node's key.")
    attempt: int
    attempt_status: str = Field(description="The attempt's status in the database now.")
    node_status: str = Field(description="The node's status in the database now.")
    running: bool = Field(description="The node still runs this attempt: it can be stopped.")
    started_at: datetime | None = Field(description="When the attempt started: busy since.")
    heartbeat_at: datetime | None = Field(description="The node's last heartbeat.")
    url: str = Field(description="The run page, opened on this node.")
    stop: str | None = Field(
        description="POST here with a reason and expected_attempt to stop the node (it fails, "
        "and is not retried); null when the node no longer runs this attempt."
    )

    @staticmethod
    def resolve_run(current) -> int:
        return current.run_id

    @staticmethod
    def resolve_node(current) -> str:
        return current.node_key

    @staticmethod
    def resolve_stop(current) -> str | None:
        if not current.running:
            return None
        return reverse(
            "api:node-stop-node", kwargs={"run_id": current.run_id, "node_key": current.node_key}
        )


class RestartsOut(Schema):
    count: int | None = Field(description="null: nothing says honestly (see note).")
    exact: bool = Field(description="false: a lower bound.")
    source: str = Field(description="devstack, worker names, or empty when unknown.")
    note: str


class WorkerOut(Schema):
    name: str
    host: str
    pid: int | None
    queues: list[str]
    state: Literal[worker_selector.STATES]  # type: ignore[valid-type]
    rq_state: str = Field(description="What the worker last wrote in its RQ hash.")
    current_job: str
    current_node: CurrentNodeOut | None
    since: datetime | None = Field(description="When the current node's attempt started.")
    last_heartbeat: datetime | None = Field(description="The worker's last RQ heartbeat.")
    birth: datetime | None
    successful_jobs: int
    failed_jobs: int
    restarts: RestartsOut

    @staticmethod
    def resolve_current_node(worker):
        return worker.current


class WorkerList(Schema):
    generated_at: datetime
    registered: int = Field(description="How many workers RQ lists.")
    shown: int
    hidden: int = Field(description="Listed by RQ but not read: past the limit.")
    counts: dict[str, int] = Field(description="Workers shown, by state.")
    workers: list[WorkerOut]


class WorkerQuery(Schema):
    limit: int = Field(
        worker_selector.WORKERS_SHOWN,
        ge=1,
        le=5000,
        description="Read at most this many workers in full: those gone quiet or shut down "
        "first, then the busy ones (every one is counted in registered).",
    )


class QueueAction(Schema):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(
        min_length=1,
        max_length=2000,
        pattern=r"\S",
        description="Why you do this; kept with your name in the audit log.",
    )


class QueueOutcome(Schema):
    queue: str
    changed: bool
    message: str
    before: dict[str, int] = Field(description="The queue's counts just before.")
    after: dict[str, int] = Field(description="The queue's counts just after.")


@router.get(
    "/findings",
    response={200: FindingPage, **errors(400)},
    url_name="finding-list",
    operation_id="listFindings",
    summary="Findings of the watchdog, newest first",
)
def finding_list(request, query: Query[FindingQuery]):
    require(request.user, VIEW_FINDINGS, VIEW_PERMISSION)
    findings = Finding.objects.select_related("node_run").order_by("-id")
    if query.state == "open":
        findings = findings.filter(resolved_at__isnull=True)
    else:
        # Open, or resolved within the window: both sides have a partial index
        # (finding_open, finding_resolved), where last_seen has none.
        findings = findings.filter(
            Q(resolved_at__isnull=True) | Q(resolved_at__gte=timezone.now() - RECENT)
        )
    if query.run is not None:
        findings = findings.filter(run_id=query.run)
    if query.code:
        findings = findings.filter(code=query.code)
    if query.before:
        findings = findings.filter(pk__lt=query.before)
    rows, more = pages.page(findings, query.limit)
    return {"results": rows, "next": pages.next_url(request, before=rows[-1].pk) if more else None}


@router.get(
    "/workers",
    response={200: WorkerList, **errors(400)},
    url_name="worker-list",
    operation_id="listWorkers",
    summary="Every RQ worker, and the node each runs",
    description="Host, pid, queues, state (busy, idle, suspended, unresponsive, dead), the "
    "current node and since when, last heartbeat, job counts and restarts. A busy worker's "
    "node is stopped through its stop link (the stop_node action). 503 while Redis cannot "
    "be read.",
)
def worker_list(request, query: Query[WorkerQuery]):
    require(request.user, VIEW_FINDINGS, VIEW_PERMISSION)
    listing = worker_selector.list_workers(limit=query.limit)
    if listing.error:
        raise ApiError(
            503,
            f"Redis could not be read ({listing.error}), so the workers cannot be listed; "
            "retry in a few seconds (manage.py doctor says why).",
            headers={"Retry-After": "5"},
        )
    return {
        "generated_at": listing.generated_at,
        "registered": listing.registered,
        "shown": len(listing.workers),
        "hidden": listing.hidden,
        "counts": listing.counts,
        "workers": listing.workers,
    }


def _queue_action(request, name: str, body: QueueAction, perform) -> dict:
    # No permission check before the operation: it refuses, and audits the refusal.
    if name not in settings.RQ_QUEUES and request.user.has_perm(operations.PERMISSION):
        raise ApiError(
            404, f"No queue {name!r}; Keel's queues are {', '.join(settings.RQ_QUEUES)}."
        )
    try:
        outcome = perform(name, actor=request.user, reason=body.reason)
    except operations.QueuePermissionDenied as error:
        raise ApiError(403, str(error)) from None
    except operations.QueueOperationError as error:
        raise ApiError(409, str(error)) from None
    return {
        "queue": outcome.queue,
        "changed": outcome.changed,
        "message": outcome.message,
        "before": outcome.before,
        "after": outcome.after,
    }


@router.post(
    "/queues/{name}/clear",
    response={200: QueueOutcome, **errors(400, 404, 409, 413)},
    url_name="queue-clear",
    operation_id="clear_queue",
    summary="Remove every job waiting in a queue",
    description="Running and finished jobs are untouched; nodes still queued in the database "
    "are re-sent by the watchdog (cancel their runs to stop them). Needs the "
    "diagnostics.operate_queues permission; audited.",
)
def clear_queue(request, name: str, body: QueueAction):
    return _queue_action(request, name, body, actions.get("clear_queue").perform)


@router.post(
    "/queues/{name}/requeue-failed",
    response={200: QueueOutcome, **errors(400, 404, 409, 413)},
    url_name="queue-requeue-failed",
    operation_id="requeue_failed",
    summary="Put the queue's failed jobs back on it",
    description="A requeued job runs only if its attempt is still the node's current one. "
    "Needs the diagnostics.operate_queues permission; audited.",
)
def requeue_failed(request, name: str, body: QueueAction):
    return _queue_action(request, name, body, actions.get("requeue_failed").perform)
