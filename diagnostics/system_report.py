"""The system report: everything an operator (or a bug report) needs, as one plain dict.

``build_report()`` is the selector behind ``manage.py system_report`` and the dashboard's
system page; ``doctor_checks()`` is the same measurements judged line by line for
``manage.py doctor``. Presenters format; nothing here prints or renders.

Reads never change anything (RQ's state is read by ``rq_state``, findings by
``selectors``). Secrets never leave this module unmasked.
"""

import json
import platform
import re
import socket
import tomllib
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import django
import psutil
import redis
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from diagnostics import health
from diagnostics.rq_state import read_queues, read_workers, sweep_workers
from diagnostics.selectors import findings_summary
from workflows.models import AuditEvent

MASK = "********"
# Workers the report lists besides those gone quiet and those on this host (all are counted).
SHOWN_WORKERS = 50
# As Django's SafeExceptionReporterFilter, plus words our URLs and tokens use.
SECRET_NAMES = re.compile(
    r"API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|CREDENTIAL|PRIVATE|COOKIE", re.IGNORECASE
)
SHOWN_SETTINGS = [
    "DEBUG",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "SECRET_KEY",
    "DATABASES",
    "REDIS_URL",
    "RQ_QUEUES",
    "RQ",
    "TIME_ZONE",
    "USE_TZ",
    "VAR_DIR",
    "STATIC_ROOT",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
]


# --- Versions and settings ----------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _keel_version() -> str:
    pyproject = Path(settings.BASE_DIR) / "pyproject.toml"
    try:
        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def versions(database: dict, redis_state: dict) -> dict:
    return {
        "keel": _keel_version(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "rq": _package_version("rq"),
        "django-rq": _package_version("django-rq"),
        "redis-py": _package_version("redis"),
        "django-prometheus": _package_version("django-prometheus"),
        "redis_server": redis_state.get("version") or "unreachable",
        "database_server": f"{database['vendor']} {database.get('version') or 'unreachable'}",
        "platform": platform.platform(),
    }


def mask_url(url: str) -> str:
    """Hide the password in a URL's user part and secret-looking query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        query = urlencode(
            [
                (name, MASK if SECRET_NAMES.search(name) else value)
                for name, value in parse_qsl(query, keep_blank_values=True)
            ],
            safe="*/",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask(name: str, value):
    """A setting's value fit to show: secrets replaced, URLs' passwords hidden."""
    if SECRET_NAMES.search(name) and not isinstance(value, bool | int | float | None):
        return MASK if value else "(empty)"
    if isinstance(value, dict):
        return {str(key): mask(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [mask(name, item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def masked_settings() -> dict:
    names = SHOWN_SETTINGS + sorted(
        name for name in dir(settings) if name.startswith("KEEL_") and name.isupper()
    )
    return {name: mask(name, getattr(settings, name)) for name in names if hasattr(settings, name)}


# --- Supervised processes ---------------------------------------------------------------------

# Written by ``manage.py devstack`` (workflows/management/commands/devstack.py); read only here.
SUPERVISOR_FILE = "supervisor.json"


def _supervisor_alive(record: dict) -> bool:
    """Whether the devstack that wrote the record still runs (elsewhere: assume it does)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(record["pid"]))
        started = float(record.get("pid_started") or 0)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - started) < 1
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.Error:
        return True


def _when_written(value) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except (TypeError, ValueError):
        return None


