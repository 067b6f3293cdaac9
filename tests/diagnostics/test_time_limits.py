"""timeout_exceeded and stalled (with a declared stall_after), against rows and RQ keys set
up as a worker would leave them: an attempt claimed by this process, started in the past."""

import os
import socket
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from rq.utils import utcformat

from diagnostics import detectors
from diagnostics.models import Finding
from workflows import engine
from workflows.models import NodeAttempt, NodeRun

pytestmark = pytest.mark.django_db(transaction=True)

HOST = socket.gethostname()


def started_node(start_run, seconds_ago: float, worker: str = "w-test", **node) -> NodeRun:
    """A node claimed by this process (pid and host are real) that started ``seconds_ago``
    and beat just now."""
    run = start_run({"name": f"Limits {time.monotonic_ns()}", "nodes": {"n": node}})
    target = NodeRun.objects.get(run=run)
    assert engine.claim_attempt(target.pk, 1, worker=worker, pid=os.getpid(), host=HOST)
    now = timezone.now()
    NodeAttempt.objects.filter(node_run=target, number=1).update(
        started_at=now - timedelta(seconds=seconds_ago)
    )
    NodeRun.objects.filter(pk=target.pk).update(
        started_at=now - timedelta(seconds=seconds_ago), heartbeat_at=now
    )
    return NodeRun.objects.get(pk=target.pk)


def detect(code: str, **context):
    ctx = detectors.Context(now=timezone.now(), **context)
    return [d for d in detectors.run_all(ctx, {code}).detections if d.code == code]


def register_worker(redis, name: str, *, pid: int, beat_seconds_ago: float = 0, **fields):
    beat = timezone.now() - timedelta(seconds=beat_seconds_ago)
    key = f"rq:worker:{name}"
    redis.hset(
        key,
        mapping={
            "birth": utcformat(beat),
            "last_heartbeat": utcformat(beat),
            "queues": "high,default,low",
            "pid": pid,
            "hostname": HOST,
            "state": "busy",
            **fields,
        },
    )
    redis.sadd("rq:workers", key)


# --- timeout_exceeded ------------------------------------------------------------------------


def test_a_node_within_its_timeout_is_not_reported(start_run):
    started_node(start_run, 25, type="test.record", timeout=30)

    assert detect("timeout_exceeded") == []


def test_past_the_hard_timeout_is_a_warning_at_once(start_run):
    node = started_node(start_run, 32, type="test.record", timeout=30)

    [found] = detect("timeout_exceeded")

    assert found.severity == "warning"
    assert found.title == (
        f"Node n of run {node.run_id} is running past its hard timeout of 30 s; "
        "the worker stops it now"
    )
    assert "kills it 5 s later" in found.suggestion
    assert found.evidence["timeout_seconds"] == 30
    assert found.evidence["deadline"] == (node.started_at + timedelta(seconds=30)).isoformat()
    assert found.action == {"kind": "retry_node", "run": node.run_id, "node": "n"}


def test_past_timeout_plus_kill_grace_the_worker_did_not_stop_it(start_run, clean_redis):
    # Never reported progress, heartbeats fresh: only the timeout tells something is wrong.
    node = started_node(start_run, 45, worker="w-forking", type="test.record", timeout=30)
    worker_pid = os.getppid()  # any live process stands for the forking worker
    register_worker(clean_redis, "w-forking", pid=worker_pid, current_job=f"keel-{node.pk}-1")

    [found] = detect("timeout_exceeded")

    assert found.severity == "critical"
    due = timezone.localtime(node.started_at + timedelta(seconds=30))
    assert found.title == (
        f"Node n of run {node.run_id} is still running past its hard timeout of 30 s "
        f"(due at {due:%H:%M:%S}): the worker did not stop it"
    )
    assert "the worker is frozen, or it is a simple worker" in found.suggestion
    assert "Retry the node" in found.suggestion
    assert f"worker w-forking on {HOST}" in found.suggestion
    assert f"`kill -9 {os.getpid()} {worker_pid}`" in found.suggestion  # horse, then worker
    assert found.evidence["pid"] == os.getpid()
    assert found.worker == "w-forking"
    assert found.action == {"kind": "retry_node", "run": node.run_id, "node": "n"}
    assert detect("worker_lost") == [], "its process runs: not lost"


