"""Queueing and pools: ready nodes go to ``queued`` while their pool has a free slot.

Every path that queues nodes — a success releasing its downstream, a due retry, a
recovery, a freed pool slot — goes through ``queue_or_wait`` or ``fill_pool`` and from
there ``_queue_nodes``: a few statements per 1 000 nodes, never one per node, and one
Redis pipeline after commit. A run's roots are born queued (``runs.start_run``: the
update of 1 000 just-inserted rows was a tenth of a wide start), by the same slot
decision (``slots_free``) and the same attempts and jobs (``record_queued``).
"""

from workflows.engine import statements
from workflows.models import NodeRun, ResourcePool, Run
from workflows.runtime import dispatch

# Ids per statement when queueing many nodes at once (well under any parameter limit).
QUEUE_CHUNK = 1000


def queue_or_wait(run: Run, nodes: list[NodeRun], now) -> list[NodeRun]:
    """Queue ready nodes; those whose pool is full wait as ``pending`` with the reason.

    The caller holds the run lock and the locks of the run's pools. Returns the nodes
    that were queued.
    """
    if not nodes:
        return []
    to_queue, waiting = [], {}
    for node, free in zip(nodes, slots_free([node.pool for node in nodes]), strict=True):
        if free:
            to_queue.append(node)
        else:
            waiting.setdefault(node.pool, []).append(node)
    for pool, group in waiting.items():
        reason = pool_wait_reason(pool)
        for node in group:
            node.status = NodeRun.Status.PENDING
            node.reason = reason
        for chunk in _chunks([node.pk for node in group]):
            NodeRun.objects.filter(pk__in=chunk).update(
                status=NodeRun.Status.PENDING, retry_at=None, reason=reason, updated_at=now
            )
    return _queue_nodes(to_queue, now)


def slots_free(pools: list[str]) -> list[bool]:
    """For ready nodes in this order, by their pools ("" for none): may each be queued
    now, its pool having a slot left once those before it took theirs? The caller holds
    the pools' locks."""
    free = {name: _free_slots(name) for name in set(pools) if name}
    answers = []
    for pool in pools:
        answers.append(not pool or free[pool] > 0)
        if pool:
            free[pool] -= 1
    return answers


def pool_wait_reason(pool: str) -> str:
    return f"waiting for pool {pool} (all slots in use)"


def _chunks(items: list, size: int = QUEUE_CHUNK) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _free_slots(pool_name: str) -> int:
    slots = ResourcePool.objects.values_list("slots", flat=True).get(name=pool_name)
    used = NodeRun.objects.filter(pool=pool_name, status__in=NodeRun.HOLDS_SLOT).count()
    return slots - used


def _queue_nodes(nodes: list[NodeRun], now) -> list[NodeRun]:
    """Move nodes to ``queued`` with a new attempt number and enqueue them after commit.

    Only nodes still waiting (pending or retry_wait) at the attempt the caller saw move
    (a compare-and-set), so a node another transaction already moved is left alone. Per
    chunk of ids and attempt number, one UPDATE … RETURNING
    (statements.queue_waiting_nodes); one INSERT … SELECT of their attempts
    (statements.insert_queued_attempts); one Redis pipeline for all the jobs.
    """
    by_attempt: dict[int, list[NodeRun]] = {}
    for node in nodes:
        by_attempt.setdefault(node.attempt, []).append(node)
    queued = []
    for attempt, group in by_attempt.items():
        for chunk in _chunks(group):
            moved = statements.queue_waiting_nodes([node.pk for node in chunk], attempt, now)
            for node in chunk:
                if node.pk in moved:
                    node.attempt += 1
                    node.status = NodeRun.Status.QUEUED
                    queued.append(node)
    return record_queued(queued, now)


def record_queued(nodes: list, now) -> list:
    """What follows a node's move to ``queued`` (or a root's birth there): its attempt
    rows, and its job sent after commit (one Redis pipeline)."""
    if not nodes:
        return []
    for chunk in _chunks([node.pk for node in nodes]):
        statements.insert_queued_attempts(chunk, now)
    dispatch.send_after_commit([dispatch.Dispatch.for_node(node) for node in nodes])
    return nodes


def fill_pool(name: str, now) -> None:
    """Give free slots of a pool to ready nodes waiting for it, oldest first, in any run.

    The caller holds the pool's lock. Waiting nodes of other runs are moved with a
    conditional update, without taking their run's lock (see the lock order above),
    all of them in one ``_queue_nodes``.
    """
    free = _free_slots(name)
    if free <= 0:
        return
    waiting = list(
        NodeRun.objects.filter(
            pool=name,
            status=NodeRun.Status.PENDING,
            pending_upstreams=0,
            run__status=Run.Status.RUNNING,
        ).order_by("id")[:free]
    )
    _queue_nodes(waiting, now)
