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

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.db import transaction
from django.db.models import F, Q, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from diagnostics.models import Finding, began_from
from workflows.models import LogLine, RunEvent

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
    """Upsert this tick's detections and resolve the findings that no longer hold,
    writing only what changed: at 10 000 open findings a tick stays well under a second.

    1. Read the open findings of the checked codes as (id, key, digest): one query.
    2. Open the new ones in one insert (a finding a second watchdog opened a moment ago
       is kept, not doubled) and rewrite those whose digest changed (what they say).
    3. Resolve the open ones not detected again, except those ``keep_open`` names (a
       detector ran but could not look at them, e.g. Redis memory while Redis is down).
    4. ``last_seen = now`` for the other open findings of the checked codes, at most
       LAST_SEEN_BATCH of them, those seen longest ago first: one update.
    5. Attach the last log lines of their attempts to the findings opened or rewritten
       (live evidence: an unchanged finding keeps those of its last change).
    6. Write a RunEvent for each finding about a run that opened or resolved.
    """
    result = RecordResult()
    detections = _unique(detections)
    codes = checked_codes | {detection.code for detection in detections}
    open_rows = {
        (code, subject): (pk, digest)
        for pk, code, subject, digest in Finding.objects.filter(
            resolved_at__isnull=True, code__in=codes
        ).values_list("pk", "code", "subject", "digest")
    }
    new, changed, unchanged = [], {}, []
    for detection in detections:
        pk, digest = open_rows.get(detection.key, (None, None))
        if pk is None:
            new.append(detection)
        elif digest != digest_of(detection):
            changed[pk] = detection
        else:
            unchanged.append((pk, detection))
    _attach_last_log_lines([*new, *changed.values()])
    result.opened, already = _open(new, now)
    result.updated = _rewrite(changed, now)
    seen = {detection.key for detection in detections}
    gone = [
        pk
        for key, (pk, _) in open_rows.items()
        if key not in seen and key[0] in checked_codes and key not in keep_open
    ]
    if gone:
        Finding.objects.filter(pk__in=gone).update(resolved_at=now)
        result.resolved = list(Finding.objects.filter(pk__in=gone).only(*EVENT_FIELDS))
    if unchanged:
        _refresh_last_seen({d.code for _, d in unchanged}, keep_open - seen, now)
    # The findings the repairs note what they did on (an unchanged one is read only then).
    result.by_key = {f.key: f for f in [*result.opened, *already, *result.updated]}
    to_repair = [pk for pk, detection in unchanged if detection.repair is not None]
    if to_repair:
        result.by_key.update(
            {f.key: f for f in Finding.objects.filter(pk__in=to_repair).only(*EVENT_FIELDS)}
        )
    _write_events(result.opened, result.resolved, now)
    return result


# At most this many unchanged findings get ``last_seen = now`` per tick, those seen longest
# ago first: every one of them while fewer are open, and in a mass incident each within
# a few ticks, at a bounded cost (rewriting 10 000 rows took ~0.6 s, every tick).
LAST_SEEN_BATCH = 1000


def _refresh_last_seen(codes: set[str], skip: set[tuple[str, str]], now: datetime) -> None:
    """Move ``last_seen`` on for open findings of ``codes`` seen before now (the new,
    rewritten and resolved ones of this tick are not), except the ``skip`` ones."""
    stale = Finding.objects.filter(resolved_at__isnull=True, code__in=codes, last_seen__lt=now)
    for code, subject in skip:
        stale = stale.exclude(code=code, subject=subject)
    oldest = stale.order_by("last_seen").values("pk")[:LAST_SEEN_BATCH]
    Finding.objects.filter(pk__in=oldest).update(last_seen=now)


