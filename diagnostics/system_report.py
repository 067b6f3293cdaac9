"""The system report: everything an operator (or a bug report) needs, as one plain dict.

``build_report()`` is the selector behind ``manage.py system_report`` and the dashboard's
system page; ``doctor_checks()`` is the same measurements judged line by line for
``manage.py doctor``. Presenters format; nothing here prints or renders.

Reads never change anything: registry counts are ZCARDs (RQ's ``count`` would first run
its clean-up, which moves jobs and fires failure callbacks), workers are read from their
hashes. Secrets never leave this module unmasked.
"""

import json
import platform
import re
import socket
import tomllib
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata
from itertools import groupby
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import django
import psutil
import redis
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Case, Count, IntegerField, Value, When
from django.urls import reverse
from rq.defaults import DEFAULT_WORKER_TTL
from rq.job import Job
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.utils import utcparse
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS

from diagnostics import health
from diagnostics.models import AuditEvent, Finding, FindingSeverity
from diagnostics.reliability import format_duration

MASK = "********"
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
REGISTRIES = {
    "started": StartedJobRegistry,
    "failed": FailedJobRegistry,
    "finished": FinishedJobRegistry,
    "deferred": DeferredJobRegistry,
    "scheduled": ScheduledJobRegistry,
    "canceled": CanceledJobRegistry,
}
WORKER_KEY_PREFIX = Worker.redis_worker_namespace_prefix
QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix
SEVERITY_RANK = {FindingSeverity.CRITICAL: 0, FindingSeverity.WARNING: 1, FindingSeverity.INFO: 2}
# Actions that workflows/operations.py performs, and the slug of their preview page (the
# operator confirms there, with a reason; workflows/action_views.py).
RUN_PAGE_ACTIONS = {
    "retry_node": "retry",
    "resume_run": "resume",
    "retry_run": "resume",
    "cancel_run": "cancel",
    "rollback_run": "rollback",
    "skip_node": "skip",
}


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


# --- Workers and queues -----------------------------------------------------------------------


def _rq_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        return utcparse(raw).replace(tzinfo=UTC)
    except ValueError:
        return None


def worker_is_alive(fields: dict, now: datetime) -> bool:
    """Whether the worker behind an RQ worker hash still runs.

    RQ keeps a killed worker's hash until its TTL runs out (worker_ttl + 60 s, eight
    minutes by default), and an idle worker renews it only every ~405 s, so the hash
    alone says little. When the worker runs on this host its pid settles the question at
    once; elsewhere we go by RQ's heartbeat. (A worker in another pid namespace with this
    host's name would look dead here: give containers their own host names.)
    """
    if fields.get("death"):
        return False
    heartbeat = _rq_time(fields.get("last_heartbeat"))
    if heartbeat and (now - heartbeat).total_seconds() > DEFAULT_WORKER_TTL + 60:
        return False
    pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
    if pid and fields.get("hostname") == socket.gethostname():
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True
    return True


def read_workers(client: redis.Redis) -> list[dict]:
    """Every worker RQ has registered: what it does, its counts, whether it is alive.

    Reads the hashes directly rather than through ``rq.Worker.all``: building Worker
    objects raises the client's socket timeout to ~7 minutes (RQ sizes it for BLPOP),
    which would turn a probe of a hung Redis into a hung probe. Raises redis.RedisError.
    """
    keys = sorted(key.decode() for key in client.smembers(REDIS_WORKER_KEYS))
    if not keys:
        return []
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        hashes = pipe.execute()
    now = datetime.now(UTC)
    workers = []
    for key, raw in zip(keys, hashes, strict=True):
        if not raw:
            continue  # registered but expired: RQ forgets it at its next clean-up
        fields = {name.decode(): value.decode(errors="replace") for name, value in raw.items()}
        workers.append(
            {
                "name": key.removeprefix(WORKER_KEY_PREFIX),
                "hostname": fields.get("hostname", ""),
                "pid": int(fields["pid"]) if fields.get("pid", "").isdigit() else None,
                "state": fields.get("state", "?"),
                "queues": [name for name in fields.get("queues", "").split(",") if name],
                "current_job": fields.get("current_job", ""),
                "last_heartbeat": _rq_time(fields.get("last_heartbeat")),
                "birth": _rq_time(fields.get("birth")),
                "successful_jobs": int(fields.get("successful_job_count") or 0),
                "failed_jobs": int(fields.get("failed_job_count") or 0),
                "working_seconds": round(float(fields.get("total_working_time") or 0), 3),
                "alive": worker_is_alive(fields, now),
                "unresponsive": worker_is_unresponsive(fields, now),
            }
        )
    return workers


