"""Queueing and pools: ready nodes go to ``queued`` while their pool has a free slot.

Every path that queues nodes — a run's start, a success releasing its downstream, a due
retry, a recovery, a freed pool slot — goes through ``queue_or_wait`` or ``fill_pool``
and from there ``_queue_nodes``: a few statements per 1 000 nodes, never one per node,
and one Redis pipeline after commit.
"""

from django.db.models import F

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
    free_slots = {name: _free_slots(name) for name in {node.pool for node in nodes if node.pool}}
    to_queue, waiting = [], {}
    for node in nodes:
        if node.pool and free_slots[node.pool] <= 0:
            waiting.setdefault(node.pool, []).append(node)
            continue
        if node.pool:
            free_slots[node.pool] -= 1
        to_queue.append(node)
    for pool, group in waiting.items():
        reason = f"waiting for pool {pool} (all slots in use)"
        for node in group:
            node.status = NodeRun.Status.PENDING
            node.reason = reason
        for chunk in _chunks([node.pk for node in group]):
            NodeRun.objects.filter(pk__in=chunk).update(
                status=NodeRun.Status.PENDING, retry_at=None, reason=reason, updated_at=now
            )
    return _queue_nodes(to_queue, now)


def _chunks(items: list, size: int = QUEUE_CHUNK) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _free_slots(pool_name: str) -> int:
    slots = ResourcePool.objects.values_list("slots", flat=True).get(name=pool_name)
    used = NodeRun.objects.filter(pool=pool_name, status__in=NodeRun.HOLDS_SLOT).count()
    return slots - used


def _queue_nodes(nodes: list[NodeRun], now) -> list[NodeRun]:
    """Move nodes to ``queued`` with a new attempt number and enqueue them after commit.

    Only nodes still waiting (pending or retry_wait) at the attempt the caller saw move:
    they are locked first, so a node another transaction already moved is left alone.
    Per chunk of ids and attempt number, one SELECT … FOR NO KEY UPDATE and one UPDATE;
    one INSERT … SELECT of their attempts (statements.insert_queued_attempts); one Redis
    pipeline for all the jobs.
    """
    by_attempt: dict[int, list[NodeRun]] = {}
    for node in nodes:
        by_attempt.setdefault(node.attempt, []).append(node)
    queued = []
    for attempt, group in by_attempt.items():
        for chunk in _chunks(group):
            moved = set(
                NodeRun.objects.select_for_update(no_key=True)
                .filter(
                    pk__in=[node.pk for node in chunk],
                    status__in=[NodeRun.Status.PENDING, NodeRun.Status.RETRY_WAIT],
                    attempt=attempt,
                )
                # By id, not NodeRun's default ordering: that joins the run, and a lock
                # on a join locks the run's row too (another run's, from fill_pool).
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            if not moved:
                continue
            NodeRun.objects.filter(pk__in=moved).update(
                status=NodeRun.Status.QUEUED,
                attempt=F("attempt") + 1,
                queued_at=now,
                retry_at=None,
                heartbeat_at=None,
                reason="",
                updated_at=now,
            )
            for node in chunk:
                if node.pk in moved:
                    node.attempt += 1
                    node.status = NodeRun.Status.QUEUED
                    queued.append(node)
    if not queued:
        return []
    for chunk in _chunks([node.pk for node in queued]):
        statements.insert_queued_attempts(chunk, now)
    dispatch.send_after_commit([dispatch.Dispatch.for_node(node) for node in queued])
    return queued


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
