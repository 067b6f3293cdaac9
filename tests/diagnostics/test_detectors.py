"""Each detector against the real condition: real workers, real database, real Redis."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.db.utils import load_backend
from django.utils import timezone

import bench.fault_nodes  # noqa: F401  (registers faults.* in this process too)
from bench.faults import ThrowawayRedis
from diagnostics import detectors, watchdog
from diagnostics.models import Finding
from tests.conftest import wait_for
from workflows import engine, operations
from workflows.models import NodeAttempt, NodeRun, ResourcePool, RunEvent

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

NODE_MODULES = "workflows.nodes.builtin,workflows.nodes.demo,tests.nodes,bench.fault_nodes"


def node(run, key="n") -> NodeRun:
    return NodeRun.objects.get(run=run, node_key=key)


def running(run, key="n") -> NodeRun:
    return wait_for(
        lambda: NodeRun.objects.filter(run=run, node_key=key, status="running").first(),
        message=f"{key} to run",
    )


def open_finding(code, **filters) -> Finding | None:
    return Finding.objects.filter(code=code, resolved_at__isnull=True, **filters).first()


def tick_until(predicate, timeout=20.0, message="a finding"):
    def ticked():
        watchdog.tick()
        return predicate()

    return wait_for(ticked, timeout=timeout, interval=0.3, message=message)


def started_ago(node_run: NodeRun, seconds: float) -> None:
    """Move the node's start back in time: the same evidence as waiting, without the wait."""
    shift = timedelta(seconds=seconds)
    NodeRun.objects.filter(pk=node_run.pk).update(started_at=F("started_at") - shift)
    NodeAttempt.objects.filter(node_run=node_run).update(started_at=F("started_at") - shift)


def claim(node_run: NodeRun):
    """Claim the node in this process, as a worker would (the test is the worker)."""
    return engine.claim_attempt(
        node_run.pk,
        node_run.attempt,
        worker="test-process",
        pid=os.getpid(),
        host=socket.gethostname(),
    )


def one_node(key="n", **node):
    return {"name": f"Detect {key} {time.monotonic_ns()}", "nodes": {key: node}}


def test_a_frozen_work_horse_is_reported_as_heartbeat_stale_not_lost(start_worker, start_run):
    start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    run = start_run(one_node(type="test.cooperative_sleep", params={"seconds": 30}, timeout=60))
    target = running(run)
    # The resource sample is the last write of this node's beat: frozen after it, the
    # horse holds no lock (frozen inside a write, it would hold SQLite's for good).
    wait_for(
        lambda: NodeAttempt.objects.get(node_run=target, number=1).resource_samples,
        message="a first heartbeat",
    )
    horse = NodeAttempt.objects.get(node_run=target, number=1).pid
    os.kill(horse, signal.SIGSTOP)
    try:
        finding = tick_until(lambda: open_finding("heartbeat_stale", node_run=target))
    finally:
        os.kill(horse, signal.SIGCONT)

    assert "is running but has sent no heartbeat since " in finding.title
    assert finding.severity == Finding.Severity.CRITICAL
    assert "hung" in finding.suggestion
    assert finding.action == {"kind": "retry_node", "run": run.pk, "node": "n"}
    assert finding.evidence["pid"] == horse
    assert finding.evidence["process"] == f"pid {horse} is running"
    assert not Finding.objects.filter(code="worker_lost").exists(), "frozen is not lost"
    assert RunEvent.objects.filter(run=run, kind=RunEvent.Kind.FINDING).exists()
    # Thawed, it beats again and the finding resolves; the node was never touched.
    tick_until(lambda: Finding.objects.get(pk=finding.pk).resolved_at, message="resolution")
    assert node(run).status == NodeRun.Status.RUNNING
    assert node(run).attempt == 1
    operations.cancel_run(run.pk, actor="test", reason="done")


def test_a_node_that_never_sent_a_heartbeat_is_stale(start_worker, start_run):
    # The worker beats every 30 s, the watchdog expects one every second.
    start_worker(KEEL_NODE_MODULES=NODE_MODULES, KEEL_HEARTBEAT_SECONDS=30)
    run = start_run(one_node(type="test.cooperative_sleep", params={"seconds": 30}, timeout=60))
    target = running(run)

    finding = tick_until(lambda: open_finding("heartbeat_stale", node_run=target))

    assert "has sent no heartbeat since it started at " in finding.title
    assert finding.evidence["never_sent_heartbeat"] is True
    operations.cancel_run(run.pk, actor="test", reason="done")


