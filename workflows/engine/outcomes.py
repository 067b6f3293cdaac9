"""Outcomes of attempts: success, failure or timeout, abandon; retries with backoff.

Whoever reports (the process that ran the node, its worker, the watchdog), a result is
applied only while the node is still ``running`` *that* attempt (compare-and-set);
anything else is a stale message, recorded in the run's history and otherwise ignored.
"""

import random
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from workflows.engine import statements
from workflows.engine.attempts import record_stale_message
from workflows.engine.common import ENGINE, lock_for_outcome, lock_run_for_outcome
from workflows.engine.queueing import fill_pool, queue_or_wait
from workflows.engine.runs import close_run_if_done
from workflows.models import NodeAttempt, NodeRun, Run, RunEvent


@dataclass(frozen=True)
class Failure:
    """What went wrong in one attempt, as the executor (or the watchdog) saw it."""

    error_type: str
    message: str
    traceback: str = ""
    timed_out: bool = False
    # Class names of the exception and its bases, matched against ``retry_on``.
    names: tuple[str, ...] = ()
    retryable: bool = True
    # True when the attempt was ended from outside (lost worker): the error list of
    # ``retry_on`` says nothing about it.
    ignore_retry_on: bool = False


def complete_attempt(
    node_run_id: int, attempt: int, output, *, actor: str = ENGINE, run_id: int | None = None
) -> bool:
    """Apply a successful attempt and advance the run. Returns False if it was stale.

    1. Lock the run and its pools; then, only if the node is running this attempt
       (compare-and-set), mark it succeeded, write its node_done checkpoint, close the
       attempt and count it off its downstream nodes (``statements.succeed``); else
       reject.
    2. Queue the downstream nodes left with nothing to wait for, as their pools allow.
    3. Give the node's pool slot to a waiting node (in any run); close the run if
       nothing more can happen in it (queueing and the pool only add to what moves).
    """
    now = timezone.now()
    with transaction.atomic():
        run = lock_run_for_outcome(node_run_id, run_id)
        done = statements.succeed(run.pk, node_run_id, attempt, output, now)
        if done is None:
            record_stale_message(node_run_id, attempt, actor, "success")
            return False
        queue_or_wait(run, done["ready"], now)
        if done["pool"]:
            fill_pool(done["pool"], now)
        if not done["moving"]:
            close_run_if_done(run, now, moving=False)
    return True


def fail_attempt(
    node_run_id: int,
    attempt: int,
    failure: Failure,
    *,
    actor: str = ENGINE,
    run_id: int | None = None,
) -> bool:
    """Record a failed or timed-out attempt; retry it or fail the node. False if stale.

    1. Lock the run, its pools, then the node; reject unless running this attempt.
    2. Close the attempt with the error and traceback.
    3. Attempts left and the error retryable: ``retry_wait`` until the backoff has
       passed (``promote_due_retries`` queues it; a zero delay queues it now).
       Otherwise the node is failed / timed_out and its downstream stays pending.
    4. Free its pool slot; close the run if nothing more can run.
    """
    now = timezone.now()
    with transaction.atomic():
        run, node = lock_for_outcome(node_run_id, run_id)
        if node.status != NodeRun.Status.RUNNING or node.attempt != attempt:
            record_stale_message(node_run_id, attempt, actor, "failure")
            return False
        _close_attempt(node, attempt, failure, now)
        _after_failure(run, node, failure, now, actor)
        if node.pool:
            fill_pool(node.pool, now)
        close_run_if_done(run, now)
    return True


def abandon_attempt(
    node_run_id: int, attempt: int, *, reason: str, actor: str, retry: bool = True
) -> bool:
    """End an attempt whose worker can no longer report (killed, lost), then let the
    retry policy act — the next attempt resumes from the node's latest checkpoint.

    Used by the watchdog (worker or job lost) and by operators. The attempt is marked
    ``abandoned``; if its worker does report later, that result is rejected as stale.
    Returns False when the attempt is no longer the node's current running one.
    """
    now = timezone.now()
    # Retried whatever ``retry_on`` lists: the node itself never raised anything.
    failure = Failure(
        error_type="AttemptAbandoned", message=reason, retryable=retry, ignore_retry_on=True
    )
    with transaction.atomic():
        run, node = lock_for_outcome(node_run_id)
        if (
            node.status not in (NodeRun.Status.RUNNING, NodeRun.Status.QUEUED)
            or node.attempt != attempt
        ):
            return False
        NodeAttempt.objects.filter(node_run=node, number=attempt).update(
            status=NodeAttempt.Status.ABANDONED,
            finished_at=now,
            updated_at=now,
            error_type=failure.error_type,
            error_message=reason[:10_000],
        )
        _after_failure(run, node, failure, now, actor)
        if node.pool:
            fill_pool(node.pool, now)
        close_run_if_done(run, now)
    return True


