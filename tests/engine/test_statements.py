"""The engine's named statements (workflows/engine/statements.py), on the database the
suite runs against: `make test` runs them on SQLite, `.ci/run` on PostgreSQL too."""

import pytest
from django.db import connection, transaction
from django.utils import timezone

from workflows.engine import statements
from workflows.engine.runs import new_node_row
from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run
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


FAN_IN = {
    "name": "Fan-in",
    "nodes": {
        "a": {"type": "keel.noop"},
        "b": {"type": "keel.noop"},
        "c": {"type": "keel.noop", "after": ["a", "b"]},
        "d": {"type": "keel.noop", "after": ["a"], "pool": "warehouse"},
    },
    "pools": {"warehouse": 1},
}


def claim(node_run: NodeRun, attempt: int = 1, now=None, worker: str = "w1"):
    return statements.claim(
        node_run.pk, attempt, worker=worker, pid=42, host="h", now=now or timezone.now()
    )


def test_claim_moves_node_and_attempt_to_running_once_and_returns_python_values(start_run):
    run = start_run(PARAMS_RUN)
    a = node(run, "a")
    row = NodeAttempt.objects.get(node_run=a, number=1)
    now = timezone.now()

    claimed = claim(a, now=now)
    again = claim(a, now=now, worker="w2")

    assert claimed == {
        "run_id": run.pk,
        "node_key": "a",
        "node_type": "test.record",
        "params": a.params,
        "upstream": [],
        "timeout_seconds": a.timeout_seconds,
        "soft_timeout_seconds": a.soft_timeout_seconds,
        "attempt_id": row.pk,
    }
    assert isinstance(claimed["params"], dict)
    assert again is None, "a claimed node cannot be claimed again"
    a.refresh_from_db()
    assert (a.status, a.started_at, a.heartbeat_at) == (NodeRun.Status.RUNNING, now, now)
    row.refresh_from_db()
    assert (row.status, row.worker, row.pid, row.host, row.started_at) == (
        "running",
        "w1",
        42,
        "h",
        now,
    )


def test_claim_commits_by_itself(start_run):
    """The worker runs the node right after: its claim must be committed, not left open."""
    a = node(start_run(PARAMS_RUN), "a")
    assert claim(a) is not None
    assert transaction.get_autocommit(), "no transaction left open"
    a.refresh_from_db()
    assert a.status == NodeRun.Status.RUNNING


def test_claim_refuses_another_attempt_number_and_leaves_the_attempt_row(start_run):
    a = node(start_run(PARAMS_RUN), "a")
    assert claim(a, attempt=2) is None
    a.refresh_from_db()
    assert a.status == NodeRun.Status.QUEUED
    assert NodeAttempt.objects.get(node_run=a, number=1).status == NodeAttempt.Status.QUEUED


def test_claim_of_a_node_whose_attempt_row_is_not_queued_has_no_attempt_id(start_run):
    a = node(start_run(PARAMS_RUN), "a")
    NodeAttempt.objects.filter(node_run=a).update(status=NodeAttempt.Status.RUNNING)
    assert claim(a)["attempt_id"] is None


def succeed(run, node_run, output=None, attempt=1, now=None):
    with transaction.atomic():
        return statements.succeed(run.pk, node_run.pk, attempt, output, now or timezone.now())


def test_succeed_applies_only_to_the_running_attempt_and_keeps_the_output(start_run):
    run = start_run(PARAMS_RUN)
    a = node(run, "a")
    output = {"rows": 3, "name": "café ✓", "nested": [1, None, {"x": 1.5}]}
    now = timezone.now()

    assert succeed(run, a, output) is None, "still queued"
    claim(a)
    assert succeed(run, a, output, attempt=2) is None, "another attempt"
    assert not Checkpoint.objects.filter(node_run=a).exists(), "nothing written when refused"
    assert NodeAttempt.objects.get(node_run=a, number=1).status == NodeAttempt.Status.RUNNING
    done = succeed(run, a, output, now=now)

    assert done["pool"] == "warehouse"
    assert [(n.node_key, n.status, n.attempt) for n in done["ready"]] == [("b", "pending", 0)]
    a.refresh_from_db()
    assert (a.status, a.output, a.finished_at, a.reason) == ("succeeded", output, now, "")
    attempt = NodeAttempt.objects.get(node_run=a, number=1)
    assert (attempt.status, attempt.finished_at) == (NodeAttempt.Status.SUCCEEDED, now)
    assert succeed(run, a, output) is None, "a success is applied once"