def test_overdue_against_the_expected_duration(start_run, settings):
    run = start_run(one_node(type="test.record", expected_duration=1))
    target = node(run)
    claim(target)
    started_ago(target, 2.1)
    engine.record_heartbeat(target.pk, 1)

    watchdog.tick()

    finding = open_finding("overdue", node_run=target)
    assert finding is not None
    assert "longer than 2 x the expected 1s" in finding.title
    assert finding.evidence["limit_seconds"] == 2
    assert "raise expected_duration" in finding.suggestion
    engine.complete_attempt(target.pk, 1, {}, actor="test")
    watchdog.tick()
    assert Finding.objects.get(pk=finding.pk).resolved_at is not None


def test_overdue_against_the_p95_of_ten_past_runs(start_run, make_version):
    version = make_version(one_node(type="test.record"))
    for _ in range(10):
        past = node(start_run(version))
        claim(past)
        engine.complete_attempt(past.pk, 1, {}, actor="test")
    target = node(start_run(version))
    claim(target)
    started_ago(target, 2.1)  # the p95 is milliseconds; the floor is two beats (2 s)
    engine.record_heartbeat(target.pk, 1)

    watchdog.tick()

    finding = open_finding("overdue", node_run=target)
    assert finding is not None
    assert "the p95 of its last 10 successful runs" in finding.title
    assert finding.evidence["history_successes"] == 10