def worker_is_unresponsive(fields: dict, now: datetime) -> bool:
    """Whether a worker that RQ still lists has stopped beating: a Keel worker heartbeats
    at least every KEEL_HEARTBEAT_SECONDS, so a stale beat is a frozen process (the
    ``worker_unresponsive`` finding says more), not a worker that takes work."""
    if fields.get("death"):
        return False
    heartbeat = _rq_time(fields.get("last_heartbeat"))
    stale_after = settings.KEEL_STALE_BEATS * settings.KEEL_HEARTBEAT_SECONDS
    return heartbeat is not None and (now - heartbeat).total_seconds() > stale_after


def queue_names(client: redis.Redis) -> list[str]:
    """Keel's queues first, in priority order, then any other queue RQ knows of."""
    known = sorted(
        key.decode().removeprefix(QUEUE_KEY_PREFIX)
        for key in client.smembers(Queue.redis_queues_keys)
    )
    return list(settings.KEEL_QUEUES) + [name for name in known if name not in settings.KEEL_QUEUES]


def read_queues(
    client: redis.Redis, workers: list[dict], names: list[str] | None = None
) -> list[dict]:
    """Length, oldest job's age, listening workers and registry sizes of each queue.

    Two round trips whatever the number of queues. Raises redis.RedisError.
    """
    names = names if names is not None else queue_names(client)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(QUEUE_KEY_PREFIX + name)
            pipe.lindex(QUEUE_KEY_PREFIX + name, 0)  # RQ pushes right, pops left: the oldest
            for registry in REGISTRIES.values():
                pipe.zcard(registry.key_template.format(name))
        answers = pipe.execute()
    width = 2 + len(REGISTRIES)
    heads = [answers[index * width + 1] for index in range(len(names))]
    with client.pipeline(transaction=False) as pipe:
        for head in filter(None, heads):
            pipe.hget(Job.key_for(head.decode()), "enqueued_at")
        answered = iter(pipe.execute())
    enqueued = [next(answered) if head else None for head in heads]
    listening = health.live_workers_by_queue(workers, names)
    registered = {name: [] for name in names}
    for worker in workers:
        for queue in worker["queues"]:
            registered.setdefault(queue, []).append(worker["name"])
    now = datetime.now(UTC)
    queues = []
    for index, name in enumerate(names):
        row = answers[index * width : (index + 1) * width]
        oldest = _rq_time(enqueued[index].decode()) if enqueued[index] else None
        queues.append(
            {
                "name": name,
                "keel": name in settings.KEEL_QUEUES,
                "length": row[0],
                "oldest_job_id": heads[index].decode() if heads[index] else "",
                "oldest_enqueued_at": oldest,
                "oldest_age_seconds": round((now - oldest).total_seconds(), 1) if oldest else None,
                "workers": listening.get(name, []),
                "dead_workers": sorted(
                    set(registered.get(name, [])) - set(listening.get(name, []))
                ),
                "registries": dict(zip(REGISTRIES, row[2:], strict=True)),
            }
        )
    return queues


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


# --- Findings -----------------------------------------------------------------------------------


def _severity_order():
    return Case(
        *[When(severity=severity, then=Value(rank)) for severity, rank in SEVERITY_RANK.items()],
        default=Value(9),
        output_field=IntegerField(),
    )


def open_findings(limit: int = 500):
    """Open findings, grouped by code, worst first; two queries whatever their number."""
    return list(
        Finding.objects.filter(resolved_at__isnull=True)
        .select_related("run__workflow", "node_run")
        .annotate(severity_rank=_severity_order())
        .order_by("code", "severity_rank", "first_seen", "id")[:limit]
    )


