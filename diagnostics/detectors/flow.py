"""Detectors about work that waits: no worker, backlog, full pools, failed upstreams,
repeated timeouts."""

from collections import defaultdict
from datetime import timedelta

from django.db.models import Count

from diagnostics.detectors.context import (
    CRITICAL,
    QUEUE_PREFIX,
    WARNING,
    Context,
    clock,
    iso,
    node_subject,
    retry_action,
    setting,
    worker_command,
)
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection, chunks
from workflows.models import NodeAttempt, NodeRun, ResourcePool, Run


@detector("no_worker", needs_redis=True)
def no_worker(ctx: Context) -> list[Detection]:
    """Nodes wait on a queue that no live worker takes work from (none started, all
    stopped, dead or frozen, or RQ suspended). A frozen worker is not gone: the fix is to
    restart it, not to start one."""
    grace = setting("KEEL_NO_WORKER_GRACE_SECONDS", 10)
    found = []
    for queue, row in sorted(ctx.queued_by_queue.items()):
        if ctx.age(row["oldest"]) < grace:
            continue
        listeners = ctx.live_listeners(queue)
        if listeners and not ctx.suspended:
            continue
        dead = ctx.dead_workers(queue)
        frozen = [w for w in ctx.frozen_workers if queue in w.queues]
        if ctx.suspended:
            title = f"Workers are suspended: {row['count']} node(s) wait on queue {queue}"
            suggestion = "RQ is suspended; resume it with `manage.py rqresume`."
            action = {"kind": "command", "command": "manage.py rqresume"}
        elif frozen:
            first = frozen[0]
            where = "this host" if first.host == ctx.host else f"host {first.host or '?'}"
            title = (
                f"No worker takes work from queue {queue}: {row['count']} node(s) wait; "
                f"worker {first.name} (pid {first.pid or '?'}) on {where} is frozen, not gone"
            )
            suggestion = (
                f"Worker {first.name} (pid {first.pid or '?'}) on {where} is frozen, not gone: "
                f"restart it (`{first.kill_command(ctx.host)}`, and let the supervisor start it "
                f"again). Starting another worker for the queue (`manage.py rqworker {queue}`) "
                "also gets the nodes going."
            )
            action = {"kind": "command", "command": first.kill_command(ctx.host)}
        else:
            title = f"No worker listens to queue {queue}: {row['count']} node(s) wait"
            suggestion = (
                f"Start a worker for that queue: `manage.py rqworker {queue}` (or restart the "
                "workers: after Redis is flushed they are no longer registered)."
            )
            action = worker_command(queue)
        found.append(
            Detection(
                code="no_worker",
                subject=f"queue:{queue}",
                severity=CRITICAL,
                title=title,
                suggestion=suggestion,
                evidence={
                    "queue": queue,
                    "queued_nodes": row["count"],
                    "oldest_queued_at": iso(row["oldest"]),
                    "rq_suspended": ctx.suspended,
                    "dead_workers_for_queue": dead,
                    "frozen_workers_for_queue": [
                        f"{w.name} (pid {w.pid or '?'} on {w.host or '?'}: {w.process})"
                        for w in frozen
                    ],
                    # Read in full only now: no worker takes this queue's work.
                    "workers": [w.as_evidence() for w in ctx.workers.values()][:20],
                },
                action=action,
                queue=queue,
            )
        )
    return found


