"""The engine end to end: real RQ workers in subprocesses, real database and Redis."""

import os
import signal

import psutil
import pytest

from tests.conftest import finished, wait_for
from tests.testapp.models import Execution, SinkRow
from workflows import engine, operations
from workflows.models import Checkpoint, LogLine, NodeAttempt, NodeRun, Run, RunEvent
from workflows.runtime import dispatch

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]


def node(run, key) -> NodeRun:
    return NodeRun.objects.get(run=run, node_key=key)


def attempts(run, key) -> list[NodeAttempt]:
    return list(
        NodeAttempt.objects.filter(node_run__run=run, node_run__node_key=key).order_by("number")
    )


DIAMOND = {
    "name": "Diamond",
    "nodes": {
        "a": {"type": "test.record", "params": {"value": 1}},
        "b": {"type": "test.record", "params": {"value": 10, "sleep": 1.0}, "after": ["a"]},
        "c": {"type": "test.record", "params": {"value": 100, "sleep": 1.0}, "after": ["a"]},
        "d": {"type": "test.record", "params": {"value": 1000}, "after": ["b", "c"]},
    },
}


def test_dag_runs_in_order_with_parallel_branches(start_worker, start_run):
    start_worker()
    start_worker()
    run = finished(start_run(DIAMOND))

    assert run.status == Run.Status.SUCCEEDED
    a, b, c, d = (attempts(run, key)[0] for key in "abcd")
    assert a.finished_at <= b.started_at and a.finished_at <= c.started_at
    assert max(b.finished_at, c.finished_at) <= d.started_at
    # Two workers: the branches b and c ran at the same time.
    assert b.started_at < c.finished_at and c.started_at < b.finished_at
    assert Execution.objects.filter(run_id=run.pk).count() == 4


def test_outputs_reach_downstream_inputs(start_worker, start_run):
    start_worker()
    run = finished(start_run(DIAMOND))

    d = node(run, "d")
    assert d.output == {"total": 1000 + (10 + 1) + (100 + 1), "seen": ["b", "c"]}
    assert Checkpoint.objects.filter(node_run=d, kind=Checkpoint.Kind.NODE_DONE).get().state == {
        "output": d.output
    }


def test_failed_node_is_retried_then_succeeds(start_worker, start_run):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Retry",
                "nodes": {
                    "flaky": {
                        "type": "test.fail_until",
                        "params": {"succeed_on": 3},
                        "retries": {
                            "max_attempts": 3,
                            "backoff": 0,
                            "retry_on": ["ConnectionError"],
                        },
                    }
                },
            }
        )
    )

    assert run.status == Run.Status.SUCCEEDED
    tries = attempts(run, "flaky")
    assert [t.status for t in tries] == ["failed", "failed", "succeeded"]
    assert tries[0].error_type == "ConnectionError"
    assert "planned failure on attempt 1" in tries[0].traceback
    assert node(run, "flaky").output == {"attempt": 3}
    assert RunEvent.objects.filter(run=run, kind=RunEvent.Kind.RETRY).count() == 2


def test_exhausted_retries_fail_the_run_but_the_independent_branch_finishes(
    start_worker, start_run
):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Exhausted",
                "nodes": {
                    "broken": {
                        "type": "test.fail_until",
                        "params": {"succeed_on": 99},
                        "retries": {"max_attempts": 2, "backoff": 0},
                    },
                    "after_broken": {"type": "test.record", "after": ["broken"]},
                    "independent": {"type": "test.record", "params": {"sleep": 0.5}},
                    "after_independent": {"type": "test.record", "after": ["independent"]},
                },
            }
        )
    )

    assert run.status == Run.Status.FAILED
    assert "broken failed" in run.reason
    assert node(run, "broken").status == NodeRun.Status.FAILED
    assert len(attempts(run, "broken")) == 2
    assert node(run, "independent").status == NodeRun.Status.SUCCEEDED
    assert node(run, "after_independent").status == NodeRun.Status.SUCCEEDED
    blocked = node(run, "after_broken")
    assert blocked.status == NodeRun.Status.PENDING
    assert blocked.reason == "blocked: upstream broken failed"


