"""The workers listing (diagnostics/workers.py) and ``manage.py workers``: a real busy worker,
RQ worker keys written as RQ writes them, Redis down, and bounded reads."""

import io
import json
import os
import socket
import uuid
from pathlib import Path

import psutil
import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from diagnostics import workers
from tests.conftest import wait_for
from tests.diagnostics.test_system_report import unreachable_redis
from tests.diagnostics.test_worker_findings import register_worker
from workflows import engine
from workflows.models import NodeAttempt, NodeRun

pytestmark = pytest.mark.django_db(transaction=True)

HOST = socket.gethostname()
LONG = {
    "name": "Long",
    "nodes": {
        "long": {
            "type": "test.sleep_first",
            "params": {"seconds": 600},
            "timeout": 900,
            "retries": {"max_attempts": 3},
        },
    },
}
WIDE = {"name": "Wide", "nodes": {f"n{i}": {"type": "test.record"} for i in range(12)}}


def running_attempt(run) -> NodeAttempt:
    return wait_for(
        lambda: NodeAttempt.objects.filter(
            node_run__run=run, status=NodeAttempt.Status.RUNNING
        ).first(),
        message="the long node to run",
    )


def row(listing: workers.WorkerList, name: str) -> workers.Worker:
    [found] = [worker for worker in listing.workers if worker.name == name]
    return found


def systemd_name(instance: int) -> str:
    return f"{HOST}-{instance}-{uuid.uuid4().hex}"


class CountingRedis(redis.Redis):
    """A real client that counts round trips: each command, and each pipeline sent."""

    trips = 0

    def execute_command(self, *args, **options):
        self.trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        send = pipe.execute

        def execute(raise_on_error=True):
            self.trips += 1
            return send(raise_on_error)

        pipe.execute = execute
        return pipe


@pytest.mark.workers
def test_a_busy_worker_shows_what_it_runs_since_when_and_its_counts(start_worker, start_run):
    worker = start_worker()
    quick = start_run({"name": "Quick", "nodes": {"q": {"type": "test.record"}}})
    wait_for(
        lambda: NodeRun.objects.filter(run=quick, status="succeeded").exists(),
        message="the quick node to succeed",
    )
    run = start_run(LONG)
    attempt = running_attempt(run)
    node = NodeRun.objects.get(run=run)

    listing = wait_for(
        lambda: (
            (found := workers.list_workers()) and row(found, worker.name).state == "busy" and found
        ),
        message="RQ to say the worker is busy",
    )

    busy = row(listing, worker.name)
    assert (busy.host, busy.pid, busy.queues) == (HOST, worker.pid, ["high", "default", "low"])
    assert busy.current_job == f"keel-{node.pk}-1"
    current = busy.current
    assert (current.run_id, current.node_key, current.attempt) == (run.pk, "long", 1)
    assert (current.node_status, current.attempt_status, current.running) == (
        "running",
        "running",
        True,
    )
    assert current.workflow == "long"
    assert current.url == f"/runs/{run.pk}/?node=long"
    assert busy.since == attempt.started_at
    assert busy.last_heartbeat is not None and busy.birth is not None
    assert (busy.successful_jobs, busy.failed_jobs) == (1, 0)
    assert busy.can_stop_current
    # A name of the tests' own, and no devstack here: nothing says how often it restarted.
    assert busy.restarts.count is None and busy.restarts.note.startswith("unknown")
    assert listing.counts["busy"] == 1 and listing.error == ""
    assert listing.as_dict()["workers"][0]["current"]["node_key"] == "long"

    # Once stopped, the node is failed in the database at once; the worker lets go of it.
    engine.stop_node(run.pk, "long", actor="olga", reason="enough")
    idle = wait_for(
        lambda: (found := row(workers.list_workers(), worker.name)).state == "idle" and found,
        message="the worker to be idle again",
    )
    assert idle.current is None and idle.since is None
    assert (idle.successful_jobs, idle.failed_jobs) == (1, 1)
    assert not psutil.Process(worker.pid).children()


def test_the_states_dead_unresponsive_suspended_and_idle(clean_redis, db):
    gone = psutil.Popen(["true"])
    gone.wait()
    register_worker(clean_redis, "w-dead", pid=gone.pid)
    register_worker(clean_redis, "w-frozen", pid=os.getpid(), beat_seconds_ago=60)
    register_worker(clean_redis, "w-paused", pid=os.getpid(), state="suspended")
    register_worker(clean_redis, "w-waiting", pid=os.getpid())
    register_worker(clean_redis, "w-stray", pid=os.getpid(), current_job="not-keel-42")

    listing = workers.list_workers()

    states = {worker.name: worker.state for worker in listing.workers}
    assert states == {
        "w-dead": "dead",
        "w-frozen": "unresponsive",
        "w-paused": "suspended",
        "w-waiting": "idle",
        "w-stray": "busy",
    }
    assert row(listing, "w-stray").current is None  # not a Keel job: shown as RQ has it
    assert listing.counts == {"dead": 1, "unresponsive": 1, "busy": 1, "suspended": 1, "idle": 1}
    assert [worker.name for worker in listing.workers] == sorted(states)