@detector("backlog")
def backlog(ctx: Context) -> list[Detection]:
    """A queue is longer than KEEL_BACKLOG_LENGTH, or its oldest node has waited longer
    than KEEL_BACKLOG_AGE_SECONDS."""
    max_length = setting("KEEL_BACKLOG_LENGTH", 1000)
    max_age = setting("KEEL_BACKLOG_AGE_SECONDS", 600)
    rows = ctx.queued_by_queue
    lengths = {}
    if ctx.redis_ok and rows:
        with ctx.redis.pipeline(transaction=False) as pipe:
            for queue in rows:
                pipe.llen(QUEUE_PREFIX + queue)
            lengths = dict(zip(rows, pipe.execute(), strict=True))
    found = []
    for queue, row in sorted(rows.items()):
        length = max(row["count"], lengths.get(queue, 0))
        wait = ctx.age(row["oldest"])
        if length < max_length and wait < max_age:
            continue
        listeners = ctx.live_listeners(queue) if ctx.redis_ok else 0
        found.append(
            Detection(
                code="backlog",
                subject=f"queue:{queue}",
                severity=WARNING,
                title=(
                    f"Queue {queue} is backed up: {length} node(s) waiting, the oldest since "
                    f"{clock(row['oldest'])}"
                ),
                suggestion=(
                    f"Add workers for queue {queue} (`manage.py rqworker {queue}`; "
                    f"{listeners} listen now), or move urgent runs to the high priority "
                    "and bulk ones to low."
                ),
                evidence={
                    "queue": queue,
                    "queued_nodes": row["count"],
                    "rq_queue_length": lengths.get(queue),
                    "oldest_queued_at": iso(row["oldest"]),
                    "max_length": max_length,
                    "max_age_seconds": max_age,
                    "listening_workers": listeners,
                },
                action=worker_command(queue),
                queue=queue,
            )
        )
    return found


@detector("pool_exhausted")
def pool_exhausted(ctx: Context) -> list[Detection]:
    """Ready nodes have waited longer than KEEL_POOL_WAIT_SECONDS for a pool whose slots
    are all taken; one finding per (pool, waiting run), naming the runs holding the slots."""
    wait = setting("KEEL_POOL_WAIT_SECONDS", 60)
    waiting = list(
        NodeRun.objects.filter(
            status=NodeRun.Status.PENDING,
            pending_upstreams=0,
            run__status=Run.Status.RUNNING,
            updated_at__lte=ctx.now - timedelta(seconds=wait),
        )
        .exclude(pool="")
        .values("id", "run_id", "node_key", "pool", "updated_at")
    )
    if not waiting:
        return []
    pools = {
        p.name: p.slots for p in ResourcePool.objects.filter(name__in={w["pool"] for w in waiting})
    }
    holders = defaultdict(list)
    for row in NodeRun.objects.filter(pool__in=pools, status__in=NodeRun.HOLDS_SLOT).values(
        "pool", "run_id", "node_key", "status", "queued_at", "started_at"
    ):
        holders[row["pool"]].append(row)
    by_run = defaultdict(list)
    for row in waiting:
        by_run[(row["pool"], row["run_id"])].append(row)
    found = []
    for (pool, run_id), rows in sorted(by_run.items()):
        slots = pools.get(pool, 0)
        held = holders.get(pool, [])
        if len(held) < slots:
            continue  # a slot is free: the engine hands it out when a node finishes
        since = min(r["updated_at"] for r in rows)
        holder_runs = sorted({h["run_id"] for h in held})
        found.append(
            Detection(
                code="pool_exhausted",
                subject=f"pool:{pool}:run:{run_id}",
                severity=WARNING,
                title=(
                    f"Run {run_id} waits for pool {pool}: all {slots} slot(s) are held by "
                    f"run(s) {', '.join(map(str, holder_runs[:10]))}"
                ),
                suggestion=(
                    f"Wait for those runs, cancel one that is stuck, or raise pool {pool} to "
                    f"{slots + 1} slot(s) if the resource can take it."
                ),
                evidence={
                    "pool": pool,
                    "slots": slots,
                    "waiting_nodes": [r["node_key"] for r in rows],
                    "waiting_since": iso(since),
                    "holders": [
                        {
                            "run": h["run_id"],
                            "node": h["node_key"],
                            "status": h["status"],
                            "since": iso(h["started_at"] or h["queued_at"]),
                        }
                        for h in held[:20]
                    ],
                },
                action={"kind": "resize_pool", "pool": pool, "slots": slots + 1},
                run_id=run_id,
            )
        )
    return found


