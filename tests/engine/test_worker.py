"""workflows/worker.py in this process: what a Keel worker does around RQ's own steps."""

import subprocess
import sys
import threading
import time

import pytest
import redis

from workflows import dispatch, heartbeat
from workflows.models import NodeAttempt, NodeRun, RunEvent
from workflows.worker import KeelSimpleWorker, _ends_within

pytestmark = pytest.mark.django_db(transaction=True)


class LosesRedisBeforeTheJob(KeelSimpleWorker):
    """RQ's bookkeeping before a job fails, as when Redis goes away at that moment."""

    def prepare_job_execution(self, job, remove_from_intermediate_queue=False):
        raise redis.exceptions.ConnectionError("Connection refused (Redis went away)")


def test_a_claimed_attempt_whose_job_rq_never_ran_is_failed_and_retried(start_run, clean_redis):
    """A simple worker claims before RQ's bookkeeping for the job. When that bookkeeping
    fails and RQ never calls the job, the attempt is reported as failed at once (and
    retried, whatever ``retry_on`` lists), not left running until the watchdog notices."""
    run = start_run(
        {
            "name": "Never started",
            "nodes": {
                "n": {
                    "type": "keel.noop",
                    "retries": {"max_attempts": 2, "backoff": 0, "retry_on": ["ValueError"]},
                }
            },
        }
    )
    worker = LosesRedisBeforeTheJob(
        [dispatch.get_queue("default")], connection=clean_redis, name="never-started"
    )
    worker.register_birth()  # as RQ's work loop does first
    job, queue = worker.dequeue_job_and_maintain_ttl(timeout=1)

    try:
        worker.execute_job(job, queue)
    finally:
        worker.teardown()  # as RQ's work loop does last: also lets the companion finish

    first = NodeAttempt.objects.get(node_run__run=run, number=1)
    assert first.status == NodeAttempt.Status.FAILED
    assert first.error_type == "JobNotStarted"
    assert "RQ failed before running the job" in first.error_message
    assert first.worker == "never-started"
    node = NodeRun.objects.get(run=run)
    assert node.attempt == 2
    assert node.status in (NodeRun.Status.QUEUED, NodeRun.Status.RETRY_WAIT)
    assert RunEvent.objects.filter(run=run, kind=RunEvent.Kind.RETRY).exists()


def test_ends_within_tells_a_quick_child_from_a_slow_one():
    """The forking worker's timed wait for its horse (``_ends_within``), on real children;
    it never reaps them (RQ does)."""
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _ends_within(quick.pid, 10.0)
        started = time.monotonic()
        assert not _ends_within(slow.pid, 0.2)
        assert time.monotonic() - started >= 0.2
        assert quick.poll() == 0 and slow.poll() is None  # both reaped here, not by the wait
    finally:
        slow.kill()
        slow.wait()


def test_a_companion_is_forked_only_between_heartbeat_beats():
    """A simple worker's heartbeat thread holds a database connection while it writes a
    beat; a companion started then (after the last one died) must wait for the beat to
    end, so that no connection (above all a SQLite one) crosses the fork."""
    beating = heartbeat.for_this_process()
    released_at = []

    def write_a_slow_beat():
        with beating._beating:
            time.sleep(0.3)
            released_at.append(time.monotonic())

    writer = threading.Thread(target=write_a_slow_beat)
    writer.start()
    time.sleep(0.05)  # the beat has begun
    with heartbeat.between_beats():
        entered_at = time.monotonic()
    writer.join()

    assert entered_at >= released_at[0]
