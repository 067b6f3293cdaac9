"""Probes of what Keel stands on: settings, database, Redis, workers, watchdog, disk, clocks.

Each ``*_status`` function measures one thing and returns a plain dict (never raising when
the thing is down: being down is the answer). ``doctor_checks`` turns the measurements into
verdicts, one per line of ``manage.py doctor``, each with the fix when it fails. The system
report shows the same measurements, and ``/readyz`` uses the database and Redis pings.
"""

import importlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import redis
from django.conf import settings
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor

# The watchdog's proof of life: every tick of every watchdog (lock holder or not) runs
#   SET keel:watchdog:heartbeat <ISO 8601 UTC time> EX <3 * interval + 10>
# so the key exists exactly while some watchdog has ticked recently.
WATCHDOG_HEARTBEAT_KEY = "keel:watchdog:heartbeat"
# What the last acting tick took: {"at": ISO 8601, "seconds": float} (diagnostics.watchdog).
LAST_TICK_KEY = "keel:watchdog:last_tick"

MIN_FREE_DISK_BYTES = 1024**3
MAX_CLOCK_SKEW_SECONDS = 2.0
# Above these shares, the database or Redis is about to refuse work.
CONNECTIONS_NEAR_MAX = 0.9
MEMORY_NEAR_MAX = 0.9
INSECURE_KEY_PREFIX = "keel-insecure-"


