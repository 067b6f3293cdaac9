"""The watchdog tick: detect, record findings, repair what is safe (shared DESIGN §6).

``manage.py watchdog`` calls ``tick()`` every KEEL_WATCHDOG_SECONDS. Several watchdogs
may run: a Redis lock lets one act at a time, and every repair is a compare-and-set in
the engine, so even two acting at once (Redis down, no lock) cannot both win.
"""

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Max
from django.utils import timezone

from diagnostics import detectors, findings, repairs
from diagnostics.health import LAST_TICK_KEY, WATCHDOG_HEARTBEAT_KEY, error_text
from diagnostics.models import Finding
from workflows import engine
from workflows.deployments import judging
from workflows.models import NodeRun
from workflows.runtime import dispatch

logger = logging.getLogger(__name__)
LOCK_NAME = "keel:watchdog:lock"
# The longest wait between ticks while the database or Redis fails (or the interval,
# when that is longer): short, so the end of an outage is seen within seconds.
MAX_BACKOFF_SECONDS = 5.0

# When the database stops answering nothing can be written down; the outage is kept
# here (per watchdog process: since when, the first error) and recorded as a finding
# once it answers again.
_outage: dict = {}
# When the database server last started (PostgreSQL), and when this watchdog saw it: a
# restart between two ticks (a fraction of a second) is an outage no tick saw.
_server: dict = {}


@dataclass(frozen=True)
class TickReport:
    acted: bool
    retries_queued: int = 0
    messages_resent: int = 0
    runs_expired: int = 0
    pool_waits_failed: int = 0
    # Canaries promoted or aborted, blue-green deployments switched or aborted.
    deployments: tuple[str, ...] = ()
    # Lost attempts not ended this tick (out of time): the next tick ends them.
    repairs_left: int = 0
    opened: tuple[str, ...] = ()
    resolved: tuple[str, ...] = ()
    repairs: tuple[str, ...] = ()
    failed_detectors: dict = field(default_factory=dict)
    database_down: str = ""
    # Redis failed in the middle of the tick (a tick that starts without Redis acts
    # without it and reports redis_unhealthy instead).
    redis_failed: str = ""

    @property
    def eventful(self) -> bool:
        return bool(
            self.retries_queued
            or self.messages_resent
            or self.runs_expired
            or self.pool_waits_failed
            or self.deployments
            or self.opened
            or self.resolved
            or self.repairs
            or self.database_down
            or self.redis_failed
        )

    @property
    def failed(self) -> bool:
        """Whether the tick could not do its work: the watchdog backs off a little."""
        return bool(self.database_down or self.redis_failed)

    def __str__(self):
        if not self.acted:
            return "another watchdog holds the lock; skipped"
        if self.database_down:
            return f"the database does not answer ({self.database_down}); nothing checked"
        if self.redis_failed:
            return f"Redis failed during the tick ({self.redis_failed}); checking again"
        lines = [
            f"retries queued: {self.retries_queued}, lost messages re-sent: "
            f"{self.messages_resent}, runs expired: {self.runs_expired}, "
            + (
                f"pool waits timed out: {self.pool_waits_failed}, "
                if self.pool_waits_failed
                else ""
            )
            + "findings opened: "
            f"{len(self.opened)}, resolved: {len(self.resolved)}, repairs: {len(self.repairs)}"
            + (f" ({self.repairs_left} left for the next tick)" if self.repairs_left else "")
        ]
        lines += _listed("opened  ", self.opened)
        lines += _listed("resolved", self.resolved)
        lines += _listed("repaired", self.repairs)
        lines += _listed("deployed", self.deployments)
        lines += [f"  could not check {code}: {why}" for code, why in self.failed_detectors.items()]
        return "\n".join(lines)


# A tick's report names this many findings of each kind, then counts the rest: a mass
# incident opens 10 000 at once, and `manage.py watchdog` prints every eventful report.
LISTED = 20


def _listed(what: str, items: tuple[str, ...]) -> list[str]:
    lines = [f"  {what} {one}" for one in items[:LISTED]]
    if len(items) > LISTED:
        lines.append(f"  {what} … and {len(items) - LISTED} more")
    return lines


def tick(
    lock_seconds: float = 30.0, *, interval: float | None = None, redis_connection=None, db=None
) -> TickReport:
    """One pass. Say this watchdog is alive, take the lock (without Redis, act anyway),
    then ``_act``. The database or Redis failing in the middle of it ends the tick with
    a report that says so, never with an exception: the loop goes on."""
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
    db = db if db is not None else connection
    started = time.monotonic()
    try:
        report = _act(redis_connection=redis_connection, db=db, lock=lock)
        _record_tick(conn, time.monotonic() - started, report)
        return report
    except LockLost as error:
        logger.warning("Watchdog: %s", error)
        return TickReport(acted=True, redis_failed=str(error))
    except DatabaseError as error:
        if not _unreachable(db):
            raise  # the database answers: a real error, for the caller to report
        return _database_down(db, timezone.now(), error_text(error))
    except redis.RedisError as error:
        logger.warning("Watchdog: Redis failed during the tick (%s).", error_text(error))
        return TickReport(acted=True, redis_failed=error_text(error))
    finally:
        if lock is not None:
            with contextlib.suppress(redis.RedisError):
                lock.release()  # if Redis went away, the lock expires by itself