def test_an_attempt_whose_process_is_gone_is_lost_not_overdue(start_run):
    """Its worker was killed: worker_lost says so; "raise expected_duration" would be wrong."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = start_run(one_node(type="test.record", expected_duration=1))
    target = node(run)
    engine.claim_attempt(
        target.pk, 1, worker="killed-worker", pid=gone.pid, host=socket.gethostname()
    )
    long_ago = timezone.now() - timedelta(seconds=60)
    NodeAttempt.objects.filter(node_run=target).update(started_at=long_ago)
    NodeRun.objects.filter(pk=target.pk).update(started_at=long_ago, heartbeat_at=long_ago)

    ctx = detectors.Context(now=timezone.now())
    codes = {d.code for d in detectors.run_all(ctx, {"overdue", "worker_lost"}).detections}

    assert codes == {"worker_lost"}


def test_node_histories_are_read_a_few_at_a_time(start_run, make_version, monkeypatch):
    from diagnostics.detectors import durations

    monkeypatch.setattr(durations, "HISTORY_REFRESH", 1)
    run = start_run(make_version(one_node(type="test.record")))
    pairs = {(run.workflow_id, "n"), (run.workflow_id, "other")}
    ctx = detectors.Context()

    assert len(durations._duration_history(ctx, pairs)) == 1, "one read, one left out"
    assert len(durations._duration_history(ctx, pairs)) == 2


def test_a_node_history_is_its_workflows_latest_runs_only(start_run, make_version, monkeypatch):
    from diagnostics.detectors import durations

    monkeypatch.setattr(durations, "HISTORY_RUNS", 10)
    version = make_version(one_node(type="test.record"))
    for _ in range(12):
        past = node(start_run(version))
        claim(past)
        engine.complete_attempt(past.pk, 1, {}, actor="test")
    pair = (version.workflow_id, "n")

    [(p95, successes)] = durations._duration_history(detectors.Context(), {pair}).values()

    assert successes == 10, "the 10 newest of 12 runs"
    assert p95 is not None


def test_nine_past_runs_are_not_a_history(start_run, make_version):
    version = make_version(one_node(type="test.record"))
    for _ in range(9):
        past = node(start_run(version))
        claim(past)
        engine.complete_attempt(past.pk, 1, {}, actor="test")
    target = node(start_run(version))
    claim(target)
    started_ago(target, 2.1)
    engine.record_heartbeat(target.pk, 1)

    watchdog.tick()

    assert open_finding("overdue", node_run=target) is None


def test_stalled_progress_is_found_but_slow_progress_is_not(start_worker, start_run, settings):
    settings.KEEL_STALLED_BEATS = 3
    start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    stuck = start_run(one_node(type="faults.stall", params={"seconds": 30}, timeout=60))
    slow = start_run(
        one_node(type="test.batches", params={"rows": 80, "batch": 1, "pause": 0.15}, timeout=60)
    )
    running(stuck)
    running(slow)

    finding = tick_until(lambda: open_finding("stalled", run=stuck), timeout=20)
    # Keep watching the slow one for a few more beats: it moves, so it is not stalled.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        watchdog.tick()
        time.sleep(0.3)

    assert "has not moved since " in finding.title
    assert "1 of 10" in finding.title
    unchanged_since = datetime.fromisoformat(finding.evidence["progress_unchanged_since"])
    assert finding.first_seen - unchanged_since >= timedelta(seconds=3)
    assert node(slow).status == NodeRun.Status.RUNNING, "the slow node is still going"
    assert not Finding.objects.filter(code="stalled", run=slow).exists()
    for one in (stuck, slow):
        operations.cancel_run(one.pk, actor="test", reason="done")


def test_resource_pressure_from_heartbeat_samples(start_worker, start_run, settings):
    settings.KEEL_RSS_LIMIT_BYTES = 320 * 2**20
    settings.KEEL_PRESSURE_CPU_PERCENT = 30
    start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    run = start_run(
        one_node(type="faults.pressure", params={"megabytes": 300, "seconds": 30}, timeout=60)
    )
    target = running(run)

    finding = tick_until(
        lambda: (
            (f := open_finding("resource_pressure", node_run=target))
            and len(f.evidence["problems"]) == 2
            and f
        )
    )

    assert "memory (RSS) at" in finding.title and "of a 320 MiB limit" in finding.title
    assert "CPU at" in finding.title
    assert finding.evidence["rss_bytes"] >= 0.9 * 320 * 2**20
    assert len(finding.evidence["resource_samples"]) >= 2
    assert finding.evidence["network_bytes_per_second_mean"] >= 0, "the host's traffic beside"
    operations.cancel_run(run.pk, actor="test", reason="done")


def test_no_worker_for_the_queue_then_a_stopped_worker(start_worker, start_run, settings):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    run = start_run(one_node(type="test.record"))

    watchdog.tick()
    finding = open_finding("no_worker", subject="queue:default")
    assert finding is not None
    assert finding.title == "No worker listens to queue default: 1 node(s) wait"
    assert finding.action == {"kind": "command", "command": "manage.py rqworker default"}

    # A worker on another queue does not help.
    start_worker(queues=("low",))
    watchdog.tick()
    assert open_finding("no_worker", subject="queue:default").pk == finding.pk

    # One that listens does: the node runs and the finding resolves.
    listener = start_worker(queues=("default",))
    wait_for(lambda: node(run).status == NodeRun.Status.SUCCEEDED, message="the node to run")
    watchdog.tick()
    assert Finding.objects.get(pk=finding.pk).resolved_at is not None

    # Killed, the worker stays in RQ's registry for minutes; its dead pid gives it away.
    listener.kill_hard()
    later = start_run(one_node(type="test.record"))
    watchdog.tick()
    again = open_finding("no_worker", subject="queue:default")
    assert again is not None and again.pk != finding.pk
    assert listener.name in again.evidence["dead_workers_for_queue"]
    operations.cancel_run(later.pk, actor="test", reason="done")


def test_backlog_by_length_and_by_age(start_run, settings, clean_redis):
    settings.KEEL_BACKLOG_LENGTH = 5
    settings.KEEL_BACKLOG_AGE_SECONDS = 3600
    start_run(
        {
            "name": "Backlog",
            "nodes": {f"n{i}": {"type": "test.record"} for i in range(6)},
        }
    )

    watchdog.tick()

    finding = open_finding("backlog", subject="queue:default")
    assert finding is not None
    assert finding.title.startswith("Queue default is backed up: 6 node(s) waiting")
    assert finding.evidence["rq_queue_length"] == 6
    assert finding.action == {"kind": "command", "command": "manage.py rqworker default"}

    settings.KEEL_BACKLOG_LENGTH = 1000
    watchdog.tick()
    assert Finding.objects.get(pk=finding.pk).resolved_at is not None, "6 is fine now"

    settings.KEEL_BACKLOG_AGE_SECONDS = 1
    finding = tick_until(lambda: open_finding("backlog", subject="queue:default"), timeout=10)
    oldest = datetime.fromisoformat(finding.evidence["oldest_queued_at"])
    assert finding.first_seen - oldest >= timedelta(seconds=1)


POOLED = {
    "name": "Pooled",
    "pools": {"warehouse": 1},
    "nodes": {"load": {"type": "test.record", "pool": "warehouse"}},
}


def test_pool_exhausted_names_the_runs_holding_the_slots(start_run, settings):
    settings.KEEL_POOL_WAIT_SECONDS = 0
    holder = start_run(POOLED)
    waiter = start_run(POOLED)
    assert node(waiter, "load").status == NodeRun.Status.PENDING

    watchdog.tick()

    finding = open_finding("pool_exhausted", run=waiter)
    assert finding is not None
    assert finding.title == (
        f"Run {waiter.pk} waits for pool warehouse: all 1 slot(s) are held by run(s) {holder.pk}"
    )
    assert finding.evidence["holders"][0]["run"] == holder.pk
    assert finding.action == {"kind": "resize_pool", "pool": "warehouse", "slots": 2}
    assert ResourcePool.objects.get(name="warehouse").slots == 1

    operations.cancel_run(holder.pk, actor="test", reason="make room")
    assert node(waiter, "load").status == NodeRun.Status.QUEUED
    watchdog.tick()
    assert Finding.objects.get(pk=finding.pk).resolved_at is not None


def test_blocked_upstream_names_what_it_blocks(start_run):
    run = start_run(
        {
            "name": "Blocked",
            "nodes": {
                "extract": {"type": "test.record"},
                "load": {"type": "test.record", "after": ["extract"]},
                "other": {"type": "test.record"},
            },
        }
    )
    extract = node(run, "extract")
    claim(extract)
    engine.fail_attempt(
        extract.pk, 1, engine.Failure("ConnectionError", "warehouse refused"), actor="test"
    )

    watchdog.tick()

    finding = open_finding("blocked_upstream", run=run)
    assert finding is not None
    assert finding.title == f"1 node(s) of run {run.pk} cannot start because extract failed"
    assert finding.evidence["blocked_nodes"] == ["load"]
    assert "warehouse refused" in finding.evidence["upstream_reason"]
    assert finding.action == {"kind": "retry_node", "run": run.pk, "node": "extract"}
    operations.cancel_run(run.pk, actor="test", reason="done")
    watchdog.tick()
    assert Finding.objects.get(pk=finding.pk).resolved_at is not None


def test_repeated_timeout(start_worker, start_run):
    start_worker("forking", KEEL_NODE_MODULES=NODE_MODULES)
    run = start_run(
        one_node(
            type="test.sleep_first",
            params={"seconds": 30, "until_attempt": 99},
            timeout=1,
            retries={"max_attempts": 4, "backoff": 0},
        )
    )

    finding = tick_until(lambda: open_finding("repeated_timeout", run=run), timeout=40)

    assert "timed out on 2 attempts (timeout 1s)" in finding.title
    assert [a["attempt"] for a in finding.evidence["timed_out_attempts"]] == [1, 2]
    assert "HardTimeout" in finding.evidence["timed_out_attempts"][0]["error"]
    assert "checkpoint more often" in finding.suggestion
    operations.cancel_run(run.pk, actor="test", reason="done")


@pytest.fixture
def own_redis(tmp_path):
    server = ThrowawayRedis(tmp_path / "redis")
    yield server
    server.stop()


def test_redis_eviction_policy_memory_and_unreachable(own_redis):
    client = own_redis.client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 50_000))

    watchdog.tick(redis_connection=client)

    policy = open_finding("redis_unhealthy", subject="redis:eviction_policy")
    memory = open_finding("redis_unhealthy", subject="redis:memory")
    assert "maxmemory-policy allkeys-lru" in policy.title
    assert "noeviction" in policy.suggestion
    assert "of its maxmemory" in memory.title

    own_redis.stop()
    report = watchdog.tick(redis_connection=client)

    down = open_finding("redis_unhealthy", subject="redis:unreachable")
    assert down is not None and "does not answer" in down.title
    assert "Nothing is lost" in down.suggestion
    # What Redis was last seen to do is not forgotten because it cannot be looked at now.
    assert "no_worker" in report.failed_detectors
    assert Finding.objects.filter(subject="redis:eviction_policy", resolved_at=None).exists()


def test_database_unreachable_then_back(settings):
    params = {**connection.settings_dict}
    if connection.vendor == "sqlite":
        params["NAME"] = "/nonexistent/dir/keel.sqlite3"
    else:
        params["PORT"] = "1"
        params["OPTIONS"] = {**params.get("OPTIONS", {}), "connect_timeout": 2}
    unreachable = load_backend(params["ENGINE"]).DatabaseWrapper(params, alias="unreachable")

    report = watchdog.tick(db=unreachable)
    assert report.database_down
    assert report.failed, "the watchdog backs off a little"
    assert not Finding.objects.filter(code="db_unhealthy").exists(), "nothing can be written"
    watchdog.tick()

    outage = Finding.objects.get(code="db_unhealthy", subject="database:unreachable")
    assert outage.resolved_at is not None, "recorded once the database answered again"
    assert re.fullmatch(
        rf"{connection.display_name} database unreachable for \d+\.\d s "
        r"\(\d\d:\d\d:\d\d\u2013\d\d:\d\d:\d\d\): \w+Error: .+",
        outage.title,
    ), outage.title
    assert outage.resolved_at > outage.first_seen
    assert outage.evidence["down_for_seconds"] >= 0


def test_database_connections_near_the_maximum(settings):
    if connection.vendor != "postgresql":
        pytest.skip("connection limits are a PostgreSQL matter")
    settings.KEEL_DB_CONNECTIONS_RATIO = 0.0001  # one open connection is "near" now

    watchdog.tick()

    finding = open_finding("db_unhealthy", subject="database:connections")
    assert finding is not None and "near its limit" in finding.title
    assert "PgBouncer" in finding.suggestion