@dataclass(frozen=True)
class Check:
    """One verdict: a line of ``manage.py doctor``."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def error_text(error: BaseException) -> str:
    # First line only: driver messages go on for paragraphs. Drivers do not echo passwords.
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# --- Redis --------------------------------------------------------------------------------------


@cache
def _client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def probe_client() -> redis.Redis:
    """A Redis client with short timeouts: a probe must answer "down" quickly, not hang."""
    return _client_for(settings.REDIS_URL)


def redis_ping(client: redis.Redis | None = None) -> dict:
    client = client or probe_client()
    started = time.perf_counter()
    try:
        client.ping()
    except redis.RedisError as error:
        return {"ok": False, "error": error_text(error)}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def redis_status(client: redis.Redis | None = None) -> dict:
    """Reachability, latency, version, memory against maxmemory, eviction policy."""
    client = client or probe_client()
    status = redis_ping(client)
    status["reachable"] = status.pop("ok")
    if not status["reachable"]:
        return status
    try:
        info = client.info()
    except redis.RedisError as error:
        return {**status, "reachable": False, "error": error_text(error)}
    policy = info.get("maxmemory_policy")
    if policy is None:  # older servers leave it out of INFO
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.RedisError:
            policy = ""  # CONFIG disabled (managed Redis): the eviction check says "unknown"
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0) or 0)
    return {
        **status,
        "version": info.get("redis_version", ""),
        "mode": info.get("redis_mode", ""),
        "uptime_seconds": info.get("uptime_in_seconds"),
        "connected_clients": info.get("connected_clients"),
        "used_memory": used,
        "maxmemory": limit,
        "memory_share": round(used / limit, 4) if limit else None,
        "maxmemory_policy": policy or "",
    }


# --- Database -----------------------------------------------------------------------------------


def database_ping(alias: str = "default") -> dict:
    started = time.perf_counter()
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as error:
        return {"ok": False, "error": error_text(error)}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def database_status(alias: str = "default") -> dict:
    """Reachability, latency, server version, unapplied migrations, connections vs max."""
    connection = connections[alias]
    status = database_ping(alias)
    status["reachable"] = status.pop("ok")
    status["vendor"] = connection.vendor
    if not status["reachable"]:
        return status
    try:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SHOW server_version")
                status["version"] = cursor.fetchone()[0]
                cursor.execute(
                    "SELECT count(*), current_setting('max_connections')::int,"
                    " current_setting('superuser_reserved_connections')::int"
                    " FROM pg_stat_activity"
                )
                in_use, maximum, reserved = cursor.fetchone()
                status["connections"] = in_use
                # Ordinary roles can use only what superusers leave them.
                status["max_connections"] = maximum - reserved
            else:
                cursor.execute("SELECT sqlite_version()")
                status["version"] = cursor.fetchone()[0]
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        status["unapplied_migrations"] = [
            f"{migration.app_label}.{migration.name}" for migration, _backwards in plan
        ]
    except DatabaseError as error:
        status["error"] = error_text(error)
    return status


def clock_status(alias: str = "default") -> dict:
    """How far the database's clock is from this process's.

    Heartbeats are written with the worker's clock and compared with the watchdog's, and
    the database orders everything; a skew of seconds makes live nodes look stale.
    """
    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            before = time.time()
            if connection.vendor == "postgresql":
                cursor.execute("SELECT extract(epoch FROM clock_timestamp())")
                database_time = float(cursor.fetchone()[0])
            else:
                cursor.execute("SELECT (julianday('now') - 2440587.5) * 86400.0")
                database_time = float(cursor.fetchone()[0])
            after = time.time()
    except DatabaseError as error:
        return {"measured": False, "error": error_text(error)}
    return {
        "measured": True,
        "skew_seconds": round(database_time - (before + after) / 2, 3),
        "uncertainty_seconds": round((after - before) / 2, 3),
    }


# --- Disk, watchdog ------------------------------------------------------------------


def disk_status(path: Path | None = None) -> dict:
    path = Path(path or settings.VAR_DIR)
    try:
        usage = shutil.disk_usage(path)
    except OSError as error:
        return {"path": str(path), "measured": False, "error": error_text(error)}
    return {
        "path": str(path),
        "measured": True,
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "free_share": round(usage.free / usage.total, 4) if usage.total else None,
    }


def watchdog_status(client: redis.Redis | None = None) -> dict:
    client = client or probe_client()
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.get(WATCHDOG_HEARTBEAT_KEY)
            pipe.ttl(WATCHDOG_HEARTBEAT_KEY)
            pipe.get(LAST_TICK_KEY)
            raw, ttl, tick = pipe.execute()
    except redis.RedisError as error:
        return {"alive": None, "error": error_text(error)}
    try:
        tick_seconds = json.loads(tick)["seconds"] if tick else None
    except (ValueError, KeyError, TypeError):
        tick_seconds = None
    if raw is None:
        return {"alive": False, "tick_seconds": tick_seconds}
    last_tick = raw.decode(errors="replace")
    status = {
        "alive": True,
        "last_tick": last_tick,
        "expires_in_seconds": ttl,
        # How long the last acting tick took (any watchdog's).
        "tick_seconds": tick_seconds,
    }
    try:
        when = datetime.fromisoformat(last_tick)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        status["age_seconds"] = round((datetime.now(UTC) - when).total_seconds(), 1)
    except ValueError:
        pass  # alive is what the key's existence says; the value is only a detail
    return status


def live_workers_by_queue(workers: list[dict], queues: list[str]) -> dict[str, list[str]]:
    listening: dict[str, list[str]] = {queue: [] for queue in queues}
    for worker in workers:
        if worker["alive"] and not worker.get("unresponsive"):
            for queue in worker["queues"]:
                listening.setdefault(queue, []).append(worker["name"])
    return listening


# --- Settings -----------------------------------------------------------------------------------


def settings_problems() -> list[Check]:
    """Settings that loaded but would break Keel, each with the variable to fix.

    config/settings.py already refuses malformed values at start-up; these are the ones
    that parse yet are wrong for where Keel runs.
    """
    problems = []

    def problem(name, detail, fix):
        problems.append(Check(name=f"setting {name}", ok=False, detail=detail, fix=fix))

    if not settings.DEBUG:
        key = settings.SECRET_KEY or ""
        if key.startswith(INSECURE_KEY_PREFIX) or len(key) < 32:
            problem(
                "SECRET_KEY",
                "is the development key or shorter than 32 characters",
                "Set SECRET_KEY to a long random string: "
                "python -c 'import secrets; print(secrets.token_urlsafe(50))'.",
            )
        if not settings.ALLOWED_HOSTS:
            problem(
                "ALLOWED_HOSTS",
                "is empty, so every request is refused",
                "Set ALLOWED_HOSTS to the host names Keel is served on (comma-separated).",
            )
    if not settings.REDIS_URL:
        problem(
            "REDIS_URL", "is empty", "Set REDIS_URL=redis://HOST:6379/0, or unset it on a laptop."
        )
    missing = [queue for queue in settings.KEEL_QUEUES if queue not in settings.RQ_QUEUES]
    if missing:
        problem(
            "RQ_QUEUES",
            f"has no entry for queue(s) {', '.join(missing)}",
            "Keep RQ_QUEUES built from KEEL_QUEUES as config/settings.py does.",
        )
    not_json = [
        name
        for name, queue in settings.RQ_QUEUES.items()
        if queue.get("SERIALIZER") != "rq.serializers.JSONSerializer"
    ]
    if not_json:
        problem(
            "RQ_QUEUES",
            f"queue(s) {', '.join(not_json)} do not use the JSON serializer",
            'Set "SERIALIZER": "rq.serializers.JSONSerializer": no pickle may cross Redis.',
        )
    for module in settings.KEEL_NODE_MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:
            problem(
                "KEEL_NODE_MODULES",
                f"cannot import {module} ({error_text(error)})",
                f"Fix or remove {module} in KEEL_NODE_MODULES.",
            )
    if settings.KEEL_HEARTBEAT_SECONDS * 3 < settings.KEEL_WATCHDOG_SECONDS:
        problem(
            "KEEL_WATCHDOG_SECONDS",
            f"({settings.KEEL_WATCHDOG_SECONDS}s) is longer than three heartbeats "
            f"({settings.KEEL_HEARTBEAT_SECONDS}s each), so stale heartbeats are seen late",
            "Lower KEEL_WATCHDOG_SECONDS (default 2).",
        )
    return problems


# --- The doctor's verdicts --------------------------------------------------------------------


def _format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _database_checks(status: dict) -> list[Check]:
    if not status["reachable"]:
        return [
            Check(
                "database reachable",
                False,
                f"no answer from the {status['vendor']} database ({status.get('error', '')})",
                "Check DATABASE_URL and that the server runs (pg_isready -h HOST -p PORT).",
            )
        ]
    checks = [
        Check(
            "database reachable",
            True,
            f"{status['vendor']} {status.get('version', '')} answered in {status['latency_ms']} ms",
        )
    ]
    if "error" in status:
        checks.append(
            Check(
                "database migrated",
                False,
                f"could not read the migration state ({status['error']})",
                "Check the database user's rights, then run: python manage.py migrate",
            )
        )
        return checks
    unapplied = status["unapplied_migrations"]
    checks.append(
        Check("database migrated", True, "no unapplied migrations")
        if not unapplied
        else Check(
            "database migrated",
            False,
            f"{len(unapplied)} unapplied migration(s): {', '.join(unapplied[:5])}"
            + (" …" if len(unapplied) > 5 else ""),
            "Run: python manage.py migrate",
        )
    )
    if status.get("max_connections"):
        in_use, maximum = status["connections"], status["max_connections"]
        near = in_use >= maximum * CONNECTIONS_NEAR_MAX
        checks.append(
            Check(
                "database connections",
                not near,
                f"{in_use} of {maximum} connections in use",
                "Lower KEEL_WEB_WORKERS or the number of RQ workers, use a pooler "
                "(PgBouncer), or raise max_connections."
                if near
                else "",
            )
        )
    return checks


def _redis_checks(status: dict) -> list[Check]:
    if not status["reachable"]:
        return [
            Check(
                "redis reachable",
                False,
                f"no answer ({status.get('error', '')})",
                'Check REDIS_URL and that redis-server runs (redis-cli -u "$REDIS_URL" ping); '
                "on a laptop leave REDIS_URL unset for the embedded Redis.",
            )
        ]
    checks = [
        Check(
            "redis reachable",
            True,
            f"Redis {status['version']} answered in {status['latency_ms']} ms",
        )
    ]
    policy = status["maxmemory_policy"]
    checks.append(
        Check("redis eviction policy", True, "noeviction")
        if policy == "noeviction"
        else Check(
            "redis eviction policy",
            False,
            f"{policy or 'unknown'}: Redis may silently drop queued jobs when memory runs out",
            "Run: redis-cli CONFIG SET maxmemory-policy noeviction "
            "(and set it in redis.conf so it survives a restart).",
        )
    )
    share = status["memory_share"]
    if share is None:
        checks.append(
            Check(
                "redis memory", True, f"{_format_bytes(status['used_memory'])} used, no maxmemory"
            )
        )
    else:
        near = share >= MEMORY_NEAR_MAX
        checks.append(
            Check(
                "redis memory",
                not near,
                f"{_format_bytes(status['used_memory'])} of {_format_bytes(status['maxmemory'])} "
                f"({share:.0%})",
                "Raise maxmemory, or clear what fills it (see the system report's registries)."
                if near
                else "",
            )
        )
    return checks


def _worker_checks(
    workers: list[dict] | None, error: str = "", live_elsewhere: dict[str, int] | None = None
) -> list[Check]:
    checks = []
    listening = live_workers_by_queue(workers or [], settings.KEEL_QUEUES)
    for queue in settings.KEEL_QUEUES:
        names = listening[queue]
        live = len(names) + (live_elsewhere or {}).get(queue, 0)
        if workers is None:
            checks.append(
                Check(
                    f"worker for queue {queue}",
                    False,
                    f"cannot tell: Redis did not answer ({error})",
                    "Fix Redis first.",
                )
            )
        elif live:
            shown = ", ".join(names[:3]) + (" …" if live > len(names[:3]) else "")
            checks.append(Check(f"worker for queue {queue}", True, f"{live} alive: {shown}"))
        else:
            checks.append(
                Check(
                    f"worker for queue {queue}",
                    False,
                    "no live worker listens to it; its nodes wait forever",
                    f"Start one: python manage.py rqworker {' '.join(settings.KEEL_QUEUES)}",
                )
            )
    return checks


def _watchdog_check(status: dict) -> Check:
    if status["alive"] is None:
        return Check(
            "watchdog alive",
            False,
            f"cannot tell: Redis did not answer ({status['error']})",
            "Fix Redis first.",
        )
    if not status["alive"]:
        return Check(
            "watchdog alive",
            False,
            "no watchdog has ticked recently: stuck nodes go unnoticed and lost jobs unsent",
            "Start one: python manage.py watchdog (make run starts one).",
        )
    age = status.get("age_seconds")
    return Check("watchdog alive", True, f"last tick {age}s ago" if age is not None else "ticking")


def _disk_check(status: dict, min_free_bytes: int) -> Check:
    if not status["measured"]:
        return Check(
            "free disk",
            False,
            f"cannot read {status['path']} ({status['error']})",
            "Create the directory or set KEEL_VAR_DIR to one Keel can write.",
        )
    free = status["free_bytes"]
    ok = free >= min_free_bytes
    return Check(
        "free disk",
        ok,
        f"{_format_bytes(free)} free for {status['path']}",
        ""
        if ok
        else f"Free space on that disk (at least {_format_bytes(min_free_bytes)}), "
        "or point KEEL_VAR_DIR at a larger one.",
    )


def _clock_check(status: dict, max_skew: float) -> Check:
    if not status["measured"]:
        return Check(
            "clock skew",
            False,
            f"cannot read the database clock ({status['error']})",
            "Fix the database first.",
        )
    skew = status["skew_seconds"]
    ok = abs(skew) <= max_skew
    return Check(
        "clock skew",
        ok,
        f"database clock {skew:+.3f}s from this host",
        ""
        if ok
        else "Synchronise clocks with NTP on this host and the database host "
        "(timedatectl set-ntp true; chronyc tracking).",
    )


def verdicts(
    measured: dict,
    *,
    min_free_bytes: int = MIN_FREE_DISK_BYTES,
    max_clock_skew: float = MAX_CLOCK_SKEW_SECONDS,
) -> list[Check]:
    """The start-up checks of the troubleshooting runbook, in the order to fix them.

    ``measured`` holds what system_report.measure() read: the statuses above plus
    ``workers`` (None when Redis could not be read) and ``workers_error``.
    """
    problems = settings_problems()
    checks = problems or [
        Check(
            "settings",
            True,
            "required settings present and valid" + (" (DEBUG on)" if settings.DEBUG else ""),
        )
    ]
    checks += _database_checks(measured["database"])
    checks += _redis_checks(measured["redis"])
    checks += _worker_checks(
        measured["workers"], measured.get("workers_error", ""), measured.get("live_elsewhere")
    )
    checks.append(_watchdog_check(measured["watchdog"]))
    checks.append(_disk_check(measured["disk"], min_free_bytes))
    checks.append(_clock_check(measured["clock"], max_clock_skew))
    return checks
