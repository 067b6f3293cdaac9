"""Runs: start one, close it when nothing more can happen, cancel or expire it."""

from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from workflows.definitions import graph
from workflows.definitions.params import run_param_problems
from workflows.engine import statements
from workflows.engine.common import ENGINE, PRIORITY_QUEUES, RunParamsError, lock_pools, lock_run
from workflows.engine.queueing import (
    fill_pool,
    pool_wait_reason,
    record_queued,
    slots_free,
)
from workflows.models import NodeAttempt, NodeRun, Run, RunEvent, WorkflowVersion
from workflows.runtime import dispatch


def start_run(
    version: WorkflowVersion,
    *,
    params: dict | None = None,
    trigger: str,
    priority: str = "default",
    request_key: str | None = None,
    deployment=None,
    restarted_from: Run | None = None,
) -> Run:
    """Create a run pinned to ``version`` (chosen by ``deployment``, when one did) and
    queue its root nodes.

    1. Check the run params against those the definition declares.
    2. Create the run and one NodeRun per node, copying what a worker needs; the nodes
       with no upstream are born queued (pools permitting: queueing.slots_free).
    3. Their attempts, and their jobs sent after commit (queueing.record_queued).

    A constant number of statements however wide the run: the node runs in one bulk
    insert (its returned ids are used as they are), their attempts in another.
    """
    spec = version.spec
    run_params = resolve_run_params(spec, params or {})
    now = timezone.now()
    with transaction.atomic():
        run = Run.objects.create(
            workflow_id=version.workflow_id,
            version=version,
            status=Run.Status.RUNNING,
            params=run_params,
            trigger=trigger,
            priority=priority,
            started_at=now,
            deadline=now + timedelta(seconds=spec["timeout"]) if spec.get("timeout") else None,
            pools=sorted({node["pool"] for node in spec["nodes"].values() if node["pool"]}),
            deployment=deployment,
            restarted_from=restarted_from,
        )
        RunEvent.objects.create(
            run=run,
            kind=RunEvent.Kind.TRANSITION,
            actor=trigger,
            reason=(
                f"run started again on v{version.number}, from run {restarted_from.pk}"
                if restarted_from
                else "run started"
            ),
            request_key=request_key,
            before={"status": Run.Status.PENDING},
            after={"status": Run.Status.RUNNING},
        )
        lock_pools(run)
        downstream = graph.downstream_map(spec)
        rows = [
            new_node_row(key, spec["nodes"][key], downstream[key], priority)
            for key in graph.node_keys(spec)
        ]
        # The roots are born queued, or waiting for their pool (queueing's slot rule).
        roots = [row for row in rows if not row["pending_upstreams"]]
        for row, free in zip(roots, slots_free([row["pool"] for row in roots]), strict=True):
            if free:
                row.update(status=NodeRun.Status.QUEUED, attempt=1)
            else:
                row["reason"] = pool_wait_reason(row["pool"])
        ids = statements.insert_node_runs(run.pk, rows, now)
        # Ids come back from the insert: no read-back of the roots.
        record_queued(
            [
                NewRoot(
                    pk=ids[row["node_key"]],
                    run_id=run.pk,
                    node_key=row["node_key"],
                    attempt=row["attempt"],
                    queue=row["queue"],
                    timeout_seconds=row["timeout_seconds"],
                )
                for row in roots
                if row["status"] == NodeRun.Status.QUEUED
            ],
            now,
        )
    return run


def resolve_run_params(spec: dict, given: dict) -> dict:
    declared = spec.get("params") or {}
    if not isinstance(given, dict):
        raise RunParamsError('Run params must be a JSON object, e.g. {"date": "2026-01-31"}.')
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise RunParamsError(
            f"Unknown run param(s) {', '.join(unknown)} for workflow {spec['slug']!r} "
            f"(it declares: {known})."
        )
    # The one type check of run params: the API, the dashboard form and run_workflow share it.
    problems = run_param_problems(declared, given)
    if problems:
        raise RunParamsError("; ".join(f"{path}: {message}" for path, message in problems))
    return {**declared, **given}


@dataclass
class NewRoot:
    """A root node born queued, as its job reads it (queueing.record_queued,
    dispatch.Dispatch): a NodeRun() per root took 19 ms at 1 000."""

    pk: int
    run_id: int
    node_key: str
    attempt: int
    queue: str
    timeout_seconds: int


