"""Recovery transitions: resume, retry, rollback, skip and mark succeeded.

Operations (workflows/operations.py) build a ``Plan`` for an operator action, show it as
a preview, run its compensate hooks (``compensate``, before any lock), then lock, plan
again and ``apply`` it. The lock order is the engine's (``common``); jobs go to RQ after
commit; a late result of an attempt reset here is rejected by the compare-and-set.
"""

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import Max
from django.utils import timezone

from workflows import engine
from workflows.definitions import registry
from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run

logger = logging.getLogger(__name__)


class RecoveryError(Exception):
    """The action cannot be applied to the run as it is; the message says what to do."""


@dataclass
class Plan:
    """What an operator action will change. Built from rows locked by the caller."""

    action: str
    run: Run
    nodes: dict[str, NodeRun]
    # Nodes that go back to pending and run again.
    reset: list[str] = field(default_factory=list)
    # Of those, nodes that resume from their latest progress checkpoint (others start over).
    resume_from_checkpoint: set[str] = field(default_factory=set)
    # Checkpoints to drop: of the reset nodes, every checkpoint with an id above this.
    drop_checkpoints_after_id: int | None = None
    # Compensate hooks to run first, in this order (reverse completion order).
    compensate: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    succeed: dict[str, Any] = field(default_factory=dict)
    pause_after: bool = False  # rollback without resume: leave the run cancelled
    noop_message: str = ""

    @property
    def is_noop(self) -> bool:
        return bool(self.noop_message)

    def affected(self) -> list[str]:
        return [
            *self.compensate,
            *[k for k in self.reset if k not in self.compensate],
            *self.skip,
            *self.succeed,
        ]


# --- Planning (reads only) --------------------------------------------------------------------


def load_nodes(run: Run, *, lock: bool) -> dict[str, NodeRun]:
    queryset = NodeRun.objects.filter(run=run).order_by("id")
    if lock:
        queryset = queryset.select_for_update(no_key=True)
    return {node.node_key: node for node in queryset}


def descendants(nodes: dict[str, NodeRun], keys) -> list[str]:
    """Every node downstream of ``keys`` (not including them), in definition order."""
    found: set[str] = set()
    frontier = list(keys)
    while frontier:
        for child in nodes[frontier.pop()].downstream:
            if child not in found:
                found.add(child)
                frontier.append(child)
    return [key for key in nodes if key in found]


def _get_node(nodes: dict[str, NodeRun], key: str, run: Run) -> NodeRun:
    if key not in nodes:
        raise RecoveryError(
            f"Run {run.pk} has no node {key!r} (nodes: {', '.join(list(nodes)[:20])})."
        )
    return nodes[key]


def plan_resume(run: Run, nodes: dict[str, NodeRun]) -> Plan:
    plan = Plan("resume", run, nodes)
    if run.status == Run.Status.SUCCEEDED:
        plan.noop_message = f"Run {run.pk} already succeeded; nothing to resume."
    elif run.status in Run.ACTIVE:
        plan.noop_message = (
            f"Run {run.pk} is {run.status}; nothing to resume (retry a node instead)."
        )
    else:
        plan.reset = [key for key, node in nodes.items() if node.status not in NodeRun.DONE]
        plan.resume_from_checkpoint = set(plan.reset)
    return plan


def plan_retry(
    run: Run, nodes: dict[str, NodeRun], key: str, *, downstream: bool, expected_attempt=None
) -> Plan:
    node = _get_node(nodes, key, run)
    plan = Plan("retry", run, nodes)
    if expected_attempt is not None and node.attempt != expected_attempt:
        plan.noop_message = (
            f"Node {key} is at attempt {node.attempt}, not {expected_attempt}: it was retried or moved on "
            "since you looked; nothing changed."
        )
        return plan
    if node.status == NodeRun.Status.PENDING and node.pending_upstreams:
        blockers = [up for up in node.upstream if nodes[up].status not in NodeRun.DONE]
        raise RecoveryError(
            f"Node {key} has not run yet: it waits for {', '.join(blockers)}. Retry "
            f"{blockers[0]} (with its downstream) or resume the run instead."
        )
    plan.reset = [key]
    # A node that did not finish resumes from its checkpoint; a succeeded one starts over.
    if node.status != NodeRun.Status.SUCCEEDED:
        plan.resume_from_checkpoint = {key}
    if downstream:
        plan.reset += [k for k in descendants(nodes, [key]) if k not in plan.reset]
    return plan