def test_reads_are_bounded_whatever_the_number_of_workers(clean_redis, start_run):
    run = start_run(WIDE)
    node_runs = list(NodeRun.objects.filter(run=run).order_by("id"))

    def register(first: int, end: int) -> None:
        for index, node in enumerate(node_runs[first:end], start=first):
            name = systemd_name(index)
            assert engine.claim_attempt(node.pk, 1, worker=name, pid=os.getpid(), host=HOST)
            register_worker(clean_redis, name, pid=os.getpid(), current_job=f"keel-{node.pk}-1")

    def measure() -> tuple[int, int, workers.WorkerList]:
        client = CountingRedis.from_url(settings.REDIS_URL)
        with CaptureQueriesContext(connection) as queries:
            listing = workers.list_workers(client)
        return client.trips, len(queries), listing

    register(0, 2)
    few = measure()
    register(2, 12)
    many = measure()

    assert len(few[2].workers) == 2 and len(many[2].workers) == 12
    assert all(worker.current and worker.current.running for worker in many[2].workers)
    # One sweep inside Redis, one pipeline of hashes; the attempts, then the slots' history.
    assert few[:2] == many[:2] == (2, 2)


def test_a_limit_reads_the_workers_that_matter_first_and_counts_the_rest(clean_redis, db):
    for index in range(6):
        register_worker(clean_redis, f"w-idle-{index}", pid=os.getpid(), host="elsewhere")
    register_worker(clean_redis, "w-quiet", pid=4242, host="elsewhere", beat_seconds_ago=60)

    listing = workers.list_workers(limit=3)

    assert len(listing.workers) == 3 and listing.registered == 7 and listing.hidden == 4
    assert "w-quiet" in [worker.name for worker in listing.workers]


def test_restarts_of_a_systemd_slot_count_its_earlier_workers_as_a_lower_bound(
    clean_redis, start_run
):
    slot = f"{HOST}-3"
    live = f"{slot}-{uuid.uuid4().hex}"
    crashed = f"{slot}-{uuid.uuid4().hex}"  # RQ still lists it: killed minutes ago
    ran_a_node = f"{slot}-{uuid.uuid4().hex}"  # forgotten by RQ, but it ran a node
    elsewhere = f"{HOST}-4-{uuid.uuid4().hex}"  # another slot
    run = start_run({"name": "Earlier", "nodes": {"a": {"type": "test.record"}}})
    node = NodeRun.objects.get(run=run)
    engine.claim_attempt(node.pk, 1, worker=ran_a_node, pid=1, host=HOST)
    engine.complete_attempt(node.pk, 1, {})
    dead = psutil.Popen(["true"])
    dead.wait()
    register_worker(clean_redis, live, pid=os.getpid())
    register_worker(clean_redis, crashed, pid=dead.pid)
    register_worker(clean_redis, elsewhere, pid=os.getpid())

    listing = workers.list_workers()

    restarts = row(listing, live).restarts
    assert (restarts.count, restarts.exact, restarts.source) == (2, False, "worker names")
    assert restarts.note.startswith(f"at least 2 earlier worker(s) of {slot} in the last 1 h")
    assert row(listing, elsewhere).restarts.count == 0
    assert row(listing, crashed).restarts.count is None  # the live one counts for its slot


def test_restarts_of_a_worker_devstack_supervises_are_devstacks_count(clean_redis, db):
    register_worker(clean_redis, "w-supervised", pid=os.getpid())
    record = Path(settings.VAR_DIR) / "supervisor.json"
    record.write_text(
        json.dumps(
            {
                "supervisor": "devstack",
                "pid": os.getpid(),
                "pid_started": psutil.Process().create_time(),
                "host": HOST,
                "processes": [
                    {"name": "worker", "pid": os.getpid(), "state": "running", "restarts": 3}
                ],
            }
        )
    )
    try:
        restarts = row(workers.list_workers(), "w-supervised").restarts
    finally:
        record.unlink()

    assert (restarts.count, restarts.exact, restarts.source) == (3, True, "devstack")


def test_redis_down_is_said_not_raised(db):
    listing = workers.list_workers(unreachable_redis())

    assert listing.workers == [] and listing.registered is None
    assert "ConnectionError" in listing.error


# --- manage.py workers ------------------------------------------------------------------------


def test_the_command_prints_a_table_and_json(clean_redis, start_run):
    run = start_run({"name": "Held", "nodes": {"held": {"type": "test.record"}}})
    node = NodeRun.objects.get(run=run)
    engine.claim_attempt(node.pk, 1, worker="w-busy", pid=os.getpid(), host=HOST)
    register_worker(clean_redis, "w-busy", pid=os.getpid(), current_job=f"keel-{node.pk}-1")
    register_worker(clean_redis, "w-idle", pid=os.getpid())

    out = io.StringIO()
    call_command("workers", stdout=out)
    text = out.getvalue()
    assert text.startswith("2 worker(s): 1 busy, 1 idle")
    [busy] = [line for line in text.splitlines() if line.startswith("w-busy")]
    assert f"run {run.pk} held #1" in busy and HOST in busy and str(os.getpid()) in busy
    assert "default" in busy and "busy" in busy

    out = io.StringIO()
    call_command("workers", "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert (data["registered"], data["shown"], data["hidden"], data["error"]) == (2, 2, 0, "")
    [busy] = [worker for worker in data["workers"] if worker["name"] == "w-busy"]
    assert busy["current"]["run_id"] == run.pk and busy["current"]["running"] is True
    assert busy["restarts"]["count"] is None


def test_the_command_says_when_no_worker_is_registered(clean_redis, db):
    out = io.StringIO()
    call_command("workers", stdout=out)
    assert "No worker is registered" in out.getvalue()


def test_the_command_fails_clearly_when_redis_is_down(settings, db):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.REDIS_URL = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    with pytest.raises(CommandError, match=r"Redis could not be read .*manage\.py doctor"):
        call_command("workers", stdout=io.StringIO())
