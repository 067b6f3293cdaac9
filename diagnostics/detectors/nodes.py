"""Detectors about running nodes: hung, lost, overdue, stalled, short of resources."""

import json
from collections import defaultdict
from datetime import datetime, timedelta

import psutil
from django.db.models import F, Window
from django.db.models.functions import RowNumber

from diagnostics.detectors.context import (
    CRITICAL,
    ENDED_JOB_STATES,
    INFO,
    PROGRESS_MEMORY_KEY,
    WARNING,
    WORKER_PREFIX,
    Context,
    about_attempt,
    attempt_evidence,
    iso,
    node_subject,
    retry_action,
    setting,
    text,
)
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection, Repair
from workflows import dispatch
from workflows.models import NodeAttempt, NodeRun


@detector("heartbeat_stale")
def heartbeat_stale(ctx: Context) -> list[Detection]:
    """Running, but no heartbeat for 3 beats (or none since the claim), and neither its
    process nor its job is known to be gone (``worker_lost``, ``job_lost``): hung, frozen,
    or on a host the watchdog cannot look into."""
    found = []
    for attempt in ctx.running:
        node = attempt.node_run
        live = ctx.liveness(attempt)
        if live.heartbeat_age <= ctx.stale_after or live.lost or live.job_status == "missing":
            continue  # fresh, or a cause is known: worker_lost / job_lost report it
        silent = (
            f"has not sent a heartbeat since it started {live.heartbeat_age:.0f}s ago"
            if live.never_beat
            else f"sent its last heartbeat {live.heartbeat_age:.0f}s ago"
        )
        found.append(
            Detection(
                code="heartbeat_stale",
                subject=node_subject(node.pk, attempt.number),
                severity=CRITICAL,
                title=f"Node {node.node_key} of run {node.run_id} is running but {silent}",
                suggestion=(
                    f"The worker {attempt.worker or '?'} on {attempt.host or '?'} is hung or "
                    f"unreachable ({live.process_detail}). Look at its last log lines; if it "
                    "does not recover, retry the node (the next attempt resumes from its last "
                    "checkpoint)."
                ),
                evidence={
                    **attempt_evidence(ctx, attempt),
                    "never_sent_heartbeat": live.never_beat,
                    "stale_after_seconds": ctx.stale_after,
                    "process": live.process_detail,
                    "rq_worker": live.worker.as_evidence() if live.worker else None,
                    "rq_job_status": live.job_status,
                },
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    return found


@detector("worker_lost", needs_redis=True)
def worker_lost(ctx: Context) -> list[Detection]:
    """The process running the attempt is gone (killed, crashed, host lost): repaired by
    abandoning the attempt, so the retry policy runs it again from its last checkpoint."""
    found = []
    for attempt in ctx.running:
        node = attempt.node_run
        live = ctx.liveness(attempt)
        if not live.lost or live.job_status == "missing":
            continue  # a missing job is job_lost's to report
        # Retries count from the last operator reset (attempts_base), as the engine counts them.
        left = node.max_attempts - (attempt.number - node.attempts_base)
        found.append(
            Detection(
                code="worker_lost",
                subject=node_subject(node.pk, attempt.number),
                severity=CRITICAL,
                title=(
                    f"Worker {attempt.worker or '?'} running node {node.node_key} of run "
                    f"{node.run_id} is gone"
                ),
                suggestion=(
                    f"Nothing to do: the watchdog ends attempt {attempt.number} and the retry "
                    f"policy runs it again ({left} attempt(s) left), resuming from its last "
                    "checkpoint. If workers keep dying, check the host (out of memory? "
                    "`dmesg`) and the worker logs."
                    if left > 0
                    else "No attempts are left, so the node fails. Retry the node once the "
                    "cause is fixed (out of memory? `dmesg`, worker logs)."
                ),
                evidence={
                    **attempt_evidence(ctx, attempt),
                    "why_lost": live.lost_because,
                    "process": live.process_detail,
                    "rq_worker": live.worker.as_evidence() if live.worker else None,
                    "rq_job_status": live.job_status,
                },
                action=retry_action(node),
                **about_attempt(attempt),
                repair=Repair(
                    "abandon",
                    node.pk,
                    attempt.number,
                    reason=f"worker lost: {live.lost_because}",
                ),
            )
        )
    return found


@detector("job_lost", needs_redis=True)
def job_lost(ctx: Context) -> list[Detection]:
    """RQ will never run the node's job: it is gone (Redis flushed or restarted, the
    enqueue after commit never happened) or ended without running it."""
    grace = lost_job_grace()
    found = [*_lost_running_jobs(ctx)]
    queued = list(
        NodeRun.objects.filter(
            status=NodeRun.Status.QUEUED, queued_at__lte=ctx.now - timedelta(seconds=grace)
        )
        .order_by("queued_at")
        .only("id", "run_id", "node_key", "attempt", "queue", "queued_at", "max_attempts")[:1000]
    )
    states = ctx.job_states([dispatch.job_id(node.pk, node.attempt) for node in queued])
    for node in queued:
        job_id = dispatch.job_id(node.pk, node.attempt)
        job = states[job_id]
        status = job["status"]
        stuck_start = (
            status == "started"
            and ctx.age(node.queued_at) > ctx.stale_after + grace
            and not _worker_alive(ctx, job["worker"])
        )
        if status != "missing" and status not in ENDED_JOB_STATES and not stuck_start:
            continue
        why = {
            "missing": f"RQ has no job {job_id} (Redis was flushed or restarted, or the "
            "message was never sent)",
            "started": f"RQ handed job {job_id} to worker {job['worker'] or '?'}, which is "
            "gone, before the node was claimed",
        }.get(status, f"RQ ended job {job_id} as {status} without running the node")
        found.append(
            Detection(
                code="job_lost",
                subject=node_subject(node.pk, node.attempt),
                severity=CRITICAL,
                title=(
                    f"Node {node.node_key} of run {node.run_id} is queued but RQ will never run it"
                ),
                suggestion=(
                    f"Nothing to do: the watchdog sends the message again to queue {node.queue}. "
                    "If this happens often, check that Redis keeps its data "
                    "(maxmemory-policy noeviction, persistence) and is not restarted."
                ),
                evidence={
                    "run": node.run_id,
                    "node": node.node_key,
                    "attempt": node.attempt,
                    "queue": node.queue,
                    "rq_job_id": job_id,
                    "rq_job_status": status,
                    "rq_job_worker": job["worker"],
                    "queued_at": iso(node.queued_at),
                    "queued_for_seconds": round(ctx.age(node.queued_at), 1),
                    "why": why,
                },
                action={"kind": "retry_node", "run": node.run_id, "node": node.node_key},
                run_id=node.run_id,
                node_run_id=node.pk,
                queue=node.queue,
                repair=Repair(
                    "resend", node.pk, node.attempt, job_id=job_id, dead_job=status != "missing"
                ),
            )
        )
    return found


def lost_job_grace() -> float:
    """Seconds a queued node may lack its RQ job: the gap between commit and enqueue."""
    return setting("KEEL_LOST_JOB_GRACE_SECONDS", 5)


def _worker_alive(ctx: Context, name: str) -> bool:
    if not name:
        return False
    info = ctx.workers.get(name)
    if info is None:
        raw = ctx.redis.hgetall(WORKER_PREFIX + name)
        return bool(raw) and b"death" not in raw
    return info.alive


def _lost_running_jobs(ctx: Context) -> list[Detection]:
    found = []
    for attempt in ctx.running:
        node = attempt.node_run
        live = ctx.liveness(attempt)
        if live.job_status != "missing":
            continue
        stale = live.heartbeat_age > ctx.stale_after or live.lost
        evidence = {
            **attempt_evidence(ctx, attempt),
            "rq_job_status": "missing",
            "process": live.process_detail,
            "rq_worker": live.worker.as_evidence() if live.worker else None,
        }
        if not stale:
            found.append(
                Detection(
                    code="job_lost",
                    subject=node_subject(node.pk, attempt.number),
                    severity=INFO,
                    title=(
                        f"RQ lost the job of node {node.node_key} (run {node.run_id}), "
                        "but its worker is still running it"
                    ),
                    suggestion=(
                        "Nothing to do: the worker keeps heartbeating and its result will be "
                        "applied. RQ losing jobs means Redis was flushed or restarted; check "
                        "its persistence and maxmemory-policy."
                    ),
                    evidence=evidence,
                    **about_attempt(attempt),
                )
            )
            continue
        why = live.lost_because or f"no heartbeat for {live.heartbeat_age:.0f}s"
        found.append(
            Detection(
                code="job_lost",
                subject=node_subject(node.pk, attempt.number),
                severity=CRITICAL,
                title=(
                    f"Node {node.node_key} of run {node.run_id} is running, but RQ has no job "
                    "for it and its worker is silent"
                ),
                suggestion=(
                    f"Nothing to do: the watchdog ends attempt {attempt.number} and the retry "
                    "policy runs it again from its last checkpoint. Check why Redis lost its "
                    "data (flushed, restarted without persistence, evicted)."
                ),
                evidence={**evidence, "why_lost": why},
                action=retry_action(node),
                **about_attempt(attempt),
                repair=Repair(
                    "abandon",
                    node.pk,
                    attempt.number,
                    reason=f"job lost: RQ has no job {attempt.rq_job_id} and {why}",
                ),
            )
        )
    return found


@detector("overdue")
def overdue(ctx: Context) -> list[Detection]:
    """Running longer than 2 x its expected duration, or than the p95 of its own history
    once that node has ≥ 10 successful runs."""
    factor = setting("KEEL_OVERDUE_FACTOR", 2)
    history = _duration_history(
        ctx, {(a.node_run.run.workflow_id, a.node_run.node_key) for a in ctx.running}
    )
    found = []
    for attempt in ctx.running:
        node = attempt.node_run
        elapsed = ctx.age(attempt.started_at)
        limits = []
        if node.expected_seconds:
            limits.append(
                (
                    factor * node.expected_seconds,
                    f"{factor:g} x the expected {node.expected_seconds}s",
                )
            )
        p95, count = history.get((node.run.workflow_id, node.node_key), (None, 0))
        if p95 is not None:
            # A floor of two beats keeps sub-second nodes from flapping.
            limit = max(p95, 2 * ctx.heartbeat)
            limits.append((limit, f"the p95 of its last {count} successful runs ({p95:.1f}s)"))
        over = [(limit, what) for limit, what in limits if elapsed > limit]
        if not over:
            continue
        limit, what = min(over)
        found.append(
            Detection(
                code="overdue",
                subject=node_subject(node.pk, attempt.number),
                severity=WARNING,
                title=(
                    f"Node {node.node_key} of run {node.run_id} has run for {elapsed:.0f}s, "
                    f"longer than {what}"
                ),
                suggestion=(
                    "Check its last log lines and progress: if it is working, raise "
                    "expected_duration (and timeout, now "
                    f"{node.timeout_seconds}s) or split the node; if it is stuck, retry it."
                ),
                evidence={
                    **attempt_evidence(ctx, attempt),
                    "expected_seconds": node.expected_seconds,
                    "history_p95_seconds": p95,
                    "history_successes": count,
                    "limit_seconds": round(limit, 1),
                    "timeout_seconds": node.timeout_seconds,
                },
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    return found


# p95 of a node's history changes slowly; recomputing it every tick would cost a scan.
_HISTORY_CACHE: dict[tuple[int, str], tuple[float | None, int, datetime]] = {}


def _duration_history(ctx: Context, pairs: set[tuple[int, str]]) -> dict:
    """{(workflow id, node key): (p95 seconds or None, successes)} over the last 200
    successful attempts of the last 30 days; cached for a minute."""
    minimum = setting("KEEL_OVERDUE_HISTORY_MIN", 10)
    fresh = {p for p in pairs if p in _HISTORY_CACHE and ctx.age(_HISTORY_CACHE[p][2]) < 60}
    missing = pairs - fresh
    if missing:
        durations: dict[tuple[int, str], list[float]] = defaultdict(list)
        rows = (
            NodeAttempt.objects.filter(
                status=NodeAttempt.Status.SUCCEEDED,
                node_run__run__workflow_id__in={w for w, _ in missing},
                node_run__node_key__in={k for _, k in missing},
                node_run__run__created_at__gte=ctx.now - timedelta(days=30),
                started_at__isnull=False,
                finished_at__isnull=False,
            )
            .annotate(
                rank=Window(
                    RowNumber(),
                    partition_by=[F("node_run__run__workflow_id"), F("node_run__node_key")],
                    order_by=F("finished_at").desc(),
                )
            )
            .filter(rank__lte=200)
            .values_list(
                "node_run__run__workflow_id", "node_run__node_key", "started_at", "finished_at"
            )
        )
        for workflow_id, key, started, finished in rows:
            durations[(workflow_id, key)].append((finished - started).total_seconds())
        for pair in missing:
            values = sorted(durations.get(pair, []))
            p95 = (
                values[max(0, int(0.95 * len(values) + 0.5) - 1)]
                if len(values) >= minimum
                else None
            )
            _HISTORY_CACHE[pair] = (p95, len(values), ctx.now)
    return {pair: _HISTORY_CACHE[pair][:2] for pair in pairs}


@detector("stalled", needs_redis=True)
def stalled(ctx: Context) -> list[Detection]:
    """Heartbeats keep coming but the reported progress has not moved for N beats.

    Slow is not stuck: any change of ``done`` or ``total`` restarts the clock. Since
    when progress stood still is kept in one Redis hash shared by all watchdogs; losing
    it (a flush) only restarts the clock, it never makes a finding.
    """
    beats = setting("KEEL_STALLED_BEATS", 12)
    memory = {text(k): json.loads(v) for k, v in ctx.redis.hgetall(PROGRESS_MEMORY_KEY).items()}
    keep, found = {}, []
    for attempt in ctx.running:
        node = attempt.node_run
        progress = node.progress if isinstance(node.progress, dict) else None
        if progress is None or ctx.liveness(attempt).heartbeat_age > ctx.stale_after:
            continue
        slot = f"{node.pk}:{attempt.number}"
        mark = json.dumps([progress.get("done"), progress.get("total")])
        seen = memory.get(slot)
        if seen is None or seen["mark"] != mark:
            seen = {"mark": mark, "since": ctx.now.isoformat()}
        keep[slot] = seen
        since = datetime.fromisoformat(seen["since"])
        still = ctx.age(since)
        if still < beats * ctx.heartbeat:
            continue
        found.append(
            Detection(
                code="stalled",
                subject=node_subject(node.pk, attempt.number),
                severity=WARNING,
                title=(
                    f"Node {node.node_key} of run {node.run_id} is alive but its progress "
                    f"({_progress_words(progress)}) has not moved for {still:.0f}s"
                ),
                suggestion=(
                    "The worker heartbeats, so the process runs, but the node makes no "
                    "progress: it may wait on a lock, a remote service or an endless loop. "
                    "Read its last log lines; retry the node if it does not move on."
                ),
                evidence={
                    **attempt_evidence(ctx, attempt),
                    "progress_unchanged_since": seen["since"],
                    "unchanged_for_seconds": round(still, 1),
                    "threshold_beats": beats,
                },
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.delete(PROGRESS_MEMORY_KEY)
        if keep:
            pipe.hset(PROGRESS_MEMORY_KEY, mapping={k: json.dumps(v) for k, v in keep.items()})
            pipe.expire(PROGRESS_MEMORY_KEY, 24 * 3600)
        pipe.execute()
    return found


def _progress_words(progress: dict) -> str:
    done, total = progress.get("done"), progress.get("total")
    return f"{done} of {total}" if total is not None else f"{done} done"


@detector("resource_pressure")
def resource_pressure(ctx: Context) -> list[Detection]:
    """From the heartbeat's samples: CPU above 90 %, IO wait above 50 % (averaged over the
    last three beats) or RSS near KEEL_RSS_LIMIT_BYTES (or the host's memory)."""
    cpu_limit = setting("KEEL_PRESSURE_CPU_PERCENT", 90)
    io_limit = setting("KEEL_PRESSURE_IOWAIT_PERCENT", 50)
    near = setting("KEEL_RSS_NEAR_RATIO", 0.9)
    found = []
    for attempt in ctx.running:
        node = attempt.node_run
        samples = (attempt.resource_samples or [])[-3:]
        if not samples:
            continue
        problems = []
        cpu = _mean(s.get("cpu_percent") for s in samples)
        if len(samples) >= 2 and cpu is not None and cpu > cpu_limit:
            problems.append(f"CPU at {cpu:.0f}% (over {cpu_limit}%)")
        io_wait = _mean(s.get("io_wait_percent") for s in samples)
        if len(samples) >= 2 and io_wait is not None and io_wait > io_limit:
            problems.append(f"IO wait at {io_wait:.0f}% (over {io_limit}%)")
        rss = samples[-1].get("rss_bytes")
        limit = setting("KEEL_RSS_LIMIT_BYTES", None)
        if not limit and attempt.host == ctx.host:
            limit = psutil.virtual_memory().total
        if rss and limit and rss >= near * limit:
            problems.append(
                f"memory (RSS) at {rss / 2**20:.0f} MiB of a {limit / 2**20:.0f} MiB limit"
            )
        if not problems:
            continue
        found.append(
            Detection(
                code="resource_pressure",
                subject=node_subject(node.pk, attempt.number),
                severity=WARNING,
                title=f"Node {node.node_key} of run {node.run_id} is short of resources: {'; '.join(problems)}",
                suggestion=(
                    "Optimise the node (smaller batches, streaming instead of loading "
                    "everything), or give its worker more resources / run fewer workers on "
                    "that host. Near the memory limit the kernel may kill the worker."
                ),
                evidence={
                    **attempt_evidence(ctx, attempt),
                    "problems": problems,
                    "cpu_percent_mean": cpu,
                    "io_wait_percent_mean": io_wait,
                    "rss_bytes": rss,
                    "rss_limit_bytes": limit,
                },
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    return found


def _mean(values) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return round(sum(numbers) / len(numbers), 1) if numbers else None
