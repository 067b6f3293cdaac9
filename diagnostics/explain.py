"""Diagnoses for people: what is wrong, in plain words, the evidence, what to do and the
one-click action that fits.

Selectors only (no writes). ``manage.py diagnose`` prints them; the dashboard's
"Stuck & findings" page and the diagnosis panels of run and node pages render the
same values (``as_dict()`` gives their JSON form).
"""

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime

from django.db.models import Count, Q
from django.utils import timezone

from diagnostics.models import Finding
from workflows.models import NodeRun, Run

# What each cause means, for someone who has never seen Keel's internals.
MEANING = {
    "heartbeat_stale": (
        "The node is marked running, but the process running it stopped sending its "
        "heartbeat. It is frozen (a deadlock, a call without a timeout, an overloaded "
        "machine) or it died on a host the watchdog cannot look into."
    ),
    "worker_lost": (
        "The worker process that was running this node is gone (killed, crashed, out of "
        "memory, its machine stopped). The attempt can never report back."
    ),
    "job_lost": (
        "Redis no longer has the message that tells a worker to run this node, usually "
        "because Redis was flushed or restarted without its data. The database still knows "
        "the node must run, so the watchdog sends the message again."
    ),
    "overdue": (
        "The node has run much longer than usual. It may be working on more data than "
        "before, or it may be stuck without the process dying."
    ),
    "stalled": (
        "The node's process is alive and heartbeating, but the progress it reports has "
        "stopped moving (or it never reported any, though its definition promised to within "
        "stall_after seconds). Slow nodes keep moving; this one does not."
    ),
    "timeout_exceeded": (
        "The node has run longer than its hard timeout. Its worker should ask it to stop "
        "and kill it a few seconds later; if it is still running after that, the worker is "
        "frozen or cannot kill it (a simple worker cannot stop a node hung in C code)."
    ),
    "worker_unresponsive": (
        "A worker stopped sending its heartbeat to Redis, though Keel workers send one every "
        "few seconds whether busy or idle. It is frozen (stopped with SIGSTOP, held by a "
        "debugger, starved on a swapping machine) and takes no work, or its process ended "
        "without RQ being told."
    ),
    "zombie_attempt": (
        "A worker is still busy with an attempt that is over: it was retried, cancelled or "
        "rolled back, or it ended. The worker should have stopped that process; until it "
        "is restarted it takes no other work. Nothing the old attempt does is applied."
    ),
    "resource_pressure": (
        "The node's process is short of CPU, waits on the disk, or is close to its memory "
        "limit. It may become slow, or be killed by the kernel."
    ),
    "no_worker": (
        "Nodes wait on a queue that no running worker listens to, so nothing will pick them "
        "up until a worker for that queue starts."
    ),
    "backlog": (
        "More work waits on the queue than the workers get through, or work has waited for "
        "a long time."
    ),
    "pool_exhausted": (
        "The node is ready but needs a slot of a resource pool, and every slot is taken by "
        "other runs."
    ),
    "blocked_upstream": (
        "A node failed, timed out or was cancelled, so the nodes after it cannot start. The "
        "rest of the run goes on without them."
    ),
    "repeated_timeout": (
        "The node hit its time limit on more than one attempt: retrying alone will probably "
        "not help."
    ),
    "redis_unhealthy": (
        "Redis, which carries the messages to the workers, is unreachable or at risk of "
        "losing messages. The database keeps the truth; nothing is lost, but work waits."
    ),
    "db_unhealthy": (
        "The database, which holds every run and node state, is unreachable or nearly out "
        "of connections. Workers cannot claim or finish nodes meanwhile."
    ),
    "retired_version_running": (
        "New runs of the workflow get another version now, because this one was aborted, "
        "rolled back, or replaced by a blue-green switch longer ago than its retention. "
        "Runs that started on it keep running on it until they end: a deployment never "
        "moves a run to another version."
    ),
    "canary_failing": (
        "A new version is being tried on a share of new runs (a canary), and its runs fail "
        "more often than those of the live version over the same time. The watchdog aborts "
        "a canary on its own only with enough runs to be sure; this one is not there yet."
    ),
    "deployment_stuck": (
        "A deployment cannot finish on its own: a blue-green validation run has not ended, "
        "or a canary step has had too few runs to judge the new version for a long time "
        "(the workflow runs rarely, or the canary's share is small). Until a person "
        "promotes or aborts it, new runs stay split or on the old version."
    ),
}