def test_errors_not_listed_in_retry_on_are_not_retried(start_worker, start_run):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Not retryable",
                "nodes": {
                    "bad_input": {
                        "type": "test.fail_until",
                        "params": {"succeed_on": 2, "error": "ValueError"},
                        "retries": {
                            "max_attempts": 5,
                            "backoff": 0,
                            "retry_on": ["ConnectionError"],
                        },
                    }
                },
            }
        )
    )

    assert run.status == Run.Status.FAILED
    assert len(attempts(run, "bad_input")) == 1
    assert "not retryable" in node(run, "bad_input").reason


def test_sleeping_node_is_hard_timed_out_then_retried(start_worker, start_run):
    start_worker("forking")
    run = finished(
        start_run(
            {
                "name": "Hard timeout",
                "nodes": {
                    "sleepy": {
                        "type": "test.sleep_first",
                        "params": {"seconds": 60, "until_attempt": 2},
                        "timeout": 2,
                        "retries": {"max_attempts": 2, "backoff": 0},
                    }
                },
            }
        ),
        timeout=60,
    )

    assert run.status == Run.Status.SUCCEEDED
    first, second = attempts(run, "sleepy")
    assert first.status == NodeAttempt.Status.TIMED_OUT
    assert first.error_type == "HardTimeout"
    assert first.error_message == "stopped at its 2 s timeout (asked to stop, and it did)"
    assert 1.5 < (first.finished_at - first.started_at).total_seconds() < 10
    assert second.status == NodeAttempt.Status.SUCCEEDED


def test_a_node_that_ignores_the_stop_request_is_killed_after_the_grace(start_worker, start_run):
    """Hung with signals blocked (as in C code), the node ignores SIGTERM at its timeout;
    the worker kills it KEEL_KILL_GRACE_SECONDS later and says so, and retries it."""
    worker = start_worker("forking", KEEL_KILL_GRACE_SECONDS=2)
    run = finished(
        start_run(
            {
                "name": "Hung in C",
                "nodes": {
                    "hung": {
                        "type": "test.hang_masked",
                        "params": {"seconds": 120},
                        "timeout": 2,
                        "retries": {"max_attempts": 2, "backoff": 0},
                    }
                },
            }
        ),
        timeout=60,
    )

    assert run.status == Run.Status.SUCCEEDED
    first, second = attempts(run, "hung")
    assert (first.status, first.error_type) == (NodeAttempt.Status.TIMED_OUT, "HardTimeout")
    assert first.error_message == ("killed 2 s after its 2 s timeout: it ignored the stop request")
    # Asked at 2 s, killed 2 s later; never RQ's own 60 s grace.
    assert 3.5 < (first.finished_at - first.started_at).total_seconds() < 20
    assert second.status == NodeAttempt.Status.SUCCEEDED
    assert "ignored the stop request for 2s; killing it" in worker.log()


def test_soft_timeout_saves_a_checkpoint_and_the_next_attempt_resumes_from_it(
    start_worker, start_run
):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Soft timeout",
                "nodes": {
                    "batches": {
                        "type": "test.batches",
                        "params": {"rows": 400, "batch": 20, "pause": 0.1},
                        "soft_timeout": 1,
                        "timeout": 30,
                        "retries": {"max_attempts": 5, "backoff": 0},
                    }
                },
            }
        ),
        timeout=60,
    )

    assert run.status == Run.Status.SUCCEEDED
    tries = attempts(run, "batches")
    assert tries[0].status == NodeAttempt.Status.TIMED_OUT
    assert tries[0].error_type == "SoftTimeout"
    assert node(run, "batches").output["started_at_row"] > 1, "the last attempt resumed mid-way"
    rows = SinkRow.objects.filter(run_key__contains=f"run{run.pk}-")
    assert rows.count() == 400
    assert sorted(rows.values_list("row_id", flat=True)) == list(range(1, 401))
    assert {row.attempt for row in rows} == {t.number for t in tries}, (
        "every attempt wrote its share"
    )


