"""A node may say how long it waits for a slot of its pool (``pool_timeout``); past it the
watchdog's sweep fails the node with that reason, and the run goes on or fails as after any
failure."""

from datetime import timedelta

import pytest
import yaml

from diagnostics import watchdog
from workflows import engine
from workflows.definitions.spec import DefinitionError, parse
from workflows.models import NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)


def pooled(name: str, pool_timeout: int | None = 30) -> dict:
    node = {"type": "keel.noop", "pool": "db"}
    if pool_timeout is not None:
        node["pool_timeout"] = pool_timeout
    return {
        "name": name,
        "pools": {"db": 1},
        "nodes": {"load": node, "report": {"type": "keel.noop", "after": ["load"]}},
    }


def node(run, key="load") -> NodeRun:
    return NodeRun.objects.get(run=run, node_key=key)


def waited(run, seconds: float) -> None:
    """As if the node began to wait for its pool ``seconds`` ago."""
    NodeRun.objects.filter(run=run, node_key="load").update(
        updated_at=node(run).updated_at - timedelta(seconds=seconds)
    )


def test_pool_timeout_needs_a_pool_and_whole_seconds():
    source = yaml.safe_dump(
        {"name": "X", "nodes": {"load": {"type": "keel.noop", "pool_timeout": 30}}}
    )
    with pytest.raises(DefinitionError) as caught:
        parse(source)
    assert dict(caught.value.problems) == {
        "nodes.load.pool_timeout": "needs a pool: it is how long the node waits for one of its slots"
    }
    with pytest.raises(DefinitionError) as caught:
        parse(yaml.safe_dump(pooled("X", pool_timeout=0)))
    assert list(dict(caught.value.problems)) == ["nodes.load.pool_timeout"]
    assert parse(yaml.safe_dump(pooled("X"))).spec["nodes"]["load"]["pool_timeout"] == 30
    # Not declared: not in the spec, so an older definition keeps its checksum.
    assert "pool_timeout" not in parse(yaml.safe_dump(pooled("X", None))).spec["nodes"]["load"]


def test_a_node_past_its_pool_timeout_fails_with_that_reason(start_run):
    holder = start_run(pooled("Holder"))  # takes the pool's only slot
    assert node(holder).status == NodeRun.Status.QUEUED
    run = start_run(pooled("Waiter"))
    assert node(run).status == NodeRun.Status.PENDING and node(run).pool_timeout_seconds == 30

    waited(run, 10)
    assert engine.fail_pool_timeouts() == 0  # 10 s of 30: it waits on
    waited(run, 25)
    assert engine.fail_pool_timeouts() == 1

    load = node(run)
    assert load.status == NodeRun.Status.FAILED and load.attempt == 0
    assert "for a slot of pool db, longer than its pool_timeout (30s); not retried" in load.reason
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED  # report can never run now
    event = RunEvent.objects.get(run=run, node_run=load)
    assert (event.before, event.after) == ({"status": "pending"}, {"status": "failed"})
    assert node(holder).status == NodeRun.Status.QUEUED  # the holder is left alone
    assert engine.fail_pool_timeouts() == 0  # nothing twice


def test_nodes_without_a_pool_timeout_wait_as_long_as_it_takes(start_run):
    start_run(pooled("Holder", None))
    run = start_run(pooled("Patient", None))
    waited(run, 86_400)
    assert engine.fail_pool_timeouts() == 0
    assert node(run).status == NodeRun.Status.PENDING


def test_the_watchdog_tick_fails_them_and_says_so(start_run, clean_redis):
    start_run(pooled("Holder"))
    run = start_run(pooled("Waiter", pool_timeout=5))
    waited(run, 60)
    report = watchdog.tick()
    assert report.pool_waits_failed == 1
    assert "pool waits timed out: 1" in str(report)
    assert node(run).status == NodeRun.Status.FAILED