def backoff(interval: float, failed_ticks: int) -> float:
    """Seconds to wait before the next tick after ``failed_ticks`` failed ones in a row:
    the interval, doubled per failure, at most MAX_BACKOFF_SECONDS (or the interval)."""
    if failed_ticks <= 0:
        return interval
    return min(interval * 2**failed_ticks, max(interval, MAX_BACKOFF_SECONDS))


def _say_alive(conn, interval: float) -> None:
    """Every watchdog, acting or not, proves it is alive (read by doctor, metrics, report)."""
    conn.set(WATCHDOG_HEARTBEAT_KEY, timezone.now().isoformat(), ex=int(3 * interval + 10))


class LockLost(Exception):
    """This tick outlived its lock: another watchdog may act now, so this one stops."""


# Between steps the lock is renewed once this share of its life has passed: renewing
# after every detector waited each time for Redis to finish the worker sweep.
LOCK_RENEW_SHARE = 1 / 3


class _LockKeeper:
    """Renews the tick's lock between its steps: a long tick keeps it, so two ticks never
    overlap; one that lost it (a step longer than the lock) stops acting."""

    def __init__(self, lock):
        self.lock = lock
        self.renewed = time.monotonic()

    def __call__(self) -> None:
        if self.lock is None:
            return
        if time.monotonic() - self.renewed < LOCK_RENEW_SHARE * self.lock.timeout:
            return
        _renew(self.lock)
        self.renewed = time.monotonic()


def _renew(lock) -> None:
    try:
        lock.reacquire()
        return
    except redis.exceptions.LockNotOwnedError:
        pass
    except redis.exceptions.OutOfMemoryError:
        return  # see below
    # Gone with no other owner (expired, or evicted by an allkeys-* maxmemory policy,
    # which is what the redis_unhealthy finding this tick may record is about): take it
    # again. When Redis refuses writes (maxmemory) act on without it, as without Redis:
    # the engine's compare-and-set keeps two watchdogs from both winning. Held by
    # another watchdog: stop.
    try:
        if lock.acquire(blocking=False):
            return
    except redis.exceptions.OutOfMemoryError:
        return
    raise LockLost(
        f"this tick outlived its {lock.timeout:g} s lock (one step took longer); it "
        "stopped so that it never acts beside another watchdog"
    )


def _record_tick(conn, seconds: float, report: "TickReport") -> None:
    """What the last acting tick took, for the system page and /metrics (best effort)."""
    if not report.acted or report.failed:
        return
    value = {"at": timezone.now().isoformat(), "seconds": round(seconds, 4)}
    with contextlib.suppress(redis.RedisError):
        conn.set(LAST_TICK_KEY, json.dumps(value), ex=24 * 3600)


def _act(*, redis_connection=None, db=None, lock=None) -> TickReport:
    """The tick itself.

    1. Check the database answers; if not, remember since when and stop here. When it
       answers again, record the outage as a finding that opened when it began and is
       resolved already; so too a PostgreSQL restart no tick saw (its start time moved).
    2. Run the detectors against one shared view of the database and Redis.
    3. Record findings: open new ones (first_seen = now), refresh those still true,
       resolve those of the checked codes that no longer hold.
    4. Repair: abandon the attempts of lost workers and lost running jobs (the retry
       policy acts; the next attempt resumes from its checkpoint), for a bounded time
       (repairs.REPAIR_SECONDS; the rest next tick).
    5. Queue retries whose backoff has passed.
    6. Drop RQ jobs that ended without running their queued node, re-send every
       queued node whose job is missing (a flush, the commit→enqueue gap), and note
       the re-sends on their findings.
    7. Fail runs past their deadline.
    8. Judge deployments in flight: promote or abort canaries, switch or abort
       blue-green deployments whose validation run ended.
    """
    now = timezone.now()
    db = db if db is not None else connection
    down = [p for p in detectors.database_problems(db) if p.subject == "database:unreachable"]
    if down:
        return _database_down(db, now, down[0].evidence.get("error", "?"))
    seen_down = bool(_outage)
    if seen_down:
        started, error = _outage["since"], _outage["error"]
        record_database_outage(started, now, error, vendor=db.display_name)
        _outage.clear()  # only once it is written down
        logger.warning(
            "Watchdog: the database answers again after %.1fs.", (now - started).total_seconds()
        )
    _notice_restart(db, seen_down=seen_down)
    ctx = detectors.Context(now=now, redis_connection=redis_connection, db=db)
    keep_lock = _LockKeeper(lock)
    ctx.between_steps = keep_lock
    found = detectors.run_all(ctx)
    keep_lock()
    recorded = findings.record(
        found.detections, checked_codes=found.checked, now=now, keep_open=found.keep_open
    )
    report = repairs.RepairReport()
    keep_lock()
    repairs.abandon_lost_attempts(found.detections, recorded.by_key, report, between=keep_lock)
    keep_lock()
    retries = engine.promote_due_retries()
    if ctx.redis_ok:
        repairs.drop_dead_jobs(found.detections)
    # The same cutoff the job_lost detector used, so nothing is re-sent unrecorded.
    grace = detectors.lost_job_grace() + (timezone.now() - now).total_seconds()
    resent = engine.resend_lost_messages(older_than_seconds=grace)
    if ctx.redis_ok:
        repairs.confirm_resent(found.detections, recorded.by_key, report)
    expired = engine.expire_overdue_runs()
    pool_waits = engine.fail_pool_timeouts()
    deployed = judging.advance_in_flight()
    return TickReport(
        deployments=tuple(deployed),
        acted=True,
        retries_queued=retries,
        messages_resent=resent,
        runs_expired=expired,
        pool_waits_failed=pool_waits,
        opened=tuple(_describe(f) for f in recorded.opened),
        resolved=tuple(_describe(f) for f in recorded.resolved),
        repairs=tuple(report.abandoned + report.resent),
        repairs_left=report.left,
        failed_detectors=found.failed,
    )


