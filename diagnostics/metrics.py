"""Keel's own Prometheus metrics, computed from the database and Redis at scrape time.

Why a collector and not counters bumped in code: Keel runs several gunicorn processes and
several RQ workers, and a counter in one process's memory sees only that process. These
values are read from the shared truth when /metrics is scraped, so every process answers
the same (aggregate several scraped instances with ``max``, never ``sum``) and a restart
resets nothing.

Every read is an aggregate query (histograms by conditional counting, one query per
family of metrics; no rows are loaded) or a pipelined Redis read, so a scrape costs the
same with ten runs or ten million. A part that cannot be read is left out and reported by
``keel_database_up`` / ``keel_redis_up`` rather than failing the whole scrape.

The counters are derived from rows: ``workflow_executions_total`` counts Run rows (runs are
never deleted, so it only grows), ``workflow_failures_total`` counts runs whose status is
failed. Resuming a failed run lowers the latter by one, which ``rate()``/``increase()``
would read as a counter reset; the alert rules therefore use ``delta()`` on these two
(deploy/prometheus/alerts.yml says more).
"""

import logging
import threading
from datetime import timedelta

import redis
from django.conf import settings
from django.db import DatabaseError
from django.db.models import (
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Min,
    Q,
    Sum,
)
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from diagnostics import health, system_report
from diagnostics.models import Finding
from diagnostics.reliability import with_known_start
from workflows.models import NodeAttempt, NodeRun, Run

logger = logging.getLogger(__name__)

RUN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
NODE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
DETECTION_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600)
RECOVERY_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

# name: (type, help, labels). Counter names are given without "_total": the client adds it.
METRICS = {
    "workflow_executions": (
        "counter",
        "Runs started, by workflow.",
        ["workflow"],
    ),
    "workflow_failures": (
        "counter",
        "Runs that ended failed, by workflow (lowered by one when a failed run is resumed).",
        ["workflow"],
    ),
    "workflow_runs_running": ("gauge", "Runs running now, by workflow.", ["workflow"]),
    "workflow_oldest_running_run_seconds": (
        "gauge",
        "Age of the longest-running run that is still running, by workflow.",
        ["workflow"],
    ),
    "workflow_duration_seconds": (
        "histogram",
        "Duration of finished runs (started to finished), by workflow.",
        ["workflow"],
    ),
    "node_duration_seconds": (
        "histogram",
        "Duration of finished node attempts, by queue.",
        ["queue"],
    ),
    "node_retries": ("counter", "Node attempts after the first (retries), by queue.", ["queue"]),
    "nodes_stuck": (
        "gauge",
        "Queued or running nodes with an open finding, by the finding's code.",
        ["code"],
    ),
    "nodes_stuck_oldest_seconds": (
        "gauge",
        "How long the oldest open finding on a queued or running node has been open, by code.",
        ["code"],
    ),
    "findings_open": ("gauge", "Open findings, by code and severity.", ["code", "severity"]),
    "finding_detection_seconds": (
        "histogram",
        "Time from when a condition began (evidence 'since') to its finding, by code.",
        ["code"],
    ),
    "finding_recovery_seconds": (
        "histogram",
        "Time from a finding's detection to its resolution, by code.",
        ["code"],
    ),
    "workflow_queue_size": ("gauge", "Jobs waiting in each RQ queue.", ["queue"]),
    "workflow_queue_oldest_job_seconds": (
        "gauge",
        "Age of the oldest job waiting in each RQ queue (0 when empty).",
        ["queue"],
    ),
    "workflow_queue_registry_jobs": (
        "gauge",
        "Jobs in each RQ registry (started, failed, finished, ...), by queue.",
        ["queue", "registry"],
    ),
    "workers_alive": ("gauge", "Live RQ workers listening to each queue.", ["queue"]),
    "keel_database_up": ("gauge", "1 when the database answered this scrape's queries.", []),
    "keel_redis_up": ("gauge", "1 when Redis answered this scrape's reads.", []),
    "keel_watchdog_up": ("gauge", "1 when a watchdog has ticked recently.", []),
}
_FAMILIES = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


def family(name: str):
    kind, documentation, labels = METRICS[name]
    return _FAMILIES[kind](name, documentation, labels=labels)


def _elapsed(end: str, start: str) -> ExpressionWrapper:
    return ExpressionWrapper(F(end) - F(start), output_field=DurationField())


def _histogram_aggregates(bounds, condition: Q | None = None) -> dict:
    """Count(...) per bucket, the count and the sum, over the annotation ``elapsed``."""
    base = condition if condition is not None else Q()
    aggregates = {
        f"le_{index}": Count("pk", filter=base & Q(elapsed__lte=timedelta(seconds=bound)))
        for index, bound in enumerate(bounds)
    }
    aggregates["observed"] = Count("pk", filter=base & Q(elapsed__isnull=False))
    aggregates["elapsed_sum"] = Sum("elapsed", filter=base)
    return aggregates


def _add_histogram(metric, labels, row, bounds) -> None:
    buckets = [(str(float(bound)), row[f"le_{index}"]) for index, bound in enumerate(bounds)]
    buckets.append(("+Inf", row["observed"]))
    total = row["elapsed_sum"]
    metric.add_metric(labels, buckets, total.total_seconds() if total else 0.0)


