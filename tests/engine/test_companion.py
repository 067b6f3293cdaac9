"""A Keel worker's database companion (workflows/companion.py), in real worker processes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from django.db import connection

from tests.conftest import BASE_DIR, WORKER_CLASSES, finished, subprocess_env, wait_for
from workflows.models import NodeAttempt, NodeRun, Run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

CHAIN = {
    "name": "Companion chain",
    "nodes": {
        "a": {"type": "keel.noop"},
        "b": {"type": "keel.noop", "after": ["a"]},
    },
}


def holds_the_database(pid: int) -> bool:
    """Whether process ``pid`` has a connection to the test database open."""
    process = psutil.Process(pid)
    if connection.vendor == "sqlite":
        database = Path(connection.settings_dict["NAME"]).resolve()
        return any(Path(opened.path) == database for opened in process.open_files())
    port = int(connection.settings_dict.get("PORT") or 5432)
    return any(
        sock.raddr and sock.raddr.port == port for sock in process.net_connections(kind="inet")
    )


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_the_companion_claims_and_reports_while_the_worker_holds_no_connection(
    kind, start_worker, start_run
):
    worker = start_worker(kind)

    run = finished(start_run(CHAIN))

    assert run.status == Run.Status.SUCCEEDED
    companion = worker.companion_pid()
    assert companion is not None
    assert psutil.Process(companion).ppid() == worker.pid
    # The worker forks its horses with no connection; the companion keeps one, warm. (A
    # simple worker opens one of its own only for a node that asks for it.)
    assert not holds_the_database(worker.pid)
    assert holds_the_database(companion)
    # The claims name the worker (the process that asked for them), not the companion.
    assert set(NodeAttempt.objects.filter(node_run__run=run).values_list("worker", "pid")) == {
        (worker.name, worker.pid)
    }


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_a_companion_that_died_is_replaced_at_the_next_node(kind, start_worker, start_run):
    worker = start_worker(kind)
    assert finished(start_run(CHAIN)).status == Run.Status.SUCCEEDED
    first = worker.companion_pid()

    os.kill(first, signal.SIGKILL)
    run = finished(start_run(CHAIN))

    assert run.status == Run.Status.SUCCEEDED
    second = wait_for(worker.companion_pid, message="a new companion")
    assert second != first
    assert f"Database companion (pid {first}): it had ended" in worker.log()


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_ctrl_c_lets_the_companion_report_the_node_the_worker_finishes(
    kind, start_worker, start_run
):
    """At Ctrl-C the terminal signals the worker's whole process group, the companion
    too. The worker finishes its node (RQ's warm shutdown); the companion, which
    ignores the signal, is still there to report it, and ends with the worker."""
    worker = start_worker(kind)
    run = start_run(
        {
            "name": "Ctrl-C",
            "nodes": {"slow": {"type": "test.cooperative_sleep", "params": {"seconds": 2}}},
        }
    )
    wait_for(
        lambda: NodeAttempt.objects.filter(
            node_run__run=run, status=NodeAttempt.Status.RUNNING
        ).exists(),
        message="the node to start",
    )
    companion = worker.companion_pid()

    os.kill(companion, signal.SIGINT)
    os.kill(worker.pid, signal.SIGINT)

    assert worker.process.wait(timeout=30) == 0
    run = finished(run, timeout=5)
    assert run.status == Run.Status.SUCCEEDED
    # The worker reaped its companion on the way out.
    assert not psutil.pid_exists(companion)


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_a_burst_worker_waits_for_the_report_that_queues_the_next_node(
    kind, clean_redis, start_run, tmp_path
):
    """The companion reports while the worker moves on; a burst worker, which stops at
    its first look at empty queues, looks only once the last report (which queued the
    next node of the chain) is done, so it runs the whole chain."""
    run = start_run(
        {
            "name": "Burst chain",
            "nodes": {
                "a": {"type": "keel.noop"},
                "b": {"type": "keel.noop", "after": ["a"]},
                "c": {"type": "keel.noop", "after": ["b"]},
                "d": {"type": "keel.noop", "after": ["c"]},
            },
        }
    )
    log = tmp_path / "burst.log"

    worker = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "rqworker",
            "high",
            "default",
            "low",
            "--burst",
            "--worker-class",
            WORKER_CLASSES[kind],
        ],
        cwd=BASE_DIR,
        env=subprocess_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        timeout=120,
        check=False,
    )

    assert worker.returncode == 0, log.read_text()
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, log.read_text()
    assert set(NodeRun.objects.filter(run=run).values_list("status", flat=True)) == {
        NodeRun.Status.SUCCEEDED
    }
