"""The engine's named statements (workflows/engine/statements.py), on the database the
suite runs against: `make test` runs them on SQLite, `.ci/run` on PostgreSQL too."""

import pytest
from django.db import transaction
from django.utils import timezone

from workflows.engine import statements
from workflows.engine.runs import new_node_row
from workflows.models import Checkpoint, NodeAttempt, NodeRun
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

PARAMS_RUN = {
    "name": "Statements",
    "pools": {"warehouse": 1},
    "nodes": {
        "a": {"type": "test.record", "pool": "warehouse"},
        "b": {"type": "keel.noop", "after": ["a"]},
    },
}


def node(run, key) -> NodeRun:
    return NodeRun.objects.get(run=run, node_key=key)


def test_claim_node_moves_queued_to_running_once_and_returns_python_values(start_run):
    run = start_run(PARAMS_RUN)
    a = node(run, "a")
    now = timezone.now()

    with transaction.atomic():
        claimed = statements.claim_node(a.pk, 1, now)
        again = statements.claim_node(a.pk, 1, now)

    assert claimed == {
        "run_id": run.pk,
        "node_key": "a",
        "node_type": "test.record",
        "params": a.params,
        "upstream": [],
        "timeout_seconds": a.timeout_seconds,
        "soft_timeout_seconds": a.soft_timeout_seconds,
    }
    assert isinstance(claimed["params"], dict)
    assert again is None
    a.refresh_from_db()
    assert (a.status, a.started_at, a.heartbeat_at) == (NodeRun.Status.RUNNING, now, now)


def test_claim_node_refuses_another_attempt_number(start_run):
    a = node(start_run(PARAMS_RUN), "a")
    with transaction.atomic():
        assert statements.claim_node(a.pk, 2, timezone.now()) is None
    a.refresh_from_db()
    assert a.status == NodeRun.Status.QUEUED


def test_claim_attempt_row_records_who_runs_it_and_returns_its_id(start_run):
    a = node(start_run(PARAMS_RUN), "a")
    row = NodeAttempt.objects.get(node_run=a, number=1)
    now = timezone.now()

    with transaction.atomic():
        got = statements.claim_attempt_row(a.pk, 1, worker="w1", pid=42, host="h", now=now)
        again = statements.claim_attempt_row(a.pk, 1, worker="w2", pid=43, host="h", now=now)

    assert (got, again) == (row.pk, None)
    row.refresh_from_db()
    assert (row.status, row.worker, row.pid, row.started_at) == ("running", "w1", 42, now)


def test_succeed_node_applies_only_to_the_running_attempt_and_keeps_the_output(start_run):
    a = node(start_run(PARAMS_RUN), "a")
    output = {"rows": 3, "name": "café ✓", "nested": [1, None, {"x": 1.5}]}
    now = timezone.now()
    with transaction.atomic():
        assert statements.succeed_node(a.pk, 1, output, now) is None  # still queued
        statements.claim_node(a.pk, 1, now)
        assert statements.succeed_node(a.pk, 2, output, now) is None  # another attempt
        done = statements.succeed_node(a.pk, 1, output, now)

    assert done == {"downstream": ["b"], "pool": "warehouse"}
    a.refresh_from_db()
    assert (a.status, a.output, a.finished_at, a.reason) == ("succeeded", output, now, "")


def test_the_node_done_checkpoint_is_numbered_after_the_last_one(start_run):
    run = start_run(PARAMS_RUN)
    a, b = node(run, "a"), node(run, "b")
    Checkpoint.objects.create(
        run=run, node_run=a, kind=Checkpoint.Kind.PROGRESS, sequence=4, attempt=1, state={}
    )
    now = timezone.now()

    with transaction.atomic():
        statements.insert_node_done_checkpoint(run.pk, a.pk, 1, {"n": 1}, now)
        statements.insert_node_done_checkpoint(run.pk, b.pk, 1, None, now)

    done = {c.node_run_id: c for c in Checkpoint.objects.filter(kind="node_done")}
    assert (done[a.pk].sequence, done[a.pk].state, done[a.pk].created_at) == (
        5,
        {"output": {"n": 1}},
        now,
    )
    assert (done[b.pk].sequence, done[b.pk].state, done[b.pk].attempt) == (1, {"output": None}, 1)