def test_succeed_counts_the_node_off_its_downstream_and_returns_only_those_ready(start_run):
    run = start_run(FAN_IN)
    a, b, c, d = (node(run, key) for key in "abcd")
    claim(a), claim(b)

    first = succeed(run, a)
    assert [n.pk for n in first["ready"]] == [d.pk], "c still waits for b"
    ready = first["ready"][0]
    assert (ready.run_id, ready.queue, ready.timeout_seconds, ready.pool) == (
        run.pk,
        d.queue,
        d.timeout_seconds,
        "warehouse",
    )
    assert succeed(run, b)["ready"][0].pk == c.pk
    assert {n.node_key: n.pending_upstreams for n in NodeRun.objects.filter(run=run)} == {
        "a": 0,
        "b": 0,
        "c": 0,
        "d": 0,
    }


@pytest.mark.parametrize(
    ("b_status", "moving"),
    [
        ("running", True),  # another node still runs
        ("succeeded", True),  # c becomes ready
        ("failed", False),  # c can never run (d is skipped)
    ],
)
def test_succeed_says_whether_anything_still_moves_as_still_moving_would(
    start_run, b_status, moving
):
    run = start_run(FAN_IN)
    a, b = node(run, "a"), node(run, "b")
    NodeRun.objects.filter(run=run, node_key="d").update(status=NodeRun.Status.SKIPPED)
    claim(a)
    NodeRun.objects.filter(pk=b.pk).update(status=b_status, pending_upstreams=0)
    if b_status == "succeeded":  # as if b's success had counted itself off c
        NodeRun.objects.filter(run=run, node_key="c").update(pending_upstreams=1)

    done = succeed(run, a)

    assert done["moving"] is moving
    assert statements.still_moving(run.pk) is moving, "the same answer, read afterwards"


def test_succeed_of_the_last_node_says_nothing_moves(start_run):
    run = start_run(PARAMS_RUN)
    a, b = node(run, "a"), node(run, "b")
    NodeRun.objects.filter(pk=b.pk).update(status=NodeRun.Status.SUCCEEDED)
    claim(a)
    assert succeed(run, a)["moving"] is False


def test_the_node_done_checkpoint_is_numbered_after_the_last_one(start_run):
    run = start_run(FAN_IN)
    a, b = node(run, "a"), node(run, "b")
    Checkpoint.objects.create(
        run=run, node_run=a, kind=Checkpoint.Kind.PROGRESS, sequence=4, attempt=1, state={}
    )
    now = timezone.now()
    claim(a), claim(b)

    succeed(run, a, {"n": 1}, now=now)
    succeed(run, b, None, now=now)

    done = {c.node_run_id: c for c in Checkpoint.objects.filter(kind="node_done")}
    assert (done[a.pk].sequence, done[a.pk].state, done[a.pk].created_at) == (
        5,
        {"output": {"n": 1}},
        now,
    )
    assert (done[b.pk].sequence, done[b.pk].state, done[b.pk].attempt) == (1, {"output": None}, 1)


@pytest.mark.parametrize(
    ("c_status", "c_pending", "moving"),
    [
        ("queued", 0, True),
        ("running", 0, True),
        ("retry_wait", 0, True),
        ("pending", 0, True),  # ready, waits for a pool slot
        ("pending", 1, False),  # behind an upstream that failed
        ("failed", 0, False),
        ("succeeded", 0, False),
    ],
)
def test_still_moving(start_run, c_status, c_pending, moving):
    run = start_run(FAN_IN)
    NodeRun.objects.filter(run=run).exclude(node_key="c").update(status=NodeRun.Status.SUCCEEDED)
    NodeRun.objects.filter(run=run, node_key="c").update(
        status=c_status, pending_upstreams=c_pending
    )
    assert statements.still_moving(run.pk) is moving


def test_lock_run_for_outcome_reads_status_and_pools(start_run):
    run = start_run(PARAMS_RUN)
    with transaction.atomic():
        locked = statements.lock_run_for_outcome(run.pk)
    assert (locked.pk, locked.status, locked.pools) == (run.pk, "running", ["warehouse"])
    with pytest.raises(Run.DoesNotExist):
        statements.lock_run_for_outcome(-1)


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


def test_the_statements_give_the_same_results_once_prepared(start_run):
    """On PostgreSQL psycopg prepares a named statement after five runs on a connection:
    eight nodes claimed and succeeded in this process go through both forms."""
    nodes = {f"n{i}": {"type": "keel.noop"} for i in range(8)}
    run = start_run(
        {"name": "Eight", "nodes": {**nodes, "last": {"type": "keel.noop", "after": list(nodes)}}}
    )
    for key in nodes:
        assert claim(node(run, key))["node_key"] == key
    for key in nodes:
        done = succeed(run, node(run, key))
        assert done["moving"] is True
    assert [n.node_key for n in done["ready"]] == ["last"]
    assert NodeRun.objects.get(run=run, node_key="last").pending_upstreams == 0
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            assert cursor.fetchone()[0] >= 2, "the claim and the success are prepared"
