"""Operator actions on RQ queues: clear a queue, requeue its failed jobs.

The dashboard, the admin and commands call these. Each checks the actor's permission
(``diagnostics.operate_queues``) and the reason, acts, and writes an AuditEvent with the
counts seen just before and just after. Acting twice is harmless: a second click finds
nothing left to do, changes nothing and writes no second event. A refusal (no
permission) is audited as well, a burst of them as one row with a count.

What they mean for Keel's own jobs (the database is the truth, Redis only carries
messages): a node still ``queued`` in the database whose job was cleared is re-sent by
the watchdog within seconds, so clearing a queue removes stray messages but does not
stop runs (cancel those). A requeued failed job runs only if its attempt is still the
node's current one; a stale one is refused by the executor's claim and recorded.
"""

from dataclasses import dataclass

import redis
from django.conf import settings
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from workflows import audit
from workflows.models import AuditEvent
from workflows.runtime import dispatch

PERMISSION = "diagnostics.operate_queues"


class QueueOperationError(Exception):
    """The action cannot be done; the message says why and what to do instead."""


class QueuePermissionDenied(QueueOperationError):
    pass


@dataclass(frozen=True)
class QueueOutcome:
    queue: str
    changed: bool
    message: str
    before: dict
    after: dict
    event: AuditEvent | None = None


def queue_counts(queue_name: str) -> dict:
    """What a queue holds now: the counts the confirm page shows and the audit records."""
    queue = dispatch.get_queue(queue_name)
    registry = FailedJobRegistry(queue=queue, serializer=JSONSerializer)
    try:
        return {"queued": queue.count, "failed": registry.get_job_count(cleanup=False)}
    except redis.RedisError as error:
        raise QueueOperationError(
            f"Could not reach Redis to read queue {queue_name!r} ({type(error).__name__}). "
            "Check REDIS_URL and run manage.py doctor."
        ) from None


def _check(queue_name: str, actor, reason: str, action: str) -> str:
    if not actor.has_perm(PERMISSION):
        audit.record_refusal(
            actor.get_username(), action, f"queue:{queue_name}", reason, PERMISSION
        )
        raise QueuePermissionDenied(
            f"{actor.get_username() or 'This user'} may not operate queues; "
            f"an administrator can grant the permission {PERMISSION}."
        )
    if queue_name not in settings.RQ_QUEUES:
        raise QueueOperationError(
            f"No queue {queue_name!r}; Keel's queues are {', '.join(settings.RQ_QUEUES)}."
        )
    reason = (reason or "").strip()
    if not reason:
        raise QueueOperationError("A reason is required: say why, for whoever reads the audit.")
    return reason


def clear_queue(queue_name: str, *, actor, reason: str) -> QueueOutcome:
    """Remove every job waiting in a queue (running and finished jobs are untouched)."""
    reason = _check(queue_name, actor, reason, AuditEvent.Action.CLEAR_QUEUE)
    before = queue_counts(queue_name)
    try:
        removed = int(dispatch.get_queue(queue_name).empty() or 0)
    except redis.RedisError as error:
        raise QueueOperationError(
            f"Redis failed while clearing {queue_name!r} ({type(error).__name__}); "
            "some jobs may remain. Run the action again once Redis answers."
        ) from None
    after = queue_counts(queue_name)
    if not removed:
        return QueueOutcome(
            queue_name, False, f"Queue {queue_name} was already empty.", before, after
        )
    event = AuditEvent.objects.create(
        actor=actor.get_username(),
        action=AuditEvent.Action.CLEAR_QUEUE,
        target=f"queue:{queue_name}",
        reason=reason,
        before=before,
        after={**after, "removed": removed},
    )
    return QueueOutcome(
        queue_name,
        True,
        f"Cleared {removed} job(s) from queue {queue_name}. Nodes still queued in the "
        "database are re-sent by the watchdog; cancel their runs to stop them.",
        before,
        after,
        event,
    )


def requeue_failed(queue_name: str, *, actor, reason: str) -> QueueOutcome:
    """Put every job of the queue's failed registry back on the queue."""
    reason = _check(queue_name, actor, reason, AuditEvent.Action.REQUEUE_FAILED)
    before = queue_counts(queue_name)
    queue = dispatch.get_queue(queue_name)
    registry = FailedJobRegistry(queue=queue, serializer=JSONSerializer)
    requeued = gone = 0
    try:
        for job_id in registry.get_job_ids(cleanup=False):
            try:
                registry.requeue(job_id)
                requeued += 1
            except NoSuchJobError:
                gone += 1  # its data expired; nothing left to run
            except InvalidJobOperation:
                pass  # someone else requeued it first
    except redis.RedisError as error:
        raise QueueOperationError(
            f"Redis failed after requeuing {requeued} job(s) from {queue_name!r} "
            f"({type(error).__name__}). Run the action again once Redis answers."
        ) from None
    after = queue_counts(queue_name)
    missing = f" {gone} could not be requeued: their data has expired." if gone else ""
    if not requeued:
        return QueueOutcome(
            queue_name,
            False,
            f"Queue {queue_name} has no failed job to requeue.{missing}",
            before,
            after,
        )
    event = AuditEvent.objects.create(
        actor=actor.get_username(),
        action=AuditEvent.Action.REQUEUE_FAILED,
        target=f"queue:{queue_name}",
        reason=reason,
        before=before,
        after={**after, "requeued": requeued, "expired": gone},
    )
    return QueueOutcome(
        queue_name,
        True,
        f"Requeued {requeued} failed job(s) on queue {queue_name}.{missing}",
        before,
        after,
        event,
    )
