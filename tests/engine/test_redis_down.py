"""A dead Redis: starting a run still works, says what happens next, and loses nothing.

Uses a throwaway redis-server on a free port, never the shared one.
"""

import logging

import pytest

from bench.fault_stores import ThrowawayRedis
from diagnostics import watchdog
from workflows.models import NodeRun
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def throwaway_redis(settings, tmp_path):
    server = ThrowawayRedis(tmp_path / "redis")
    settings.REDIS_URL = server.url
    dispatch.redis_connection.cache_clear()
    yield server
    server.stop()
    dispatch.redis_connection.cache_clear()


def test_a_run_started_while_redis_is_down_is_kept_and_sent_when_redis_returns(
    throwaway_redis, start_run, caplog, tmp_path
):
    throwaway_redis.stop()

    with caplog.at_level(logging.WARNING, logger="workflows.runtime.dispatch"):
        run = start_run({"name": "Redis down", "nodes": {"only": {"type": "keel.noop"}}})

    only = NodeRun.objects.get(run=run)
    assert only.status == NodeRun.Status.QUEUED, "the database keeps the truth"
    assert "Could not reach Redis" in caplog.text
    assert "the watchdog (manage.py watchdog) enqueues them once Redis answers" in caplog.text

    throwaway_redis.start()
    NodeRun.objects.filter(pk=only.pk).update(queued_at=run.created_at.replace(year=2020))
    report = watchdog.tick()
    assert report.messages_resent == 1
    assert dispatch.missing_jobs([dispatch.job_id(only.pk, 1)]) == set()
