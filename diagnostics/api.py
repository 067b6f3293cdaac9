"""The API's diagnostics: findings (open, or recent) and the queue actions.

Mounted with the workflows routers by config/api.py; the queue actions call
diagnostics/operations.py like the dashboard and admin do.
"""

from datetime import datetime, timedelta
from typing import Any, Literal

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from ninja import Field, Query, Router, Schema
from pydantic import ConfigDict

from diagnostics import operations
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


def _queue_action(request, name: str, body: QueueAction, perform) -> dict:
    require(request.user, operations.PERMISSION)
    if name not in settings.RQ_QUEUES:
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