# Evidence keys worth showing a person, in this order, with their labels.
EVIDENCE_LABELS = [
    ("why_lost", "why lost"),
    ("why_not_stopped", "why not stopped"),
    ("how_it_ended", "how it ended"),
    ("why", "why"),
    ("problems", "problems"),
    ("node", "node"),
    ("attempt", "attempt"),
    ("worker", "worker"),
    ("host", "host"),
    ("pid", "pid"),
    ("worker_pid", "worker pid"),
    ("process", "process"),
    ("queue", "queue"),
    ("queues", "queues"),
    ("current_job", "current job"),
    ("rq_last_heartbeat", "last RQ heartbeat"),
    ("rq_heartbeat_age_seconds", "since RQ heartbeat"),
    ("rq_heartbeat_within_seconds", "RQ heartbeat within"),
    ("rq_key_exists", "listed by RQ"),
    ("rq_job_id", "RQ job"),
    ("rq_job_status", "RQ job status"),
    ("started_at", "started"),
    ("running_for_seconds", "running for"),
    ("heartbeat_at", "last heartbeat"),
    ("seconds_since_heartbeat", "since heartbeat"),
    ("never_sent_heartbeat", "never sent a heartbeat"),
    ("heartbeat_age_counted_from", "heartbeat age counted from"),
    ("alive_because", "alive because"),
    ("progress", "progress"),
    ("unchanged_for_seconds", "progress unchanged for"),
    ("never_reported_progress", "never reported progress"),
    ("threshold", "stalled after"),
    ("expected_seconds", "expected duration"),
    ("history_p95_seconds", "p95 of history"),
    ("limit_seconds", "limit"),
    ("timeout_seconds", "timeout"),
    ("past_timeout_seconds", "past the timeout by"),
    ("kill_grace_seconds", "kill grace"),
    ("deadline", "deadline"),
    ("stopped_by", "should be stopped by"),
    ("attempt_status", "attempt status"),
    ("node_status", "node status"),
    ("node_attempt", "node's current attempt"),
    ("over_for_seconds", "over for"),
    ("runbook", "runbook"),
    ("queued_at", "queued"),
    ("queued_for_seconds", "queued for"),
    ("queued_nodes", "queued nodes"),
    ("rq_queue_length", "RQ queue length"),
    ("oldest_wait_seconds", "oldest waiting for"),
    ("listening_workers", "listening workers"),
    ("dead_workers_for_queue", "dead workers for queue"),
    ("frozen_workers_for_queue", "frozen workers for queue"),
    ("rq_suspended", "RQ suspended"),
    ("pool", "pool"),
    ("slots", "slots"),
    ("waiting_nodes", "waiting nodes"),
    ("waiting_seconds", "waiting for"),
    ("holders", "held by"),
    ("upstream", "failed upstream"),
    ("upstream_reason", "upstream reason"),
    ("blocked_nodes", "blocked nodes"),
    ("timed_out_attempts", "timed-out attempts"),
    ("rss_bytes", "RSS"),
    ("rss_limit_bytes", "RSS limit"),
    ("cpu_percent_mean", "CPU % (mean)"),
    ("io_wait_percent_mean", "IO wait % (mean)"),
    ("network_bytes_per_second_mean", "network, host (mean bytes/s)"),
    ("resource_samples", "resource samples"),
    ("url", "URL"),
    ("error", "error"),
    ("used_memory_human", "used memory"),
    ("maxmemory", "maxmemory"),
    ("maxmemory_policy", "maxmemory-policy"),
    ("connections", "connections"),
    ("max_connections", "max_connections"),
    ("down_from", "down from"),
    ("up_at", "up again at"),
    ("down_for_seconds", "down for"),
    ("workflow", "workflow"),
    ("version", "version"),
    ("baseline_version", "baseline version"),
    ("live_version", "live version"),
    ("deployment", "deployment"),
    ("strategy", "strategy"),
    ("deployment_state", "deployment state"),
    ("retired_at", "left at"),
    ("running_runs", "runs still running"),
    ("run_ids", "runs"),
    ("oldest_started_at", "oldest started"),
    ("step", "step"),
    ("percent", "canary share"),
    ("step_started_at", "step started"),
    ("waiting_since", "waiting since"),
    ("stuck_after_seconds", "stuck after"),
    ("validation_run", "validation run"),
    ("validation_run_status", "validation run status"),
    ("finished_runs", "finished runs"),
    ("runs_needed", "runs needed"),
    ("canary", "canary"),
    ("baseline", "baseline"),
    ("fisher_p", "Fisher's exact test p"),
    ("reported_below_p", "reported below p"),
]


