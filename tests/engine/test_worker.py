"""workflows/worker.py in this process: what a Keel worker does around RQ's own steps."""

import os
import subprocess
import sys
import time

import pytest
import redis

from workflows.models import NodeAttempt, NodeRun
from workflows.runtime import dispatch
from workflows.runtime.worker import KeelSimpleWorker, _EndOf, describe_status

pytestmark = pytest.mark.django_db(transaction=True)


class LosesRedisBeforeTheJob(KeelSimpleWorker):
    """RQ's bookkeeping before a job fails, as when Redis goes away at that moment."""

    def prepare_job_execution(self, job, remove_from_intermediate_queue=False):
        raise redis.exceptions.ConnectionError("Connection refused (Redis went away)")


def test_a_worker_whose_redis_fails_before_a_job_keeps_going_and_claims_nothing(
    start_run, clean_redis
):
    """RQ's own worker quits on such an error. A Keel worker logs it and goes on; the
    node was never claimed, so it stays queued for the watchdog to send again."""
    run = start_run({"name": "Never started", "nodes": {"n": {"type": "keel.noop"}}})
    worker = LosesRedisBeforeTheJob(
        [dispatch.get_queue("default")], connection=clean_redis, name="never-started"
    )
    worker.register_birth()  # as RQ's work loop does first
    job, queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
    try:
        worker.execute_job(job, queue)  # does not raise
    finally:
        worker.teardown()

    node = NodeRun.objects.get(run=run)
    assert (node.status, node.attempt) == (NodeRun.Status.QUEUED, 1)
    assert NodeAttempt.objects.get(node_run=node).status == NodeAttempt.Status.QUEUED


def test_end_of_tells_a_quick_child_from_a_slow_one_and_reaps_it():
    """The forking worker's bounded wait for its horse (``_EndOf``), on real children."""
    quick = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with _EndOf(quick.pid) as end:
            assert end.ended_within(10.0)
        assert describe_status(end.status) == "exited with code 3"
        with _EndOf(slow.pid) as end:
            started = time.monotonic()
            assert not end.ended_within(0.2)
            assert time.monotonic() - started >= 0.2
            os.kill(slow.pid, 9)
            assert end.ended_within(10.0)
        assert describe_status(end.status) == "killed by SIGKILL"
    finally:
        slow.kill()