def describe_action(action: dict, run_id: int | None) -> dict | None:
    """How the page offers a finding's one-click action.

    Run and node actions are done from the run page (workflows operations); a command is
    shown to copy; a link is followed only if it stays on this site.
    """
    if not action:
        return None
    kind = str(action.get("kind", ""))
    label = str(action.get("label") or kind.replace("_", " ").capitalize() or "Action")
    # The detectors write {"kind": "retry_node", "run": 12, "node": "load"}.
    run_id = action.get("run") or action.get("run_id") or run_id
    if kind in RUN_PAGE_ACTIONS and str(run_id).isdigit():
        node = action.get("node")
        url = reverse(f"dashboard:run-{RUN_PAGE_ACTIONS[kind]}-preview", args=[int(run_id)])
        return {
            "kind": kind,
            "label": f"{label} ({node})…" if node else f"{label}…",
            "url": f"{url}?{urlencode({'node': node})}" if node else url,
        }
    if action.get("command"):
        return {"kind": kind or "command", "label": label, "command": str(action["command"])}
    if kind in {"raise_pool", "resize_pool"} and action.get("pool"):
        url = reverse("admin:workflows_resourcepool_changelist")
        return {"kind": kind, "label": label, "url": f"{url}?{urlencode({'q': action['pool']})}"}
    url = str(action.get("url") or "")
    if url.startswith("/") and not url.startswith("//"):
        return {"kind": kind, "label": label, "url": url}
    return {"kind": kind, "label": label}


def _evidence_items(evidence) -> list[dict]:
    """Evidence as rows to show: scalars inline, lists and mappings as indented JSON."""
    if not isinstance(evidence, dict):
        evidence = {"evidence": evidence}
    items = []
    for key, value in evidence.items():
        if isinstance(value, dict | list):
            items.append(
                {"key": str(key), "value": json.dumps(value, indent=2, default=str), "block": True}
            )
        else:
            items.append({"key": str(key), "value": "" if value is None else value, "block": False})
    return items


def _finding_row(finding: Finding, now: datetime) -> dict:
    run = finding.run
    open_seconds = max(0.0, (now - finding.first_seen).total_seconds())
    return {
        "id": finding.pk,
        "code": finding.code,
        "severity": finding.severity,
        "subject": finding.subject,
        "title": finding.title,
        "suggestion": finding.suggestion,
        "evidence": finding.evidence,
        "evidence_items": _evidence_items(finding.evidence),
        "action": describe_action(finding.action or {}, finding.run_id),
        "repair": finding.repair,
        "repaired_at": finding.repaired_at,
        "first_seen": finding.first_seen,
        "last_seen": finding.last_seen,
        "open_seconds": round(open_seconds, 1),
        "open_for": format_duration(open_seconds),
        "run_id": finding.run_id,
        "run_url": run.get_absolute_url() if run else "",
        "workflow": run.workflow.slug if run else "",
        "node_key": finding.node_run.node_key if finding.node_run else "",
        "queue": finding.queue,
        "worker": finding.worker,
    }


def findings_by_cause(limit: int = 500) -> dict:
    """The "Stuck & findings" page: open findings grouped by cause, worst cause first."""
    now = datetime.now(UTC)
    findings = open_findings(limit + 1)
    truncated = len(findings) > limit
    groups = []
    for code, members in groupby(findings[:limit], key=lambda finding: finding.code):
        rows = [_finding_row(finding, now) for finding in members]
        groups.append(
            {
                "code": code,
                "count": len(rows),
                "severity": min(
                    (row["severity"] for row in rows), key=lambda s: SEVERITY_RANK.get(s, 9)
                ),
                "findings": rows,
            }
        )
    groups.sort(key=lambda group: (SEVERITY_RANK.get(group["severity"], 9), -group["count"]))
    return {
        "groups": groups,
        "total": sum(group["count"] for group in groups),
        "truncated": truncated,
    }


def findings_summary(limit: int = 100) -> dict:
    """Open findings for the report: counts by code and severity, and the list (bounded)."""
    by_code = Counter()
    by_severity = Counter()
    for code, severity, count in (
        Finding.objects.filter(resolved_at__isnull=True)
        .values_list("code", "severity")
        .annotate(count=Count("id"))
        .order_by()
    ):
        by_code[code] += count
        by_severity[severity] += count
    now = datetime.now(UTC)
    rows = [_finding_row(finding, now) for finding in open_findings(limit)]
    return {
        "open": sum(by_code.values()),
        "by_code": dict(sorted(by_code.items())),
        "by_severity": dict(by_severity),
        "findings": rows,
    }


# --- The report -------------------------------------------------------------------------------


def measure(client: redis.Redis | None = None) -> dict:
    """Read the database, Redis, workers, watchdog, disk and clocks once each."""
    client = client or health.probe_client()
    measured = {"database": health.database_status(), "redis": health.redis_status(client)}
    workers, workers_error = None, ""
    if measured["redis"]["reachable"]:
        try:
            workers = read_workers(client)
        except redis.RedisError as error:
            workers_error = health.error_text(error)
    else:
        workers_error = measured["redis"].get("error", "")
    measured.update(
        workers=workers,
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
            queues = read_queues(client, measured["workers"])
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
