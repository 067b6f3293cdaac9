"""Engine transitions driven directly, as a worker would drive them.

These pin down interleavings that are hard to force with real workers: a late result,
a fan-in counter, a pool shared by two runs. Jobs still go to the real Redis.
"""

import threading

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from workflows import engine
from workflows.models import Checkpoint, NodeAttempt, NodeRun, ResourcePool, Run, RunEvent
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)


def claim(node_run: NodeRun, attempt: int | None = None) -> engine.Claim | None:
    node_run.refresh_from_db()
    return engine.claim_attempt(
        node_run.pk, attempt or node_run.attempt, worker="test-worker", pid=1, host="test-host"
    )


def by_key(run) -> dict[str, NodeRun]:
    return {n.node_key: n for n in NodeRun.objects.filter(run=run)}


def test_roots_are_queued_with_an_attempt_and_a_job_on_start(start_run, clean_redis):
    run = start_run(
        {
            "name": "Roots",
            "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
        }
    )
    nodes = by_key(run)
    assert (nodes["a"].status, nodes["a"].attempt) == (NodeRun.Status.QUEUED, 1)
    assert (nodes["b"].status, nodes["b"].pending_upstreams) == (NodeRun.Status.PENDING, 1)
    assert nodes["b"].reason == "waiting for upstream: a"
    assert NodeAttempt.objects.get(node_run=nodes["a"]).rq_job_id == dispatch.job_id(
        nodes["a"].pk, 1
    )
    assert dispatch.missing_jobs([dispatch.job_id(nodes["a"].pk, 1)]) == set()


def test_fan_in_waits_for_every_upstream_by_counting(start_run):
    fan = {f"s{i}": {"type": "keel.noop"} for i in range(50)}
    run = start_run(
        {"name": "Fan", "nodes": {**fan, "join": {"type": "keel.noop", "after": list(fan)}}}
    )
    nodes = by_key(run)
    for index, key in enumerate(fan):
        assert claim(nodes[key])
        assert engine.complete_attempt(nodes[key].pk, 1, {"i": index})
        nodes["join"].refresh_from_db()
        assert nodes["join"].pending_upstreams == 49 - index
        expected = NodeRun.Status.QUEUED if index == 49 else NodeRun.Status.PENDING
        assert nodes["join"].status == expected
    join = claim(nodes["join"])
    assert len(engine.upstream_outputs(join.run_id, join.upstream)) == 50


def test_a_result_for_an_attempt_that_is_not_current_is_rejected_and_recorded(start_run):
    run = start_run(
        {
            "name": "Stale",
            "nodes": {"n": {"type": "keel.noop", "retries": {"max_attempts": 2, "backoff": 0}}},
        }
    )
    n = by_key(run)["n"]
    assert claim(n)
    assert engine.abandon_attempt(n.pk, 1, reason="worker vanished", actor="watchdog")
    n.refresh_from_db()
    assert (n.status, n.attempt) == (NodeRun.Status.QUEUED, 2)

    assert engine.complete_attempt(n.pk, 1, {"late": True}) is False
    assert engine.fail_attempt(n.pk, 1, engine.Failure("ValueError", "late")) is False

    n.refresh_from_db()
    assert n.output is None and n.status == NodeRun.Status.QUEUED
    reasons = list(
        RunEvent.objects.filter(run=run, kind=RunEvent.Kind.STALE).values_list("reason", flat=True)
    )
    assert reasons == [
        "rejected success of attempt 1: the node is queued at attempt 2",
        "rejected failure of attempt 1: the node is queued at attempt 2",
    ]


def test_a_second_claim_of_the_same_attempt_is_refused(start_run):
    run = start_run({"name": "Claim", "nodes": {"n": {"type": "keel.noop"}}})
    n = by_key(run)["n"]
    assert claim(n, 1) is not None
    assert claim(n, 1) is None
    assert (
        RunEvent.objects.filter(
            run=run, kind=RunEvent.Kind.STALE, reason__startswith="rejected claim"
        ).count()
        == 1
    )