def new_node_row(key: str, node: dict, downstream: list[str], run_priority: str) -> dict:
    """A new node run's columns (statements.NEW_NODE_COLUMNS), from its definition."""
    from workflows.definitions import registry

    priority = node.get("priority") or run_priority
    retries = node["retries"]
    return {
        "node_key": key,
        "node_type": node["type"],
        "status": NodeRun.Status.PENDING,
        "attempt": 0,
        "attempts_base": 0,
        "max_attempts": retries.get("max_attempts", 1),
        "queue": PRIORITY_QUEUES[priority],
        "pool": node["pool"],
        "timeout_seconds": node["timeout"],
        "soft_timeout_seconds": node.get("soft_timeout"),
        "expected_seconds": node.get("expected_duration"),
        "stall_after_seconds": node.get("stall_after"),
        "pool_timeout_seconds": node.get("pool_timeout"),
        "params": registry.get(node["type"]).resolve_params(node["params"]),
        "upstream": list(node["after"]),
        "downstream": downstream,
        "retry_policy": retries,
        "pending_upstreams": len(node["after"]),
        "reason": f"waiting for upstream: {', '.join(node['after'])}" if node["after"] else "",
    }


def close_run_if_done(run: Run, now, *, moving: bool | None = None) -> bool:
    """Close the run when nothing more can happen in it, with its transition event.

    Succeeded when every node is done; failed otherwise, the reason naming the first
    unfinished nodes that are not merely pending (or "nodes could not run"). The caller
    holds the run's lock, and may say whether anything still ``moving`` when it knows
    (a success's statement does). Returns True if it closed the run.
    """
    if run.status != Run.Status.RUNNING:
        return False
    if moving is None:
        moving = statements.still_moving(run.pk)
    if moving:
        return False
    first_unfinished = list(
        NodeRun.objects.filter(run_id=run.pk)
        .exclude(status__in=NodeRun.DONE)
        .order_by("id")
        .values_list("node_key", "status")[:5]
    )
    if not first_unfinished:
        finish_run(run, Run.Status.SUCCEEDED, "", now, ENGINE)
        return True
    named = [f"{key} {status}" for key, status in first_unfinished if status != "pending"]
    finish_run(run, Run.Status.FAILED, "; ".join(named) or "nodes could not run", now, ENGINE)
    return True


def finish_run(run: Run, status: str, reason: str, now, actor: str) -> None:
    before = run.status
    run.status = status
    run.finished_at = now
    run.reason = reason
    fields = ["status", "finished_at", "reason", "updated_at"]
    if status == Run.Status.FAILED and run.first_failed_at is None:
        run.first_failed_at = now
        fields.append("first_failed_at")
    run.save(update_fields=fields)
    RunEvent.objects.create(
        run=run,
        kind=RunEvent.Kind.TRANSITION,
        actor=actor,
        reason=reason or f"run {status}",
        before={"status": before},
        after={"status": status},
    )


def cancel_run(run_id: int, *, actor: str, reason: str) -> bool:
    """Cancel every node that has not finished and close the run as cancelled.

    Queued jobs are removed from RQ and running ones stopped (RQ's stop-job command)
    after commit; a running node also sees ``should_stop()`` at its next heartbeat,
    and any result it still reports is rejected. Returns False if already finished.
    """
    return _stop_run(run_id, Run.Status.CANCELLED, f"cancelled by {actor}: {reason}", actor)


def expire_run(run_id: int) -> bool:
    """Fail a run that went past its deadline (the definition's ``timeout``)."""
    return _stop_run(
        run_id, Run.Status.FAILED, "run exceeded its timeout", ENGINE, only_if_overdue=True
    )


def _stop_run(
    run_id: int, final_status: str, reason: str, actor: str, only_if_overdue=False
) -> bool:
    now = timezone.now()
    with transaction.atomic():
        run = lock_run(run_id)
        if run.status in Run.TERMINAL:
            return False
        if only_if_overdue and (run.deadline is None or run.deadline > now):
            return False
        lock_pools(run)
        live = list(
            NodeRun.objects.select_for_update(no_key=True)
            .filter(run=run, status__in=[*NodeRun.ACTIVE, NodeRun.Status.PENDING])
            .order_by("pk")  # the default ordering would join (and lock) the run again
            .values_list("pk", "status", "attempt", "pool")
        )
        to_cancel = [(pk, attempt) for pk, status, attempt, _ in live if status in NodeRun.ACTIVE]
        NodeRun.objects.filter(pk__in=[pk for pk, *_ in live]).update(
            status=NodeRun.Status.CANCELLED,
            finished_at=now,
            reason=reason[:2000],
            updated_at=now,
        )
        for pk, attempt in to_cancel:
            NodeAttempt.objects.filter(
                node_run_id=pk, number=attempt, status__in=NodeAttempt.ACTIVE
            ).update(
                status=NodeAttempt.Status.CANCELLED,
                finished_at=now,
                updated_at=now,
                error_type="Cancelled",
                error_message=reason[:10_000],
            )
        for pool in sorted({pool for *_, pool in live if pool}):
            fill_pool(pool, now)
        finish_run(run, final_status, reason, now, actor)
        job_ids = [dispatch.job_id(pk, attempt) for pk, attempt in to_cancel]
        transaction.on_commit(lambda: dispatch.stop_jobs(job_ids))
    return True
