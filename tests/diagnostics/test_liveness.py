"""Who is alive, for worker_lost, heartbeat_stale and job_lost: an attempt is never
called lost while its process runs (this host) or its worker heartbeats to RQ and still
runs its job, and a heartbeat nobody could write (the database was down) is not silence."""

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from rq.utils import utcformat

from diagnostics import detectors
from diagnostics.models import Finding
from workflows import engine
from workflows.models import NodeRun
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

HOST = socket.gethostname()


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def silent_node(start_run, *, pid: int, host: str = HOST, worker: str = "w-1", beat_ago=20):
    """A node claimed by ``pid`` on ``host`` whose last heartbeat was ``beat_ago`` s ago."""
    run = start_run(
        {"name": f"Alive {time.monotonic_ns()}", "nodes": {"n": {"type": "test.record"}}}
    )
    node = NodeRun.objects.get(run=run)
    assert engine.claim_attempt(node.pk, 1, worker=worker, pid=pid, host=host)
    beat = timezone.now() - timedelta(seconds=beat_ago)
    NodeRun.objects.filter(pk=node.pk).update(heartbeat_at=beat)
    return NodeRun.objects.get(pk=node.pk)


def outage(ended_seconds_ago: float, lasted: float = 30) -> None:
    """The database was unreachable until ``ended_seconds_ago``, as the watchdog records
    it once it answers again (diagnostics/watchdog.py)."""
    end = timezone.now() - timedelta(seconds=ended_seconds_ago)
    Finding.objects.create(
        code="db_unhealthy",
        subject="database:unreachable",
        severity="critical",
        title="PostgreSQL database unreachable",
        suggestion="-",
        first_seen=end - timedelta(seconds=lasted),
        last_seen=end,
        resolved_at=end,
    )


def detect(code: str, now=None):
    ctx = detectors.Context(now=now or timezone.now())
    return [d for d in detectors.run_all(ctx, {code}).detections if d.code == code]


def register_worker(redis, name: str, *, current_job: str = "", beat_ago: float = 0):
    """RQ's key for a worker on another host, as RQ writes it (rq 2.x)."""
    key = f"rq:worker:{name}"
    beat = utcformat(timezone.now() - timedelta(seconds=beat_ago))
    redis.hset(
        key,
        mapping={
            "birth": beat,
            "last_heartbeat": beat,
            "queues": "default",
            "pid": 4242,
            "hostname": "elsewhere",
            "state": "busy",
            "current_job": current_job,
        },
    )
    redis.sadd("rq:workers", key)


# --- heartbeats nobody could write -----------------------------------------------------------


def test_heartbeat_age_counts_from_the_end_of_the_last_outage(start_run, clean_redis):
    node = silent_node(start_run, pid=os.getpid(), beat_ago=20)
    assert detect("heartbeat_stale"), "20 s without a beat is stale (3 beats of 1 s)"

    outage(ended_seconds_ago=1)

    assert detect("heartbeat_stale") == [], "nothing could beat until a second ago"
    later = detect("heartbeat_stale", now=timezone.now() + timedelta(seconds=5))
    assert len(later) == 1
    beat = timezone.localtime(NodeRun.objects.get(pk=node.pk).heartbeat_at)
    assert f"has sent no heartbeat since {beat:%H:%M:%S}, none since the database " in (
        later[0].title
    )
    assert later[0].evidence["heartbeat_age_counted_from"]
    assert later[0].node_run_id == node.pk


def test_a_dead_process_is_not_lost_until_it_missed_beats_after_the_outage(start_run, clean_redis):
    silent_node(start_run, pid=dead_pid(), beat_ago=20)
    assert detect("worker_lost"), "gone, and silent for 20 s"

    outage(ended_seconds_ago=0.5)

    assert detect("worker_lost") == []


# --- who is alive ----------------------------------------------------------------------------


def test_never_lost_while_its_worker_heartbeats_to_rq_and_runs_its_job(start_run, clean_redis):
    node = silent_node(start_run, pid=4242, host="elsewhere", worker="w-far", beat_ago=20)
    job = dispatch.job_id(node.pk, 1)
    register_worker(clean_redis, "w-far", current_job=job)
    clean_redis.hset(f"rq:job:{job}", "status", "finished")  # RQ's word, not the truth

    assert detect("worker_lost") == []
    [stale] = detect("heartbeat_stale")
    assert "is running but has sent no heartbeat since " in stale.title


def test_a_worker_that_moved_on_is_not_called_gone(start_run, clean_redis):
    node = silent_node(start_run, pid=4242, host="elsewhere", worker="w-on", beat_ago=20)
    job = dispatch.job_id(node.pk, 1)
    register_worker(clean_redis, "w-on", current_job="keel-999999-1")
    clean_redis.hset(f"rq:job:{job}", "status", "failed")

    [lost] = detect("worker_lost")

    assert lost.title == (
        f"The process running node n of run {node.run_id} (pid 4242 on elsewhere) is gone; "
        "its worker w-on is still up"
    )
    assert "is gone" not in lost.title.split(";")[1]


def test_a_worker_rq_no_longer_knows_is_gone(start_run, clean_redis):
    node = silent_node(start_run, pid=4242, host="elsewhere", worker="w-gone", beat_ago=20)

    [lost] = detect("worker_lost")

    assert lost.title == f"Worker w-gone running node n of run {node.run_id} is gone"
    assert "RQ has no key for worker w-gone" in lost.evidence["why_lost"]


# --- job_lost's words --------------------------------------------------------------------------


def test_job_lost_says_the_worker_heartbeats_only_when_it_is_alive(start_run, clean_redis):
    alive = silent_node(start_run, pid=os.getpid(), beat_ago=0.5)
    dead = silent_node(start_run, pid=dead_pid(), beat_ago=0.5)
    for node in (alive, dead):
        clean_redis.delete(f"rq:job:{dispatch.job_id(node.pk, 1)}")  # Redis lost them

    found = {d.node_run_id: d for d in detect("job_lost")}

    assert found[alive.pk].severity == "info"
    assert "the worker keeps heartbeating" in found[alive.pk].suggestion
    assert found[dead.pk].severity == "warning"
    assert "nothing shows its worker is still running it" in found[dead.pk].title
    assert "keeps heartbeating" not in found[dead.pk].suggestion
    assert found[dead.pk].repair is None, "not silent long enough to be called lost yet"
