"""Detectors about how long running nodes take: overdue, past the hard timeout, stalled."""

import operator
from datetime import datetime, timedelta
from functools import reduce

from django.db.models import (
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Min,
    OuterRef,
    Q,
    Subquery,
    Value,
    Window,
)
from django.db.models.functions import Floor, Greatest, RowNumber

from diagnostics.detectors.context import (
    CRITICAL,
    WARNING,
    Context,
    about_attempt,
    attempt_evidence,
    clock,
    iso,
    node_subject,
    retry_action,
    rq_clock,
    seconds_of,
    setting,
)
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection
from workflows.models import NodeAttempt, NodeRun, Run, Workflow


def _overdue_suspects(ctx: Context) -> Q:
    """Running past factor x expected, or past the p95 of its history (two beats at least)."""
    factor = setting("KEEL_OVERDUE_FACTOR", 2)
    suspects = Q(
        expected_seconds__isnull=False,
        started_at__lt=ctx.now - seconds_of(F("expected_seconds") * factor),
    )
    floor = ctx.now - timedelta(seconds=2 * ctx.heartbeat)
    # Each (workflow, node) running past the floor, and since when its oldest runs: only
    # those whose oldest is past their history's limit add a condition (none, when all is
    # well, so the suspects query stays one short condition at any number running).
    rows = (
        NodeRun.objects.filter(
            status=NodeRun.Status.RUNNING, started_at__lt=floor, run__status__in=Run.ACTIVE
        )
        .values("run__workflow_id", "node_key")
        .annotate(oldest=Min("started_at"))
        .values_list("run__workflow_id", "node_key", "oldest")
    )
    oldest = {(workflow_id, node_key): at for workflow_id, node_key, at in rows}
    for (workflow_id, node_key), (p95, _) in _duration_history(ctx, set(oldest)).items():
        limit = max(p95 or 0, 2 * ctx.heartbeat)
        if p95 is not None and ctx.age(oldest[(workflow_id, node_key)]) > limit:
            suspects |= Q(
                run__workflow_id=workflow_id,
                node_key=node_key,
                started_at__lt=ctx.now - timedelta(seconds=limit),
            )
    return suspects


