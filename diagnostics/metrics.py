"""Keel's own Prometheus metrics, computed from the database and Redis at scrape time.

Why a collector and not counters bumped in code: Keel runs several gunicorn processes and
several RQ workers, and a counter in one process's memory sees only that process. These
values are read from the shared truth when /metrics is scraped, so every process answers
the same (aggregate several scraped instances with ``max``, never ``sum``) and a restart
resets nothing.

A scrape's cost does not grow with history: every query reads either current state
(running runs, open findings, live deployments) or a recent window through an index on the
timestamp that bounds it (``RECENT`` for counts the alerts read, ``DURATION_WINDOW`` for the
histograms).
So there are no all-time counters: ``workflow_runs_finished_5m`` and ``node_retries_5m``
are gauges over the last five minutes, and the duration histograms are gauge histograms
of what finished in the last hour (read them as they are, never with ``rate()``).
A part that cannot be read is left out and reported by ``keel_database_up`` /
``keel_redis_up`` rather than failing the whole scrape.
"""

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
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
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

from diagnostics import health, rq_state
from diagnostics.models import Finding
from diagnostics.reliability import with_known_start
from workflows.models import Deployment, NodeAttempt, NodeRun, Run, Workflow

logger = logging.getLogger(__name__)

RUN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
NODE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
DETECTION_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600)
RECOVERY_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

# The windows are in the metric names and HELP texts below: change them together.
RECENT = timedelta(minutes=5)
DURATION_WINDOW = timedelta(hours=1)

