"""worker_unresponsive, zombie_attempt and a no_worker caused by a frozen worker: RQ worker
keys written as a worker writes them, and a real process frozen with SIGSTOP."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta

import psutil
import pytest
from django.utils import timezone
from rq.utils import utcformat

from diagnostics import detectors, watchdog
from diagnostics.models import Finding
from tests.conftest import wait_for
from workflows import engine, operations
from workflows.models import NodeAttempt, NodeRun
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

HOST = socket.gethostname()


def register_worker(
    redis, name: str, *, pid: int, beat_seconds_ago: float = 0, host: str = HOST, **fields
):
    """Write RQ's key for a worker, as RQ does (rq 2.x) at birth and at each heartbeat."""
    beat = timezone.now() - timedelta(seconds=beat_seconds_ago)
    key = f"rq:worker:{name}"
    redis.hset(
        key,
        mapping={
            "birth": utcformat(beat - timedelta(minutes=1)),
            "last_heartbeat": utcformat(beat),
            "queues": "default",
            "pid": pid,
            "hostname": host,
            "state": "busy" if fields.get("current_job") else "idle",
            **fields,
        },
    )
    redis.sadd("rq:workers", key)
    redis.expire(key, 480)


def forget_worker(redis, name: str) -> None:
    """What RQ does once a worker's key expires (worker_ttl + 60 s without a heartbeat)."""
    redis.delete(f"rq:worker:{name}")
    redis.srem("rq:workers", f"rq:worker:{name}")


def detect(code: str):
    ctx = detectors.Context(now=timezone.now())
    return [d for d in detectors.run_all(ctx, {code}).detections if d.code == code]


def open_finding(code: str, **filters) -> Finding | None:
    return Finding.objects.filter(code=code, resolved_at__isnull=True, **filters).first()


@pytest.fixture
def sleeper():
    """A real long-running process on this host, stopped at teardown whatever state it is in."""
    started = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait(timeout=10)


