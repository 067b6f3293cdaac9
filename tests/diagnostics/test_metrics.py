"""Keel's metrics on /metrics: computed from the database and Redis when scraped, over
current state or a recent window, so a scrape's cost does not grow with history."""

import socket
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Max
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from diagnostics import metrics
from diagnostics.models import Finding
from tests.conftest import finished, wait_for
from tests.deployments.test_deployments import finish, load, start
from tests.diagnostics.test_pages import make_finding
from workflows import engine
from workflows.deployments import judging, services
from workflows.models import Deployment, NodeAttempt, Run

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
def test_recent_run_counts_gauges_and_duration_histogram(client, make_version):
    version, other = make_version(DEFINITION), make_version(OTHER)
    make_run(version, Run.Status.SUCCEEDED, took=3)
    make_run(version, Run.Status.SUCCEEDED, took=40)
    make_run(version, Run.Status.FAILED, took=200)
    make_run(version, Run.Status.RUNNING, took=4000)
    make_run(other, Run.Status.CANCELLED, took=1)
    # Finished 10 minutes ago: in the hour's durations, not in the 5-minute counts.
    make_run(version, Run.Status.FAILED, took=2, ago=600)
    # Finished two hours ago: in neither.
    make_run(version, Run.Status.FAILED, took=2, ago=7200)
    samples = scrape(client)
    slug = version.workflow.slug

    def finished_5m(workflow, status):
        return value(samples, "workflow_runs_finished_5m", workflow=workflow, status=status)

    assert finished_5m(slug, "succeeded") == 2
    assert finished_5m(slug, "failed") == 1
    assert finished_5m(slug, "cancelled") == 0
    assert finished_5m(other.workflow.slug, "failed") == 0
    assert finished_5m(other.workflow.slug, "cancelled") == 1
    assert value(samples, "workflow_runs_running", workflow=slug) == 1
    assert value(samples, "workflow_runs_running", workflow=other.workflow.slug) == 0
    oldest = value(samples, "workflow_oldest_running_run_seconds", workflow=slug)
    assert 4000 <= oldest < 4100
    assert value(samples, "workflow_oldest_running_run_seconds", workflow="other-measured") is None

    def bucket(le):
        return value(samples, "workflow_duration_1h_seconds_bucket", workflow=slug, le=le)

    assert (bucket("1.0"), bucket("5.0"), bucket("60.0"), bucket("300.0")) == (0, 2, 3, 4)
    assert bucket("+Inf") == 4
    assert value(samples, "workflow_duration_1h_seconds_gcount", workflow=slug) == 4
    assert value(samples, "workflow_duration_1h_seconds_gsum", workflow=slug) == pytest.approx(245)
    assert value(samples, "keel_database_up") == 1


