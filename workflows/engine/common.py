"""What every engine module shares: the lock order, the engine's actor name, its errors.

Every transition runs in ``transaction.atomic()`` and takes row locks in one order — the
run, then the pools it uses (by name), then node rows — so two transactions never wait
on each other in a circle. They are ``FOR NO KEY UPDATE`` locks: Keel never changes a
primary key, and unlike ``FOR UPDATE`` they leave alone the key-share locks PostgreSQL's
foreign-key checks take (an event written outside the run's lock checks its node-run
and run at commit, in no set order). On SQLite the transaction holds the database.
"""

from workflows.engine import statements
from workflows.models import NodeRun, ResourcePool, Run

ENGINE = "engine"
PRIORITY_QUEUES = {"high": "high", "default": "default", "low": "low"}


class EngineError(Exception):
    """A transition that cannot happen; the message says why and what to do."""


class RunParamsError(EngineError):
    pass


def lock_run(run_id: int) -> Run:
    """Take the run's lock, first in the lock order."""
    return Run.objects.select_for_update(no_key=True).get(pk=run_id)


def lock_pools(run: Run) -> dict[str, int]:
    """Lock the run's pools in name order; return {name: slots}."""
    slots = {}
    for name in run.pools:
        pool, _ = ResourcePool.objects.get_or_create(name=name, defaults={"slots": 1})
        pool = ResourcePool.objects.select_for_update(no_key=True).get(pk=pool.pk)
        slots[name] = pool.slots
    return slots


def lock_run_for_outcome(node_run_id: int, run_id: int | None = None) -> Run:
    """Lock a node's run, then the run's pools: what an outcome takes before the node."""
    if run_id is None:
        run_id = NodeRun.objects.values_list("run_id", flat=True).get(pk=node_run_id)
    run = statements.lock_run_for_outcome(run_id)
    lock_pools(run)
    return run


def lock_for_outcome(node_run_id: int, run_id: int | None = None) -> tuple[Run, NodeRun]:
    """Lock the run, its pools, then the node: what a failure or an abandon needs."""
    run = lock_run_for_outcome(node_run_id, run_id)
    node = NodeRun.objects.select_for_update(no_key=True).get(pk=node_run_id)
    return run, node