def status_of(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


# --- worker_unresponsive -----------------------------------------------------------------------


def test_a_worker_that_heartbeats_is_not_unresponsive(clean_redis, sleeper):
    register_worker(clean_redis, "w-fine", pid=sleeper().pid, beat_seconds_ago=1)

    assert detect("worker_unresponsive") == []


def test_a_worker_whose_rq_heartbeat_is_stale_is_unresponsive(clean_redis, sleeper):
    process = sleeper()
    register_worker(
        clean_redis, "w-quiet", pid=process.pid, beat_seconds_ago=30, current_job="keel-1-1"
    )

    [found] = detect("worker_unresponsive")

    assert found.severity == "critical"
    assert found.subject == "worker:w-quiet"
    assert found.worker == "w-quiet"
    assert found.title.startswith(
        f"Worker w-quiet on {HOST} (pid {process.pid}) is unresponsive: no RQ heartbeat since "
    )
    evidence = found.evidence
    assert (evidence["host"], evidence["pid"], evidence["queues"]) == (
        HOST,
        process.pid,
        ["default"],
    )
    assert evidence["process"] in ("sleeping", "running")
    assert evidence["current_job"] == "keel-1-1"
    assert evidence["rq_last_heartbeat"]
    assert f"`kill -9 {process.pid}`" in found.suggestion
    assert "job keel-1-1 it holds does not move" in found.suggestion
    assert found.action == {"kind": "command", "command": f"kill -9 {process.pid}"}


def test_a_worker_on_another_host_is_judged_on_its_heartbeat_alone(clean_redis):
    register_worker(clean_redis, "w-far", pid=4242, beat_seconds_ago=30, host="elsewhere")

    [found] = detect("worker_unresponsive")

    assert found.evidence["process"] == "unknown: another host (elsewhere)"
    assert "`ssh elsewhere kill -9 4242`" in found.suggestion


def test_a_worker_that_only_serves_other_queues_is_not_keel_s(clean_redis, sleeper):
    register_worker(clean_redis, "w-other", pid=sleeper().pid, beat_seconds_ago=600, queues="mail")

    assert detect("worker_unresponsive") == []


def test_a_redis_outage_is_not_read_as_every_worker_freezing(clean_redis, sleeper):
    register_worker(clean_redis, "w-through", pid=sleeper().pid, beat_seconds_ago=30)
    # Redis was unreachable until a moment ago: no worker could beat meanwhile.
    now = timezone.now()
    Finding.objects.create(
        code="redis_unhealthy",
        subject="redis:unreachable",
        severity="critical",
        title="Redis does not answer",
        suggestion="-",
        first_seen=now - timedelta(seconds=40),
        last_seen=now - timedelta(seconds=2),
        resolved_at=now - timedelta(seconds=1),
    )

    assert detect("worker_unresponsive") == []


def test_a_worker_frozen_with_sigstop_stays_found_after_rq_forgets_it(
    start_run, clean_redis, sleeper, settings
):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    process = sleeper()
    register_worker(clean_redis, "w-frozen", pid=process.pid)
    os.kill(process.pid, signal.SIGSTOP)
    wait_for(lambda: status_of(process.pid) == psutil.STATUS_STOPPED, message="it to stop")
    # It beat last 30 s ago, then nothing: what RQ's key says of a frozen worker.
    clean_redis.hset(
        "rq:worker:w-frozen",
        "last_heartbeat",
        utcformat(timezone.now() - timedelta(seconds=30)),
    )
    run = start_run({"name": "Waits", "nodes": {"n": {"type": "test.record"}}})

    watchdog.tick()

    found = open_finding("worker_unresponsive", subject="worker:w-frozen")
    assert found is not None
    assert found.evidence["process"] == "stopped (SIGSTOP?)"
    assert f"`kill -CONT {process.pid}`" in found.suggestion
    assert f"kill -9 {process.pid}" in found.suggestion
    # It does not take work: the node on its queue waits, and the fix is to restart it.
    waiting = open_finding("no_worker", subject="queue:default")
    assert waiting is not None
    assert waiting.title == (
        "No worker takes work from queue default: 1 node(s) wait; worker w-frozen "
        f"(pid {process.pid}) on this host is frozen, not gone"
    )
    assert waiting.suggestion.startswith(
        f"Worker w-frozen (pid {process.pid}) on this host is frozen, not gone: restart it"
    )
    assert "Start a worker" not in waiting.suggestion
    assert waiting.action == {"kind": "command", "command": f"kill -9 {process.pid}"}

    # RQ drops its key; the process is still here, so the finding stays open.
    forget_worker(clean_redis, "w-frozen")
    watchdog.tick()

    kept = Finding.objects.get(pk=found.pk)
    assert kept.resolved_at is None
    assert kept.last_seen > found.last_seen
    assert "RQ forgot it" in kept.title
    assert kept.evidence["rq_key_exists"] is False
    assert open_finding("no_worker", subject="queue:default").title.endswith(
        "on this host is frozen, not gone"
    )

    # Killed, it is gone for good: the finding resolves, no_worker says "start a worker".
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    watchdog.tick()

    assert Finding.objects.get(pk=found.pk).resolved_at is not None
    assert open_finding("no_worker", subject="queue:default").title == (
        "No worker listens to queue default: 1 node(s) wait"
    )
    operations.cancel_run(run.pk, actor="test", reason="done")


# --- zombie_attempt ----------------------------------------------------------------------------


def claimed(start_run, worker: str, pid: int) -> NodeRun:
    run = start_run(
        {
            "name": f"Zombie {time.monotonic_ns()}",
            "nodes": {"n": {"type": "test.record", "retries": {"max_attempts": 3}}},
        }
    )
    node = NodeRun.objects.get(run=run)
    assert engine.claim_attempt(node.pk, 1, worker=worker, pid=pid, host=HOST)
    return node


def backdate_end(node: NodeRun, seconds: float) -> None:
    """As if attempt 1 had ended (or been superseded) ``seconds`` ago."""
    when = timezone.now() - timedelta(seconds=seconds)
    NodeAttempt.objects.filter(node_run=node, number=1, finished_at__isnull=False).update(
        finished_at=when
    )
    NodeAttempt.objects.filter(node_run=node, number__gt=1).update(created_at=when)


def test_a_worker_still_running_a_retried_attempt_is_a_zombie(start_run, clean_redis, settings):
    settings.KEEL_KILL_GRACE_SECONDS = 5
    horse = os.getppid()  # any live process of this host stands for the old attempt's horse
    node = claimed(start_run, "w-zombie", horse)
    job = dispatch.job_id(node.pk, 1)
    register_worker(clean_redis, "w-zombie", pid=os.getpid(), current_job=job)
    operations.retry_node(node.run_id, "n", actor="op", reason="stuck")
    backdate_end(node, 12)  # past the grace of 5 s + 5 s

    [found] = detect("zombie_attempt")

    assert found.severity == "critical"
    assert found.subject == f"worker:w-zombie:{job}"
    assert found.title.startswith(
        f"Worker w-zombie on {HOST} (pid {horse}) still runs attempt 1 of node n "
        f"(run {node.run_id}), "
    )
    assert found.title.endswith(": it holds the worker, nothing else runs on it")
    assert f"`kill -9 {horse}`" in found.suggestion
    assert "restart the worker service" in found.suggestion
    assert 'Runbook: "worker process alive but not taking work"' in found.suggestion
    evidence = found.evidence
    assert (evidence["worker"], evidence["host"], evidence["pid"]) == ("w-zombie", HOST, horse)
    assert evidence["node_attempt"] == 2
    assert timezone.now() - datetime.fromisoformat(evidence["since"]) >= timedelta(seconds=12)
    assert found.action == {"kind": "command", "command": f"kill -9 {horse}"}
    assert (found.run_id, found.node_run_id, found.worker) == (node.run_id, node.pk, "w-zombie")


def test_a_cancelled_attempt_still_held_names_how_it_ended(start_run, clean_redis):
    node = claimed(start_run, "w-cancel", os.getppid())
    register_worker(
        clean_redis, "w-cancel", pid=os.getpid(), current_job=dispatch.job_id(node.pk, 1)
    )
    operations.cancel_run(node.run_id, actor="op", reason="not needed")
    backdate_end(node, 30)

    [found] = detect("zombie_attempt")

    assert "still runs attempt 1 of node n" in found.title
    assert re.search(r", ended \(cancelled\) at \d\d:\d\d:\d\d: it holds the worker", found.title)
    assert found.evidence["how_it_ended"] == "ended (cancelled)"


def test_within_the_kill_grace_the_worker_is_still_stopping_it(start_run, clean_redis, settings):
    settings.KEEL_KILL_GRACE_SECONDS = 5
    node = claimed(start_run, "w-stopping", os.getppid())
    register_worker(
        clean_redis, "w-stopping", pid=os.getpid(), current_job=dispatch.job_id(node.pk, 1)
    )
    operations.retry_node(node.run_id, "n", actor="op", reason="stuck")
    backdate_end(node, 8)  # under 5 s + 5 s

    assert detect("zombie_attempt") == []


def test_a_worker_running_the_current_attempt_is_no_zombie(start_run, clean_redis):
    node = claimed(start_run, "w-busy", os.getppid())
    register_worker(clean_redis, "w-busy", pid=os.getpid(), current_job=dispatch.job_id(node.pk, 1))

    assert detect("zombie_attempt") == []