# name: (type, help, labels).
METRICS = {
    "workflow_runs_finished_5m": (
        "gauge",
        "Runs that finished in the last 5 minutes, by workflow and final status "
        "(a resumed run is no longer counted).",
        ["workflow", "status"],
    ),
    "workflow_runs_running": ("gauge", "Runs running now, by workflow.", ["workflow"]),
    "workflow_oldest_running_run_seconds": (
        "gauge",
        "Age of the longest-running run that is still running, by workflow.",
        ["workflow"],
    ),
    "workflow_duration_1h_seconds": (
        "gaugehistogram",
        "Duration (started to finished) of runs that finished in the last hour, by workflow.",
        ["workflow"],
    ),
    "node_duration_1h_seconds": (
        "gaugehistogram",
        "Duration of node attempts that finished in the last hour, by queue.",
        ["queue"],
    ),
    "node_retries_5m": (
        "gauge",
        "Node attempts after the first (retries) that finished in the last 5 minutes, by queue.",
        ["queue"],
    ),
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
    "finding_detection_1h_seconds": (
        "gaugehistogram",
        "Time from when a condition began (evidence 'since') to its finding, for findings "
        "first seen in the last hour, by code.",
        ["code"],
    ),
    "finding_recovery_1h_seconds": (
        "gaugehistogram",
        "Time from a finding's detection to its resolution, for findings resolved in the "
        "last hour, by code.",
        ["code"],
    ),
    "workflow_version_live": (
        "gauge",
        "1 for the version new runs of each workflow get (its active deployment).",
        ["workflow", "version"],
    ),
    "workflow_deployment_in_flight": (
        "gauge",
        "1 for each deployment in flight (a canary ramping, a blue-green validating).",
        ["workflow", "version", "strategy", "state"],
    ),
    "workflow_deployment_canary_percent": (
        "gauge",
        "The share of new runs, in %, the version in flight gets now (0 while validating).",
        ["workflow", "version"],
    ),
    "workflow_canary_runs": (
        "gauge",
        "Finished runs of the canary's current step, of the canary and of its baseline "
        "(role), as of the watchdog's last analysis.",
        ["workflow", "version", "role"],
    ),
    "workflow_canary_failure_rate": (
        "gauge",
        "Share (0-1) of those runs that failed, of the canary and of its baseline (role), "
        "as of the watchdog's last analysis.",
        ["workflow", "version", "role"],
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
    "keel_watchdog_tick_seconds": (
        "gauge",
        "How long the last acting watchdog tick took (detect, record, repair).",
        [],
    ),
}
_FAMILIES = {
    "gauge": GaugeMetricFamily,
    "gaugehistogram": GaugeHistogramMetricFamily,
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
    """Registered once (DiagnosticsConfig.ready); runs its queries on each scrape.

    Eight queries, each bounded by current state or a recent window, each through an
    index (the index names are in the comments).
    """

    def describe(self):
        # Without describe(), registering would call collect() — queries at import time.
        return [family(name) for name in METRICS]

    def collect(self):
        # Redis answers in a thread while the database does (at 10 000 workers its
        # sweep takes ~40 ms, as long as the queries).
        redis_families = _REDIS_READER.submit(lambda: list(self._redis_families()))
        yield from self._database_families()
        yield from redis_families.result()

    # --- database -----------------------------------------------------------------------

    def _database_families(self):
        up = family("keel_database_up")
        now = timezone.now()
        try:
            families = [
                *self._run_families(now),
                *self._node_families(now),
                *self._finding_families(now),
                *self._deployment_families(),
            ]
        except DatabaseError as error:
            logger.warning("metrics: database unreadable: %s", health.error_text(error))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _run_families(self, now):
        # Every workflow gets a series (0 when idle), so a quiet workflow reads 0, not absent.
        slugs = list(Workflow.objects.order_by("slug").values_list("pk", "slug"))
        running, oldest = (
            family("workflow_runs_running"),
            family("workflow_oldest_running_run_seconds"),
        )
        # Current state: run_status_created (status, -created_at).
        live = {
            row["workflow_id"]: row
            for row in Run.objects.filter(status=Run.Status.RUNNING)
            .values("workflow_id")
            .annotate(count=Count("pk"), oldest=Min("started_at"))
            .order_by()
        }
        # Runs that finished in the last hour: run_finished (finished_at).
        recent = Q(finished_at__gte=now - RECENT)
        finished = {
            row["workflow_id"]: row
            for row in Run.objects.filter(
                finished_at__gte=now - DURATION_WINDOW,
                status__in=Run.TERMINAL,
                started_at__isnull=False,
            )
            .annotate(elapsed=_elapsed("finished_at", "started_at"))
            .values("workflow_id")
            .annotate(
                **{
                    f"recent_{status}": Count("pk", filter=recent & Q(status=status))
                    for status in Run.TERMINAL
                },
                **_histogram_aggregates(RUN_BUCKETS),
            )
            .order_by()
        }
        counts, durations = (
            family("workflow_runs_finished_5m"),
            family("workflow_duration_1h_seconds"),
        )
        for pk, slug in slugs:
            row = live.get(pk)
            running.add_metric([slug], row["count"] if row else 0)
            if row and row["oldest"] is not None:
                oldest.add_metric([slug], max(0.0, (now - row["oldest"]).total_seconds()))
            row = finished.get(pk)
            for status in sorted(Run.TERMINAL):
                counts.add_metric([slug, status], row[f"recent_{status}"] if row else 0)
            if row:
                _add_histogram(durations, [slug], row, RUN_BUCKETS)
        return [counts, running, oldest, durations]

    def _node_families(self, now):
        durations, retries = family("node_duration_1h_seconds"), family("node_retries_5m")
        # Attempts that finished in the last hour: attempt_finished (finished_at).
        for row in (
            NodeAttempt.objects.filter(
                finished_at__gte=now - DURATION_WINDOW, started_at__isnull=False
            )
            .annotate(elapsed=_elapsed("finished_at", "started_at"))
            .values("queue")
            .annotate(
                retries=Count("pk", filter=Q(number__gt=1, finished_at__gte=now - RECENT)),
                **_histogram_aggregates(NODE_BUCKETS),
            )
            .order_by("queue")
        ):
            retries.add_metric([row["queue"]], row["retries"])
            _add_histogram(durations, [row["queue"]], row, NODE_BUCKETS)
        return [durations, retries]

    def _finding_families(self, now):
        stuck, stuck_oldest = family("nodes_stuck"), family("nodes_stuck_oldest_seconds")
        open_findings = family("findings_open")
        on_stuck_node = Q(node_run__status__in=NodeRun.HOLDS_SLOT)
        per_code: dict[str, tuple[int, object]] = {}
        # Current state: finding_open (partial, resolved_at IS NULL).
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
        since = now - DURATION_WINDOW
        detection = family("finding_detection_1h_seconds")
        # Findings first seen in the last hour: finding_first_seen (first_seen).
        for row in (
            with_known_start(Finding.objects.filter(first_seen__gte=since))
            .annotate(elapsed=_elapsed("first_seen", "began"))
            .values("code")
            .annotate(**_histogram_aggregates(DETECTION_BUCKETS))
            .order_by("code")
        ):
            _add_histogram(detection, [row["code"]], row, DETECTION_BUCKETS)
        recovery = family("finding_recovery_1h_seconds")
        # Findings resolved in the last hour: finding_resolved (resolved_at).
        for row in (
            Finding.objects.filter(resolved_at__gte=since)
            .annotate(elapsed=_elapsed("resolved_at", "first_seen"))
            .values("code")
            .annotate(**_histogram_aggregates(RECOVERY_BUCKETS))
            .order_by("code")
        ):
            _add_histogram(recovery, [row["code"]], row, RECOVERY_BUCKETS)
        return [stuck, stuck_oldest, open_findings, detection, recovery]

    def _deployment_families(self):
        live, in_flight = family("workflow_version_live"), family("workflow_deployment_in_flight")
        percent = family("workflow_deployment_canary_percent")
        runs, failure_rate = family("workflow_canary_runs"), family("workflow_canary_failure_rate")
        # Current state: at most one active and one in flight per workflow
        # (deployment_one_active, deployment_in_flight).
        for slug, number, baseline, strategy, state, steps, step, evidence in (
            Deployment.objects.filter(state__in=Deployment.LIVE)
            .order_by("workflow__slug", "pk")
            .values_list(
                "workflow__slug",
                "version__number",
                "baseline__number",
                "strategy",
                "state",
                "steps",
                "step",
                "evidence",
            )
        ):
            version = str(number)
            if state == Deployment.State.ACTIVE:
                live.add_metric([slug, version], 1)
                continue
            in_flight.add_metric([slug, version, strategy, state], 1)
            share = Deployment(state=state, steps=steps, step=step).percent
            percent.add_metric([slug, version], share)
            # The watchdog's analysis of this step (one of an earlier step says nothing now).
            if state != Deployment.State.RAMPING or (evidence or {}).get("step") != step:
                continue
            for role, role_version in (("canary", number), ("baseline", baseline)):
                if role_version is None:
                    continue
                sample = evidence.get(role) or {}
                labels = [slug, str(role_version), role]
                if sample.get("runs") is not None:
                    runs.add_metric(labels, sample["runs"])
                if sample.get("failure_rate") is not None:
                    failure_rate.add_metric(labels, sample["failure_rate"])
        return [live, in_flight, percent, runs, failure_rate]

    # --- Redis --------------------------------------------------------------------------

    def _redis_families(self):
        up = family("keel_redis_up")
        client = health.probe_client()
        try:
            # Counted inside Redis: a scrape reads in full only the workers gone quiet and
            # those on this host, not every worker's hash.
            stale_after = settings.KEEL_STALE_BEATS * settings.KEEL_HEARTBEAT_SECONDS
            sweep = rq_state.sweep_workers(
                client,
                quiet_before=timezone.now() - timedelta(seconds=stale_after),
                host=socket.gethostname(),
            )
            looked_at = rq_state.read_workers(client, [*sweep.unwell, *sweep.nearby])
            queues = rq_state.read_queues(
                client, looked_at, list(settings.KEEL_QUEUES), live_elsewhere=sweep.well_by_queue
            )
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
            alive.add_metric(labels, queue["live"])
            for registry, count in queue["registries"].items():
                registries.add_metric([queue["name"], registry], count)
        watchdog_up = family("keel_watchdog_up")
        watchdog_up.add_metric([], 1 if watchdog.get("alive") else 0)
        tick = family("keel_watchdog_tick_seconds")
        if watchdog.get("tick_seconds") is not None:
            tick.add_metric([], watchdog["tick_seconds"])
        yield from (size, oldest, alive, registries, watchdog_up, tick)


# One thread per process for a scrape's Redis reads (scrapes are seconds apart).
_REDIS_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-metrics")

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