def test_killed_batch_node_resumes_and_processes_every_row_exactly_once(start_worker, start_run):
    first_worker = start_worker("forking")
    run = start_run(
        {
            "name": "Kill midway",
            "nodes": {
                "load": {
                    "type": "test.batches",
                    "params": {"rows": 10_000, "batch": 100, "pause": 0.03},
                    "timeout": 120,
                    "retries": {"max_attempts": 3, "backoff": 0},
                }
            },
        }
    )
    key = f"keel-run{run.pk}-load"
    wait_for(
        lambda: SinkRow.objects.filter(run_key=key).count() >= 2000, timeout=60, message="2000 rows"
    )
    first_worker.kill_hard()
    written_before_kill = SinkRow.objects.filter(run_key=key).count()
    assert written_before_kill < 10_000

    # The worker is gone; the watchdog (or an operator) abandons its attempt.
    load = node(run, "load")
    assert load.status == NodeRun.Status.RUNNING
    assert engine.abandon_attempt(load.pk, 1, reason="worker killed", actor="test")
    start_worker("forking")
    run = finished(run, timeout=120)

    assert run.status == Run.Status.SUCCEEDED
    rows = SinkRow.objects.filter(run_key=key)
    assert rows.count() == 10_000
    assert sorted(rows.values_list("row_id", flat=True)) == list(range(1, 10_001))
    resumed_at = node(run, "load").output["started_at_row"]
    assert resumed_at == written_before_kill + 1, (
        "the second attempt started right after the last checkpoint"
    )
    assert [a.status for a in attempts(run, "load")] == ["abandoned", "succeeded"]


def _superseded_run(start_worker, start_run, kind):
    slow = start_worker(kind, name=f"slow-{kind}-worker")
    run = start_run(
        {
            "name": "Superseded",
            "nodes": {
                "node": {
                    "type": "test.sleep_first",
                    "params": {"seconds": 4, "until_attempt": 2},
                    "timeout": 30,
                    "retries": {"max_attempts": 2, "backoff": 0},
                }
            },
        }
    )
    target = node(run, "node")
    wait_for(
        lambda: NodeRun.objects.get(pk=target.pk).status == NodeRun.Status.RUNNING,
        message="running",
    )
    assert engine.abandon_attempt(target.pk, 1, reason="presumed lost", actor="test")
    return slow, run, target


def test_the_process_of_a_superseded_attempt_is_stopped_and_frees_its_worker(
    start_worker, start_run
):
    """A forking worker sees within a second that its attempt was superseded and stops
    its horse; the same worker then runs the next attempt (no second worker needed)."""
    slow, run, target = _superseded_run(start_worker, start_run, "forking")
    run = finished(run, timeout=30)

    assert run.status == Run.Status.SUCCEEDED
    assert node(run, "node").output == {"attempt": 2}
    second = NodeAttempt.objects.get(node_run=target, number=2)
    assert second.worker == slow.name  # the worker was freed for it
    assert "its attempt was superseded" in slow.log()
    assert NodeAttempt.objects.get(node_run=target, number=1).status == NodeAttempt.Status.ABANDONED
    assert not RunEvent.objects.filter(run=run, kind=RunEvent.Kind.STALE).exists()


def test_retrying_a_frozen_node_frees_its_worker_within_seconds(start_worker, start_run):
    """The runbook's "worker alive but not taking work": a node hung in C code (signals
    blocked) holds the only worker. The operator's retry supersedes its attempt; the
    worker asks it to stop, kills it after the grace, and runs the new attempt itself."""
    worker = start_worker("forking", KEEL_KILL_GRACE_SECONDS=2)
    run = start_run(
        {
            "name": "Frozen",
            "nodes": {
                "frozen": {
                    "type": "test.hang_masked",
                    "params": {"seconds": 600},
                    "timeout": 900,
                    "retries": {"max_attempts": 1},
                }
            },
        }
    )
    frozen = node(run, "frozen")
    horse = wait_for(
        lambda: (
            NodeRun.objects.get(pk=frozen.pk).status == NodeRun.Status.RUNNING
            and attempts(run, "frozen")[0].pid
        ),
        message="the frozen node running",
    )

    operations.retry_node(run.pk, "frozen", actor="operator", reason="frozen in C")
    # How fast is bench/faults.py's to measure (frozen_retry); here: that it happens.
    wait_for(lambda: not psutil.pid_exists(horse), timeout=30, message="the old horse gone")
    run = finished(run, timeout=30)

    assert run.status == Run.Status.SUCCEEDED
    first, second = attempts(run, "frozen")
    assert first.status == NodeAttempt.Status.ABANDONED  # ended by the retry, not reported
    assert second.worker == worker.name and second.status == NodeAttempt.Status.SUCCEEDED
    assert "ignored the stop request for 2s; killing it" in worker.log()
    note = RunEvent.objects.get(run=run, reason__contains="was superseded")
    assert note.actor == worker.name
    assert f"(pid {horse}) to stop, and killed 2 s after it ignored the request" in note.reason


