"""Detectors about the workers themselves: frozen, or held by an attempt that is over."""

from django.db.models import F

from diagnostics.detectors.context import (
    CRITICAL,
    KEEL_JOB_ID,
    Context,
    FrozenWorker,
    WorkerInfo,
    clock,
    iso,
    rq_clock,
    setting,
)
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection
from workflows.models import NodeAttempt, NodeRun

ZOMBIE_RUNBOOK = "worker process alive but not taking work"
# Past KEEL_KILL_GRACE_SECONDS, what a worker may take to notice a superseded attempt (it
# looks every second) and to end its process.
ZOMBIE_SLACK_SECONDS = 5


@detector("worker_unresponsive", needs_redis=True)
def worker_unresponsive(ctx: Context) -> list[Detection]:
    """A Keel worker RQ still lists (its key exists, no death recorded) whose RQ heartbeat
    is older than KEEL_STALE_BEATS heartbeats: Keel workers beat idle or busy, so it is
    frozen (SIGSTOP, a debugger, a machine swapping) or its process ended unreaped.

    RQ forgets a worker whose key expires (worker_ttl + 60 s); the finding stays open
    while the process it names is still there on this host (``Context.frozen_workers``).
    """
    found = []
    for frozen in ctx.frozen_workers:
        found.append(
            Detection(
                code="worker_unresponsive",
                subject=f"worker:{frozen.name}",
                severity=CRITICAL,
                title=_unresponsive_title(ctx, frozen),
                suggestion=_unresponsive_suggestion(ctx, frozen),
                evidence={
                    "name": frozen.name,
                    "host": frozen.host,
                    "pid": frozen.pid,
                    "process": frozen.process,
                    "process_created": frozen.process_created,
                    "rq_last_heartbeat": frozen.last_heartbeat,
                    "stale_after_seconds": ctx.stale_after,
                    "rq_key_exists": frozen.in_rq,
                    "queues": frozen.queues,
                    "state": frozen.state,
                    "current_job": frozen.current_job,
                },
                action=_restart_action(ctx, frozen),
                worker=frozen.name,
            )
        )
    return found


def _unresponsive_title(ctx: Context, frozen: FrozenWorker) -> str:
    who = f"Worker {frozen.name} on {frozen.host or '?'} (pid {frozen.pid or '?'})"
    if not frozen.in_rq:
        return (
            f"{who} is frozen: RQ forgot it (no heartbeat for longer than its key lives) but "
            f"its process is still here: {frozen.process}"
        )
    return (
        f"{who} is unresponsive: no RQ heartbeat since {rq_clock(frozen.last_heartbeat)}; "
        f"process {frozen.process}"
    )


def _unresponsive_suggestion(ctx: Context, frozen: FrozenWorker) -> str:
    queues = ", ".join(frozen.queues) or "its queues"
    meanwhile = f"Meanwhile it takes no work from {queues}" + (
        f" and job {frozen.current_job} it holds does not move." if frozen.current_job else "."
    )
    if frozen.process.startswith(("zombie", "gone")):
        return (
            "Its process has ended without RQ being told. Start the worker again (its "
            f"supervisor should: systemd, `make run`); RQ drops the old key by itself. {meanwhile}"
        )
    kill = frozen.kill_command(ctx.host)
    if frozen.process.startswith("stopped"):
        return (
            f"Restart it. If it was stopped on purpose (a debugger, Ctrl-Z), resume it: "
            f"`kill -CONT {frozen.pid}` on {frozen.host}; otherwise kill it (`{kill}`) and let "
            f"the supervisor start it again. {meanwhile}"
        )
    return (
        f"Restart it: `{kill}`, and let the supervisor start it again (or restart the "
        "worker service). If it was only starved of CPU for a moment (a busy or swapping "
        f"machine), this finding closes by itself once it beats again. {meanwhile}"
    )


def _restart_action(ctx: Context, frozen: FrozenWorker) -> dict:
    if frozen.process.startswith(("zombie", "gone")) or not frozen.pid:
        return {"kind": "command", "command": f"manage.py rqworker {' '.join(frozen.queues)}"}
    return {"kind": "command", "command": frozen.kill_command(ctx.host)}