def _close_attempt(node: NodeRun, attempt: int, failure: Failure, now) -> None:
    NodeAttempt.objects.filter(node_run=node, number=attempt).update(
        status=NodeAttempt.Status.TIMED_OUT if failure.timed_out else NodeAttempt.Status.FAILED,
        finished_at=now,
        updated_at=now,
        error_type=failure.error_type[:200],
        error_message=failure.message[:10_000],
        traceback=failure.traceback[-50_000:],
    )


def _after_failure(run: Run, node: NodeRun, failure: Failure, now, actor: str) -> None:
    what = "timed out" if failure.timed_out else "failed"
    summary = f"attempt {node.attempt} {what}: {failure.error_type}: {failure.message}"[:2000]
    if node.attempt - node.attempts_base < node.max_attempts and _should_retry(
        node.retry_policy, failure
    ):
        delay = backoff_delay(node.retry_policy, node.attempt)
        node.status = NodeRun.Status.RETRY_WAIT
        node.retry_at = now + timedelta(seconds=delay)
        node.reason = (
            f"{summary}; attempt {node.attempt + 1} of {node.max_attempts} in {delay:.1f}s"
        )
        node.save(update_fields=["status", "retry_at", "reason", "updated_at"])
        RunEvent.objects.create(
            run=run,
            node_run=node,
            kind=RunEvent.Kind.RETRY,
            actor=actor,
            reason=node.reason,
            before={"status": NodeRun.Status.RUNNING, "attempt": node.attempt},
            after={"status": NodeRun.Status.RETRY_WAIT, "retry_at": node.retry_at.isoformat()},
        )
        if delay <= 0:
            queue_or_wait(run, [node], now)
        return
    node.status = NodeRun.Status.TIMED_OUT if failure.timed_out else NodeRun.Status.FAILED
    node.finished_at = now
    tries = (
        "no retries left"
        if node.attempt - node.attempts_base >= node.max_attempts
        else "not retryable"
    )
    node.reason = f"{summary} ({tries})"
    node.save(update_fields=["status", "finished_at", "reason", "updated_at"])
    record_node_end(run, node, now, actor)


def record_node_end(
    run: Run, node: NodeRun, now, actor: str, was: str = NodeRun.Status.RUNNING
) -> None:
    """A node has ended for good (``node`` holds its new status and reason; it ``was``
    running unless said): its transition event, and its pending downstream told why it
    waits."""
    RunEvent.objects.create(
        run=run,
        node_run=node,
        kind=RunEvent.Kind.TRANSITION,
        actor=actor,
        reason=node.reason,
        before={"status": was},
        after={"status": node.status},
    )
    if node.downstream:
        NodeRun.objects.filter(
            run=run, node_key__in=node.downstream, status=NodeRun.Status.PENDING
        ).update(reason=f"blocked: upstream {node.node_key} {node.status}", updated_at=now)


def _should_retry(policy: dict, failure: Failure) -> bool:
    if not failure.retryable:
        return False
    retry_on = policy.get("retry_on") or []
    return (
        failure.ignore_retry_on or not retry_on or any(name in retry_on for name in failure.names)
    )


def backoff_delay(policy: dict, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, jittered.

    Jitter keeps the delay between half and all of the computed value, so a burst of
    failures does not come back as a burst of retries.
    """
    base = float(policy.get("backoff", 0))
    factor = float(policy.get("factor", 2))
    delay = min(base * factor ** max(attempt - 1, 0), float(policy.get("max_delay", 300)))
    if policy.get("jitter", True) and delay > 0:
        delay = random.uniform(delay / 2, delay)
    return delay