def test_late_result_of_a_superseded_attempt_is_rejected(start_worker, start_run):
    """A simple worker cannot kill its node: the late success is rejected and recorded."""
    slow, run, target = _superseded_run(start_worker, start_run, "simple")
    start_worker("forking")
    run = finished(run, timeout=30)
    assert run.status == Run.Status.SUCCEEDED
    assert node(run, "node").output == {"attempt": 2}

    # Attempt 1 wakes up after its sleep and reports success: it must be rejected.
    wait_for(
        lambda: RunEvent.objects.filter(run=run, kind=RunEvent.Kind.STALE).exists(),
        timeout=15,
        message="the stale result to be recorded",
    )
    stale = RunEvent.objects.get(run=run, kind=RunEvent.Kind.STALE)
    assert "rejected success of attempt 1" in stale.reason
    assert node(run, "node").output == {"attempt": 2}
    assert NodeAttempt.objects.get(node_run=target, number=1).status == NodeAttempt.Status.ABANDONED
    slow.stop()


def test_a_message_delivered_twice_runs_the_node_once(start_worker, start_run, clean_redis):
    run = start_run({"name": "Twice", "nodes": {"only": {"type": "test.record"}}})
    only = node(run, "only")
    # The same "run attempt 1 of node-run X" arrives again, as after a redelivery.
    dispatch.get_queue("default").enqueue_call(
        dispatch.EXECUTOR_FUNC, args=(only.pk, 1), job_id=f"duplicate-{only.pk}"
    )
    start_worker()
    run = finished(run)
    wait_for(
        lambda: RunEvent.objects.filter(run=run, kind=RunEvent.Kind.STALE).exists(),
        message="stale claim",
    )

    assert run.status == Run.Status.SUCCEEDED
    assert Execution.objects.filter(run_id=run.pk, node_key="only").count() == 1
    assert (
        "rejected claim of attempt 1"
        in RunEvent.objects.get(run=run, kind=RunEvent.Kind.STALE).reason
    )


def test_one_slot_pool_serialises_two_nodes(start_worker, start_run):
    start_worker()
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Pool",
                "pools": {"warehouse": 1},
                "nodes": {
                    "first": {"type": "test.record", "params": {"sleep": 1.0}, "pool": "warehouse"},
                    "second": {
                        "type": "test.record",
                        "params": {"sleep": 1.0},
                        "pool": "warehouse",
                    },
                },
            }
        )
    )

    assert run.status == Run.Status.SUCCEEDED
    one, two = sorted(
        (attempts(run, key)[0] for key in ("first", "second")), key=lambda a: a.started_at
    )
    assert one.finished_at <= two.started_at, "the pool let only one node in at a time"


def test_node_waiting_for_a_pool_slot_says_so(start_worker, start_run):
    run = start_run(
        {
            "name": "Pool wait",
            "pools": {"single": 1},
            "nodes": {
                "holder": {"type": "test.record", "pool": "single"},
                "waiter": {"type": "test.record", "pool": "single"},
            },
        }
    )
    waiter = node(run, "waiter")
    assert waiter.status == NodeRun.Status.PENDING
    assert waiter.reason == "waiting for pool single (all slots in use)"
    start_worker()
    assert finished(run).status == Run.Status.SUCCEEDED