def supervision() -> dict:
    """Devstack's record of the processes it restarts (``var/supervisor.json``), if any.

    No file: nothing here supervises by devstack (systemd or another runner may). A record
    whose devstack is gone is stale; an unreadable one is an error, never a failed report.
    """
    path = Path(settings.VAR_DIR) / SUPERVISOR_FILE
    state = {"path": str(path), "supervised": False, "stale": False, "error": "", "processes": []}
    try:
        record = json.loads(path.read_text())
        rows = [row for row in record["processes"] if isinstance(row, dict)]
    except FileNotFoundError:
        return state
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {**state, "error": f"{path} could not be read: {error}"}
    processes = [
        {
            "name": str(row.get("name", "?")),
            "command": str(row.get("command", "")),
            "state": str(row.get("state", "?")),
            "pid": row.get("pid") if isinstance(row.get("pid"), int) else None,
            "started_at": _when_written(row.get("started_at")),
            "restarts": row.get("restarts") if isinstance(row.get("restarts"), int) else 0,
            "restart_in_seconds": row.get("restart_in_seconds"),
            "last_exit": str(row.get("last_exit") or ""),
            "last_exit_at": _when_written(row.get("last_exit_at")),
            "last_exit_pid": row.get("last_exit_pid"),
        }
        for row in rows
    ]
    return {
        **state,
        "supervised": True,
        "stale": not _supervisor_alive(record),
        "supervisor": str(record.get("supervisor", "devstack")),
        "supervisor_pid": record.get("pid"),
        "updated_at": _when_written(record.get("updated_at")),
        "processes": processes,
    }


# --- The report -------------------------------------------------------------------------------


def measure(client: redis.Redis | None = None) -> dict:
    """Read the database, Redis, workers, watchdog, disk and clocks once each."""
    client = client or health.probe_client()
    measured = {"database": health.database_status(), "redis": health.redis_status(client)}
    workers, workers_error, sweep = None, "", None
    if measured["redis"]["reachable"]:
        try:
            # Every worker is counted inside Redis; read in full are those gone quiet,
            # those on this host and up to SHOWN_WORKERS others (at 10 000 workers a
            # page of every hash took seconds).
            stale_after = settings.KEEL_STALE_BEATS * settings.KEEL_HEARTBEAT_SECONDS
            sweep = sweep_workers(
                client,
                quiet_before=timezone.now() - timedelta(seconds=stale_after),
                host=socket.gethostname(),
                sample=SHOWN_WORKERS,
            )
            workers = read_workers(client, [*sweep.unwell, *sweep.nearby, *sweep.sample])
        except redis.RedisError as error:
            workers_error = health.error_text(error)
    else:
        workers_error = measured["redis"].get("error", "")
    measured.update(
        workers=workers,
        workers_registered=sweep.registered if sweep else None,
        live_elsewhere=sweep.well_by_queue if sweep else {},
        workers_error=workers_error,
        watchdog=health.watchdog_status(client),
        disk=health.disk_status(),
        clock=health.clock_status(),
    )
    return measured


def doctor_checks(client: redis.Redis | None = None, **limits) -> list[health.Check]:
    return health.verdicts(measure(client), **limits)


def build_report(client: redis.Redis | None = None, *, findings_limit: int = 100) -> dict:
    """Versions, settings (masked), health, queues, workers, supervision, registries, findings."""
    client = client or health.probe_client()
    measured = measure(client)
    queues, queues_error = [], measured["workers_error"]
    if measured["workers"] is not None:
        try:
            queues = read_queues(
                client, measured["workers"], live_elsewhere=measured["live_elsewhere"]
            )
        except redis.RedisError as error:
            queues_error = health.error_text(error)
    try:
        findings = findings_summary(findings_limit)
        audit = recent_queue_actions()
    except DatabaseError as error:
        findings = {"error": health.error_text(error), "open": None, "findings": []}
        audit = []
    return {
        "generated_at": datetime.now(UTC),
        "host": socket.gethostname(),
        "versions": versions(measured["database"], measured["redis"]),
        "settings": masked_settings(),
        "checks": [check.as_dict() for check in health.verdicts(measured)],
        "database": measured["database"],
        "redis": measured["redis"],
        "watchdog": measured["watchdog"],
        "disk": measured["disk"],
        "clock": measured["clock"],
        "queues": queues,
        "queues_error": queues_error,
        "workers": measured["workers"] or [],
        "workers_registered": measured["workers_registered"],
        "supervision": supervision(),
        "findings": findings,
        "queue_actions": audit,
    }


def recent_queue_actions(limit: int = 20) -> list[dict]:
    """The latest operator actions on queues (clear, requeue failed), newest first."""
    return list(
        AuditEvent.objects.order_by("-at", "-id").values(
            "id", "actor", "action", "target", "reason", "before", "after", "at"
        )[:limit]
    )
