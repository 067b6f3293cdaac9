"""Stopping one running node on an operator's word: its attempt fails, and is not retried.

Like Airflow's "mark failed" on a running task. The run then goes on, or fails, as after
any node failure; the worker is told to stop the job once the transaction commits.
"""

from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from workflows.engine.common import EngineError, lock_pools, lock_run
from workflows.engine.outcomes import record_node_end
from workflows.engine.queueing import fill_pool
from workflows.engine.runs import close_run_if_done
from workflows.models import NodeAttempt, NodeRun, Run, RunEvent
from workflows.runtime import dispatch

STOPPED_ERROR = "StoppedByOperator"
ALREADY_APPLIED = "This request was already applied; nothing changed."


@dataclass(frozen=True)
class Stopped:
    """What ``stop_node`` did: the run as it is now, and whether anything changed."""

    run: Run
    changed: bool
    message: str


def why_not_stoppable(node: NodeRun, expected_attempt: int | None = None) -> str:
    """Why stopping ``node`` now would change nothing ("" when it can be stopped)."""
    where = f"Node {node.node_key} of run {node.run_id}"
    if expected_attempt is not None and node.attempt != expected_attempt:
        return (
            f"{where} is at attempt {node.attempt}, not {expected_attempt}: it moved on since "
            f"you looked ({node.status} now); nothing to stop."
        )
    if node.status != NodeRun.Status.RUNNING:
        return f"{where} is {node.status.replace('_', ' ')}, not running; nothing to stop."
    return ""


def stop_note(actor: str, reason: str) -> str:
    return f"stopped by {actor}: {reason}"[:2000]


def stop_node(
    run_id: int,
    node_key: str,
    *,
    actor: str,
    reason: str,
    expected_attempt: int | None = None,
    request_key: str | None = None,
) -> Stopped:
    """Fail a node's running attempt with "stopped by <actor>: <reason>", not retried.

    1. Lock the run, its pools, then the node (the engine's order). A request key seen
       before, or a node no longer running that attempt, changes nothing and says why.
    2. ``running`` → ``failed`` by a conditional UPDATE on the status and attempt number
       (compare-and-set): a double click or an outcome that won the race writes nothing.
    3. Close the attempt as failed with the note; the node's transition event, its
       downstream told why it waits, and the operator's event (actor, reason, before,
       after).
    4. Free its pool slot; close the run if nothing more can happen in it.
    5. After commit, tell the worker to stop the job (RQ's stop-job command). A result the
       job still reports is rejected as stale; a forking worker also stops its horse
       within a second once the attempt is no longer the node's current one.
    """
    now = timezone.now()
    note = stop_note(actor, reason)
    with transaction.atomic():
        run = lock_run(run_id)
        if request_key and RunEvent.objects.filter(request_key=request_key).exists():
            return Stopped(run, False, ALREADY_APPLIED)
        lock_pools(run)
        node = NodeRun.objects.select_for_update(no_key=True).filter(run=run, node_key=node_key)
        node = node.first()
        if node is None:
            raise EngineError(f"Run {run.pk} has no node {node_key!r}.")
        refusal = why_not_stoppable(node, expected_attempt)
        if refusal:
            return Stopped(run, False, refusal)
        attempt, before_status = node.attempt, run.status
        claimed = NodeRun.objects.filter(
            pk=node.pk, status=NodeRun.Status.RUNNING, attempt=attempt
        ).update(
            status=NodeRun.Status.FAILED,
            finished_at=now,
            reason=note,
            retry_at=None,
            updated_at=now,
        )
        if claimed != 1:  # the lock says it cannot happen; the statement says it did not
            return Stopped(run, False, f"Node {node_key} of run {run.pk} changed; nothing to stop.")
        worker = (
            NodeAttempt.objects.filter(node_run=node, number=attempt)
            .values_list("worker", flat=True)
            .first()
        )
        NodeAttempt.objects.filter(
            node_run=node, number=attempt, status__in=NodeAttempt.ACTIVE
        ).update(
            status=NodeAttempt.Status.FAILED,
            finished_at=now,
            updated_at=now,
            error_type=STOPPED_ERROR,
            error_message=note,
        )
        node.status, node.finished_at, node.reason = NodeRun.Status.FAILED, now, note
        record_node_end(run, node, now, actor)
        if node.pool:
            fill_pool(node.pool, now)
        close_run_if_done(run, now)
        RunEvent.objects.create(
            run=run,
            node_run=node,
            kind=RunEvent.Kind.OPERATOR,
            actor=actor,
            reason=reason,
            request_key=request_key,
            before={
                "action": "stop_node",
                "node": node_key,
                "attempt": attempt,
                "worker": worker or "",
                "run_status": before_status,
                "nodes": {node_key: NodeRun.Status.RUNNING},
            },
            after={"run_status": run.status, "nodes": {node_key: NodeRun.Status.FAILED}},
        )
        job = dispatch.job_id(node.pk, attempt)
        transaction.on_commit(lambda: dispatch.stop_jobs([job]))
    run.refresh_from_db()
    on = f" on worker {worker}" if worker else ""
    return Stopped(
        run,
        True,
        f"Node {node_key} of run {run.pk} stopped: attempt {attempt}{on} failed and is not "
        f"retried; the run is {run.status}.",
    )