def plan_rollback(
    run: Run,
    nodes: dict[str, NodeRun],
    *,
    checkpoint_id: int | None = None,
    node_key: str | None = None,
    resume: bool = True,
) -> Plan:
    """Back to a checkpoint, or to just before a node.

    1. Find the point: the checkpoint's id, or just before the node's first checkpoint.
    2. Nodes completed after the point (their node_done checkpoint is later) are
       compensated, newest first, and reset with everything downstream of them.
    3. Rolling back to a progress checkpoint of node X also resets X, which resumes
       from that checkpoint; "to just before X" resets X to start over.
    4. Every checkpoint of the reset nodes later than the point is dropped.
    """
    if (checkpoint_id is None) == (node_key is None):
        raise RecoveryError("Give exactly one of a checkpoint or a node to roll back to.")
    if run.status in Run.ACTIVE:
        raise RecoveryError(f"Run {run.pk} is still {run.status}; cancel it first, then roll back.")
    plan = Plan("rollback", run, nodes, pause_after=not resume)
    roots: list[str] = []
    if checkpoint_id is not None:
        checkpoint = (
            Checkpoint.objects.filter(pk=checkpoint_id, run=run).select_related("node_run").first()
        )
        if checkpoint is None:
            raise RecoveryError(
                f"Run {run.pk} has no checkpoint {checkpoint_id}; pick one from the run page."
            )
        point = checkpoint.pk
        if checkpoint.kind == Checkpoint.Kind.PROGRESS and checkpoint.node_run is not None:
            roots.append(checkpoint.node_run.node_key)
    else:
        node = _get_node(nodes, node_key, run)
        first = (
            Checkpoint.objects.filter(node_run=node)
            .order_by("pk")
            .values_list("pk", flat=True)
            .first()
        )
        newest = Checkpoint.objects.filter(run=run).aggregate(newest=Max("pk"))["newest"] or 0
        point = (first - 1) if first is not None else newest
        roots.append(node.node_key)
    completed_after = list(
        Checkpoint.objects.filter(
            run=run, kind=Checkpoint.Kind.NODE_DONE, pk__gt=point, node_run__isnull=False
        )
        .order_by("-pk")
        .values_list("node_run__node_key", flat=True)
    )
    completed_now = [
        key
        for key in dict.fromkeys(completed_after)
        if nodes[key].status == NodeRun.Status.SUCCEEDED
    ]
    plan.compensate = [
        key for key in completed_now if registry.get(nodes[key].node_type).compensate_func
    ]
    starts = list(dict.fromkeys([*roots, *completed_now]))
    plan.reset = [key for key in nodes if key in set(starts) | set(descendants(nodes, starts))]
    plan.drop_checkpoints_after_id = point
    plan.resume_from_checkpoint = set(plan.reset)  # from what is left after the drop
    if not plan.reset:
        plan.noop_message = "Nothing completed after that point; nothing to roll back."
    return plan


def plan_skip(run: Run, nodes: dict[str, NodeRun], key: str) -> Plan:
    node = _get_node(nodes, key, run)
    plan = Plan("skip", run, nodes)
    if node.status in NodeRun.DONE:
        plan.noop_message = f"Node {key} is already {node.status}; nothing to skip."
    else:
        plan.skip = [key]
    return plan


def plan_mark_succeeded(run: Run, nodes: dict[str, NodeRun], key: str, output) -> Plan:
    node = _get_node(nodes, key, run)
    plan = Plan("mark_succeeded", run, nodes)
    try:
        size = len(json.dumps(output))
    except (TypeError, ValueError) as error:
        raise RecoveryError(f"The output must be JSON: {error}") from None
    if size > settings.KEEL_MAX_OUTPUT_BYTES:
        raise RecoveryError(
            f"The output is {size} bytes, over KEEL_MAX_OUTPUT_BYTES={settings.KEEL_MAX_OUTPUT_BYTES}."
        )
    if node.status == NodeRun.Status.SUCCEEDED:
        plan.noop_message = f"Node {key} already succeeded; nothing to mark."
    else:
        plan.succeed = {key: output}
    return plan


# --- Applying ---------------------------------------------------------------------------------