@pytest.mark.django_db
def test_a_resumed_run_leaves_the_recent_failures(client, make_version):
    version = make_version(DEFINITION)
    run = make_run(version, Run.Status.FAILED, took=5)
    slug = version.workflow.slug
    samples = scrape(client)
    assert value(samples, "workflow_runs_finished_5m", workflow=slug, status="failed") == 1
    # What a resume does to the row (workflows/recovery.py): running again, not finished.
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, finished_at=None)
    samples = scrape(client)
    assert value(samples, "workflow_runs_finished_5m", workflow=slug, status="failed") == 0
    assert value(samples, "workflow_runs_running", workflow=slug) == 1


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
    assert value(samples, "node_retries_5m", queue="default") == 1
    assert value(samples, "node_duration_1h_seconds_gcount", queue="default") == 3
    durations = [(a.finished_at - a.started_at).total_seconds() for a in attempts]
    assert max(durations) >= 0.3  # the slow node
    for bound in (*metrics.NODE_BUCKETS, "+Inf"):
        le = "+Inf" if bound == "+Inf" else str(float(bound))
        expected = sum(1 for seconds in durations if bound == "+Inf" or seconds <= bound)
        assert value(samples, "node_duration_1h_seconds_bucket", queue="default", le=le) == expected
    assert value(samples, "node_duration_1h_seconds_gsum", queue="default") == pytest.approx(
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
        return value(samples, "finding_detection_1h_seconds_bucket", code="worker_lost", le=le)

    assert (detection("2.0"), detection("5.0"), detection("+Inf")) == (0, 1, 1)
    assert value(samples, "finding_detection_1h_seconds_gsum", code="worker_lost") == pytest.approx(
        4, abs=0.01
    )

    def recovery(le):
        return value(samples, "finding_recovery_1h_seconds_bucket", code="worker_lost", le=le)

    assert value(samples, "finding_detection_1h_seconds_gcount", code="worker_lost") == 1
    assert (recovery("20.0"), recovery("30.0")) == (0, 1)
    assert value(samples, "finding_recovery_1h_seconds_gcount", code="worker_lost") == 1
    # Open findings have not recovered.
    assert value(samples, "finding_recovery_1h_seconds_gcount", code="heartbeat_stale") is None


def add_history(version, node_run, count: int, *, ago: timedelta) -> None:
    """``count`` finished runs, node attempts and resolved findings, ending ``ago`` back."""
    end = timezone.now() - ago
    start = end - timedelta(seconds=2)
    runs = Run.objects.bulk_create(
        Run(
            workflow=version.workflow,
            version=version,
            status=Run.Status.FAILED if index % 2 else Run.Status.SUCCEEDED,
            trigger="history",
            started_at=start,
            finished_at=end,
        )
        for index in range(count)
    )
    first = (NodeAttempt.objects.filter(node_run=node_run).aggregate(n=Max("number"))["n"]) or 0
    NodeAttempt.objects.bulk_create(
        NodeAttempt(
            node_run=node_run,
            number=first + 1 + index,
            status=NodeAttempt.Status.FAILED,
            rq_job_id=f"history-{first + index}",
            queue="default",
            started_at=start,
            finished_at=end,
        )
        for index in range(count)
    )
    Finding.objects.bulk_create(
        Finding(
            code=f"code_{index % 5}",
            subject=f"history:{run.pk}",
            run=run,
            title="old",
            suggestion="none",
            evidence={"since": (start - timedelta(seconds=1)).isoformat()},
            began_at=start - timedelta(seconds=1),  # as the watchdog writes it (no save())
            first_seen=start,
            last_seen=end,
            resolved_at=end,
        )
        for index, run in enumerate(runs)
    )


@pytest.mark.django_db
def test_a_scrape_makes_the_same_queries_with_ten_times_the_history(
    client, make_version, start_run
):
    version = make_version(DEFINITION)
    node_run = start_run(version).nodes.get()
    history = 40
    add_history(version, node_run, history, ago=timedelta(days=3))
    add_history(version, node_run, history // 10, ago=timedelta(minutes=1))
    make_finding(node_run=node_run, ago=30)
    with CaptureQueriesContext(connection) as few:
        first = scrape(client)
    add_history(version, node_run, history * 9, ago=timedelta(days=3))
    with CaptureQueriesContext(connection) as many:
        second = scrape(client)
    assert len(many) == len(few)
    # The old history shows nowhere: only the recent runs, attempts and findings count.
    slug, recent = version.workflow.slug, history // 10
    for samples in (first, second):
        finished_5m = {
            status: value(samples, "workflow_runs_finished_5m", workflow=slug, status=status)
            for status in ("succeeded", "failed", "cancelled")
        }
        assert finished_5m == {"succeeded": recent / 2, "failed": recent / 2, "cancelled": 0}
        assert value(samples, "workflow_duration_1h_seconds_gcount", workflow=slug) == recent
        assert value(samples, "node_duration_1h_seconds_gcount", queue="default") == recent
        assert value(samples, "node_retries_5m", queue="default") == recent  # numbers > 1
        recovered = sum(
            value(samples, "finding_recovery_1h_seconds_gcount", code=f"code_{index}") or 0
            for index in range(5)
        )
        assert recovered == recent
        detected = sum(
            value(samples, "finding_detection_1h_seconds_gcount", code=f"code_{index}") or 0
            for index in range(5)
        )
        assert detected == recent
        assert value(samples, "findings_open", code="heartbeat_stale", severity="warning") == 1


@pytest.mark.django_db
def test_a_scrape_costs_a_fixed_number_of_queries(client, make_version):
    """Eight database queries: current state and recent windows, one query per group of
    families (runs, nodes, open findings, ..., deployments)."""
    make_run(make_version(DEFINITION), Run.Status.SUCCEEDED, took=1)
    make_finding()
    with CaptureQueriesContext(connection) as queries:
        scrape(client)
    keel = [q["sql"] for q in queries if "django_session" not in q["sql"]]
    assert len(keel) == 8, "\n".join(keel)


@pytest.mark.django_db
def test_the_collector_is_registered_once(client):
    assert metrics.register() is metrics.register()
    collectors = [c for c in REGISTRY._collector_to_names if isinstance(c, metrics.KeelCollector)]
    assert len(collectors) == 1
    body = client.get("/metrics").content.decode()
    assert body.count("# TYPE workflow_runs_finished_5m gauge") == 1


@pytest.mark.django_db
def test_a_scrape_without_redis_still_reports_the_database(client, settings, make_version):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.REDIS_URL = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    make_run(make_version(DEFINITION), Run.Status.SUCCEEDED, took=1)
    samples = scrape(client)
    assert value(samples, "keel_redis_up") == 0
    assert value(samples, "workflow_queue_size", queue="default") is None
    assert value(samples, "workflow_runs_finished_5m", workflow="measured", status="succeeded") == 1
    assert value(samples, "keel_database_up") == 1


@pytest.mark.django_db(transaction=True)
def test_versions_live_and_in_flight_and_the_canary_step_by_role(client, clean_redis):
    load(1)
    v2 = load(2, deploying=None)
    canary = services.deploy(
        v2, actor="test", reason="try v2", strategy="canary", steps=[20, 100]
    ).deployment
    runs = start(10)  # 2 on the canary, 8 on v1
    on_v2 = [run for run in runs if run.version == v2]
    finish(on_v2[:1], Run.Status.FAILED)
    finish(on_v2[1:], Run.Status.SUCCEEDED)
    finish([run for run in runs if run.version != v2][:4], Run.Status.SUCCEEDED)
    assert judging.advance_in_flight() == [], "2 of 20 runs: the analysis waits, and says so"

    with CaptureQueriesContext(connection) as queries:
        samples = scrape(client)
    assert len([q for q in queries if "django_session" not in q["sql"]]) == 8

    assert value(samples, "workflow_version_live", workflow="orders", version="1") == 1
    assert value(samples, "workflow_version_live", workflow="orders", version="2") is None
    in_flight = {"workflow": "orders", "version": "2", "strategy": "canary", "state": "ramping"}
    assert value(samples, "workflow_deployment_in_flight", **in_flight) == 1
    assert (
        value(samples, "workflow_deployment_canary_percent", workflow="orders", version="2") == 20
    )
    step = {
        (role, name): value(samples, name, workflow="orders", version=version, role=role)
        for role, version in (("canary", "2"), ("baseline", "1"))
        for name in ("workflow_canary_runs", "workflow_canary_failure_rate")
    }
    assert step == {
        ("canary", "workflow_canary_runs"): 2,
        ("canary", "workflow_canary_failure_rate"): 0.5,
        ("baseline", "workflow_canary_runs"): 4,
        ("baseline", "workflow_canary_failure_rate"): 0.0,
    }

    services.promote(canary.pk, actor="test", reason="looks fine")
    samples = scrape(client)
    assert (
        value(samples, "workflow_deployment_canary_percent", workflow="orders", version="2") == 100
    )
    assert (
        value(samples, "workflow_canary_runs", workflow="orders", version="2", role="canary")
        is None
    ), "the analysis of an earlier step says nothing about this one"

    services.promote(canary.pk, actor="test", reason="all in")
    samples = scrape(client)
    assert value(samples, "workflow_version_live", workflow="orders", version="2") == 1
    assert value(samples, "workflow_version_live", workflow="orders", version="1") is None
    assert not any(name == "workflow_deployment_in_flight" for name, _ in samples)
    assert Deployment.objects.get(pk=canary.pk).state == Deployment.State.ACTIVE