def test_cancel_stops_a_running_node(start_worker, start_run):
    worker = start_worker("forking")
    run = start_run(
        {
            "name": "Cancel",
            "nodes": {
                "long": {"type": "test.sleep_first", "params": {"seconds": 60}, "timeout": 120},
                "next": {"type": "test.record", "after": ["long"]},
            },
        }
    )
    long_node = node(run, "long")
    wait_for(
        lambda: NodeRun.objects.get(pk=long_node.pk).status == NodeRun.Status.RUNNING,
        message="running",
    )
    wait_for(worker.horse_pids, message="a work horse")

    outcome = operations.cancel_run(run.pk, actor="tester", reason="wrong input file")

    assert outcome.changed
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert node(run, "long").status == NodeRun.Status.CANCELLED
    assert node(run, "next").status == NodeRun.Status.CANCELLED
    # RQ's stop-job command kills the work horse well before the node's 60 s sleep ends.
    wait_for(lambda: not worker.horse_pids(), timeout=15, message="the work horse to be stopped")
    assert attempts(run, "long")[0].status == NodeAttempt.Status.CANCELLED
    event = RunEvent.objects.get(run=run, kind=RunEvent.Kind.OPERATOR)
    assert (event.actor, event.reason) == ("tester", "wrong input file")
    assert not operations.cancel_run(run.pk, actor="tester", reason="again").changed


def test_cooperative_node_stops_when_cancelled(start_worker, start_run):
    start_worker("simple")
    run = start_run(
        {
            "name": "Cooperative",
            "nodes": {
                "n": {"type": "test.cooperative_sleep", "params": {"seconds": 60}, "timeout": 120}
            },
        }
    )
    target = node(run, "n")
    wait_for(
        lambda: NodeRun.objects.get(pk=target.pk).status == NodeRun.Status.RUNNING,
        message="running",
    )
    operations.cancel_run(run.pk, actor="tester", reason="stop")
    # The heartbeat (1 s in tests) sees the cancel; the node's late report is rejected.
    wait_for(
        lambda: RunEvent.objects.filter(run=run, kind=RunEvent.Kind.STALE).exists(),
        timeout=15,
        message="the node to stop and its report to be rejected",
    )
    assert node(run, "n").status == NodeRun.Status.CANCELLED


def test_retry_backoff_is_kept_in_the_database_and_survives_losing_redis(
    start_worker, start_run, clean_redis
):
    from diagnostics import watchdog

    run = start_run(
        {
            "name": "Backoff",
            "nodes": {
                "flaky": {
                    "type": "test.fail_until",
                    "params": {"succeed_on": 2},
                    "retries": {"max_attempts": 2, "backoff": 1, "jitter": False},
                }
            },
        }
    )
    start_worker()
    flaky = node(run, "flaky")
    wait_for(
        lambda: NodeRun.objects.get(pk=flaky.pk).status == NodeRun.Status.RETRY_WAIT,
        message="retry_wait",
    )
    assert NodeRun.objects.get(pk=flaky.pk).retry_at is not None
    for key in clean_redis.scan_iter("rq:*"):
        if b"worker" not in key:
            clean_redis.delete(key)  # everything RQ knew about jobs is gone

    def retried():
        watchdog.tick()
        run.refresh_from_db()
        return run.status in Run.TERMINAL

    wait_for(retried, timeout=30, interval=0.5, message="the retry to be queued from the database")
    assert run.status == Run.Status.SUCCEEDED
    assert [a.status for a in attempts(run, "flaky")] == ["failed", "succeeded"]


def test_queued_node_whose_job_was_lost_is_sent_again(start_worker, start_run, clean_redis):
    from diagnostics import watchdog

    run = start_run({"name": "Lost", "nodes": {"only": {"type": "test.record"}}})
    clean_redis.delete("rq:queue:default")
    clean_redis.delete(f"rq:job:{dispatch.job_id(node(run, 'only').pk, 1)}")
    NodeRun.objects.filter(run=run).update(queued_at=run.created_at.replace(year=2020))
    assert watchdog.tick().messages_resent == 1
    start_worker()
    assert finished(run).status == Run.Status.SUCCEEDED
    assert Execution.objects.filter(run_id=run.pk).count() == 1