@dataclass
class CompensationContext:
    """What a compensate hook sees: ``hook(ctx, output)``."""

    run_id: int
    node_key: str
    params: dict
    run_params: dict
    idempotency_key: str
    log: logging.Logger


def apply(plan: Plan, *, actor: str, reason: str) -> dict:
    """Apply a plan; the caller holds the run lock (and the plan's node rows).

    1. Lock the run's pools (the compensate hooks ran before, outside the locks).
    2. End the active attempts of nodes being reset, skipped or marked.
    3. Reset, skip or mark the nodes; drop outputs and later checkpoints.
    4. Re-open the run, recount every pending node's unfinished upstreams, queue the
       ready ones (pools permitting), refill freed pool slots, close it if done.
    Returns before/after node statuses for the audit event.
    """
    run, nodes, now = plan.run, plan.nodes, timezone.now()
    engine.lock_pools(run)
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
            sequence=engine.next_checkpoint_sequence(node.pk),
            attempt=node.attempt,
            state={"output": output},
        )
    _reopen(run, now)
    if plan.pause_after:
        # Rolled back without resuming: nothing is queued; resume_run continues later.
        engine.cancel_run(
            run.pk, actor=actor, reason=f"rolled back; resume the run to continue ({reason})"
        )
    else:
        engine.queue_or_wait(run, _recount_pending(nodes, now), now)
        for pool in sorted({nodes[key].pool for key in touched if nodes[key].pool}):
            engine.fill_pool(pool, now)
        engine.close_run_if_done(run, now)
    after = dict(
        NodeRun.objects.filter(run=run, node_key__in=list(before)).values_list("node_key", "status")
    )
    run.refresh_from_db()
    return {"nodes_before": before, "nodes_after": after, "run_status": run.status}


def compensate(plan: Plan) -> None:
    """Run the plan's compensate hooks, newest completion first, each within
    ``KEEL_COMPENSATE_TIMEOUT_SECONDS``.

    The caller holds no lock and no transaction: a hook is user code that may call other
    systems for a while, and must not hold the run's or the pools' locks meanwhile. A
    hook that fails or overruns stops the rollback before anything is reset.
    """
    for key in plan.compensate:
        _compensate(plan.run, plan.nodes[key], settings.KEEL_COMPENSATE_TIMEOUT_SECONDS)


def _compensate(run: Run, node: NodeRun, timeout: float) -> None:
    hook = registry.get(node.node_type).compensate_func
    ctx = CompensationContext(
        run_id=run.pk,
        node_key=node.node_key,
        params=node.params,
        run_params=run.params,
        idempotency_key=node.idempotency_key,
        log=logging.getLogger(f"keel.compensate.{node.node_key}"),
    )
    failed: list[BaseException] = []

    def call() -> None:
        try:
            hook(ctx, node.output)
        except Exception as error:
            failed.append(error)
        finally:
            connections.close_all()  # this thread's own connections

    # A thread, so that the timeout holds whatever the hook does; one that overruns is
    # left to finish on its own (a daemon: it never keeps the process alive).
    thread = threading.Thread(target=call, name=f"keel-compensate-{node.node_key}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RecoveryError(
            f"The compensate hook of node {node.node_key} did not finish within {timeout:g}s "
            "(KEEL_COMPENSATE_TIMEOUT_SECONDS). Nothing was reset; it may still finish on its "
            "own. Check what it does, then roll back again (hooks must be safe to repeat)."
        )
    if failed:
        error = failed[0]
        raise RecoveryError(
            f"The compensate hook of node {node.node_key} failed: {type(error).__name__}: {error}. "
            "Nothing was reset; fix the cause and roll back again (hooks must be safe to repeat)."
        ) from error


def _end_active_attempts(nodes: list[NodeRun], note: str, now) -> None:
    for node in nodes:
        if node.status in NodeRun.ACTIVE:
            NodeAttempt.objects.filter(
                node_run=node, number=node.attempt, status__in=NodeAttempt.ACTIVE
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
    for key in plan.reset:
        node = nodes[key]
        _set(
            node,
            status=NodeRun.Status.PENDING,
            output=None,
            finished_at=None,
            retry_at=None,
            heartbeat_at=None,
            progress=None,
            reason=note,
            attempts_base=node.attempt,
        )


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
    ready = []
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
            _set(node, pending_upstreams=len(waiting), reason=reason)
        if not waiting:
            ready.append(node)
    return ready