@detector("zombie_attempt", needs_redis=True)
def zombie_attempt(ctx: Context) -> list[Detection]:
    """An RQ worker still runs the job of an attempt that is over (ended, superseded by
    a retry, cancelled, rolled back) KEEL_KILL_GRACE_SECONDS + 5 s after it ended: the
    worker should have stopped that process, and it holds the worker meanwhile.

    Nothing of that attempt is applied (the engine rejects a superseded attempt's
    outcome); the harm is the worker it holds.
    """
    # Busy workers whose job is not a running node's current attempt (the sweep read
    # what each runs); only those are read in full.
    current = ctx.running_job_ids
    held = {name: job for name, job in ctx.worker_sweep.busy.items() if job not in current}
    holders: dict[tuple[int, int], WorkerInfo] = {}
    for info in ctx.worker_infos(held).values():
        match = KEEL_JOB_ID.match(info.current_job)
        if match and info.exists and not info.died and info.process != "dead":
            holders[(int(match[1]), int(match[2]))] = info
    if not holders:
        return []
    # A busy worker holds a current attempt: tell those apart on plain values (one
    # query), and load only the node runs of attempts that are over.
    current = set(
        NodeAttempt.objects.filter(
            node_run_id__in={node_run_id for node_run_id, _ in holders},
            status__in=NodeAttempt.ACTIVE,
            number=F("node_run__attempt"),
            node_run__status__in=(NodeRun.Status.QUEUED, NodeRun.Status.RUNNING),
        ).values_list("node_run_id", "number")
    )
    holders = {key: info for key, info in holders.items() if key not in current}
    if not holders:
        return []
    attempts: dict[int, list[NodeAttempt]] = {}
    for attempt in NodeAttempt.objects.filter(
        node_run_id__in={node_run_id for node_run_id, _ in holders}
    ).select_related("node_run"):
        attempts.setdefault(attempt.node_run_id, []).append(attempt)
    after = setting("KEEL_KILL_GRACE_SECONDS", 5) + ZOMBIE_SLACK_SECONDS
    found = []
    for (node_run_id, number), worker in sorted(holders.items()):
        mine = [a for a in attempts.get(node_run_id, []) if a.number == number]
        if not mine:
            continue
        attempt = mine[0]
        node = attempt.node_run
        if _is_current(node, attempt):
            continue
        since, how = _over_since(node, attempt, attempts[node_run_id])
        if since is None or ctx.age(since) <= after:
            continue
        found.append(_zombie_detection(ctx, worker, node, attempt, since, how))
    return found


def _is_current(node: NodeRun, attempt: NodeAttempt) -> bool:
    return (
        node.attempt == attempt.number
        and node.status in (NodeRun.Status.QUEUED, NodeRun.Status.RUNNING)
        and attempt.status in NodeAttempt.ACTIVE
    )


def _over_since(node: NodeRun, attempt: NodeAttempt, all_attempts: list[NodeAttempt]):
    """(since when the attempt is over, how it ended, in words)."""
    if attempt.finished_at is not None:
        return attempt.finished_at, f"ended ({attempt.status.replace('_', ' ')})"
    later = [a for a in all_attempts if a.number > attempt.number]
    if later:
        first = min(later, key=lambda a: a.number)
        return first.created_at, f"superseded by attempt {first.number}"
    when = node.finished_at or node.updated_at
    return when, f"over: its node is {node.status.replace('_', ' ')}"


def _zombie_detection(ctx, worker: WorkerInfo, node, attempt, since, how) -> Detection:
    host = worker.hostname or attempt.host or "?"
    pid = attempt.pid or worker.pid
    kill = f"kill -9 {pid or '<pid>'}"
    if host != ctx.host:
        kill = f"ssh {host} {kill}"
    return Detection(
        code="zombie_attempt",
        subject=f"worker:{worker.name}:{attempt.rq_job_id}",
        severity=CRITICAL,
        title=(
            f"Worker {worker.name} on {host} (pid {pid or '?'}) still runs attempt "
            f"{attempt.number} of node {node.node_key} (run {node.run_id}), {how} at "
            f"{clock(since)}: it holds the worker, nothing else runs on it"
        ),
        suggestion=(
            f"Restart that worker: `{kill}` (the process still running the old attempt) on "
            f"{host}, or restart the worker service; the supervisor starts it again. Nothing "
            "of the old attempt is applied: the engine rejects its result. Runbook: "
            f'"{ZOMBIE_RUNBOOK}".'
        ),
        evidence={
            "run": node.run_id,
            "node": node.node_key,
            "attempt": attempt.number,
            "attempt_status": attempt.status,
            "node_status": node.status,
            "node_attempt": node.attempt,
            "worker": worker.name,
            "host": host,
            "pid": pid,
            "worker_pid": worker.pid,
            "rq_job_id": attempt.rq_job_id,
            "since": iso(since),
            "how_it_ended": how,
            "rq_worker": worker.as_evidence(),
            "runbook": ZOMBIE_RUNBOOK,
        },
        action={"kind": "command", "command": kill},
        run_id=node.run_id,
        node_run_id=node.pk,
        queue=attempt.queue,
        worker=worker.name,
    )
