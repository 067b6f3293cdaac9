"""The watchdog tick: findings upserted and resolved, safe repairs, locking, the command."""

import signal
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from diagnostics import health, watchdog
from diagnostics.models import Finding
from tests.conftest import BASE_DIR, finished, subprocess_env, wait_for
from tests.testapp.models import Execution
from workflows import operations
from workflows.models import NodeAttempt, NodeRun, Run, RunEvent
from workflows.runtime import dispatch

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

SINGLE = {"name": "Single", "nodes": {"only": {"type": "test.record"}}}


def only(run) -> NodeRun:
    return NodeRun.objects.get(run=run, node_key="only")


def backdate_queued(run):
    """As if the node had been queued 6 s ago: past the re-send grace of 5 s."""
    NodeRun.objects.filter(run=run).update(queued_at=timezone.now() - timedelta(seconds=6))


def finding_events(run) -> list[str]:
    return [
        event.after["state"]
        for event in RunEvent.objects.filter(run=run, kind=RunEvent.Kind.FINDING).order_by("id")
    ]


def test_a_queued_node_whose_job_is_gone_is_found_resent_and_resolved(
    start_worker, start_run, clean_redis
):
    run = start_run(SINGLE)
    job_id = dispatch.job_id(only(run).pk, 1)
    clean_redis.delete(f"rq:job:{job_id}", "rq:queue:default")
    backdate_queued(run)

    report = watchdog.tick()

    finding = Finding.objects.get(code="job_lost", run=run)
    assert f"job_lost node_run:{only(run).pk}:1: {finding.title}" in report.opened
    assert finding.title == f"Node only of run {run.pk} is queued but RQ will never run it"
    assert finding.evidence["rq_job_status"] == "missing"
    assert finding.repaired_at is not None
    assert finding.repair == f"sent job {job_id} to queue default again"
    assert report.messages_resent == 1

    start_worker()
    assert finished(run).status == Run.Status.SUCCEEDED
    watchdog.tick()
    finding.refresh_from_db()
    assert finding.resolved_at is not None and finding.resolved_at >= finding.repaired_at
    assert finding_events(run) == ["open", "repaired", "resolved"]
    assert Execution.objects.filter(run_id=run.pk).count() == 1


def test_a_queued_node_whose_job_rq_ended_unrun_is_sent_again(start_worker, start_run, clean_redis):
    run = start_run(SINGLE)
    job_id = dispatch.job_id(only(run).pk, 1)
    # RQ gave up on the job (a worker died between taking it and claiming the node).
    job = Job.fetch(job_id, connection=clean_redis, serializer=JSONSerializer)
    dispatch.get_queue("default").remove(job)
    job.set_status(JobStatus.FAILED)
    backdate_queued(run)

    watchdog.tick()

    finding = Finding.objects.get(code="job_lost", run=run)
    assert finding.evidence["rq_job_status"] == "failed"
    assert f"RQ ended job {job_id} as failed" in finding.evidence["why"]
    assert finding.repaired_at is not None
    start_worker()
    assert finished(run).status == Run.Status.SUCCEEDED
    assert Execution.objects.filter(run_id=run.pk).count() == 1


def test_first_seen_is_kept_and_last_seen_moves(start_run, settings):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    start_run(SINGLE)

    watchdog.tick()
    first = Finding.objects.get(code="no_worker")
    # As if the first tick had been a second ago: the second tick must move last_seen on.
    Finding.objects.filter(pk=first.pk).update(last_seen=first.last_seen - timedelta(seconds=1))
    watchdog.tick()

    again = Finding.objects.get(code="no_worker")
    assert again.pk == first.pk
    assert again.first_seen == first.first_seen
    assert again.last_seen > first.last_seen - timedelta(seconds=1)
    assert again.resolved_at is None


def test_a_second_watchdog_skips_while_one_holds_the_lock(clean_redis):
    lock = clean_redis.lock(watchdog.LOCK_NAME, timeout=10)
    assert lock.acquire(blocking=False)
    try:
        assert watchdog.tick().acted is False
    finally:
        lock.release()
    assert watchdog.tick().acted is True