def test_heartbeat_records_progress_and_resource_samples(start_worker, start_run):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Heartbeat",
                "nodes": {
                    "slow": {
                        "type": "test.batches",
                        "params": {"rows": 30, "batch": 1, "pause": 0.1},
                    }
                },
            }
        )
    )
    slow = node(run, "slow")
    attempt = attempts(run, "slow")[0]
    assert slow.heartbeat_at is not None and slow.heartbeat_at > attempt.started_at
    assert slow.progress["total"] == 30
    assert attempt.rss_bytes > 0
    assert len(attempt.resource_samples) >= 2
    first = attempt.resource_samples[0]
    assert {"cpu_percent", "rss_bytes", "io_wait_percent", "network_bytes_per_second"} <= set(first)
    assert isinstance(first["network_bytes_per_second"], int), "the host's traffic, bytes/s"
    assert first["network_bytes_per_second"] >= 0


def test_a_claim_the_database_forgot_costs_a_rerun_never_a_second_result(
    start_worker, start_run, settings
):
    """A claim does not wait for the disk (engine.claim_attempt): a crash of PostgreSQL
    may undo it while the node runs. Undone here by hand, as the crash would."""
    from diagnostics import watchdog

    settings.KEEL_LOST_JOB_GRACE_SECONDS = 0
    start_worker("simple")
    run = start_run(
        {
            "name": "Claim undone",
            "nodes": {"n": {"type": "test.cooperative_sleep", "params": {"seconds": 4}}},
        }
    )
    wait_for(lambda: node(run, "n").status == NodeRun.Status.RUNNING, message="running")
    NodeRun.objects.filter(run=run).update(
        status=NodeRun.Status.QUEUED, started_at=None, heartbeat_at=None
    )
    NodeAttempt.objects.filter(node_run__run=run).update(
        status=NodeAttempt.Status.QUEUED, worker="", pid=None, host="", started_at=None
    )

    # The running attempt hears at its next beat that it is not current and stops; what
    # it reports is rejected, and the node stays queued.
    stale = wait_for(
        lambda: RunEvent.objects.filter(run=run, kind=RunEvent.Kind.STALE).first(),
        message="the undone attempt's report rejected",
    )
    assert stale.reason == "rejected failure of attempt 1: the node is queued at attempt 1"
    assert node(run, "n").status == NodeRun.Status.QUEUED

    # RQ has ended the job without the node running to the end: the watchdog sends it again.
    def rerun_finished():
        watchdog.tick()
        return Run.objects.get(pk=run.pk).status in Run.TERMINAL

    wait_for(rerun_finished, timeout=30, interval=0.3, message="the re-sent node to finish")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert Execution.objects.filter(run_id=run.pk).count() == 2
    [attempt] = attempts(run, "n")
    assert attempt.status == NodeAttempt.Status.SUCCEEDED
    assert Checkpoint.objects.filter(node_run=node(run, "n"), kind="node_done").count() == 1


def test_a_simple_worker_beats_for_each_node_it_runs_in_turn(start_worker, start_run):
    # One heartbeat thread serves every node the process runs: each attempt gets its own
    # beats and samples, and a beat never lands on an attempt that has ended.
    start_worker("simple")
    batches = {"type": "test.batches", "params": {"rows": 25, "batch": 1, "pause": 0.1}}
    run = finished(
        start_run(
            {
                "name": "Beats in turn",
                "nodes": {"first": batches, "second": {**batches, "after": ["first"]}},
            }
        )
    )
    assert run.status == Run.Status.SUCCEEDED
    for key in ("first", "second"):
        beaten, [attempt] = node(run, key), attempts(run, key)
        assert attempt.started_at < beaten.heartbeat_at <= attempt.finished_at
        assert beaten.progress["done"] >= 10
        # One sample per heartbeat interval (1 s), however long a busy machine makes it.
        took = (attempt.finished_at - attempt.started_at).total_seconds()
        assert 2 <= len(attempt.resource_samples) <= took + 1, key


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_a_busy_node_shows_its_cpu_from_the_first_sample(start_worker, start_run, kind):
    start_worker(kind)
    run = finished(
        start_run(
            {"name": "Busy", "nodes": {"hot": {"type": "test.busy", "params": {"seconds": 2.5}}}}
        )
    )
    samples = attempts(run, "hot")[0].resource_samples
    assert len(samples) >= 2
    # psutil's first reading of a process is 0.0; Keel's samples count from the start, so
    # a node that only computes shows CPU in every sample, however busy the machine is.
    assert all(sample["cpu_percent"] > 0 for sample in samples), samples


