"""Findings services: record what the detectors saw, and close what no longer holds.

A detector returns ``Detection`` values; ``record`` turns one tick's detections into
``Finding`` rows:

* a detection whose (code, subject) has no open finding opens one (``first_seen`` is
  now: the time of detection);
* one that has refreshes ``last_seen``, the evidence and the words;
* an open finding of a code that was checked this tick but not detected again is
  resolved (``resolved_at``: the time of recovery). Codes whose detector could not run
  (Redis down, an error) are left as they are: not seeing is not the same as healthy.

Every finding about a run is written into the run's history as a RunEvent of kind
``finding`` when it opens, is repaired and is resolved.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from diagnostics.models import Finding
from workflows.models import RunEvent

logger = logging.getLogger(__name__)

ACTOR = "watchdog"


@dataclass(frozen=True)
class Repair:
    """What the watchdog may do on its own about a detection (see diagnostics/repairs.py).

    ``abandon``: end attempt ``attempt`` of node-run ``node_run_id`` with ``reason`` and
    let the retry policy act. ``resend``: the node is queued but RQ will never run its
    job ``job_id``; drop the dead job (``dead_job``) and send the message again.
    """

    kind: str
    node_run_id: int
    attempt: int
    reason: str = ""
    job_id: str = ""
    dead_job: bool = False


@dataclass
class Detection:
    """One condition a detector saw, with everything a person needs to act on it."""

    code: str
    subject: str
    title: str
    suggestion: str
    severity: str = Finding.Severity.WARNING
    evidence: dict = field(default_factory=dict)
    action: dict = field(default_factory=dict)
    run_id: int | None = None
    node_run_id: int | None = None
    queue: str = ""
    worker: str = ""
    repair: Repair | None = None
    # The attempt's row id, for attaching its last log lines and resource samples.
    attempt_id: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.code, self.subject)


@dataclass
class RecordResult:
    opened: list[Finding] = field(default_factory=list)
    updated: list[Finding] = field(default_factory=list)
    resolved: list[Finding] = field(default_factory=list)
    # (code, subject) -> the open finding for each detection of this tick.
    by_key: dict[tuple[str, str], Finding] = field(default_factory=dict)


def record(
    detections: list[Detection],
    *,
    checked_codes: set[str],
    now: datetime,
    keep_open: set[tuple[str, str]] = frozenset(),
) -> RecordResult:
    """Upsert this tick's detections and resolve the findings that no longer hold.

    1. Read every open finding of the checked codes (one query, partial index).
    2. Refresh those detected again; open the new ones (each in a savepoint: a second
       watchdog acting without the lock may have opened it a moment ago).
    3. Resolve the open ones not detected again, except those ``keep_open`` names (a
       detector ran but could not look at them, e.g. Redis memory while Redis is down).
    4. Write a RunEvent for each finding about a run that opened or resolved.
    """
    result = RecordResult()
    detections = _unique(detections)
    codes = checked_codes | {detection.code for detection in detections}
    open_findings = {
        (finding.code, finding.subject): finding
        for finding in Finding.objects.filter(resolved_at__isnull=True, code__in=codes)
    }
    to_update = []
    for detection in detections:
        finding = open_findings.get(detection.key)
        if finding is None:
            finding = _open(detection, now)
            if finding is None:
                continue
            result.opened.append(finding)
        else:
            _apply(finding, detection, now)
            to_update.append(finding)
        result.by_key[detection.key] = finding
    if to_update:
        Finding.objects.bulk_update(to_update, UPDATED_FIELDS, batch_size=200)
        result.updated = to_update
    seen = {detection.key for detection in detections}
    gone = [
        finding
        for key, finding in open_findings.items()
        if key not in seen and finding.code in checked_codes and key not in keep_open
    ]
    if gone:
        Finding.objects.filter(pk__in=[finding.pk for finding in gone]).update(resolved_at=now)
        for finding in gone:
            finding.resolved_at = now
        result.resolved = gone
    _write_events(result.opened, result.resolved, now)
    return result


UPDATED_FIELDS = [
    "severity",
    "title",
    "suggestion",
    "evidence",
    "action",
    "last_seen",
    "run",
    "node_run",
    "queue",
    "worker",
]


def _unique(detections: list[Detection]) -> list[Detection]:
    """One detection per (code, subject); the first wins."""
    seen, unique = set(), []
    for detection in detections:
        if detection.key not in seen:
            seen.add(detection.key)
            unique.append(detection)
    return unique


def _apply(finding: Finding, detection: Detection, now: datetime) -> None:
    finding.severity = detection.severity
    finding.title = detection.title[:300]
    finding.suggestion = detection.suggestion
    # Keep when the condition began across refreshes: it feeds time to detect (MTTD).
    began = (finding.evidence or {}).get("since") or condition_began(detection.evidence)
    finding.evidence = {**detection.evidence, **({"since": began} if began else {})}
    finding.action = detection.action
    finding.last_seen = now
    finding.run_id = detection.run_id
    finding.node_run_id = detection.node_run_id
    finding.queue = detection.queue[:100]
    finding.worker = detection.worker[:200]


# Evidence fields that say when a condition began, most telling first: the last sign of
# life of a silent node, the start of a wait, the moment progress stopped moving.
SINCE_FIELDS = (
    "since",
    "progress_unchanged_since",
    "waiting_since",
    "heartbeat_at",
    "oldest_queued_at",
    "queued_at",
    "finished_at",
    "started_at",
)


def condition_began(evidence: dict) -> str | None:
    """When the condition began, as far as the evidence tells (ISO 8601), or None."""
    for name in SINCE_FIELDS:
        value = evidence.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _open(detection: Detection, now: datetime) -> Finding | None:
    finding = Finding(code=detection.code, subject=detection.subject[:200], first_seen=now)
    _apply(finding, detection, now)
    try:
        with transaction.atomic():
            finding.save()
    except IntegrityError:
        # Another watchdog opened it between our read and our insert: keep theirs.
        logger.info("Finding %s on %s was opened concurrently.", detection.code, detection.subject)
        return Finding.objects.filter(
            code=detection.code, subject=detection.subject[:200], resolved_at__isnull=True
        ).first()
    return finding


def _write_events(opened: list[Finding], resolved: list[Finding], now: datetime) -> None:
    events = [
        RunEvent(
            run_id=finding.run_id,
            node_run_id=finding.node_run_id,
            kind=RunEvent.Kind.FINDING,
            actor=ACTOR,
            reason=f"{finding.code}: {finding.title}"[:2000],
            after={"finding": finding.pk, "code": finding.code, "state": "open"},
        )
        for finding in opened
        if finding.run_id
    ]
    events += [
        RunEvent(
            run_id=finding.run_id,
            node_run_id=finding.node_run_id,
            kind=RunEvent.Kind.FINDING,
            actor=ACTOR,
            reason=(
                f"{finding.code} resolved after "
                f"{(now - finding.first_seen).total_seconds():.0f}s: {finding.title}"
            )[:2000],
            before={"finding": finding.pk, "code": finding.code, "state": "open"},
            after={"finding": finding.pk, "code": finding.code, "state": "resolved"},
        )
        for finding in resolved
        if finding.run_id
    ]
    if events:
        RunEvent.objects.bulk_create(events, batch_size=200)


def mark_repaired(finding: Finding, repair: str, *, now: datetime | None = None) -> None:
    """Note on the finding (and in its run's history) what the watchdog did about it."""
    now = now or timezone.now()
    finding.repaired_at = now
    finding.repair = repair
    Finding.objects.filter(pk=finding.pk).update(repaired_at=now, repair=repair)
    if finding.run_id:
        RunEvent.objects.create(
            run_id=finding.run_id,
            node_run_id=finding.node_run_id,
            kind=RunEvent.Kind.FINDING,
            actor=ACTOR,
            reason=f"{finding.code} repaired: {repair}"[:2000],
            after={"finding": finding.pk, "code": finding.code, "state": "repaired"},
        )


def record_past_outage(code: str, subject: str, *, describe, started, ended) -> Finding:
    """Store a condition the watchdog could not write down while it held (the database
    was unreachable) as a finding that opened when it began and resolved when it ended.

    Another sighting of the same condition that overlaps it (a second watchdog saw part
    of it, or a finding opened just before nothing could be written) is merged in: one
    outage is one finding. ``describe(began, ended)`` gives the (title, suggestion,
    evidence) of the whole span.
    """
    with transaction.atomic():
        overlapping = list(
            Finding.objects.select_for_update()
            .filter(code=code, subject=subject, first_seen__lte=ended)
            .filter(Q(resolved_at__isnull=True) | Q(resolved_at__gte=started))
            .order_by("first_seen")
        )
        began = min([started, *(f.first_seen for f in overlapping)])
        over = max([ended, *(f.resolved_at or ended for f in overlapping)])
        title, suggestion, evidence = describe(began, over)
        finding = overlapping[0] if overlapping else Finding(code=code, subject=subject)
        if len(overlapping) > 1:
            Finding.objects.filter(pk__in=[other.pk for other in overlapping[1:]]).delete()
        finding.severity = Finding.Severity.CRITICAL
        finding.title = title[:300]
        finding.suggestion = suggestion
        finding.evidence = evidence
        finding.first_seen, finding.last_seen, finding.resolved_at = began, over, over
        finding.save()
    return finding