@dataclass
class Explanation:
    """One finding, explained."""

    id: int
    code: str
    severity: str
    subject: str
    title: str
    meaning: str
    evidence: list[tuple[str, str]]
    last_log_lines: list[dict]
    suggestion: str
    action: dict
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None
    repaired_at: datetime | None
    repair: str
    run_id: int | None
    node_key: str
    raw_evidence: dict = field(repr=False)

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["evidence"] = [{"label": label, "value": value} for label, value in self.evidence]
        for key in ("first_seen", "last_seen", "resolved_at", "repaired_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass
class RunDiagnosis:
    run_id: int
    workflow: str
    version: int
    status: str
    summary: str
    counts: dict
    findings: list[Explanation]
    recently_resolved: list[Explanation]
    actions: list[dict]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["findings"] = [f.as_dict() for f in self.findings]
        data["recently_resolved"] = [f.as_dict() for f in self.recently_resolved]
        return data


@dataclass
class NodeDiagnosis:
    run_id: int
    node_key: str
    status: str
    summary: str
    findings: list[Explanation]
    recently_resolved: list[Explanation]
    actions: list[dict]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["findings"] = [f.as_dict() for f in self.findings]
        data["recently_resolved"] = [f.as_dict() for f in self.recently_resolved]
        return data


# --- Findings ---------------------------------------------------------------------------------


def explain(finding: Finding) -> Explanation:
    evidence = finding.evidence or {}
    return Explanation(
        id=finding.pk,
        code=finding.code,
        severity=finding.severity,
        subject=finding.subject,
        title=finding.title,
        meaning=MEANING.get(finding.code, ""),
        evidence=evidence_lines(evidence),
        last_log_lines=evidence.get("last_log_lines") or [],
        suggestion=finding.suggestion,
        action=with_label(finding.action),
        first_seen=finding.first_seen,
        last_seen=finding.last_seen,
        resolved_at=finding.resolved_at,
        repaired_at=finding.repaired_at,
        repair=finding.repair,
        run_id=finding.run_id,
        node_key=evidence.get("node") or "",
        raw_evidence=evidence,
    )


def open_findings(codes: list[str] | None = None) -> list[Explanation]:
    """Every open finding, most severe first, then newest."""
    qs = Finding.objects.filter(resolved_at__isnull=True)
    if codes:
        qs = qs.filter(code__in=codes)
    order = {Finding.Severity.CRITICAL: 0, Finding.Severity.WARNING: 1, Finding.Severity.INFO: 2}
    found = sorted(qs, key=lambda f: (order.get(f.severity, 3), -f.first_seen.timestamp()))
    return [explain(f) for f in found]


def group_by_code(explanations: list[Explanation]) -> dict[str, list[Explanation]]:
    groups: dict[str, list[Explanation]] = {}
    for explanation in explanations:
        groups.setdefault(explanation.code, []).append(explanation)
    return groups


def evidence_lines(evidence: dict, now: datetime | None = None) -> list[tuple[str, str]]:
    now = now or timezone.now()
    return [
        (label, format_value(key, evidence[key], now))
        for key, label in EVIDENCE_LABELS
        if evidence.get(key) not in (None, "", [], {})
    ]


@dataclass(frozen=True)
class EvidenceRow:
    """One evidence value for a table: its label, the value in words with its unit, and
    the moment it names, if any (a page shows how long ago, kept true as time passes)."""

    label: str
    value: str
    moment: datetime | None = None


def evidence_rows(evidence: dict) -> list[EvidenceRow]:
    rows = []
    for key, label in EVIDENCE_LABELS:
        value = evidence.get(key)
        if value in (None, "", [], {}):
            continue
        moment = evidence_moment(key, value)
        words = f"{moment:%Y-%m-%d %H:%M:%S %Z}".strip() if moment else format_value(key, value)
        rows.append(EvidenceRow(label=label, value=words, moment=moment))
    return rows


def evidence_moment(key: str, value) -> datetime | None:
    """The moment an evidence value names (findings store moments, never ages, so that
    they do not change while nothing changes)."""
    if not isinstance(value, str) or not (
        key.endswith("_at")
        or key in ("down_from", "waiting_since", "deadline", "stopped_by")
        or key == "heartbeat_age_counted_from"
    ):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def format_value(key: str, value, now: datetime | None = None) -> str:
    """One evidence value in words; a moment also says how long ago it was."""
    if "seconds" in key and isinstance(value, int | float) and not isinstance(value, bool):
        return duration_words(value)
    moment = evidence_moment(key, value)
    if moment is not None:
        words = f"{moment:%Y-%m-%d %H:%M:%S %Z}".strip()
        if now is not None and moment.tzinfo is not None and moment <= now:
            words += f" ({duration_words((now - moment).total_seconds())} ago)"
        return words
    if key.endswith("_bytes") and isinstance(value, int | float):
        return f"{value / 2**20:.0f} MiB"
    if key == "progress" and isinstance(value, dict):
        done, total = value.get("done"), value.get("total")
        words = f"{done} of {total}" if total is not None else f"{done}"
        return f"{words} {value.get('message') or ''}".strip()
    if key == "holders":
        return ", ".join(f"run {h['run']} ({h['node']}, {h['status']})" for h in value)
    if key in ("canary", "baseline") and isinstance(value, dict):
        return _sample_words(value)
    if key == "percent" and isinstance(value, int | float):
        return f"{value}% of new runs"
    if key == "timed_out_attempts":
        return "; ".join(f"#{a['attempt']} after {a['seconds']}s: {a['error']}" for a in value)
    if key == "resource_samples":
        return "; ".join(
            f"cpu {s.get('cpu_percent')}%, rss {(s.get('rss_bytes') or 0) / 2**20:.0f} MiB, "
            f"io wait {s.get('io_wait_percent')}%"
            + (
                f", network {s['network_bytes_per_second'] / 2**10:.0f} KiB/s (host)"
                if s.get("network_bytes_per_second") is not None
                else ""
            )
            for s in value
        )
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _sample_words(sample: dict) -> str:
    """A canary's or baseline's runs in a step: "3 of 20 failed (15.0%), p95 2.10s"."""
    rate = sample.get("failure_rate")
    words = f"{sample.get('failures')} of {sample.get('runs')} failed"
    words += f" ({rate * 100:.1f}%)" if rate is not None else ""
    p95 = sample.get("p95_seconds")
    if p95 is not None:
        words += f", p95 {p95:.2f}s" if p95 < 60 else f", p95 {duration_words(p95)}"
    return words


def duration_words(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f}s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def with_label(action: dict) -> dict:
    """The action with a ``label`` a button can show."""
    if not action:
        return {}
    kind = action.get("kind")
    if kind == "retry_node":
        label = f"Retry node {action.get('node')} of run {action.get('run')}"
    elif kind == "resume_run":
        label = f"Resume run {action.get('run')}"
    elif kind == "resize_pool":
        label = f"Raise pool {action.get('pool')} to {action.get('slots')} slot(s)"
    elif kind == "command" or (action.get("command") and not action.get("label")):
        label = f"Run `{action.get('command')}`"
    elif action.get("command"):  # its own words, then what to paste
        label = f"{action['label']}: `{action['command']}`"
    else:
        label = str(kind)
    return {**action, "label": label}


# --- Runs and nodes ---------------------------------------------------------------------------


# Findings about things every run depends on, shown with a run that they hold up.
QUEUE_CODES = ("no_worker", "backlog")
STORE_CODES = ("redis_unhealthy", "db_unhealthy")


def _run_findings(run: Run, node: NodeRun | None = None) -> tuple[list, list]:
    """The run's (or node's) findings, open and recently resolved, plus the open findings
    about the queues its queued nodes wait on and about Redis and the database."""
    found = list(Finding.objects.filter(run=run).order_by("-last_seen")[:100])
    if node is not None:
        found = [f for f in found if _concerns(f, node)]
        queues = {node.queue} if node.status == NodeRun.Status.QUEUED else set()
    else:
        queues = set(
            NodeRun.objects.filter(run=run, status=NodeRun.Status.QUEUED)
            .values_list("queue", flat=True)
            .distinct()
        )
    if run.status in Run.ACTIVE:
        found += list(
            Finding.objects.filter(resolved_at__isnull=True)
            .filter(Q(code__in=QUEUE_CODES, queue__in=queues) | Q(code__in=STORE_CODES))
            .order_by("-last_seen")[:20]
        )
    still = [explain(f) for f in found if f.resolved_at is None]
    resolved = [explain(f) for f in found if f.resolved_at is not None][:10]
    return still, resolved


def _concerns(finding: Finding, node: NodeRun) -> bool:
    """Is the finding about this node: on it, or about the run and naming it?"""
    if finding.node_run_id == node.pk:
        return True
    evidence = finding.evidence or {}
    return node.node_key in evidence.get("blocked_nodes", []) + evidence.get("waiting_nodes", [])


def diagnose_run(run: Run | int) -> RunDiagnosis:
    """Why a run is where it is: a summary in plain words, its open findings (and the
    recently resolved ones), and the actions that fit."""
    if not isinstance(run, Run):
        run = Run.objects.select_related("workflow", "version").get(pk=run)
    counts = dict(NodeRun.objects.filter(run=run).values_list("status").annotate(n=Count("id")))
    still, resolved = _run_findings(run)
    summary, actions = _run_summary(run, counts, still)
    for explanation in still:
        if explanation.action and explanation.action not in actions:
            actions.append(explanation.action)
    return RunDiagnosis(
        run_id=run.pk,
        workflow=run.workflow.slug,
        version=run.version.number,
        status=run.status,
        summary=summary,
        counts=counts,
        findings=still,
        recently_resolved=resolved,
        actions=actions,
    )


def _run_summary(run: Run, counts: dict, still: list[Explanation]) -> tuple[str, list[dict]]:
    now = timezone.now()
    name = f"Run {run.pk} ({run.workflow.slug} v{run.version.number})"
    tally = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items()))
    if run.status == Run.Status.SUCCEEDED:
        took = duration_words((run.finished_at - run.started_at).total_seconds())
        return f"{name} succeeded in {took}. Nothing to do.", []
    if run.status == Run.Status.CANCELLED:
        return f"{name} was cancelled: {run.reason or 'no reason given'}.", []
    if run.status == Run.Status.FAILED:
        return _failed_summary(run, name)
    age = duration_words((now - (run.started_at or run.created_at)).total_seconds())
    text = f"{name} has been {run.status} for {age}: {tally or 'no nodes'}."
    if still:
        causes = Counter(e.code for e in still)
        text += " Problems: " + ", ".join(
            f"{code.replace('_', ' ')}" + (f" (x{n})" if n > 1 else "")
            for code, n in causes.items()
        )
        text += "."
    else:
        waiting = _waiting_words(run)
        text += f" {waiting}" if waiting else " Nothing looks stuck."
    return text, []