def test_a_pool_slot_freed_in_one_run_goes_to_a_node_waiting_in_another(start_run):
    definition = {
        "name": "Pooled",
        "pools": {"db": 1},
        "nodes": {"n": {"type": "keel.noop", "pool": "db"}},
    }
    first = start_run(definition)
    second = start_run(definition)
    holder, waiter = by_key(first)["n"], by_key(second)["n"]
    assert holder.status == NodeRun.Status.QUEUED
    assert waiter.status == NodeRun.Status.PENDING and "waiting for pool db" in waiter.reason

    assert claim(holder)
    assert engine.complete_attempt(holder.pk, 1, {})
    waiter.refresh_from_db()
    assert (waiter.status, waiter.attempt) == (NodeRun.Status.QUEUED, 1)


def test_resizing_a_pool_is_respected_by_the_next_queueing(start_run):
    definition = {
        "name": "Pooled",
        "pools": {"api": 1},
        "nodes": {"n": {"type": "keel.noop", "pool": "api"}},
    }
    first = start_run(definition)
    ResourcePool.objects.filter(name="api").update(slots=2)
    second = start_run(definition)
    assert by_key(first)["n"].status == by_key(second)["n"].status == NodeRun.Status.QUEUED


def test_the_run_succeeds_when_every_node_succeeded(start_run):
    run = start_run(
        {
            "name": "Two",
            "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
        }
    )
    for key in ("a", "b"):
        n = by_key(run)[key]
        assert claim(n)
        engine.complete_attempt(n.pk, 1, {key: 1})
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.finished_at is not None
    assert Checkpoint.objects.filter(run=run, kind=Checkpoint.Kind.NODE_DONE).count() == 2


def test_progress_checkpoint_of_a_superseded_attempt_is_refused(start_run):
    run = start_run(
        {
            "name": "Cp",
            "nodes": {"n": {"type": "keel.noop", "retries": {"max_attempts": 2, "backoff": 0}}},
        }
    )
    n = by_key(run)["n"]
    assert claim(n)
    engine.save_progress_checkpoint(n.pk, run.pk, 1, 1, {"offset": 10})
    engine.abandon_attempt(n.pk, 1, reason="lost", actor="test")
    with pytest.raises(engine.AttemptSuperseded):
        engine.save_progress_checkpoint(n.pk, run.pk, 1, 2, {"offset": 20})
    assert engine.latest_progress_state(n.pk) == {"offset": 10}


def test_cancel_is_idempotent_and_closes_every_unfinished_node(start_run):
    run = start_run(
        {
            "name": "C",
            "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
        }
    )
    assert engine.cancel_run(run.pk, actor="op", reason="test") is True
    assert engine.cancel_run(run.pk, actor="op", reason="test") is False
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert set(NodeRun.objects.filter(run=run).values_list("status", flat=True)) == {
        NodeRun.Status.CANCELLED
    }
    assert NodeAttempt.objects.get(node_run__run=run).status == NodeAttempt.Status.CANCELLED


def test_unknown_run_params_are_refused_before_anything_is_written(make_version):
    version = make_version(
        {"name": "P", "params": {"day": "2026-01-01"}, "nodes": {"n": {"type": "keel.noop"}}}
    )
    with pytest.raises(
        engine.RunParamsError, match=r"Unknown run param\(s\) colour .* declares: day"
    ):
        engine.start_run(version, params={"colour": "red"}, trigger="t")
    assert not Run.objects.exists()
    run = engine.start_run(version, params={"day": "2026-02-02"}, trigger="t")
    assert run.params == {"day": "2026-02-02"}


@pytest.mark.parametrize(
    ("policy", "attempt", "low", "high"),
    [
        ({"backoff": 5, "factor": 2, "max_delay": 300, "jitter": False}, 1, 5, 5),
        ({"backoff": 5, "factor": 2, "max_delay": 300, "jitter": False}, 3, 20, 20),
        ({"backoff": 5, "factor": 2, "max_delay": 30, "jitter": False}, 10, 30, 30),
        ({"backoff": 8, "factor": 2, "max_delay": 300, "jitter": True}, 1, 4, 8),
        ({"backoff": 0, "factor": 2, "max_delay": 300, "jitter": True}, 4, 0, 0),
    ],
)
def test_backoff_is_exponential_capped_and_jittered(policy, attempt, low, high):
    for _ in range(20):
        assert low <= engine.backoff_delay(policy, attempt) <= high


def test_nodes_keep_the_order_the_definition_wrote_them_in(start_run):
    # PostgreSQL's jsonb reorders object keys; the spec keeps the written order separately.
    run = start_run(
        {"name": "Order", "nodes": {key: {"type": "keel.noop"} for key in ("zeta", "alpha", "mid")}}
    )
    assert list(
        NodeRun.objects.filter(run=run).order_by("id").values_list("node_key", flat=True)
    ) == ["zeta", "alpha", "mid"]
    assert run.version.spec["order"] == ["zeta", "alpha", "mid"]