def test_a_simple_worker_cannot_kill_a_node_hung_in_c(start_run, clean_redis):
    node = started_node(start_run, 45, worker="w-simple", type="test.record", timeout=30)
    # A simple worker runs the node in its own process: the same pid.
    register_worker(clean_redis, "w-simple", pid=os.getpid(), current_job=f"keel-{node.pk}-1")

    [found] = detect("timeout_exceeded")

    assert found.severity == "critical"
    assert "it runs on a simple worker, which cannot kill a node hung in C code" in (
        found.suggestion
    )
    assert f"`kill -9 {os.getpid()}`" in found.suggestion


def test_after_a_database_outage_the_worker_gets_time_to_record_the_timeout(start_run):
    started_node(start_run, 45, type="test.record", timeout=30)
    now = timezone.now()
    # The database was unreachable until a second ago (as the watchdog records it).
    Finding.objects.create(
        code="db_unhealthy",
        subject="database:unreachable",
        severity="critical",
        title="database unreachable",
        suggestion="-",
        first_seen=now - timedelta(seconds=30),
        last_seen=now - timedelta(seconds=1),
        resolved_at=now - timedelta(seconds=1),
    )

    [found] = detect("timeout_exceeded")

    assert found.severity == "warning", "it could not write the timed-out outcome until now"


# --- stalled -----------------------------------------------------------------------------------


def test_declared_stall_after_counts_from_the_start_when_no_progress_came(start_run):
    node = started_node(start_run, 70, type="test.record", timeout=300, stall_after=60)

    [found] = detect("stalled")

    since = timezone.localtime(node.started_at)
    assert found.title == (
        f"Node n of run {node.run_id} is alive but has reported no progress since "
        f"{since:%H:%M:%S} (declared stall_after 60 s)"
    )
    assert found.evidence["threshold"] == "declared stall_after 60 s"
    assert found.evidence["threshold_seconds"] == 60
    assert found.evidence["never_reported_progress"] is True
    assert found.action == {"kind": "retry_node", "run": node.run_id, "node": "n"}


def test_declared_stall_after_not_reached_is_not_stalled(start_run):
    started_node(start_run, 50, type="test.record", timeout=300, stall_after=60)

    assert detect("stalled") == []


def test_without_stall_after_a_node_is_not_judged_on_progress_it_never_reported(start_run):
    started_node(start_run, 250, type="test.record", timeout=300)

    assert detect("stalled") == []


def _progress_stood_still(node: NodeRun, seconds: float, done=1, total=10):
    """The node reported ``done`` of ``total``, which last moved ``seconds`` ago (what its
    process writes with each heartbeat)."""
    NodeRun.objects.filter(pk=node.pk).update(
        progress={"done": done, "total": total, "message": ""},
        progress_at=timezone.now() - timedelta(seconds=seconds),
    )


def test_declared_stall_after_applies_to_progress_that_stopped(start_run, clean_redis):
    node = started_node(start_run, 200, type="test.record", timeout=300, stall_after=60)
    _progress_stood_still(node, 65)

    [found] = detect("stalled")

    assert "its progress (1 of 10) has not moved since " in found.title
    assert found.title.endswith("(declared stall_after 60 s)")
    assert found.evidence["stall_after_seconds"] == 60


def test_the_default_threshold_is_named_with_its_setting(start_run, clean_redis, settings):
    settings.KEEL_STALLED_BEATS = 12
    node = started_node(start_run, 200, type="test.record", timeout=300)
    _progress_stood_still(node, 15)

    [found] = detect("stalled")

    threshold = "KEEL_STALLED_BEATS x heartbeat = 12 x 1 s = 12 s"
    assert found.title.endswith(f"({threshold})")
    assert found.evidence["threshold"] == threshold
    assert "declare a longer `stall_after`" in found.suggestion


def test_a_declared_stall_after_longer_than_the_default_is_honoured(start_run, clean_redis):
    node = started_node(start_run, 200, type="test.record", timeout=300, stall_after=120)
    _progress_stood_still(node, 60)  # past 12 beats, within 120 s

    assert detect("stalled") == []
