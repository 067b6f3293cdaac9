"""Recovery transitions: resume, retry, rollback, skip and mark succeeded.

Operations call ``recover`` with a planner from ``plans``; it compensates (rollback),
then locks, plans again and ``apply``s. The lock order is the engine's (``common``);
jobs go to RQ after commit; a late result of an attempt reset here is rejected by the
compare-and-set.
"""

from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from workflows.engine.attempts import next_checkpoint_sequence
from workflows.engine.common import lock_pools, lock_run
from workflows.engine.compensation import compensate
from workflows.engine.plans import Plan, RecoveryError, load_nodes
from workflows.engine.queueing import fill_pool, queue_or_wait
from workflows.engine.runs import cancel_run, close_run_if_done
from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run, RunEvent

ALREADY_APPLIED = "This request was already applied; nothing changed."


@dataclass(frozen=True)
class Recovered:
    """What ``recover`` did: the run as it is now, and the plan it applied (if any)."""

    run: Run
    changed: bool
    message: str = ""
    plan: Plan | None = None


def recover(
    action: str,
    run_id: int,
    make_plan: Callable[[Run, dict[str, NodeRun]], Plan],
    *,
    actor: str,
    reason: str,
    request_key: str | None = None,
    details: dict | None = None,
) -> Recovered:
    """Apply one operator action to a run, with its audit event.

    1. Plan from unlocked rows; a request key seen before, or nothing to do, changes
       nothing. A plan the run does not allow raises ``RecoveryError``.
    2. Run the plan's compensate hooks (a rollback's), outside any transaction and lock;
       one that fails or overruns raises, and nothing is changed.
    3. In one transaction: lock the run, its pools, then plan again from the locked node
       rows. If hooks ran and the plan is no longer the same, raise: the run changed
       while compensating.
    4. Apply the plan and write the operator's RunEvent (actor, reason, before/after).
    """
    run = Run.objects.get(pk=run_id)
    if request_key and RunEvent.objects.filter(request_key=request_key).exists():
        return Recovered(run, False, ALREADY_APPLIED)
    draft = make_plan(run, load_nodes(run, lock=False))
    if draft.is_noop:
        return Recovered(run, False, draft.noop_message, draft)
    compensate(draft)
    with transaction.atomic():
        run = lock_run(run_id)
        if request_key and RunEvent.objects.filter(request_key=request_key).exists():
            return Recovered(run, False, ALREADY_APPLIED)
        # The engine's lock order: the run, its pools, then its node rows (the plan's).
        lock_pools(run)
        before_status = run.status
        try:
            plan = make_plan(run, load_nodes(run, lock=True))
        except RecoveryError as error:
            if not draft.compensate:
                raise
            raise RecoveryError(_changed_message(draft, f" ({error})")) from None
        if draft.compensate and _shape(plan) != _shape(draft):
            raise RecoveryError(_changed_message(draft))
        if plan.is_noop:
            return Recovered(run, False, plan.noop_message, plan)
        summary = apply(plan, actor=actor, reason=reason)
        RunEvent.objects.create(
            run=run,
            kind=RunEvent.Kind.OPERATOR,
            actor=actor,
            reason=reason,
            request_key=request_key,
            before={
                "action": action,
                **(details or {}),
                "run_status": before_status,
                "nodes": summary["nodes_before"],
            },
            after={"run_status": summary["run_status"], "nodes": summary["nodes_after"]},
        )
    run.refresh_from_db()
    return Recovered(run, True, "", plan)


def _shape(plan: Plan) -> tuple:
    """What must not change between compensating and applying."""
    return (
        plan.run.status,
        plan.noop_message,
        tuple(plan.compensate),
        tuple(plan.reset),
        tuple(sorted(plan.resume_from_checkpoint)),
        plan.drop_checkpoints_after_id,
        tuple(plan.skip),
        tuple(plan.succeed),
        tuple((key, plan.nodes[key].status, plan.nodes[key].attempt) for key in plan.affected()),
    )


def _changed_message(draft: Plan, why: str = "") -> str:
    return (
        f"Run {draft.run.pk} changed while its compensate hooks ran "
        f"({', '.join(draft.compensate)} compensated){why}; nothing was reset. "
        "Preview the rollback again."
    )


