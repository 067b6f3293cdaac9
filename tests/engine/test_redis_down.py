"""A dead Redis: starting a run still works, says what happens next, and loses nothing.

Uses a throwaway redis-server on a free port, never the shared one.
"""

import logging
import socket
import subprocess
import time

import pytest
import redis

from config.embedded_redis import redis_server_binary
from diagnostics import watchdog
from workflows import dispatch
from workflows.models import NodeRun

pytestmark = pytest.mark.django_db(transaction=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, directory) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                return process
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("throwaway redis-server did not start")


@pytest.fixture
def throwaway_redis(settings, tmp_path):
    port = free_port()
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    dispatch.redis_connection.cache_clear()
    holder = {"process": start_redis(port, tmp_path), "port": port}
    yield holder
    holder["process"].kill()
    holder["process"].wait()
    dispatch.redis_connection.cache_clear()


def test_a_run_started_while_redis_is_down_is_kept_and_sent_when_redis_returns(
    throwaway_redis, start_run, caplog, tmp_path
):
    throwaway_redis["process"].kill()
    throwaway_redis["process"].wait()

    with caplog.at_level(logging.WARNING, logger="workflows.dispatch"):
        run = start_run({"name": "Redis down", "nodes": {"only": {"type": "keel.noop"}}})

    only = NodeRun.objects.get(run=run)
    assert only.status == NodeRun.Status.QUEUED, "the database keeps the truth"
    assert "Could not reach Redis" in caplog.text
    assert "the watchdog (manage.py watchdog) enqueues them once Redis answers" in caplog.text

    throwaway_redis["process"] = start_redis(throwaway_redis["port"], tmp_path)
    NodeRun.objects.filter(pk=only.pk).update(queued_at=run.created_at.replace(year=2020))
    report = watchdog.tick()
    assert report.messages_resent == 1
    assert dispatch.missing_jobs([dispatch.job_id(only.pk, 1)]) == set()