@detector("overdue", suspects=_overdue_suspects)
def overdue(ctx: Context) -> list[Detection]:
    """Running longer than 2 x its expected duration, or than the p95 of its own history
    once that node has ≥ 10 successful runs."""
    factor = setting("KEEL_OVERDUE_FACTOR", 2)
    history = _duration_history(
        ctx, {(a.node_run.run.workflow_id, a.node_run.node_key) for a in ctx.suspects}
    )
    found = []
    for attempt in ctx.suspects:
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
            history_words = f"the p95 of its last {count} successful runs ({p95:.1f}s)"
            limits.append(
                (
                    limit,
                    history_words
                    if limit == p95
                    else f"{limit:.0f}s (two heartbeats, the floor; {history_words})",
                )
            )
        over = [(limit, what) for limit, what in limits if elapsed > limit]
        if not over or ctx.liveness(attempt).lost:
            continue  # in time; or its process is gone: worker_lost says so
        limit, what = min(over)
        found.append(
            Detection(
                code="overdue",
                subject=node_subject(node.pk, attempt.number),
                severity=WARNING,
                title=(
                    f"Node {node.node_key} of run {node.run_id} has run since "
                    f"{clock(attempt.started_at)}, longer than {what}"
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


# Past the kill deadline (hard timeout + KEEL_KILL_GRACE_SECONDS), the seconds the worker
# may take to notice (it looks every second) and to commit the timed-out outcome.
STOP_SLACK_SECONDS = 5


def _past_timeout(ctx: Context) -> Q:
    return Q(started_at__lt=ctx.now - seconds_of(F("timeout_seconds")))


@detector("timeout_exceeded", suspects=_past_timeout)
def timeout_exceeded(ctx: Context) -> list[Detection]:
    """Running past the node's hard timeout, whatever its heartbeats and progress say.

    The worker asks the node to stop at the timeout (SIGTERM) and kills it
    KEEL_KILL_GRACE_SECONDS later: past the timeout the finding is a WARNING (the worker
    is stopping it); past timeout + grace + a few seconds, CRITICAL: the worker did not
    stop it. Counted from the end of the last database outage when later: the worker
    could not record the timed-out outcome during it.
    """
    grace = setting("KEEL_KILL_GRACE_SECONDS", 5)
    found = []
    for attempt in ctx.suspects:
        node = attempt.node_run
        elapsed = ctx.age(attempt.started_at)
        if not attempt.started_at or elapsed <= node.timeout_seconds:
            continue
        live = ctx.liveness(attempt)
        if live.lost:
            continue  # its process is gone: worker_lost / job_lost report and repair it
        deadline = attempt.started_at + timedelta(seconds=node.timeout_seconds)
        kill_by = deadline + timedelta(seconds=grace + STOP_SLACK_SECONDS)
        if ctx.db_outage_end is not None:
            kill_by = max(kill_by, ctx.db_outage_end + timedelta(seconds=STOP_SLACK_SECONDS))
        worker = live.worker
        simple = bool(worker and worker.pid and worker.pid == attempt.pid)
        pids = [attempt.pid] if attempt.pid else []
        if worker is not None and worker.pid and not simple:
            pids.append(worker.pid)
        if len(pids) == 2:
            pid_words = f"pid {attempt.pid} runs the node, the worker is pid {worker.pid}"
        else:
            pid_words = f"pid {attempt.pid or '?'}"
        where = f"worker {attempt.worker or '?'} on {attempt.host or '?'} ({pid_words})"
        evidence = {
            **attempt_evidence(ctx, attempt),
            "timeout_seconds": node.timeout_seconds,
            "kill_grace_seconds": grace,
            "deadline": iso(deadline),
            "stopped_by": iso(kill_by),
            "process": live.process_detail,
            "rq_worker": worker.as_evidence() if worker else None,
        }
        if ctx.now <= kill_by:
            found.append(
                Detection(
                    code="timeout_exceeded",
                    subject=node_subject(node.pk, attempt.number),
                    severity=WARNING,
                    title=(
                        f"Node {node.node_key} of run {node.run_id} is running past its hard "
                        f"timeout of {node.timeout_seconds} s; the worker stops it now"
                    ),
                    suggestion=(
                        f"Nothing to do yet: {where} asks the node to stop (SIGTERM) and "
                        f"kills it {grace} s later if it has not; the attempt then ends as "
                        "timed out and the retry policy decides. If it needs longer, raise "
                        "its timeout in the definition."
                    ),
                    evidence=evidence,
                    action=retry_action(node),
                    **about_attempt(attempt),
                )
            )
            continue
        if simple:
            cause = (
                "it runs on a simple worker, which cannot kill a node hung in C code (the "
                "node runs in the worker process itself)"
            )
        elif worker is not None and worker.unresponsive:
            cause = (
                f"the worker is frozen (no RQ heartbeat since {rq_clock(worker.last_heartbeat)})"
            )
        else:
            cause = (
                "the worker is frozen, or it is a simple worker (cannot kill a node hung in C code)"
            )
        kill = f"kill -9 {' '.join(map(str, pids)) or '<pid>'}"
        if attempt.host and attempt.host != ctx.host:
            kill = f"ssh {attempt.host} {kill}"
        found.append(
            Detection(
                code="timeout_exceeded",
                subject=node_subject(node.pk, attempt.number),
                severity=CRITICAL,
                title=(
                    f"Node {node.node_key} of run {node.run_id} is still running past its "
                    f"hard timeout of {node.timeout_seconds} s (due at {clock(deadline)}): "
                    "the worker did not stop it"
                ),
                suggestion=(
                    f"The worker did not stop it: {cause}. Retry the node (its next attempt "
                    f"resumes from the last checkpoint), and restart {where}: `{kill}` on "
                    f"{attempt.host or 'its host'}, then let the supervisor start the worker "
                    "again (or restart the worker service)."
                ),
                evidence={**evidence, "why_not_stopped": cause},
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    return found


# p95 of a node's history changes slowly; recomputing it every tick would cost a scan.
# How many of a workflow's latest runs make a node's duration history.
HISTORY_RUNS = 200
# How many nodes' histories are read at most per call (20 take ~30 ms at 200 runs each).
HISTORY_REFRESH = 20
# How long a node's figure is kept. 200 runs' p95 hardly moves in minutes; kept for one
# minute, 200 running nodes' histories were read again in a third of all ticks.
HISTORY_KEEP_SECONDS = 600
_HISTORY_CACHE: dict[tuple[int, str], tuple[float | None, int, datetime]] = {}


def _duration_history(ctx: Context, pairs: set[tuple[int, str]]) -> dict:
    """{(workflow id, node key): (p95 seconds or None, successes)} over the successful
    attempts of the workflow's last 200 runs of the last 30 days; kept for
    HISTORY_KEEP_SECONDS, and a node not read yet is left out.

    Two indexed queries whatever the history's size: the 200th newest run of each
    workflow (200 entries of ``run_workflow_created`` each), then the attempts of the
    runs since (a million node runs made "the last 200 attempts of each node", ranked
    over every attempt of 30 days, take most of a second)."""
    minimum = setting("KEEL_OVERDUE_HISTORY_MIN", 10)
    stale = [
        p
        for p in pairs
        if p not in _HISTORY_CACHE or ctx.age(_HISTORY_CACHE[p][2]) >= HISTORY_KEEP_SECONDS
    ]
    # Those never read first, then the oldest; at most HISTORY_REFRESH at a time, so no
    # tick pays for all of them at once. Until read, a node has no history (a few ticks
    # after the watchdog starts); a stale one keeps its last figure until read again.
    stale.sort(key=lambda p: _HISTORY_CACHE[p][2].timestamp() if p in _HISTORY_CACHE else 0)
    missing = set(stale[:HISTORY_REFRESH])
    if missing:
        workflows = {w for w, _ in missing}
        since = ctx.now - timedelta(days=30)
        # The 200th newest run since ``since`` (None when fewer): a window ranking every
        # run of 30 days took 15 ms for 15 workflows.
        newest = Run.objects.filter(workflow_id=OuterRef("pk"), created_at__gte=since)
        cutoffs = dict(
            Workflow.objects.filter(pk__in=workflows)
            .annotate(
                cutoff=Subquery(
                    newest.order_by("-created_at").values("created_at")[
                        HISTORY_RUNS - 1 : HISTORY_RUNS
                    ]
                )
            )
            .values_list("pk", "cutoff")
        )
        recent_enough = reduce(
            operator.or_,
            (
                Q(
                    node_run__run__workflow_id=workflow_id,
                    node_run__run__created_at__gte=cutoffs.get(workflow_id) or since,
                    node_run__node_key__in={k for w, k in missing if w == workflow_id},
                )
                for workflow_id in workflows
            ),
        )
        # The p95 is picked in the database: one row per node, not every attempt (40 000
        # of them for 200 nodes took 0.4 s to read, once a minute).
        pair = [F("node_run__run__workflow_id"), F("node_run__node_key")]
        took = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
        rows = (
            NodeAttempt.objects.filter(
                recent_enough,
                status=NodeAttempt.Status.SUCCEEDED,
                started_at__isnull=False,
                finished_at__isnull=False,
            )
            .order_by()
            .annotate(
                took=took,
                place=Window(RowNumber(), partition_by=pair, order_by=took.asc()),
                successes=Window(Count("id"), partition_by=pair),
            )
            # The nearest rank: the ceil(0.95 n)-th shortest, as round-half-up of 0.95 n.
            .filter(place=Greatest(Floor(F("successes") * Value(0.95) + Value(0.5)), Value(1.0)))
            .values_list("node_run__run__workflow_id", "node_run__node_key", "took", "successes")
        )
        found = {(w, key): (took, count) for w, key, took, count in rows}
        for each in missing:
            took, count = found.get(each, (None, 0))
            p95 = took.total_seconds() if took is not None and count >= minimum else None
            _HISTORY_CACHE[each] = (p95, count, ctx.now)
    return {pair: _HISTORY_CACHE[pair][:2] for pair in pairs if pair in _HISTORY_CACHE}


def _still(ctx: Context) -> Q:
    """No progress for the declared ``stall_after`` (since the start, if none was ever
    reported), or for KEEL_STALLED_BEATS beats since progress last moved."""
    declared = ctx.now - seconds_of(F("stall_after_seconds"))
    beats = timedelta(seconds=setting("KEEL_STALLED_BEATS", 12) * ctx.heartbeat)
    return (
        Q(stall_after_seconds__isnull=False, progress_at__lt=declared)
        | Q(
            stall_after_seconds__isnull=False,
            progress_at__isnull=True,
            started_at__lt=declared,
        )
        | Q(
            stall_after_seconds__isnull=True,
            progress_at__lt=ctx.now - beats,
        )
    )


@detector("stalled", suspects=_still)
def stalled(ctx: Context) -> list[Detection]:
    """Heartbeats keep coming but the reported progress has not moved for the node's
    declared ``stall_after`` seconds, or else for KEEL_STALLED_BEATS beats.

    Slow is not stuck: any change of ``done`` or ``total`` restarts the clock (the node's
    process notes when its progress last moved, ``NodeRun.progress_at``; the claim clears
    it). A node that declared ``stall_after`` and never reported progress is stalled
    counting from its start; one that did not declare it is not judged on progress it
    never promised. Nothing can be reported while the database is down: the clock starts
    again at the end of an outage.
    """
    beats = setting("KEEL_STALLED_BEATS", 12)
    found = []
    for attempt in ctx.suspects:
        node = attempt.node_run
        declared = node.stall_after_seconds
        if ctx.liveness(attempt).heartbeat_age > ctx.stale_after:
            continue  # silent: heartbeat_stale's to report
        moved = node.progress_at
        if moved is None and not declared:
            continue
        progress = node.progress if moved is not None and isinstance(node.progress, dict) else None
        since = moved or attempt.started_at or ctx.now
        since = max(since, ctx.db_outage_end or since)
        if declared:
            limit, threshold = declared, f"declared stall_after {declared} s"
        else:
            limit = beats * ctx.heartbeat
            threshold = (
                f"KEEL_STALLED_BEATS x heartbeat = {beats} x {ctx.heartbeat:g} s = {limit:g} s"
            )
        still = ctx.age(since)
        if still < limit:
            continue
        if progress is None:
            title = (
                f"Node {node.node_key} of run {node.run_id} is alive but has reported no "
                f"progress since {clock(since)} ({threshold})"
            )
        else:
            title = (
                f"Node {node.node_key} of run {node.run_id} is alive but its progress "
                f"({_progress_words(progress)}) has not moved since {clock(since)} ({threshold})"
            )
        found.append(
            Detection(
                code="stalled",
                subject=node_subject(node.pk, attempt.number),
                severity=WARNING,
                title=title,
                suggestion=(
                    "The worker heartbeats, so the process runs, but the node makes no "
                    "progress: it may wait on a lock, a remote service or an endless loop. "
                    "Read its last log lines; retry the node if it does not move on."
                    + (
                        ""
                        if declared
                        else " If it is just slow between reports, declare a longer "
                        "`stall_after` for it in the definition."
                    )
                ),
                evidence={
                    **attempt_evidence(ctx, attempt),
                    "progress_unchanged_since": since.isoformat(),
                    "never_reported_progress": progress is None,
                    "threshold": threshold,
                    "threshold_seconds": limit,
                    "stall_after_seconds": declared,
                    "threshold_beats": None if declared else beats,
                },
                action=retry_action(node),
                **about_attempt(attempt),
            )
        )
    return found


def _progress_words(progress: dict) -> str:
    done, total = progress.get("done"), progress.get("total")
    return f"{done} of {total}" if total is not None else f"{done} done"