def _describe(finding: Finding) -> str:
    return f"{finding.code} {finding.subject}: {finding.title}"


def _unreachable(db) -> bool:
    return any(p.subject == "database:unreachable" for p in detectors.database_problems(db))


def _database_down(db, now: datetime, error: str) -> TickReport:
    """Remember since when the database is down (one log line when it starts); its
    connection is closed so the next tick connects afresh."""
    error = error.strip().splitlines()[0] if error.strip() else "?"  # drivers go on for lines
    if not _outage:
        _outage.update(since=now, error=error)
        logger.error("Watchdog: the database does not answer (%s); retrying every tick.", error)
    with contextlib.suppress(DatabaseError):
        db.close()
    return TickReport(acted=True, database_down=error)


def _notice_restart(db, *, seen_down: bool) -> None:
    """Record a restart of the database server that happened between two ticks.

    PostgreSQL says when its server started (``pg_postmaster_start_time()``); when that
    moved since the last tick, the server went down and came back unseen. It was down
    at most from the later of the last tick and the last heartbeat written before the
    new start, until that start.
    """
    if db.vendor != "postgresql":
        return
    with db.cursor() as cursor:
        # Both on the server's clock, so a skewed clock here cannot misplace the restart.
        cursor.execute("SELECT pg_postmaster_start_time(), now()")
        started, server_now = cursor.fetchone()
    before = dict(_server)
    _server.update(started=started, seen_at=server_now)
    if seen_down or not before or started == before["started"]:
        return  # the outage was seen and is written down already; first look; no restart
    last_write = NodeRun.objects.filter(
        status=NodeRun.Status.RUNNING, heartbeat_at__lt=started, heartbeat_at__gt=before["seen_at"]
    ).aggregate(last=Max("heartbeat_at"))["last"]
    down_from = min(max(before["seen_at"], last_write or before["seen_at"]), started)
    at = timezone.localtime(started)
    cause = (
        f"the server restarted at {at:%H:%M:%S}.{at.microsecond // 1000:03d} (seen from its "
        "start time, between two watchdog ticks)"
    )
    record_database_outage(down_from, started, cause, vendor=db.display_name)
    logger.warning("Watchdog: the database server restarted at %s.", started.isoformat())


def record_database_outage(
    started: datetime, ended: datetime, error: str, *, vendor: str = ""
) -> Finding:
    """Write down a database outage seen from ``started`` to ``ended`` (nothing could be
    written while it lasted) as a ``db_unhealthy`` finding: first seen when it began,
    resolved when it ended. Sightings of the same outage (several watchdogs) become one
    finding."""
    name = f"{vendor} database" if vendor else "database"

    def describe(began: datetime, over: datetime) -> tuple[str, str, dict]:
        seconds = (over - began).total_seconds()
        start, end = timezone.localtime(began), timezone.localtime(over)
        span = f"{start:%H:%M:%S}\N{EN DASH}{end:%H:%M:%S}"
        title = f"{name} unreachable for {seconds_words(seconds)} ({span}): {error}"
        suggestion = (
            "It answers again. Find out why it stopped (server logs, restarts, failover, "
            "network) so it does not happen again. Heartbeats could not be written meanwhile: "
            "the watchdog counts their age from the moment it answered again."
        )
        evidence = {
            "error": error,
            "down_from": began.isoformat(),
            "up_at": over.isoformat(),
            "down_for_seconds": round(seconds, 1),
        }
        return title, suggestion, evidence

    return findings.record_past_outage(
        *detectors.DB_OUTAGE, describe=describe, started=started, ended=ended
    )


def seconds_words(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
