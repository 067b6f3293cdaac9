"""Transitions the watchdog sweeps for each tick: due retries, overdue runs, lost messages."""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from workflows.engine.common import lock_pools, lock_run
from workflows.engine.queueing import queue_or_wait
from workflows.engine.runs import expire_run
from workflows.models import NodeRun, Run
from workflows.runtime import dispatch


def promote_due_retries(limit: int = 500) -> int:
    """Queue nodes whose retry backoff has passed. Returns how many were queued.

    Retries live in the database (``retry_wait`` + ``retry_at``), not in a scheduler,
    so none is lost when a scheduler or Redis goes away.
    """
    now = timezone.now()
    due = list(
        NodeRun.objects.filter(status=NodeRun.Status.RETRY_WAIT, retry_at__lte=now)
        .order_by("retry_at")
        .values_list("run_id", flat=True)[:limit]
    )
    promoted = 0
    for run_id in sorted(set(due)):
        with transaction.atomic():
            run = lock_run(run_id)
            if run.status != Run.Status.RUNNING:
                continue
            lock_pools(run)
            nodes = list(
                NodeRun.objects.select_for_update(no_key=True)
                .filter(run=run, status=NodeRun.Status.RETRY_WAIT, retry_at__lte=now)
                .order_by("id")
            )
            promoted += len(queue_or_wait(run, nodes, now))
    return promoted


def expire_overdue_runs() -> int:
    now = timezone.now()
    overdue = Run.objects.filter(status=Run.Status.RUNNING, deadline__lt=now).values_list(
        "pk", flat=True
    )
    return sum(expire_run(run_id) for run_id in list(overdue))


def resend_lost_messages(older_than_seconds: float = 5.0) -> int:
    """Re-send queued nodes whose RQ job is gone (never sent, or Redis lost it).

    The job id is derived from (node-run, attempt), so re-sending the same message
    is safe: the claim's compare-and-set lets only one delivery run the node.
    """
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    queued = list(
        NodeRun.objects.filter(status=NodeRun.Status.QUEUED, queued_at__lte=cutoff).order_by(
            "queued_at"
        )[:1000]
    )
    if not queued:
        return 0
    missing = dispatch.missing_jobs([dispatch.job_id(node.pk, node.attempt) for node in queued])
    lost = [node for node in queued if dispatch.job_id(node.pk, node.attempt) in missing]
    if lost:
        dispatch.send([dispatch.Dispatch.for_node(node, note=" (re-sent)") for node in lost])
    return len(lost)