def test_two_watchdogs_acting_at_once_repair_a_lost_attempt_once(start_worker, start_run):
    worker = start_worker("forking")
    run = start_run(
        {
            "name": "Race",
            "nodes": {
                "only": {
                    "type": "test.cooperative_sleep",
                    "params": {"seconds": 30},
                    "retries": {"max_attempts": 2, "backoff": 60},
                }
            },
        }
    )
    wait_for(lambda: only(run).status == NodeRun.Status.RUNNING, message="running")
    worker.kill_hard()
    # Two beats without a heartbeat from a process that is gone, without waiting for them.
    NodeRun.objects.filter(pk=only(run).pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=2)
    )

    # Both act without the lock (as when Redis is down): the engine's compare-and-set
    # lets exactly one of them end the attempt.
    barrier = threading.Barrier(2)
    reports, errors = [], []

    def act():
        try:
            barrier.wait()
            reports.append(watchdog._act())
        except Exception as error:  # a deadlock or any other error fails the test, below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=act) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sum(len(report.repairs) for report in reports) == 1
    attempt = NodeAttempt.objects.get(node_run=only(run), number=1)
    assert attempt.status == NodeAttempt.Status.ABANDONED
    assert only(run).status == NodeRun.Status.RETRY_WAIT
    assert RunEvent.objects.filter(run=run, kind=RunEvent.Kind.RETRY).count() == 1
    finding = Finding.objects.get(code="worker_lost", run=run)
    assert finding.repair.startswith("ended attempt 1 (worker lost: its process is gone")
    assert "attempt 2 of 2 due at" in finding.repair
    operations.cancel_run(run.pk, actor="test", reason="done")


def test_watchdog_once_prints_what_it_did(start_run, settings, capsys):
    settings.KEEL_NO_WORKER_GRACE_SECONDS = 0
    start_run(SINGLE)

    call_command("watchdog", "--once")

    out = capsys.readouterr().out
    assert "findings opened: 1" in out
    assert "opened   no_worker queue:default: No worker listens to queue default" in out


def test_the_watchdog_freezes_what_it_built_at_start(transactional_db, clean_redis):
    import gc

    gc.unfreeze()  # another test's command may have frozen this process already
    try:
        call_command("watchdog", "--once")
        assert gc.get_freeze_count() > 0, "startup objects left out of the ticks' collections"
    finally:
        gc.unfreeze()


def test_the_watchdog_loop_stops_cleanly_on_sigterm(transactional_db, clean_redis, tmp_path):
    log = tmp_path / "watchdog.log"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "watchdog", "--interval", "1"],
        cwd=BASE_DIR,
        env=subprocess_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "one tick every 1s" in log.read_text(), message="the watchdog to start")
        # Stop it once it has ticked (its heartbeat key says so), between two ticks.
        wait_for(lambda: health.watchdog_status()["alive"], message="the watchdog's first tick")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert log.read_text().rstrip().endswith("watchdog stopped")
    assert "tick failed" not in log.read_text()


@pytest.mark.django_db(transaction=True)
def test_every_tick_says_the_watchdog_is_alive_for_a_few_intervals(clean_redis):
    from diagnostics.health import WATCHDOG_HEARTBEAT_KEY

    watchdog.tick(interval=2)
    assert clean_redis.get(WATCHDOG_HEARTBEAT_KEY)
    assert 0 < clean_redis.ttl(WATCHDOG_HEARTBEAT_KEY) <= 16


@pytest.mark.django_db(transaction=True)
def test_a_finding_remembers_when_its_condition_began_across_ticks(start_run, clean_redis):
    from tests.operations.test_operations import work

    run = start_run(
        {
            "name": "Since",
            "nodes": {
                "a": {"type": "test.effect"},
                "b": {"type": "test.effect", "after": ["a"]},
                "c": {"type": "test.effect"},  # keeps the run open while b is blocked
            },
        }
    )
    work(run, "a", fail="ValueError")
    watchdog.tick()
    finding = Finding.objects.get(run=run, code="blocked_upstream")
    began = finding.evidence["since"]
    assert began == finding.evidence["finished_at"]
    watchdog.tick()
    finding.refresh_from_db()
    assert finding.evidence["since"] == began and finding.last_seen > finding.first_seen
