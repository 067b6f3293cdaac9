"""Queueing many nodes at once: a run's start, a freed pool, a resume.

Every path goes through the same bulk queueing, so the SQL statements do not grow with
the number of nodes, and every job lands in its queue (one Redis pipeline after commit).
"""

from collections import defaultdict

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from workflows import engine
from workflows.models import NodeAttempt, NodeRun, ResourcePool, Run
from workflows.runtime import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

PRIORITIES = ("high", "default", "low")


def wide(count: int, name: str, pool: str | None = None) -> dict:
    """``count`` independent nodes spread over the three priority queues."""
    nodes = {
        f"n{index:03d}": {"type": "keel.noop", "priority": PRIORITIES[index % 3]}
        for index in range(count)
    }
    definition = {"name": name, "nodes": nodes}
    if pool:
        definition["pools"] = {pool: 1}
        for node in nodes.values():
            node["pool"] = pool
    return definition


def statements(action) -> tuple[int, object]:
    with CaptureQueriesContext(connection) as queries:
        result = action()
    return len(queries.captured_queries), result


def assert_every_queued_node_has_its_job_in_its_queue(run: Run, count: int) -> None:
    attempts = list(
        NodeAttempt.objects.filter(node_run__run=run, status=NodeAttempt.Status.QUEUED)
        .select_related("node_run")
        .order_by("id")
    )
    assert len(attempts) == count
    by_queue = defaultdict(set)
    for attempt in attempts:
        node = attempt.node_run
        assert (node.status, node.attempt) == (NodeRun.Status.QUEUED, attempt.number)
        assert attempt.rq_job_id == dispatch.job_id(node.pk, attempt.number)
        by_queue[attempt.queue].add(attempt.rq_job_id)
    for queue, job_ids in by_queue.items():
        assert job_ids <= set(dispatch.get_queue(queue).get_job_ids())


def test_starting_a_wide_run_costs_the_same_statements_for_10_and_200_nodes(
    make_version, clean_redis
):
    counted = {}
    for count in (10, 200):
        version = make_version(wide(count, f"Wide {count}"))
        counted[count], run = statements(
            lambda version=version: engine.start_run(version, params={}, trigger="test")
        )
        assert_every_queued_node_has_its_job_in_its_queue(run, count)
        assert set(run.nodes.values_list("queue", flat=True)) == set(PRIORITIES)
    assert counted[200] == counted[10], "one INSERT of node runs, one of attempts, on both"


def test_a_freed_pool_queues_every_waiting_node_at_once(make_version, clean_redis):
    counted = {}
    for count in (10, 60):
        pool = f"wide{count}"
        version = make_version(wide(count, f"Pooled {count}", pool=pool))
        started, run = statements(
            lambda version=version: engine.start_run(version, params={}, trigger="test")
        )
        waiting = run.nodes.filter(status=NodeRun.Status.PENDING)
        assert waiting.count() == count - 1
        assert {node.reason for node in waiting} == {f"waiting for pool {pool} (all slots in use)"}

        ResourcePool.objects.filter(name=pool).update(slots=count)
        with transaction.atomic():
            filled, _ = statements(lambda pool=pool: engine.fill_pool(pool, timezone.now()))
        assert_every_queued_node_has_its_job_in_its_queue(run, count)
        counted[count] = (started, filled)
    # One node queued at the start, the others by fill_pool.
    assert counted[60] == counted[10]


def test_resuming_a_wide_cancelled_run_requeues_every_node_in_the_same_statements(
    make_version, clean_redis
):
    counted = {}
    for count in (10, 200):
        run = engine.start_run(make_version(wide(count, f"Resumed {count}")), trigger="test")
        assert engine.cancel_run(run.pk, actor="test", reason="stop for now")
        counted[count], result = statements(
            lambda run=run: engine.recover(
                "resume", run.pk, engine.plan_resume, actor="test", reason="carry on"
            )
        )
        assert result.changed and result.run.status == Run.Status.RUNNING
        assert set(run.nodes.values_list("attempt", "attempts_base")) == {(2, 1)}
        assert_every_queued_node_has_its_job_in_its_queue(run, count)
    assert counted[200] == counted[10]