def _waiting_words(run: Run) -> str:
    pending = list(
        NodeRun.objects.filter(run=run, status=NodeRun.Status.PENDING, pending_upstreams=0)
        .exclude(reason="")
        .values_list("node_key", "reason")[:3]
    )
    return " ".join(f"{key}: {reason}." for key, reason in pending)


def _failed_summary(run: Run, name: str) -> tuple[str, list[dict]]:
    failed = list(
        NodeRun.objects.filter(
            run=run, status__in=[NodeRun.Status.FAILED, NodeRun.Status.TIMED_OUT]
        ).order_by("finished_at")[:5]
    )
    blocked = list(
        NodeRun.objects.filter(run=run, status=NodeRun.Status.PENDING).values_list(
            "node_key", flat=True
        )[:10]
    )
    if not failed:
        return f"{name} failed: {run.reason or 'no reason recorded'}.", [
            with_label({"kind": "resume_run", "run": run.pk})
        ]
    first = failed[0]
    text = f"{name} failed because node {first.node_key} {first.status.replace('_', ' ')}: {first.reason}."
    if len(failed) > 1:
        text += f" Also: {', '.join(n.node_key for n in failed[1:])}."
    if blocked:
        text += f" Never ran because of it: {', '.join(blocked)}."
    text += f" Fix the cause, then retry {first.node_key} or resume the run."
    actions = [
        with_label({"kind": "retry_node", "run": run.pk, "node": first.node_key}),
        with_label({"kind": "resume_run", "run": run.pk}),
    ]
    return text, actions


def diagnose_node(node: NodeRun) -> NodeDiagnosis:
    """Why one node is where it is, with its findings and the actions that fit."""
    still, resolved = _run_findings(node.run, node)
    status = node.status.replace("_", " ")
    text = f"Node {node.node_key} of run {node.run_id} is {status}"
    text += f" (attempt {node.attempt} of {node.max_attempts})." if node.attempt else "."
    if node.reason:
        text += f" {node.reason[0].upper()}{node.reason[1:]}."
    if still:
        text += " " + " ".join(e.title + "." for e in still)
    elif node.status in (NodeRun.Status.QUEUED, NodeRun.Status.RUNNING):
        text += " Nothing looks stuck."
    actions = []
    for explanation in still:
        if explanation.action and explanation.action not in actions:
            actions.append(explanation.action)
    if node.status in (NodeRun.Status.FAILED, NodeRun.Status.TIMED_OUT) and not actions:
        actions.append(
            with_label({"kind": "retry_node", "run": node.run_id, "node": node.node_key})
        )
    return NodeDiagnosis(
        run_id=node.run_id,
        node_key=node.node_key,
        status=node.status,
        summary=text,
        findings=still,
        recently_resolved=resolved,
        actions=actions,
    )