def _attach_last_log_lines(detections: list[Detection], lines: int = 5) -> None:
    """Add each attempt's last log lines to its detections' evidence (one query)."""
    ids = {d.attempt_id for d in detections if d.attempt_id}
    if not ids:
        return
    rows = (
        LogLine.objects.filter(attempt_id__in=ids)
        .annotate(
            rank=Window(RowNumber(), partition_by=[F("attempt_id")], order_by=F("seq").desc())
        )
        .filter(rank__lte=lines)
        .order_by("attempt_id", "seq")
        .values_list("attempt_id", "at", "level", "message")
    )
    by_attempt = defaultdict(list)
    for attempt_id, at, level, message in rows:
        by_attempt[attempt_id].append(
            {"at": at.isoformat(), "level": level, "message": message[:500]}
        )
    for detection in detections:
        if detection.attempt_id:
            detection.evidence["last_log_lines"] = by_attempt.get(detection.attempt_id, [])


# Evidence that follows a node or a worker while the condition holds (in the evidence or
# an object in it): kept
# as of the finding's last change, and not a change by itself (a finding is rewritten when
# what it says changes). A live worker's RQ heartbeat moves every few seconds: were it
# counted, a mass incident would rewrite every finding on every tick.
LIVE_EVIDENCE = frozenset(
    {
        "progress",
        "resource_samples",
        "last_log_lines",
        "rq_last_heartbeat",
        "network_bytes_per_second_mean",
    }
)
# What the run history and the repairs read of a finding.
EVENT_FIELDS = ("id", "code", "subject", "title", "run_id", "node_run_id", "first_seen")


def digest_of(detection: Detection) -> str:
    """A hash of what a detection says (its live evidence aside)."""
    said = [
        detection.severity,
        detection.title[:300],
        detection.suggestion,
        _lasting(detection.evidence),
        detection.action,
        detection.run_id,
        detection.node_run_id,
        detection.queue[:100],
        detection.worker[:200],
    ]
    encoded = json.dumps(said, sort_keys=True, default=str).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def _lasting(evidence: dict) -> dict:
    """Evidence without its live parts, in it and in the objects it holds (a worker's)."""
    return {
        k: _lasting(v) if isinstance(v, dict) else v
        for k, v in evidence.items()
        if k not in LIVE_EVIDENCE
    }


def _open(detections: list[Detection], now: datetime) -> tuple[list[Finding], list[Finding]]:
    """Insert the new findings at once: (those opened, those a second watchdog acting
    without the lock opened a moment ago — kept as they are: the open-finding constraint
    skips ours)."""
    if not detections:
        return [], []
    rows = []
    for detection in detections:
        finding = Finding(code=detection.code, subject=detection.subject[:200], first_seen=now)
        _apply(finding, detection, now)
        rows.append(finding)
    Finding.objects.bulk_create(rows, batch_size=500, ignore_conflicts=True)
    # The ids (ignore_conflicts does not return them); ours are those first seen now.
    opened, already = [], []
    for chunk in chunks(detections, 500):
        keys = {(d.code, d.subject[:200]) for d in chunk}
        for finding in Finding.objects.filter(
            resolved_at__isnull=True,
            code__in={code for code, _ in keys},
            subject__in={subject for _, subject in keys},
        ):
            if finding.key in keys:
                (opened if finding.first_seen == now else already).append(finding)
    return opened, already


def _rewrite(changed: dict[int, Detection], now: datetime) -> list[Finding]:
    """Rewrite the findings whose digest changed (few, unless what they say moves)."""
    findings = Finding.objects.in_bulk(list(changed))
    for pk, finding in findings.items():
        _apply(finding, changed[pk], now)
        finding.save(update_fields=UPDATED_FIELDS)
    return list(findings.values())


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


UPDATED_FIELDS = [
    "digest",
    "began_at",
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
    finding.digest = digest_of(detection)
    finding.severity = detection.severity
    finding.title = detection.title[:300]
    finding.suggestion = detection.suggestion
    # Keep when the condition began across refreshes: it feeds time to detect (MTTD).
    began = (finding.evidence or {}).get("since") or condition_began(detection.evidence)
    finding.evidence = {**detection.evidence, **({"since": began} if began else {})}
    finding.began_at = began_from(finding.evidence)  # bulk_create does not call save()
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
