"""The watchdog tick: detect, record findings, repair what is safe (shared DESIGN §6).

``manage.py watchdog`` calls ``tick()`` every KEEL_WATCHDOG_SECONDS. Several watchdogs
may run: a Redis lock lets one act at a time, and every repair is a compare-and-set in
the engine, so even two acting at once (Redis down, no lock) cannot both win.
"""

import contextlib
import logging
from dataclasses import dataclass, field

import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone

from diagnostics import detectors, findings, repairs
from diagnostics.health import WATCHDOG_HEARTBEAT_KEY
from diagnostics.models import Finding
from workflows import dispatch, engine

logger = logging.getLogger(__name__)
LOCK_NAME = "keel:watchdog:lock"

# When the database stops answering nothing can be written down; the outage is kept
# here (per watchdog process) and recorded as a finding once it answers again.
_outage: dict = {}


@dataclass(frozen=True)
class TickReport:
    acted: bool
    retries_queued: int = 0
    messages_resent: int = 0
    runs_expired: int = 0
    opened: tuple[str, ...] = ()
    resolved: tuple[str, ...] = ()
    repairs: tuple[str, ...] = ()
    failed_detectors: dict = field(default_factory=dict)
    database_down: str = ""

    @property
    def eventful(self) -> bool:
        return bool(
            self.retries_queued
            or self.messages_resent
            or self.runs_expired
            or self.opened
            or self.resolved
            or self.repairs
            or self.database_down
        )

    def __str__(self):
        if not self.acted:
            return "another watchdog holds the lock; skipped"
        if self.database_down:
            return f"the database does not answer ({self.database_down}); nothing checked"
        lines = [
            f"retries queued: {self.retries_queued}, lost messages re-sent: "
            f"{self.messages_resent}, runs expired: {self.runs_expired}, findings opened: "
            f"{len(self.opened)}, resolved: {len(self.resolved)}, repairs: {len(self.repairs)}"
        ]
        lines += [f"  opened   {one}" for one in self.opened]
        lines += [f"  resolved {one}" for one in self.resolved]
        lines += [f"  repaired {one}" for one in self.repairs]
        lines += [f"  could not check {code}: {why}" for code, why in self.failed_detectors.items()]
        return "\n".join(lines)


def tick(
    lock_seconds: float = 30.0, *, interval: float | None = None, redis_connection=None, db=None
) -> TickReport:
    """One pass. Say this watchdog is alive, take the lock (without Redis, act anyway),
    then ``_act``."""
    lock = None
    try:
        conn = redis_connection if redis_connection is not None else dispatch.redis_connection()
        _say_alive(conn, interval or settings.KEEL_WATCHDOG_SECONDS)
        lock = conn.lock(LOCK_NAME, timeout=lock_seconds, blocking=False)
        if not lock.acquire():
            return TickReport(acted=False)
    except redis.RedisError as error:
        logger.warning("Watchdog acting without its Redis lock (%s).", error)
        lock = None
    try:
        return _act(redis_connection=redis_connection, db=db)
    finally:
        if lock is not None:
            with contextlib.suppress(redis.RedisError):
                lock.release()  # if Redis went away, the lock expires by itself


def _say_alive(conn, interval: float) -> None:
    """Every watchdog, acting or not, proves it is alive (read by doctor, metrics, report)."""
    conn.set(WATCHDOG_HEARTBEAT_KEY, timezone.now().isoformat(), ex=int(3 * interval + 10))


def _act(*, redis_connection=None, db=None) -> TickReport:
    """The tick itself.

    1. Check the database answers; if not, remember since when and stop here. When it
       answers again, record the outage as a (resolved) finding.
    2. Run the detectors against one shared view of the database and Redis.
    3. Record findings: open new ones (first_seen = now), refresh those still true,
       resolve those of the checked codes that no longer hold.
    4. Repair: abandon the attempts of lost workers and lost running jobs (the retry
       policy acts; the next attempt resumes from its checkpoint).
    5. Queue retries whose backoff has passed.
    6. Drop RQ jobs that ended without running their queued node, re-send every
       queued node whose job is missing (a flush, the commit→enqueue gap), and note
       the re-sends on their findings.
    7. Fail runs past their deadline.
    """
    now = timezone.now()
    db = db if db is not None else connection
    down = [p for p in detectors.database_problems(db) if p.subject == "database:unreachable"]
    if down:
        _outage.setdefault("since", now)
        _outage["evidence"] = down[0].evidence
        logger.error("Watchdog: %s (%s)", down[0].title, down[0].evidence.get("error"))
        return TickReport(acted=True, database_down=down[0].evidence.get("error", "?"))
    if _outage:
        _record_outage(now)
    ctx = detectors.Context(now=now, redis_connection=redis_connection, db=db)
    found = detectors.run_all(ctx)
    recorded = findings.record(
        found.detections, checked_codes=found.checked, now=now, keep_open=found.keep_open
    )
    report = repairs.RepairReport()
    repairs.abandon_lost_attempts(found.detections, recorded.by_key, report)
    retries = engine.promote_due_retries()
    if ctx.redis_ok:
        repairs.drop_dead_jobs(found.detections)
    # The same cutoff the job_lost detector used, so nothing is re-sent unrecorded.
    grace = detectors.lost_job_grace() + (timezone.now() - now).total_seconds()
    resent = engine.resend_lost_messages(older_than_seconds=grace)
    if ctx.redis_ok:
        repairs.confirm_resent(found.detections, recorded.by_key, report)
    expired = engine.expire_overdue_runs()
    return TickReport(
        acted=True,
        retries_queued=retries,
        messages_resent=resent,
        runs_expired=expired,
        opened=tuple(_describe(f) for f in recorded.opened),
        resolved=tuple(_describe(f) for f in recorded.resolved),
        repairs=tuple(report.abandoned + report.resent),
        failed_detectors=found.failed,
    )


def _describe(finding: Finding) -> str:
    return f"{finding.code} {finding.subject}: {finding.title}"


def _record_outage(now) -> None:
    since = _outage.pop("since")
    evidence = {
        **_outage.pop("evidence", {}),
        "down_from": since.isoformat(),
        "up_at": now.isoformat(),
    }
    findings.record_past_outage(
        "db_unhealthy",
        "database:unreachable",
        title=f"The database did not answer for {(now - since).total_seconds():.0f}s",
        suggestion=(
            "It answers again. Find out why it stopped (server logs, restarts, network) so it "
            "does not happen again."
        ),
        evidence=evidence,
        started=since,
        ended=now,
    )