def apply(plan: Plan, *, actor: str, reason: str) -> dict:
    """Apply a plan; the caller holds the locks of the run, its pools and the plan's
    node rows, taken in that order (``recover``).

    1. End the active attempts of nodes being reset, skipped or marked.
    2. Reset, skip or mark the nodes; drop outputs and later checkpoints.
    3. Re-open the run, recount every pending node's unfinished upstreams, queue the
       ready ones (pools permitting), refill freed pool slots, close it if done.
    Returns before/after node statuses for the audit event.
    """
    run, nodes, now = plan.run, plan.nodes, timezone.now()
    before = {key: nodes[key].status for key in plan.affected()}
    note = f"{plan.action} by {actor}: {reason}"[:2000]
    touched = [*plan.reset, *plan.skip, *plan.succeed]
    _end_active_attempts([nodes[key] for key in touched], note, now)
    if plan.reset:
        _reset(plan, note, now)
    for key in plan.skip:
        _set(nodes[key], status=NodeRun.Status.SKIPPED, finished_at=now, reason=note, retry_at=None)
    for key, output in plan.succeed.items():
        node = nodes[key]
        _set(
            node,
            status=NodeRun.Status.SUCCEEDED,
            output=output,
            finished_at=now,
            reason=note,
            retry_at=None,
        )
        Checkpoint.objects.create(
            run=run,
            node_run=node,
            kind=Checkpoint.Kind.NODE_DONE,
            sequence=next_checkpoint_sequence(node.pk),
            attempt=node.attempt,
            state={"output": output},
        )
    _reopen(run, now)
    if plan.pause_after:
        # Rolled back without resuming: nothing is queued; resume_run continues later.
        cancel_run(
            run.pk, actor=actor, reason=f"rolled back; resume the run to continue ({reason})"
        )
    else:
        queue_or_wait(run, _recount_pending(nodes, now), now)
        for pool in sorted({nodes[key].pool for key in touched if nodes[key].pool}):
            fill_pool(pool, now)
        close_run_if_done(run, now)
    after = dict(
        NodeRun.objects.filter(run=run, node_key__in=list(before)).values_list("node_key", "status")
    )
    run.refresh_from_db()
    return {"nodes_before": before, "nodes_after": after, "run_status": run.status}


def _end_active_attempts(nodes: list[NodeRun], note: str, now) -> None:
    # One UPDATE per attempt number, not per node: a wide resume ends them all at once.
    by_attempt: dict[int, list[int]] = {}
    for node in nodes:
        if node.status in NodeRun.ACTIVE:
            by_attempt.setdefault(node.attempt, []).append(node.pk)
    for number, ids in by_attempt.items():
        NodeAttempt.objects.filter(
            node_run_id__in=ids, number=number, status__in=NodeAttempt.ACTIVE
        ).update(
            status=NodeAttempt.Status.ABANDONED,
            finished_at=now,
            updated_at=now,
            error_type="ResetByOperator",
            error_message=note,
        )


def _reset(plan: Plan, note: str, now) -> None:
    nodes = plan.nodes
    ids = [nodes[key].pk for key in plan.reset]
    if plan.drop_checkpoints_after_id is not None:
        Checkpoint.objects.filter(
            node_run_id__in=ids, pk__gt=plan.drop_checkpoints_after_id
        ).delete()
    fresh = [nodes[key].pk for key in plan.reset if key not in plan.resume_from_checkpoint]
    Checkpoint.objects.filter(node_run_id__in=fresh).delete()
    reset = {
        "status": NodeRun.Status.PENDING,
        "output": None,
        "finished_at": None,
        "retry_at": None,
        "heartbeat_at": None,
        "progress": None,
        "reason": note,
        "updated_at": now,
    }
    # Retries count from here: each node's own attempt, so one UPDATE for all of them.
    NodeRun.objects.filter(pk__in=ids).update(**reset, attempts_base=F("attempt"))
    for key in plan.reset:
        node = nodes[key]
        for name, value in reset.items():
            setattr(node, name, value)
        node.attempts_base = node.attempt


def _set(node: NodeRun, **fields) -> None:
    for name, value in fields.items():
        setattr(node, name, value)
    node.save(update_fields=[*fields, "updated_at"])


def _reopen(run: Run, now) -> None:
    if run.status in Run.TERMINAL:
        run.status = Run.Status.RUNNING
        run.finished_at = None
        run.reason = ""
        run.save(update_fields=["status", "finished_at", "reason", "updated_at"])


def _recount_pending(nodes: dict[str, NodeRun], now) -> list[NodeRun]:
    """Set each pending node's count of unfinished upstreams; return those with none."""
    done = {key for key, node in nodes.items() if node.status in NodeRun.DONE}
    ready, changed = [], []
    for node in nodes.values():
        if node.status != NodeRun.Status.PENDING:
            continue
        waiting = [up for up in node.upstream if up not in done]
        blocked = [up for up in waiting if nodes[up].status in NodeRun.TERMINAL]
        reason = (
            f"blocked: upstream {blocked[0]} {nodes[blocked[0]].status}"
            if blocked
            else f"waiting for upstream: {', '.join(waiting)}"
            if waiting
            else node.reason
        )
        if node.pending_upstreams != len(waiting) or node.reason != reason:
            node.pending_upstreams, node.reason, node.updated_at = len(waiting), reason, now
            changed.append(node)
        if not waiting:
            ready.append(node)
    NodeRun.objects.bulk_update(changed, ["pending_upstreams", "reason", "updated_at"])
    return ready