def new_row(key: str, **changes) -> dict:
    row = {
        "node_key": key,
        "node_type": "keel.noop",
        "status": NodeRun.Status.PENDING,
        "attempt": 0,
        "attempts_base": 0,
        "max_attempts": 3,
        "queue": "default",
        "pool": "",
        "timeout_seconds": 60,
        "soft_timeout_seconds": None,
        "expected_seconds": 5,
        "stall_after_seconds": None,
        "pool_timeout_seconds": 45,
        "params": {"text": "ünïcode 'quoted' \"too\"", "n": 1.5, "none": None, "list": [1, "a"]},
        "upstream": [],
        "downstream": ["b"],
        "retry_policy": {"max_attempts": 3, "backoff": 2.0},
        "pending_upstreams": 0,
        "reason": "",
    }
    return {**row, **changes}


def test_insert_node_runs_writes_every_column_as_the_orm_reads_it(start_run):
    run = start_run(PARAMS_RUN)
    now = timezone.now()
    rows = [
        new_row("x", status=NodeRun.Status.QUEUED, attempt=1),
        new_row("y", upstream=["x"], pending_upstreams=1, reason="waits"),
    ]

    with transaction.atomic():
        ids = statements.insert_node_runs(run.pk, rows, now)

    assert set(ids) == {"x", "y"}
    for row, queued_at in zip(rows, [now, None], strict=True):
        stored = NodeRun.objects.get(pk=ids[row["node_key"]])
        assert stored.run_id == run.pk
        assert (stored.created_at, stored.updated_at) == (now, now)
        assert stored.queued_at == queued_at, "a root born queued is queued now"
        assert NodeRun.objects.filter(pk=stored.pk, queued_at__lte=now).exists() == bool(
            queued_at
        ), "stored as the ORM stores a time, so comparisons hold (SQLite: text)"
        for name, value in row.items():
            assert getattr(stored, name) == value, name
    made = new_node_row("a", run.version.spec["nodes"]["a"], [], "default")
    assert tuple(made) == tuple(rows[0]) == statements.NEW_NODE_COLUMNS, "the start's columns"


def test_insert_queued_attempts_names_each_job_as_dispatch_does(start_run):
    run = start_run(PARAMS_RUN)
    b = node(run, "b")
    NodeRun.objects.filter(pk=b.pk).update(status=NodeRun.Status.QUEUED, attempt=2)
    now = timezone.now()

    with transaction.atomic():
        statements.insert_queued_attempts([b.pk], now)

    attempt = NodeAttempt.objects.get(node_run=b, number=2)
    assert attempt.rq_job_id == dispatch.job_id(b.pk, 2)
    assert (attempt.status, attempt.queue, attempt.resource_samples) == (
        NodeAttempt.Status.QUEUED,
        b.queue,
        [],
    )
    assert (attempt.created_at, attempt.worker, attempt.error_message) == (now, "", "")


def test_queue_waiting_nodes_moves_only_those_still_waiting_at_that_attempt(start_run):
    run = start_run(PARAMS_RUN)
    a, b = node(run, "a"), node(run, "b")  # a: queued at attempt 1; b: pending at 0
    NodeRun.objects.filter(pk=b.pk).update(
        retry_at=timezone.now(), heartbeat_at=timezone.now(), reason="waits for a"
    )
    now = timezone.now()

    with transaction.atomic():
        moved = statements.queue_waiting_nodes([a.pk, b.pk], 0, now)
        again = statements.queue_waiting_nodes([b.pk], 0, now)

    assert moved == {b.pk}, "a is not waiting; b is, at attempt 0"
    assert again == set(), "b moved already: the same attempt cannot move it twice"
    b.refresh_from_db()
    assert (b.status, b.attempt, b.queued_at, b.updated_at) == (NodeRun.Status.QUEUED, 1, now, now)
    assert (b.retry_at, b.heartbeat_at, b.reason) == (None, None, "")
    a.refresh_from_db()
    assert (a.status, a.attempt) == (NodeRun.Status.QUEUED, 1)


def test_queue_waiting_nodes_takes_a_node_waiting_for_its_retry(start_run):
    run = start_run(PARAMS_RUN)
    a = node(run, "a")
    NodeRun.objects.filter(pk=a.pk).update(status=NodeRun.Status.RETRY_WAIT)

    with transaction.atomic():
        assert statements.queue_waiting_nodes([a.pk], 2, timezone.now()) == set()
        assert statements.queue_waiting_nodes([a.pk], 1, timezone.now()) == {a.pk}

    a.refresh_from_db()
    assert (a.status, a.attempt) == (NodeRun.Status.QUEUED, 2)