@detector("blocked_upstream")
def blocked_upstream(ctx: Context) -> list[Detection]:
    """In a run that is still going, nodes wait for an upstream that failed, timed out
    or was cancelled; one finding per such upstream, naming what it blocks."""
    # The live runs first (the run_active index), then their ended nodes by (run, status):
    # as one join PostgreSQL scanned all 100 000 runs.
    live = list(Run.objects.filter(status=Run.Status.RUNNING).values_list("id", flat=True))
    ended = [
        node
        for chunk in chunks(live, 1000)
        for node in NodeRun.objects.filter(
            run_id__in=chunk,
            status__in=[NodeRun.Status.FAILED, NodeRun.Status.TIMED_OUT, NodeRun.Status.CANCELLED],
        )
        .order_by()
        .only(
            "id", "run_id", "node_key", "status", "downstream", "reason", "attempt", "finished_at"
        )
        if node.downstream
    ]
    if not ended:
        return []
    pending = defaultdict(set)
    for run_id, key in NodeRun.objects.filter(
        run_id__in={n.run_id for n in ended}, status=NodeRun.Status.PENDING
    ).values_list("run_id", "node_key"):
        pending[run_id].add(key)
    found = []
    for node in ended:
        blocked = sorted(set(node.downstream) & pending[node.run_id])
        if not blocked:
            continue
        found.append(
            Detection(
                code="blocked_upstream",
                subject=node_subject(node.pk),
                severity=WARNING,
                title=(
                    f"{len(blocked)} node(s) of run {node.run_id} cannot start because "
                    f"{node.node_key} {node.status.replace('_', ' ')}"
                ),
                suggestion=(
                    f"Fix the cause and retry {node.node_key}, or skip it if its output is "
                    f"not needed; {', '.join(blocked[:5])} then go ahead."
                ),
                evidence={
                    "run": node.run_id,
                    "upstream": node.node_key,
                    "upstream_status": node.status,
                    "upstream_reason": node.reason,
                    "attempts": node.attempt,
                    "finished_at": iso(node.finished_at),
                    "blocked_nodes": blocked,
                },
                action=retry_action(node),
                run_id=node.run_id,
                node_run_id=node.pk,
            )
        )
    return found


@detector("repeated_timeout")
def repeated_timeout(ctx: Context) -> list[Detection]:
    """A node of a run still going timed out on two attempts or more."""
    counts = dict(
        NodeAttempt.objects.filter(
            status=NodeAttempt.Status.TIMED_OUT, node_run__run__status=Run.Status.RUNNING
        )
        .values("node_run_id")
        .annotate(n=Count("id"))
        .filter(n__gte=2)
        .values_list("node_run_id", "n")
    )
    if not counts:
        return []
    timed_out = defaultdict(list)
    for attempt in NodeAttempt.objects.filter(
        node_run_id__in=counts, status=NodeAttempt.Status.TIMED_OUT
    ).order_by("number"):
        timed_out[attempt.node_run_id].append(attempt)
    found = []
    for node in NodeRun.objects.filter(pk__in=counts):
        tries = timed_out[node.pk]
        soft = f", soft timeout {node.soft_timeout_seconds}s" if node.soft_timeout_seconds else ""
        found.append(
            Detection(
                code="repeated_timeout",
                subject=node_subject(node.pk),
                severity=WARNING,
                title=(
                    f"Node {node.node_key} of run {node.run_id} timed out on {len(tries)} "
                    f"attempts (timeout {node.timeout_seconds}s{soft})"
                ),
                suggestion=(
                    f"Raise its timeout (now {node.timeout_seconds}s) if the work needs longer, "
                    "or make it checkpoint more often so each retry resumes where the last one "
                    "stopped instead of starting over."
                ),
                evidence={
                    "run": node.run_id,
                    "node": node.node_key,
                    "status": node.status,
                    "timeout_seconds": node.timeout_seconds,
                    "soft_timeout_seconds": node.soft_timeout_seconds,
                    "max_attempts": node.max_attempts,
                    "timed_out_attempts": [
                        {
                            "attempt": a.number,
                            "error": f"{a.error_type}: {a.error_message}"[:300],
                            "seconds": round(a.duration.total_seconds(), 1) if a.duration else None,
                            "worker": a.worker,
                        }
                        for a in tries
                    ],
                },
                action=retry_action(node),
                run_id=node.run_id,
                node_run_id=node.pk,
                queue=node.queue,
                attempt_id=tries[-1].pk,
            )
        )
    return found