class KeelCollector:
    """Registered once (DiagnosticsConfig.ready); runs its queries on each scrape."""

    def describe(self):
        # Without describe(), registering would call collect() — queries at import time.
        return [family(name) for name in METRICS]

    def collect(self):
        yield from self._database_families()
        yield from self._redis_families()

    # --- database -----------------------------------------------------------------------

    def _database_families(self):
        up = family("keel_database_up")
        try:
            families = [*self._run_families(), *self._node_families(), *self._finding_families()]
        except DatabaseError as error:
            logger.warning("metrics: database unreadable: %s", health.error_text(error))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _run_families(self):
        now = timezone.now()
        executions, failures = family("workflow_executions"), family("workflow_failures")
        running, oldest = (
            family("workflow_runs_running"),
            family("workflow_oldest_running_run_seconds"),
        )
        is_running = Q(status=Run.Status.RUNNING)
        for row in (
            Run.objects.values("workflow__slug")
            .annotate(
                executions=Count("pk"),
                failures=Count("pk", filter=Q(status=Run.Status.FAILED)),
                running=Count("pk", filter=is_running),
                oldest=Min("started_at", filter=is_running),
            )
            .order_by("workflow__slug")
        ):
            labels = [row["workflow__slug"]]
            executions.add_metric(labels, row["executions"])
            failures.add_metric(labels, row["failures"])
            running.add_metric(labels, row["running"])
            if row["oldest"] is not None:
                oldest.add_metric(labels, max(0.0, (now - row["oldest"]).total_seconds()))
        durations = family("workflow_duration_seconds")
        for row in (
            Run.objects.filter(
                status__in=Run.TERMINAL, started_at__isnull=False, finished_at__isnull=False
            )
            .annotate(elapsed=_elapsed("finished_at", "started_at"))
            .values("workflow__slug")
            .annotate(**_histogram_aggregates(RUN_BUCKETS))
            .order_by("workflow__slug")
        ):
            _add_histogram(durations, [row["workflow__slug"]], row, RUN_BUCKETS)
        return [executions, failures, running, oldest, durations]

    def _node_families(self):
        durations, retries = family("node_duration_seconds"), family("node_retries")
        finished = Q(started_at__isnull=False, finished_at__isnull=False)
        for row in (
            NodeAttempt.objects.annotate(elapsed=_elapsed("finished_at", "started_at"))
            .values("queue")
            .annotate(
                retries=Count("pk", filter=Q(number__gt=1)),
                **_histogram_aggregates(NODE_BUCKETS, finished),
            )
            .order_by("queue")
        ):
            retries.add_metric([row["queue"]], row["retries"])
            _add_histogram(durations, [row["queue"]], row, NODE_BUCKETS)
        return [durations, retries]

    def _finding_families(self):
        now = timezone.now()
        stuck, stuck_oldest = family("nodes_stuck"), family("nodes_stuck_oldest_seconds")
        open_findings = family("findings_open")
        on_stuck_node = Q(node_run__status__in=NodeRun.HOLDS_SLOT)
        per_code: dict[str, tuple[int, object]] = {}
        for row in (
            Finding.objects.filter(resolved_at__isnull=True)
            .values("code", "severity")
            .annotate(
                count=Count("pk"),
                nodes=Count("pk", filter=on_stuck_node),
                oldest=Min("first_seen", filter=on_stuck_node),
            )
            .order_by("code", "severity")
        ):
            open_findings.add_metric([row["code"], row["severity"]], row["count"])
            nodes, oldest = per_code.get(row["code"], (0, None))
            if row["oldest"] is not None and (oldest is None or row["oldest"] < oldest):
                oldest = row["oldest"]
            per_code[row["code"]] = (nodes + row["nodes"], oldest)
        for code, (nodes, oldest) in sorted(per_code.items()):
            if nodes:
                stuck.add_metric([code], nodes)
                stuck_oldest.add_metric([code], max(0.0, (now - oldest).total_seconds()))
        detection = family("finding_detection_seconds")
        for row in (
            with_known_start(Finding.objects.all())
            .annotate(elapsed=_elapsed("first_seen", "began"))
            .values("code")
            .annotate(**_histogram_aggregates(DETECTION_BUCKETS))
            .order_by("code")
        ):
            _add_histogram(detection, [row["code"]], row, DETECTION_BUCKETS)
        recovery = family("finding_recovery_seconds")
        for row in (
            Finding.objects.filter(resolved_at__isnull=False)
            .annotate(elapsed=_elapsed("resolved_at", "first_seen"))
            .values("code")
            .annotate(**_histogram_aggregates(RECOVERY_BUCKETS))
            .order_by("code")
        ):
            _add_histogram(recovery, [row["code"]], row, RECOVERY_BUCKETS)
        return [stuck, stuck_oldest, open_findings, detection, recovery]

    # --- Redis --------------------------------------------------------------------------

    def _redis_families(self):
        up = family("keel_redis_up")
        client = health.probe_client()
        try:
            workers = system_report.read_workers(client)
            queues = system_report.read_queues(client, workers, list(settings.KEEL_QUEUES))
            watchdog = health.watchdog_status(client)
        except redis.RedisError as error:
            logger.warning("metrics: Redis unreadable: %s", health.error_text(error))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        size, oldest = family("workflow_queue_size"), family("workflow_queue_oldest_job_seconds")
        alive, registries = family("workers_alive"), family("workflow_queue_registry_jobs")
        for queue in queues:
            labels = [queue["name"]]
            size.add_metric(labels, queue["length"])
            oldest.add_metric(labels, queue["oldest_age_seconds"] or 0.0)
            alive.add_metric(labels, len(queue["workers"]))
            for registry, count in queue["registries"].items():
                registries.add_metric([queue["name"], registry], count)
        watchdog_up = family("keel_watchdog_up")
        watchdog_up.add_metric([], 1 if watchdog.get("alive") else 0)
        yield from (size, oldest, alive, registries, watchdog_up)


_collector: KeelCollector | None = None
_lock = threading.Lock()


def register(registry=REGISTRY) -> KeelCollector:
    """Register the collector once per process, however often this is called."""
    global _collector
    with _lock:
        if _collector is None:
            _collector = KeelCollector()
            registry.register(_collector)
    return _collector