def test_node_logs_are_stored_and_bounded(start_worker, start_run, settings):
    start_worker(KEEL_MAX_LOG_LINES=50)
    run = finished(
        start_run(
            {
                "name": "Logs",
                "nodes": {"chatty": {"type": "test.log_lines", "params": {"lines": 80}}},
            }
        )
    )
    lines = list(LogLine.objects.filter(attempt__node_run__run=run).order_by("seq"))
    assert [line.message for line in lines[:2]] == ["line 0", "line 1"]
    assert len(lines) == 51
    assert lines[-1].message.startswith("log truncated: 30 more line(s) dropped")


def test_run_past_its_timeout_is_failed_by_the_watchdog(start_worker, start_run):
    from diagnostics import watchdog

    start_worker()
    run = start_run(
        {
            "name": "Deadline",
            "timeout": 1,
            "nodes": {"n": {"type": "test.cooperative_sleep", "params": {"seconds": 30}}},
        }
    )
    wait_for(lambda: node(run, "n").status == NodeRun.Status.RUNNING, message="running")

    def expired():
        watchdog.tick()
        run.refresh_from_db()
        return run.status in Run.TERMINAL

    wait_for(expired, timeout=15, interval=0.3, message="the run to expire")
    assert run.status == Run.Status.FAILED
    assert run.reason == "run exceeded its timeout"
    assert node(run, "n").status == NodeRun.Status.CANCELLED


def test_a_killed_work_horse_is_reported_by_its_worker_and_retried(start_worker, start_run):
    """The forking worker claims, forks, and reports: when its horse dies without a word
    (OOM killer, kill -9), the worker says so at once and the retry policy acts."""
    worker = start_worker("forking")
    run = start_run(
        {
            "name": "Horse killed",
            "nodes": {
                "slow": {
                    "type": "test.cooperative_sleep",
                    "params": {"seconds": 2},
                    "retries": {"max_attempts": 2, "backoff": 0},
                }
            },
        }
    )
    # The horse claims the attempt with its own pid.
    horse = wait_for(
        lambda: (
            attempts(run, "slow")[0].status == NodeAttempt.Status.RUNNING
            and attempts(run, "slow")[0].pid
        ),
        message="the horse's pid on the attempt",
    )
    assert horse in worker.horse_pids()
    os.kill(horse, signal.SIGKILL)

    run = finished(run, timeout=30)  # no watchdog runs: the worker itself reported

    assert run.status == Run.Status.SUCCEEDED
    first, second = attempts(run, "slow")
    assert (first.status, first.error_type) == (NodeAttempt.Status.FAILED, "WorkHorseEnded")
    assert "killed by SIGKILL" in first.error_message
    assert second.status == NodeAttempt.Status.SUCCEEDED and second.pid != horse


