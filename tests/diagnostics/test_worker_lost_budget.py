"""worker_lost counts the attempts left from the last operator reset, as the engine does."""

import socket
from datetime import timedelta

import pytest
from django.utils import timezone

from diagnostics import detectors
from tests.operations.test_operations import work
from workflows import engine, operations
from workflows.models import NodeRun

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_lost_attempt_after_a_reset_still_has_its_retries(start_run, clean_redis):
    run = start_run(
        {"name": "Budget", "nodes": {"n": {"type": "test.effect", "retries": {"max_attempts": 2}}}}
    )
    work(run, "n", fail="ValueError")  # not retryable: the node failed at attempt 1
    operations.retry_node(run.pk, "n", actor="op", reason="fixed")  # a fresh budget from attempt 2
    node = NodeRun.objects.get(run=run)
    # Attempt 2 claimed by a process that no longer exists on this host, silent for a while.
    assert engine.claim_attempt(
        node.pk, node.attempt, worker="ghost", pid=2**22 + 7, host=socket.gethostname()
    )
    NodeRun.objects.filter(pk=node.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))

    found = [
        d
        for d in detectors.run_all(detectors.Context(now=timezone.now())).detections
        if d.code == "worker_lost"
    ]

    assert len(found) == 1
    assert "(1 attempt(s) left)" in found[0].suggestion
