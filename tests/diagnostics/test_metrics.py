"""Keel's metrics on /metrics: computed from the database and Redis when scraped."""

import socket
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from diagnostics import metrics
from tests.conftest import finished, wait_for
from tests.diagnostics.test_pages import make_finding
from workflows import engine
from workflows.models import NodeAttempt, Run

DEFINITION = {"name": "Measured", "nodes": {"a": {"type": "keel.noop"}}}
OTHER = {"name": "Other measured", "nodes": {"a": {"type": "keel.noop"}}}


def scrape(client) -> dict:
    """{(sample name, frozenset of labels): value} from a real GET /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels):
    return samples.get((name, frozenset(labels.items())))


def make_run(version, status, *, took: float | None, ago: float = 0) -> Run:
    now = timezone.now() - timedelta(seconds=ago)
    return Run.objects.create(
        workflow=version.workflow,
        version=version,
        status=status,
        trigger="test",
        started_at=now - timedelta(seconds=took or 0),
        finished_at=now if status in Run.TERMINAL else None,
    )


@pytest.mark.django_db
def test_run_counters_gauges_and_duration_histogram(client, make_version):
    version, other = make_version(DEFINITION), make_version(OTHER)
    make_run(version, Run.Status.SUCCEEDED, took=3)
    make_run(version, Run.Status.SUCCEEDED, took=40)
    make_run(version, Run.Status.FAILED, took=200)
    make_run(version, Run.Status.RUNNING, took=4000)
    make_run(other, Run.Status.CANCELLED, took=1)
    samples = scrape(client)
    slug = version.workflow.slug
    assert value(samples, "workflow_executions_total", workflow=slug) == 4
    assert value(samples, "workflow_failures_total", workflow=slug) == 1
    assert value(samples, "workflow_failures_total", workflow=other.workflow.slug) == 0
    assert value(samples, "workflow_runs_running", workflow=slug) == 1
    oldest = value(samples, "workflow_oldest_running_run_seconds", workflow=slug)
    assert 4000 <= oldest < 4100
    assert value(samples, "workflow_oldest_running_run_seconds", workflow="other-measured") is None

    def bucket(le):
        return value(samples, "workflow_duration_seconds_bucket", workflow=slug, le=le)

    assert (bucket("1.0"), bucket("5.0"), bucket("60.0"), bucket("300.0")) == (0, 1, 2, 3)
    assert bucket("+Inf") == 3
    assert value(samples, "workflow_duration_seconds_count", workflow=slug) == 3
    assert value(samples, "workflow_duration_seconds_sum", workflow=slug) == pytest.approx(243)
    assert value(samples, "keel_database_up") == 1


@pytest.mark.workers
def test_node_durations_and_retries_from_real_attempts(client, start_worker, start_run):
    start_worker(queues=("high", "default", "low"))
    run = start_run(
        {
            "name": "Retried",
            "nodes": {
                "flaky": {
                    "type": "test.fail_until",
                    "params": {"succeed_on": 2},
                    "retries": {"max_attempts": 2, "backoff": 0, "jitter": False},
                },
                "slow": {"type": "test.record", "params": {"sleep": 0.3}, "after": ["flaky"]},
            },
        }
    )

    def done():
        engine.promote_due_retries()  # what the watchdog does every tick
        run.refresh_from_db()
        return run.status in Run.TERMINAL

    wait_for(done, timeout=60, message="the run to finish")
    assert finished(run).status == Run.Status.SUCCEEDED
    attempts = NodeAttempt.objects.filter(node_run__run=run)
    assert attempts.count() == 3
    samples = scrape(client)
    assert value(samples, "node_retries_total", queue="default") == 1
    assert value(samples, "node_duration_seconds_count", queue="default") == 3
    durations = [(a.finished_at - a.started_at).total_seconds() for a in attempts]
    assert max(durations) >= 0.3  # the slow node
    for bound in (*metrics.NODE_BUCKETS, "+Inf"):
        le = "+Inf" if bound == "+Inf" else str(float(bound))
        expected = sum(1 for seconds in durations if bound == "+Inf" or seconds <= bound)
        assert value(samples, "node_duration_seconds_bucket", queue="default", le=le) == expected
    assert value(samples, "node_duration_seconds_sum", queue="default") == pytest.approx(
        sum(durations), abs=0.01
    )


@pytest.mark.workers
def test_queue_sizes_and_live_workers_come_from_redis(client, start_worker, start_run):
    worker = start_worker(queues=("high",))
    start_run(
        {"name": "Waiting", "nodes": {k: {"type": "keel.noop", "priority": "low"} for k in "abc"}}
    )
    samples = scrape(client)
    assert value(samples, "keel_redis_up") == 1
    assert value(samples, "workflow_queue_size", queue="low") == 3
    assert value(samples, "workflow_queue_size", queue="high") == 0
    assert value(samples, "workflow_queue_oldest_job_seconds", queue="low") >= 0
    assert value(samples, "workers_alive", queue="high") == 1
    assert value(samples, "workers_alive", queue="low") == 0
    assert value(samples, "workflow_queue_registry_jobs", queue="low", registry="failed") == 0
    assert value(samples, "keel_watchdog_up") == 0

    worker.kill_hard()
    assert value(scrape(client), "workers_alive", queue="high") == 0


@pytest.mark.django_db
def test_stuck_nodes_findings_and_detection_and_recovery_histograms(client, start_run):
    run = start_run(
        {"name": "Stuck", "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop"}}}
    )
    node_a, node_b = run.nodes.order_by("node_key")
    now = timezone.now()
    make_finding(code="heartbeat_stale", node_run=node_a, ago=130)
    make_finding(code="heartbeat_stale", node_run=node_b, ago=20, severity="critical")
    make_finding(code="backlog", subject="queue:default", queue="default")
    # Resolved: began 4 s before it was seen, recovered 30 s after.
    first_seen = now - timedelta(minutes=5)
    make_finding(
        code="worker_lost",
        node_run=node_a,
        subject="node_run:old",
        evidence={"since": (first_seen - timedelta(seconds=4)).isoformat()},
        first_seen=first_seen,
        last_seen=first_seen,
        resolved_at=first_seen + timedelta(seconds=30),
    )
    # A "since" that is not an ISO time is skipped, not cast (a failed cast fails the scrape).
    make_finding(code="worker_lost", evidence={"since": "yesterday"})
    samples = scrape(client)
    assert value(samples, "keel_database_up") == 1
    assert value(samples, "nodes_stuck", code="heartbeat_stale") == 2
    assert 130 <= value(samples, "nodes_stuck_oldest_seconds", code="heartbeat_stale") < 160
    assert value(samples, "nodes_stuck", code="backlog") is None  # about a queue, not a node
    assert value(samples, "findings_open", code="backlog", severity="warning") == 1
    assert value(samples, "findings_open", code="heartbeat_stale", severity="critical") == 1

    def detection(le):
        return value(samples, "finding_detection_seconds_bucket", code="worker_lost", le=le)

    assert (detection("2.0"), detection("5.0"), detection("+Inf")) == (0, 1, 1)
    assert value(samples, "finding_detection_seconds_sum", code="worker_lost") == pytest.approx(
        4, abs=0.01
    )

    def recovery(le):
        return value(samples, "finding_recovery_seconds_bucket", code="worker_lost", le=le)

    assert value(samples, "finding_detection_seconds_count", code="worker_lost") == 1
    assert (recovery("20.0"), recovery("30.0")) == (0, 1)
    assert value(samples, "finding_recovery_seconds_count", code="worker_lost") == 1
    # Open findings have not recovered.
    assert value(samples, "finding_recovery_seconds_count", code="heartbeat_stale") is None


@pytest.mark.django_db
def test_a_scrape_costs_the_same_whatever_the_history(client, make_version):
    version = make_version(DEFINITION)
    make_run(version, Run.Status.SUCCEEDED, took=1)
    make_finding()
    with CaptureQueriesContext(connection) as few:
        scrape(client)
    for index in range(30):
        make_run(version, Run.Status.FAILED if index % 2 else Run.Status.SUCCEEDED, took=index)
        make_finding(code=f"code_{index % 5}", resolved_at=timezone.now())
    with CaptureQueriesContext(connection) as many:
        scrape(client)
    assert len(many) == len(few)


@pytest.mark.django_db
def test_the_collector_is_registered_once(client):
    assert metrics.register() is metrics.register()
    collectors = [c for c in REGISTRY._collector_to_names if isinstance(c, metrics.KeelCollector)]
    assert len(collectors) == 1
    body = client.get("/metrics").content.decode()
    assert body.count("# TYPE workflow_executions_total counter") == 1


@pytest.mark.django_db
def test_a_scrape_without_redis_still_reports_the_database(client, settings, make_version):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.REDIS_URL = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    make_run(make_version(DEFINITION), Run.Status.SUCCEEDED, took=1)
    samples = scrape(client)
    assert value(samples, "keel_redis_up") == 0
    assert value(samples, "workflow_queue_size", queue="default") is None
    assert value(samples, "workflow_executions_total", workflow="measured") == 1
    assert value(samples, "keel_database_up") == 1