def test_the_attempt_names_the_process_that_ran_the_node(start_worker, start_run):
    """The horse claims and reports: its pid, not the worker's, is on the attempt, and the
    worker's name, so diagnostics look at the process that runs the node."""
    worker = start_worker("forking")
    run = finished(start_run({"name": "Quick", "nodes": {"quick": {"type": "keel.noop"}}}))

    assert run.status == Run.Status.SUCCEEDED
    [attempt] = attempts(run, "quick")
    assert attempt.status == NodeAttempt.Status.SUCCEEDED
    assert attempt.pid not in (None, worker.pid)
    assert attempt.worker == worker.name


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_an_outcome_never_travels_through_redis(start_worker, start_run, clean_redis, kind):
    """A 10 MB error is stored (bounded) in the database by the process that ran the node;
    RQ keeps only a few bytes about the job."""
    start_worker(kind)
    run = finished(
        start_run({"name": "Huge error", "nodes": {"huge": {"type": "test.huge_error"}}})
    )

    [attempt] = attempts(run, "huge")
    assert (attempt.status, attempt.error_type) == (NodeAttempt.Status.FAILED, "PermanentError")
    assert 1000 < len(attempt.error_message) <= 10_000
    stored = sum(
        clean_redis.memory_usage(key) or 0
        for key in clean_redis.scan_iter(f"rq:*{attempt.rq_job_id}*")
    )
    assert stored < 20_000, stored


@pytest.mark.parametrize("kind", ["forking", "simple"])
def test_a_busy_worker_keeps_its_rq_heartbeat_fresh(start_worker, start_run, clean_redis, kind):
    """A frozen worker shows as a stale RQ heartbeat, so a busy one must not look stale:
    it beats every KEEL_HEARTBEAT_SECONDS while its node runs."""
    worker = start_worker(kind, KEEL_HEARTBEAT_SECONDS=1)
    run = start_run(
        {"name": "Busy", "nodes": {"busy": {"type": "test.record", "params": {"sleep": 8}}}}
    )
    wait_for(lambda: node(run, "busy").status == NodeRun.Status.RUNNING, message="the node running")

    def last_beat():
        return clean_redis.hget(f"rq:worker:{worker.name}", "last_heartbeat")

    seen = {last_beat()}
    wait_for(lambda: seen.add(last_beat()) or len(seen) >= 3, timeout=6, message="two beats")
    assert node(run, "busy").status == NodeRun.Status.RUNNING  # beats came during the node


def test_a_node_that_lost_its_database_is_retried_whatever_retry_on_says(start_worker, start_run):
    """A database restart under a running node is not the node's fault."""
    start_worker("forking")
    run = finished(
        start_run(
            {
                "name": "Lost database",
                "nodes": {
                    "n": {
                        "type": "test.loses_database",
                        "retries": {"max_attempts": 2, "backoff": 0, "retry_on": ["ValueError"]},
                    }
                },
            }
        )
    )

    assert run.status == Run.Status.SUCCEEDED
    first, second = attempts(run, "n")
    assert first.error_type == "OperationalError"
    assert first.error_message.startswith("the database connection was lost while the node ran")
    assert second.status == NodeAttempt.Status.SUCCEEDED


def test_a_stop_keel_did_not_ask_for_is_not_called_a_timeout_and_is_retried(
    start_worker, start_run
):
    """SIGTERM from outside (an orphaned horse cleaned up after its worker died, a machine
    shutting down) is not the node's timeout: the attempt says so and is retried, even
    for an error its retry_on does not list."""
    start_worker("forking")
    run = start_run(
        {
            "name": "Stopped outside",
            "nodes": {
                "sleepy": {
                    "type": "test.sleep_first",
                    "params": {"seconds": 60, "until_attempt": 2},
                    "timeout": 120,
                    "retries": {"max_attempts": 2, "backoff": 0, "retry_on": ["ValueError"]},
                }
            },
        }
    )
    horse = wait_for(
        lambda: (
            NodeAttempt.objects.filter(
                node_run__run=run, number=1, status=NodeAttempt.Status.RUNNING
            )
            .values_list("pid", flat=True)
            .first()
        ),
        message="the first attempt running",
    )
    os.kill(horse, signal.SIGTERM)
    run = finished(run, timeout=60)

    assert run.status == Run.Status.SUCCEEDED
    first, second = attempts(run, "sleepy")
    assert (first.status, first.error_type) == (NodeAttempt.Status.FAILED, "StoppedFromOutside")
    assert "told to stop (SIGTERM)" in first.error_message and "not by Keel" in first.error_message
    assert "timeout" not in first.error_message
    assert second.status == NodeAttempt.Status.SUCCEEDED