def test_an_event_written_beside_a_transition_does_not_wait_for_its_run_lock(start_run):
    """A watchdog writes findings' events without the run's lock, while a worker's
    transition holds it. PostgreSQL checks the event's run and node-run keys at commit;
    if the engine's lock blocked that check, the two could deadlock (seen in CI)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks and deferred key checks are a PostgreSQL matter")
    run = start_run({"name": "Locked", "nodes": {"only": {"type": "keel.noop"}}})
    node = NodeRun.objects.get(run=run)
    holding, release = threading.Event(), threading.Event()

    def transition_in_progress():
        try:
            with transaction.atomic():
                engine.common.lock_for_outcome(node.pk, run.pk)
                holding.set()
                release.wait(timeout=20)
        finally:
            connection.close()

    thread = threading.Thread(target=transition_in_progress)
    thread.start()
    try:
        assert holding.wait(timeout=10)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            RunEvent.objects.create(
                run=run, node_run=node, kind=RunEvent.Kind.FINDING, actor="watchdog", reason="x"
            )
    finally:
        release.set()
        thread.join(timeout=20)
    assert RunEvent.objects.filter(run=run, reason="x").count() == 1


def test_a_released_node_gets_its_attempt_and_its_job_like_a_root_does(start_run, clean_redis):
    # The attempt of a node queued by its upstream's success is written by a query
    # (INSERT … SELECT); it must read exactly like one the ORM writes for a root.
    run = start_run(
        {
            "name": "Released",
            "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
        }
    )
    a, b = by_key(run)["a"], by_key(run)["b"]
    assert claim(a)
    assert engine.complete_attempt(a.pk, 1, {"rows": 3})

    b.refresh_from_db()
    assert (b.status, b.attempt, b.reason) == (NodeRun.Status.QUEUED, 1, "")
    released = NodeAttempt.objects.get(node_run=b)
    assert (released.number, released.status, released.queue) == (1, "queued", b.queue)
    assert released.rq_job_id == dispatch.job_id(b.pk, 1)
    assert dispatch.missing_jobs([released.rq_job_id]) == set()
    assert released.created_at is not None and released.updated_at is not None
    as_the_orm_would = NodeAttempt()
    for field in (
        *("worker", "pid", "host", "started_at", "finished_at", "error_type"),
        *("error_message", "traceback", "cpu_percent", "rss_bytes", "resource_samples"),
    ):
        assert getattr(released, field) == getattr(as_the_orm_would, field), field


def test_the_node_done_checkpoint_follows_the_progress_checkpoints(start_run):
    run = start_run({"name": "Seq", "nodes": {"n": {"type": "keel.noop"}}})
    n = by_key(run)["n"]
    assert claim(n)
    engine.save_progress_checkpoint(n.pk, run.pk, 1, 1, {"offset": 10})
    engine.save_progress_checkpoint(n.pk, run.pk, 1, 2, {"offset": 20})
    assert engine.complete_attempt(n.pk, 1, {"rows": 20})
    assert list(
        Checkpoint.objects.filter(node_run=n).order_by("sequence").values_list("kind", "sequence")
    ) == [("progress", 1), ("progress", 2), ("node_done", 3)]
    assert Checkpoint.objects.get(node_run=n, kind="node_done").state == {"output": {"rows": 20}}


def test_a_duplicate_success_report_changes_nothing(start_run):
    run = start_run(
        {
            "name": "Twice",
            "nodes": {"a": {"type": "keel.noop"}, "b": {"type": "keel.noop", "after": ["a"]}},
        }
    )
    a, b = by_key(run)["a"], by_key(run)["b"]
    assert claim(a)
    assert engine.complete_attempt(a.pk, 1, {"first": True})
    assert engine.complete_attempt(a.pk, 1, {"second": True}) is False

    a.refresh_from_db()
    b.refresh_from_db()
    assert a.output == {"first": True}
    assert (b.pending_upstreams, b.attempt) == (0, 1)
    assert Checkpoint.objects.filter(node_run=a).count() == 1
    assert NodeAttempt.objects.filter(node_run=b).count() == 1


def test_a_success_that_leaves_only_blocked_nodes_fails_the_run_naming_the_failure(start_run):
    run = start_run(
        {
            "name": "Blocked",
            "nodes": {
                "a": {"type": "keel.noop"},
                "b": {"type": "keel.noop", "after": ["a"]},
                "c": {"type": "keel.noop"},
            },
        }
    )
    a, c = by_key(run)["a"], by_key(run)["c"]
    assert claim(a) and claim(c)
    assert engine.fail_attempt(a.pk, 1, engine.Failure("ValueError", "boom"))
    assert Run.objects.get(pk=run.pk).status == Run.Status.RUNNING  # c still runs

    assert engine.complete_attempt(c.pk, 1, {})

    run.refresh_from_db()
    assert (run.status, run.reason) == (Run.Status.FAILED, "a failed")
    assert run.finished_at is not None
    event = RunEvent.objects.filter(run=run, kind=RunEvent.Kind.TRANSITION).latest("id")
    assert (event.reason, event.actor) == ("a failed", "engine")
    assert (event.before, event.after) == ({"status": "running"}, {"status": "failed"})


def test_the_last_success_closes_the_run_with_its_event(start_run):
    run = start_run({"name": "Last", "nodes": {"n": {"type": "keel.noop"}}})
    n = by_key(run)["n"]
    assert claim(n)
    assert engine.complete_attempt(n.pk, 1, {})

    run.refresh_from_db()
    assert (run.status, run.reason) == (Run.Status.SUCCEEDED, "")
    event = RunEvent.objects.filter(run=run, kind=RunEvent.Kind.TRANSITION).latest("id")
    assert (event.reason, event.after) == ("run succeeded", {"status": "succeeded"})
    assert RunEvent.objects.filter(run=run, reason="run succeeded").count() == 1


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite's write transaction holds the whole file"
)
def test_a_recovery_locks_the_run_then_its_pools_then_its_nodes(start_run):
    # The engine's lock order: an outcome holding a pool may lock a waiting node of this
    # run (fill_pool); locking this run's nodes before its pools could deadlock with it.
    run = start_run(
        {
            "name": "Pooled retry",
            "pools": {"warehouse": 1},
            "nodes": {
                "a": {"type": "keel.noop", "pool": "warehouse"},
                "b": {"type": "keel.noop", "after": ["a"]},
            },
        }
    )
    a = by_key(run)["a"]
    assert claim(a)
    assert engine.fail_attempt(a.pk, 1, engine.Failure("ValueError", "boom", retryable=False))

    with CaptureQueriesContext(connection) as queries:
        recovered = engine.recover(
            "retry",
            run.pk,
            lambda run, nodes: engine.plan_retry(run, nodes, "a", downstream=False),
            actor="alice",
            reason="try again",
        )

    assert recovered.changed
    locked = []
    for query in queries.captured_queries:
        if "FOR NO KEY UPDATE" not in query["sql"] and "FOR UPDATE" not in query["sql"]:
            continue
        table = query["sql"].split(" FROM ", 1)[1].split()[0].strip('"')
        if not locked or locked[-1] != table:
            locked.append(table)
    assert locked[:3] == ["workflows_run", "workflows_resourcepool", "workflows_noderun"]


def test_a_freed_pool_slot_goes_to_another_run_without_waiting_for_that_runs_lock(start_run):
    """fill_pool queues a waiting node of another run while holding the pool: taking that
    run's lock there (after the pool) could deadlock with that run's own outcome."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks are a PostgreSQL matter")
    definition = {"name": "Pooled", "pools": {"db": 1}, "nodes": {"n": {"type": "keel.noop"}}}
    definition["nodes"]["n"]["pool"] = "db"
    first, second = start_run(definition), start_run(definition)
    holder, waiter = by_key(first)["n"], by_key(second)["n"]
    assert claim(holder)
    holding, release = threading.Event(), threading.Event()

    def second_run_locked():
        try:
            with transaction.atomic():
                engine.common.lock_run(second.pk)
                holding.set()
                release.wait(timeout=20)
        finally:
            connection.close()

    thread = threading.Thread(target=second_run_locked)
    thread.start()
    try:
        assert holding.wait(timeout=10)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            assert engine.complete_attempt(holder.pk, 1, {})
    finally:
        release.set()
        thread.join(timeout=20)
    waiter.refresh_from_db()
    assert (waiter.status, waiter.attempt) == (NodeRun.Status.QUEUED, 1)
