"""Transitions the watchdog sweeps for each tick: due retries, pool waits past their
timeout, overdue runs, lost messages."""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from workflows.engine.common import ENGINE, lock_pools, lock_run
from workflows.engine.outcomes import record_node_end
from workflows.engine.queueing import queue_or_wait
from workflows.engine.runs import close_run_if_done, expire_run
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


def fail_pool_timeouts(limit: int = 500) -> int:
    """Fail the nodes that waited for a slot of their pool longer than their definition's
    ``pool_timeout`` allows; the reason says so. They are not retried: a full pool is not
    something another attempt changes. Returns how many failed.

    A node waiting for its pool is ``pending`` with no upstream left, and its row is not
    touched while it waits (``queueing.fill_pool`` moves only the ones it queues), so
    ``updated_at`` is when the wait began, as the pool_exhausted detector reads it too.
    """
    now = timezone.now()
    waiting = (
        NodeRun.objects.filter(
            status=NodeRun.Status.PENDING,
            pool_timeout_seconds__isnull=False,
            pending_upstreams=0,
            updated_at__lt=now - timedelta(seconds=1),
        )
        .only("id", "run_id", "updated_at", "pool_timeout_seconds")
        .order_by("updated_at")[:limit]
    )
    over = [
        node
        for node in waiting
        if node.updated_at + timedelta(seconds=node.pool_timeout_seconds) <= now
    ]
    failed = 0
    for run_id in sorted({node.run_id for node in over}):
        ids = [node.pk for node in over if node.run_id == run_id]
        with transaction.atomic():
            run = lock_run(run_id)
            if run.status != Run.Status.RUNNING:
                continue
            lock_pools(run)
            for node in NodeRun.objects.select_for_update(no_key=True).filter(
                pk__in=ids, status=NodeRun.Status.PENDING, pending_upstreams=0
            ):
                waited = (now - node.updated_at).total_seconds()
                if waited < node.pool_timeout_seconds:
                    continue  # it began to wait again since it was read
                node.status, node.finished_at = NodeRun.Status.FAILED, now
                node.reason = (
                    f"waited {waited:.0f}s for a slot of pool {node.pool}, longer than its "
                    f"pool_timeout ({node.pool_timeout_seconds}s); not retried"
                )
                node.save(update_fields=["status", "finished_at", "reason", "updated_at"])
                record_node_end(run, node, now, ENGINE, was=NodeRun.Status.PENDING)
                failed += 1
            close_run_if_done(run, now)
    return failed


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
