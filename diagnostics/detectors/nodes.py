"""Detectors about running nodes: hung, lost, short of resources."""

from datetime import timedelta

import psutil
from django.db.models import Q

from diagnostics.detectors.context import (
    CRITICAL,
    ENDED_JOB_STATES,
    INFO,
    WARNING,
    Context,
    about_attempt,
    attempt_evidence,
    clock,
    iso,
    node_subject,
    retry_action,
    setting,
)
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection, Repair
from workflows.models import NodeAttempt, NodeRun
from workflows.runtime import dispatch


def _stale(ctx: Context) -> Q:
    return ctx.quiet_since(ctx.stale_after)


@detector("heartbeat_stale", suspects=_stale)
def heartbeat_stale(ctx: Context) -> list[Detection]:
    """Running, but no heartbeat for 3 beats (or none since the claim), and neither its
    process nor its job is known to be gone (``worker_lost``, ``job_lost``): hung, frozen,
    or on a host the watchdog cannot look into."""
    found = []
    for attempt in ctx.suspects:
        node = attempt.node_run
        live = ctx.liveness(attempt)
        if live.heartbeat_age <= ctx.stale_after or live.lost or live.job_status == "missing":
            continue  # fresh, or a cause is known: worker_lost / job_lost report it
        silent = (
            f"has sent no heartbeat since it started at {clock(attempt.started_at)}"
            if live.never_beat
            else f"has sent no heartbeat since {clock(node.heartbeat_at)}"
        )
        if live.counted_from_outage:
            silent += (
                f", none since the database answered again at {clock(live.counted_from_outage)}"
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
                    **outage_evidence(live),
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


def _quiet(ctx: Context) -> Q:
    return ctx.quiet_since(min(1.5 * ctx.heartbeat, ctx.stale_after))


@detector("worker_lost", needs_redis=True, suspects=_quiet)
def worker_lost(ctx: Context) -> list[Detection]:
    """The process running the attempt is gone (killed, crashed, host lost): repaired by
    abandoning the attempt, so the retry policy runs it again from its last checkpoint.
    Every way of being lost needs 1.5 beats of silence (``Context.liveness``)."""
    found = []
    for attempt in ctx.suspects:
        node = attempt.node_run
        live = ctx.liveness(attempt)
        if not live.lost or live.job_status == "missing":
            continue  # a missing job is job_lost's to report
        # Retries count from the last operator reset (attempts_base), as the engine counts them.
        left = node.max_attempts - (attempt.number - node.attempts_base)
        if live.worker_gone:
            title = (
                f"Worker {attempt.worker or '?'} running node {node.node_key} of run "
                f"{node.run_id} is gone"
            )
        else:
            # RQ still has the worker: the process that ran the node (its horse) is what
            # ended, and the worker has moved on.
            title = (
                f"The process running node {node.node_key} of run {node.run_id} (pid "
                f"{attempt.pid or '?'} on {attempt.host or '?'}) is gone; its worker "
                f"{attempt.worker or '?'} is still up"
            )
        found.append(
            Detection(
                code="worker_lost",
                subject=node_subject(node.pk, attempt.number),
                severity=CRITICAL,
                title=title,
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
                    **outage_evidence(live),
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
    return ctx.worker_infos([name])[name].alive


def _heartbeats_from_a_live_process(ctx: Context, attempt: NodeAttempt, live) -> bool:
    """Whether "the worker keeps heartbeating" is true: its process is seen alive, or (on
    another host) a heartbeat was actually written within the stale threshold (not merely
    counted from an outage's end) and nothing says the process is gone."""
    if live.alive_because:
        return True
    node = attempt.node_run
    if live.never_beat or ctx.age(node.heartbeat_at) > ctx.stale_after:
        return False
    known_gone = live.process == "dead" or (
        live.worker is not None and live.worker.exists and not live.worker.alive
    )
    return live.process == "unknown" and not known_gone


def outage_evidence(live) -> dict:
    """Where a heartbeat's age was counted from, when a database outage moved it."""
    if live.counted_from_outage is None:
        return {}
    return {
        "heartbeat_age_counted_from": iso(live.counted_from_outage),
        "why_counted_from_there": "the database was unreachable until then: nothing could "
        "write a heartbeat",
    }


def _lost_running_jobs(ctx: Context) -> list[Detection]:
    found = []
    for attempt in ctx.lost_job_attempts:
        node = attempt.node_run
        live = ctx.liveness(attempt)
        if live.job_status != "missing":
            continue
        stale = live.heartbeat_age > ctx.stale_after or live.lost
        evidence = {
            **attempt_evidence(ctx, attempt),
            **outage_evidence(live),
            "rq_job_status": "missing",
            "process": live.process_detail,
            "alive_because": live.alive_because,
            "rq_worker": live.worker.as_evidence() if live.worker else None,
        }
        if not stale and not _heartbeats_from_a_live_process(ctx, attempt, live):
            # Not silent long enough to be called lost, but nothing says its process is
            # alive either: say so, and let a later tick decide.
            found.append(
                Detection(
                    code="job_lost",
                    subject=node_subject(node.pk, attempt.number),
                    severity=WARNING,
                    title=(
                        f"RQ lost the job of node {node.node_key} (run {node.run_id}), and "
                        "nothing shows its worker is still running it"
                    ),
                    suggestion=(
                        f"Wait a few seconds: if no heartbeat comes within {ctx.stale_after:.0f}s "
                        f"of the last one, the watchdog ends attempt {attempt.number} and the "
                        "retry policy runs it again. RQ losing jobs means Redis was flushed or "
                        "restarted; check its persistence and maxmemory-policy."
                    ),
                    evidence=evidence,
                    **about_attempt(attempt),
                )
            )
            continue
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
        why = live.lost_because or (
            f"no heartbeat since {clock(attempt.node_run.heartbeat_at or attempt.started_at)}"
        )
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


def _pressed(ctx: Context) -> Q:
    """The latest sample (the running attempt's own columns) over a limit."""
    cpu_limit, io_limit, near = _pressure_limits()
    over = Q(cpu_percent__gt=cpu_limit) | Q(io_wait_percent__gt=io_limit)
    rss_limit = setting("KEEL_RSS_LIMIT_BYTES", None)
    if rss_limit:
        over |= Q(rss_bytes__gte=near * rss_limit)
    else:
        over |= Q(host=ctx.host, rss_bytes__gte=near * psutil.virtual_memory().total)
    # Evaluated once (the attempt_running index), not per running node.
    pressed = NodeAttempt.objects.filter(over, status=NodeAttempt.Status.RUNNING).order_by()
    return Q(pk__in=pressed.values("node_run_id"))


def _pressure_limits() -> tuple[float, float, float]:
    return (
        setting("KEEL_PRESSURE_CPU_PERCENT", 90),
        setting("KEEL_PRESSURE_IOWAIT_PERCENT", 50),
        setting("KEEL_RSS_NEAR_RATIO", 0.9),
    )


@detector("resource_pressure", suspects=_pressed)
def resource_pressure(ctx: Context) -> list[Detection]:
    """From the heartbeat's samples: CPU above 90 % or IO wait above 50 %, in the latest
    sample and averaged over the last three beats; or RSS near KEEL_RSS_LIMIT_BYTES (or
    the host's memory)."""
    cpu_limit, io_limit, near = _pressure_limits()
    found = []
    for attempt in ctx.suspects:
        node = attempt.node_run
        samples = (attempt.resource_samples or [])[-3:]
        if not samples:
            continue
        problems = []
        latest = samples[-1]
        cpu = _mean(s.get("cpu_percent") for s in samples)
        if _over(latest.get("cpu_percent"), cpu_limit) and len(samples) >= 2 and cpu > cpu_limit:
            problems.append(f"CPU at {cpu:.0f}% (over {cpu_limit}%)")
        io_wait = _mean(s.get("io_wait_percent") for s in samples)
        if (
            _over(latest.get("io_wait_percent"), io_limit)
            and len(samples) >= 2
            and io_wait > io_limit
        ):
            problems.append(f"IO wait at {io_wait:.0f}% (over {io_limit}%)")
        rss = latest.get("rss_bytes")
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
                    "network_bytes_per_second_mean": _mean(
                        s.get("network_bytes_per_second") for s in samples
                    ),
                    "rss_bytes": rss,
                    "rss_limit_bytes": limit,
                },
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    return found


def _over(value, limit: float) -> bool:
    return isinstance(value, int | float) and value > limit


def _mean(values) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return round(sum(numbers) / len(numbers), 1) if numbers else None
