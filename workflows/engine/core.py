"""The engine: the one place where runs and node-runs change state.

Executor, watchdog and operations all call these functions; nothing else writes a
status. Every transition runs in ``transaction.atomic()``:

* locks are taken in one order — the run row, then the pools it uses (by name),
  then node rows — so two transactions never wait on each other in a circle;
* they are ``FOR NO KEY UPDATE`` locks: Keel never changes a primary key, and unlike
  ``FOR UPDATE`` they leave alone the key-share locks PostgreSQL's foreign-key checks
  take. An event written outside the run's lock (a finding, a stale message) checks
  its node-run and its run at commit, in no set order; against ``FOR UPDATE`` that
  could wait on a transition in a circle;
* a result is applied only if the node is still ``running`` *that* attempt
  (compare-and-set); anything else is a stale message, recorded as a RunEvent and
  otherwise ignored;
* jobs are sent to RQ only after commit (workflows/dispatch.py).
"""

import logging
import random
from dataclasses import asdict, dataclass
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from workflows.definitions import graph
from workflows.definitions.params import run_param_problems
from workflows.engine import sql
from workflows.models import (
    Checkpoint,
    NodeAttempt,
    NodeRun,
    ResourcePool,
    Run,
    RunEvent,
    WorkflowVersion,
)
from workflows.runtime import dispatch

logger = logging.getLogger(__name__)

ENGINE = "engine"
PRIORITY_QUEUES = {"high": "high", "default": "default", "low": "low"}


class EngineError(Exception):
    """A transition that cannot happen; the message says why and what to do."""


class RunParamsError(EngineError):
    pass


@dataclass(frozen=True)
class Failure:
    """What went wrong in one attempt, as the executor (or the watchdog) saw it."""

    error_type: str
    message: str
    traceback: str = ""
    timed_out: bool = False
    # Class names of the exception and its bases, matched against ``retry_on``.
    names: tuple[str, ...] = ()
    retryable: bool = True
    # True when the attempt was ended from outside (lost worker): the error list of
    # ``retry_on`` says nothing about it.
    ignore_retry_on: bool = False


@dataclass(frozen=True)
class NodeFacts:
    """What cannot change about a node-run once its run has started (safe to read unlocked)."""

    run_id: int
    downstream: tuple[str, ...]
    run_pools: tuple[str, ...]


@dataclass(frozen=True)
class Claim:
    node_run_id: int
    run_id: int
    attempt: int
    node_key: str
    node_type: str
    params: dict
    upstream: list
    downstream: tuple[str, ...]
    run_pools: tuple[str, ...]
    timeout_seconds: int
    soft_timeout_seconds: int | None
    attempt_id: int

    @property
    def facts(self) -> NodeFacts:
        return NodeFacts(self.run_id, self.downstream, self.run_pools)

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Claim":
        return cls(
            **{
                **data,
                "downstream": tuple(data["downstream"]),
                "run_pools": tuple(data["run_pools"]),
            }
        )


# --- Starting a run ---------------------------------------------------------------------------


def start_run(
    version: WorkflowVersion,
    *,
    params: dict | None = None,
    trigger: str,
    priority: str = "default",
    request_key: str | None = None,
) -> Run:
    """Create a run pinned to ``version`` and queue its root nodes.

    1. Check the run params against those the definition declares.
    2. Create the run and one NodeRun per node, copying what a worker needs.
    3. Queue the nodes with no upstream (pools permitting); enqueue after commit.
    """
    spec = version.spec
    run_params = resolve_run_params(spec, params or {})
    now = timezone.now()
    with transaction.atomic():
        run = Run.objects.create(
            workflow_id=version.workflow_id,
            version=version,
            status=Run.Status.RUNNING,
            params=run_params,
            trigger=trigger,
            priority=priority,
            started_at=now,
            deadline=now + timedelta(seconds=spec["timeout"]) if spec.get("timeout") else None,
            pools=sorted({node["pool"] for node in spec["nodes"].values() if node["pool"]}),
        )
        downstream = graph.downstream_map(spec)
        NodeRun.objects.bulk_create(
            [
                _new_node_run(run, key, spec["nodes"][key], downstream[key], priority, now)
                for key in graph.node_keys(spec)
            ],
            batch_size=500,
        )
        RunEvent.objects.create(
            run=run,
            kind=RunEvent.Kind.TRANSITION,
            actor=trigger,
            reason="run started",
            request_key=request_key,
            before={"status": Run.Status.PENDING},
            after={"status": Run.Status.RUNNING},
        )
        lock_pools(run)
        roots = list(NodeRun.objects.filter(run=run, pending_upstreams=0).order_by("id"))
        queue_or_wait(run, roots, now)
    return run


def resolve_run_params(spec: dict, given: dict) -> dict:
    declared = spec.get("params") or {}
    if not isinstance(given, dict):
        raise RunParamsError('Run params must be a JSON object, e.g. {"date": "2026-01-31"}.')
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise RunParamsError(
            f"Unknown run param(s) {', '.join(unknown)} for workflow {spec['slug']!r} "
            f"(it declares: {known})."
        )
    # The one type check of run params: the API, the dashboard form and run_workflow share it.
    problems = run_param_problems(declared, given)
    if problems:
        raise RunParamsError("; ".join(f"{path}: {message}" for path, message in problems))
    return {**declared, **given}


def _new_node_run(run, key, node, downstream, run_priority, now) -> NodeRun:
    from workflows.definitions import registry

    priority = node.get("priority") or run_priority
    retries = node["retries"]
    return NodeRun(
        run=run,
        node_key=key,
        node_type=node["type"],
        status=NodeRun.Status.PENDING,
        max_attempts=retries.get("max_attempts", 1),
        queue=PRIORITY_QUEUES[priority],
        pool=node["pool"],
        timeout_seconds=node["timeout"],
        soft_timeout_seconds=node.get("soft_timeout"),
        expected_seconds=node.get("expected_duration"),
        stall_after_seconds=node.get("stall_after"),
        params=registry.get(node["type"]).resolve_params(node["params"]),
        upstream=list(node["after"]),
        downstream=downstream,
        retry_policy=retries,
        pending_upstreams=len(node["after"]),
        reason=f"waiting for upstream: {', '.join(node['after'])}" if node["after"] else "",
        created_at=now,
        updated_at=now,
    )


# --- Queueing and pools -----------------------------------------------------------------------


def lock_pools(run: Run) -> dict[str, int]:
    """Lock the run's pools in name order; return {name: slots}."""
    slots = {}
    for name in run.pools:
        pool, _ = ResourcePool.objects.get_or_create(name=name, defaults={"slots": 1})
        pool = ResourcePool.objects.select_for_update(no_key=True).get(pk=pool.pk)
        slots[name] = pool.slots
    return slots


def queue_or_wait(run: Run, nodes: list[NodeRun], now) -> list[NodeRun]:
    """Queue ready nodes; those whose pool is full wait as ``pending`` with the reason.

    The caller holds the run lock and the locks of the run's pools. Returns the nodes
    that were queued.
    """
    if not nodes:
        return []
    free_slots = {name: _free_slots(name) for name in {node.pool for node in nodes if node.pool}}
    to_queue, waiting = [], []
    for node in nodes:
        if node.pool and free_slots[node.pool] <= 0:
            waiting.append(node)
            continue
        if node.pool:
            free_slots[node.pool] -= 1
        to_queue.append(node)
    for node in waiting:
        node.status = NodeRun.Status.PENDING
        node.reason = f"waiting for pool {node.pool} (all slots in use)"
        NodeRun.objects.filter(pk=node.pk).update(
            status=node.status, retry_at=None, reason=node.reason, updated_at=now
        )
    return _queue_nodes(run, to_queue, now)


def _free_slots(pool_name: str) -> int:
    slots = ResourcePool.objects.values_list("slots", flat=True).get(name=pool_name)
    used = NodeRun.objects.filter(pool=pool_name, status__in=NodeRun.HOLDS_SLOT).count()
    return slots - used


def _queue_nodes(run: Run, nodes: list[NodeRun], now) -> list[NodeRun]:
    """Move nodes to ``queued`` with a new attempt number and enqueue them after commit.

    Conditional on the node still waiting (pending or retry_wait) at the attempt the
    caller saw, so a node another transaction already moved is left alone; RETURNING
    says which ones moved. One UPDATE per distinct attempt number (usually one for
    all) and one INSERT for the attempts: a 1000-root run costs two statements.
    """
    stamp = sql.to_db(NodeRun, "queued_at", now)
    by_attempt: dict[int, list[NodeRun]] = {}
    for node in nodes:
        by_attempt.setdefault(node.attempt, []).append(node)
    queued = []
    for attempt, group in by_attempt.items():
        for start in range(0, len(group), QUEUE_CHUNK):
            chunk = group[start : start + QUEUE_CHUNK]
            moved = {
                pk
                for (pk,) in sql.fetch_all(
                    *_queue_statement(
                        f"id IN ({sql.placeholders(len(chunk))}) AND status IN (%s, %s)"
                        " AND attempt = %s",
                        [
                            *(node.pk for node in chunk),
                            NodeRun.Status.PENDING,
                            NodeRun.Status.RETRY_WAIT,
                            attempt,
                        ],
                        stamp,
                        returning="id",
                    )
                )
            }
            for node in chunk:
                if node.pk in moved:
                    node.attempt += 1
                    node.status = NodeRun.Status.QUEUED
                    queued.append(node)
    sql.insert(
        [
            NodeAttempt(
                node_run_id=node.pk,
                number=node.attempt,
                status=NodeAttempt.Status.QUEUED,
                rq_job_id=dispatch.job_id(node.pk, node.attempt),
                queue=node.queue,
                created_at=now,
                updated_at=now,
            )
            for node in queued
        ]
    )
    dispatch.send_after_commit([dispatch.Dispatch.for_node(node) for node in queued])
    return queued


# Ids per UPDATE when queueing many nodes at once (well under any parameter limit).
QUEUE_CHUNK = 1000


def _queue_statement(where: str, params: list, stamp, *, returning: str) -> tuple[str, list]:
    """The UPDATE that moves the node-runs ``where`` selects to ``queued``, next attempt.

    The caller also inserts their NodeAttempt rows and sends them after commit.
    """
    return (
        f"UPDATE {sql.table(NodeRun)} SET status = %s, attempt = attempt + 1, queued_at = %s,"
        " retry_at = NULL, heartbeat_at = NULL, reason = '', updated_at = %s"
        f" WHERE {where} RETURNING {returning}",
        [NodeRun.Status.QUEUED, stamp, stamp, *params],
    )


def fill_pool(name: str, now) -> None:
    """Give free slots of a pool to ready nodes waiting for it, oldest first, in any run.

    The caller holds the pool's lock. Waiting nodes of other runs are moved with a
    conditional update, without taking their run's lock (see the lock order above).
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
        )
        .select_related("run")
        .order_by("id")[:free]
    )
    for node in waiting:
        _queue_nodes(node.run, [node], now)


# --- The worker side: claim, heartbeat, checkpoint --------------------------------------------


def claim_attempt(
    node_run_id: int, attempt: int, *, worker: str, pid: int, host: str
) -> Claim | None:
    """Compare-and-set ``queued`` → ``running`` for exactly this attempt.

    Returns None when the message is stale (the node moved on, was cancelled, or this
    very message was already delivered); that is recorded, and nothing runs.

    One batch: a single round trip on PostgreSQL (workflows/sql.py). The claim does not
    wait for the disk (sql.commit_without_waiting_for_disk): it only says an attempt
    started, and waiting cost a quarter of a millisecond per node on this kind of
    machine. Should a crash of PostgreSQL undo it, the node is queued again while its
    attempt runs: the attempt is told to stop at its next beat, its result is rejected
    as stale, and the watchdog sends the node again once RQ has ended the job. A
    re-run, as when a worker dies; never a result lost or applied twice. Outcomes and
    every other transition wait for the disk.
    """
    now = sql.to_db(NodeRun, "started_at", timezone.now())
    batch = sql.Batch()
    sql.commit_without_waiting_for_disk(batch)
    batch.add(
        f"UPDATE {sql.table(NodeRun)} SET status = %s, started_at = %s, heartbeat_at = %s,"
        " updated_at = %s WHERE id = %s AND status = %s AND attempt = %s"
        " RETURNING run_id, node_key, node_type, params, upstream, downstream,"
        f" timeout_seconds, soft_timeout_seconds, (SELECT pools FROM {sql.table(Run)}"
        f" WHERE {sql.table(Run)}.id = {sql.table(NodeRun)}.run_id)",
        [NodeRun.Status.RUNNING, now, now, now, node_run_id, NodeRun.Status.QUEUED, attempt],
        name="node",
    )
    # Only if the node was claimed just now, by the statement above.
    batch.add(
        f"UPDATE {sql.table(NodeAttempt)} SET status = %s, worker = %s, pid = %s, host = %s,"
        " started_at = %s, updated_at = %s WHERE node_run_id = %s AND number = %s"
        f" AND status = %s AND EXISTS (SELECT 1 FROM {sql.table(NodeRun)} WHERE id = %s"
        " AND status = %s AND attempt = %s AND started_at = %s) RETURNING id",
        [
            *(NodeAttempt.Status.RUNNING, worker, pid, host, now, now),
            *(node_run_id, attempt, NodeAttempt.Status.QUEUED),
            *(node_run_id, NodeRun.Status.RUNNING, attempt, now),
        ],
        name="attempt",
    )
    rows = batch.run()
    claimed = rows["node"]
    if not claimed:
        _record_stale_message(node_run_id, attempt, worker, "claim")
        return None
    [(run_id, node_key, node_type, params, upstream, downstream, timeout, soft, pools)] = claimed
    return Claim(
        node_run_id=node_run_id,
        run_id=run_id,
        attempt=attempt,
        node_key=node_key,
        node_type=node_type,
        params=sql.from_db(NodeRun, "params", params),
        upstream=sql.from_db(NodeRun, "upstream", upstream),
        downstream=tuple(sql.from_db(NodeRun, "downstream", downstream)),
        run_pools=tuple(sql.from_db(Run, "pools", pools)),
        timeout_seconds=timeout,
        soft_timeout_seconds=soft,
        attempt_id=rows["attempt"][0][0],
    )


def note_attempt(node_run_id: int, attempt: int, note: str, *, actor: str) -> None:
    """Say in the run's history what happened to an attempt's process that is not a
    transition: its outcome waited for the database, or it was stopped once superseded."""
    run_id = NodeRun.objects.filter(pk=node_run_id).values_list("run_id", flat=True).first()
    if run_id is None:
        return
    RunEvent.objects.create(
        run_id=run_id,
        node_run_id=node_run_id,
        kind=RunEvent.Kind.TRANSITION,
        actor=actor,
        reason=note[:2000],
        before={"attempt": attempt},
    )


def attempt_is_running(node_run_id: int, attempt: int) -> bool:
    return NodeRun.objects.filter(
        pk=node_run_id, status=NodeRun.Status.RUNNING, attempt=attempt
    ).exists()


def run_params(run_id: int) -> dict:
    return Run.objects.values_list("params", flat=True).get(pk=run_id)


def _record_stale_message(node_run_id: int, attempt: int, worker: str, what: str) -> None:
    row = NodeRun.objects.filter(pk=node_run_id).values("run_id", "status", "attempt").first()
    if row is None:
        logger.warning(
            "Ignoring %s for node-run %s attempt %s: no such node-run.", what, node_run_id, attempt
        )
        return
    logger.info(
        "Ignoring stale %s for node-run %s attempt %s (node is %s, attempt %s).",
        what,
        node_run_id,
        attempt,
        row["status"],
        row["attempt"],
    )
    RunEvent.objects.create(
        run_id=row["run_id"],
        node_run_id=node_run_id,
        kind=RunEvent.Kind.STALE,
        actor=worker or ENGINE,
        reason=(
            f"rejected {what} of attempt {attempt}: the node is {row['status']} "
            f"at attempt {row['attempt']}"
        ),
        before={"attempt": attempt},
        after={"status": row["status"], "attempt": row["attempt"]},
    )


def record_heartbeat(
    node_run_id: int, attempt: int, *, progress=None, sample=None, samples=None
) -> bool:
    """Write heartbeat_at (and progress, resource samples) if the attempt is still current.

    Returns False when it is not (cancelled, superseded): the node should stop.
    """
    now = timezone.now()
    fields = {"heartbeat_at": now, "updated_at": now}
    if progress is not None:
        fields["progress"] = progress
    current = NodeRun.objects.filter(
        pk=node_run_id, status=NodeRun.Status.RUNNING, attempt=attempt
    ).update(**fields)
    if current and sample:
        NodeAttempt.objects.filter(node_run_id=node_run_id, number=attempt).update(
            cpu_percent=sample.get("cpu_percent"),
            rss_bytes=sample.get("rss_bytes"),
            io_wait_percent=sample.get("io_wait_percent"),
            resource_samples=samples or [sample],
            updated_at=now,
        )
    return bool(current)


class AttemptSuperseded(BaseException):
    """This attempt is no longer current (cancelled, timed out, or re-queued).

    A BaseException so that a node's ``except Exception`` does not swallow it: the
    attempt must stop without writing anything more.
    """


def save_progress_checkpoint(
    node_run_id: int, run_id: int, attempt: int, sequence: int, state
) -> Checkpoint:
    """Store a node's resume state, only while its attempt is current.

    Runs in its own savepoint: called inside the node's own ``transaction.atomic()``,
    the checkpoint commits or rolls back together with the node's writes.
    """
    now = timezone.now()
    with transaction.atomic():
        current = NodeRun.objects.filter(
            pk=node_run_id, status=NodeRun.Status.RUNNING, attempt=attempt
        ).update(heartbeat_at=now, updated_at=now)
        if not current:
            raise AttemptSuperseded(
                f"node-run {node_run_id} attempt {attempt} is no longer current"
            )
        return Checkpoint.objects.create(
            run_id=run_id,
            node_run_id=node_run_id,
            kind=Checkpoint.Kind.PROGRESS,
            sequence=sequence,
            attempt=attempt,
            state=state,
        )


def next_checkpoint_sequence(node_run_id: int) -> int:
    last = Checkpoint.objects.filter(node_run_id=node_run_id).aggregate(last=Max("sequence"))[
        "last"
    ]
    return (last or 0) + 1


def latest_progress_state(node_run_id: int):
    checkpoint = (
        Checkpoint.objects.filter(node_run_id=node_run_id, kind=Checkpoint.Kind.PROGRESS)
        .order_by("-sequence")
        .only("state")
        .first()
    )
    return checkpoint.state if checkpoint else None


def upstream_outputs(run_id: int, keys: list[str]) -> dict:
    if not keys:
        return {}
    return dict(
        NodeRun.objects.filter(run_id=run_id, node_key__in=keys).values_list("node_key", "output")
    )


# --- Outcomes ---------------------------------------------------------------------------------


def complete_attempt(
    node_run_id: int,
    attempt: int,
    output,
    *,
    actor: str = ENGINE,
    facts: NodeFacts | None = None,
) -> bool:
    """Apply a successful attempt and advance the run. Returns False if it was stale.

    One transaction:

    1. Lock the run, its pools, then the node (the lock order above).
    2. While the node is still running this attempt (each write's WHERE says so, and the
       node's own compare-and-set comes last): write the node_done checkpoint, close
       the attempt, count the node off each downstream node (the fan-in counter),
       queue those left with nothing to wait for, close the run if nothing more can
       happen in it, and mark the node succeeded.

    In a run without pools it is one batch of statements and nothing else: a single
    round trip on PostgreSQL, the claim having brought the ``facts``. In a run with
    pools, where queueing counts free slots, the released nodes queue after the batch
    as slots allow, and the node's slot goes to a waiting node, in any run.
    """
    facts = facts or node_facts(node_run_id)
    now = timezone.now()
    if facts.run_pools:
        return _complete_in_pools(node_run_id, attempt, output, actor, facts, now)
    rows = _success_batch(node_run_id, attempt, output, facts, now, lock_run=True).run()
    if not rows["succeeded"]:
        _record_stale_message(node_run_id, attempt, actor, "success")
        return False
    dispatch.send_after_commit(
        [
            dispatch.Dispatch.for_node(
                NodeRun(
                    id=pk,
                    run_id=facts.run_id,
                    node_key=key,
                    attempt=number,
                    queue=queue,
                    timeout_seconds=timeout,
                )
            )
            for pk, number, key, queue, timeout in sorted(rows.get("queued", []))
        ]
    )
    return True


def _complete_in_pools(node_run_id, attempt, output, actor, facts: NodeFacts, now) -> bool:
    with transaction.atomic():
        run = _lock_run(facts.run_id)
        lock_pools(run)  # also creates a pool deleted since the run started
        rows = _success_batch(node_run_id, attempt, output, facts, now).run()
        if not rows["succeeded"]:
            _record_stale_message(node_run_id, attempt, actor, "success")
            return False
        queue_or_wait(run, _ready_nodes(run, rows.get("counted_off", [])), now)
        [(pool,)] = rows["succeeded"]
        if pool:
            fill_pool(pool, now)
    return True


def _success_batch(
    node_run_id: int, attempt: int, output, facts: NodeFacts, now, *, lock_run: bool = False
) -> sql.Batch:
    """The statements of a success (steps 1 and 2 of ``complete_attempt``).

    Named results: ``succeeded`` (a row with the node's pool, or none if the result
    was stale), ``counted_off`` (the downstream nodes' counters), ``queued`` (the nodes
    queued, in a run without pools), ``closed`` (a row if the run closed).
    """
    stamp = sql.to_db(NodeRun, "finished_at", now)
    current = Condition(
        f"EXISTS (SELECT 1 FROM {sql.table(NodeRun)} AS this WHERE this.id = %s"
        " AND this.status = %s AND this.attempt = %s)",
        [node_run_id, NodeRun.Status.RUNNING, attempt],
    )
    batch = sql.Batch()
    if sql.has_row_locks():  # on SQLite the transaction holds the whole database already
        if lock_run:
            batch.add(*_lock_run_statement(facts.run_id))
        batch.add(
            f"SELECT id FROM {sql.table(NodeRun)} WHERE id = %s{sql.row_lock()}", [node_run_id]
        )
    batch.add(
        *sql.insert_select(
            Checkpoint,
            {
                "run": facts.run_id,
                "node_run": node_run_id,
                "kind": Checkpoint.Kind.NODE_DONE,
                "sequence": sql.Raw(
                    f"COALESCE((SELECT MAX(sequence) FROM {sql.table(Checkpoint)}"
                    " WHERE node_run_id = %s), 0) + 1",
                    (node_run_id,),
                ),
                "attempt": attempt,
                "state": {"output": output},
                "created_at": now,
            },
            f"WHERE {current.sql}",
            current.params,
        )
    )
    batch.add(
        f"UPDATE {sql.table(NodeAttempt)} SET status = %s, finished_at = %s, updated_at = %s"
        f" WHERE node_run_id = %s AND number = %s AND {current.sql}",
        [NodeAttempt.Status.SUCCEEDED, stamp, stamp, node_run_id, attempt, *current.params],
    )
    if facts.downstream:
        downstream = Condition(
            f"run_id = %s AND node_key IN ({sql.placeholders(len(facts.downstream))})",
            [facts.run_id, *facts.downstream],
        )
        batch.add(
            f"UPDATE {sql.table(NodeRun)} SET pending_upstreams = pending_upstreams - 1,"
            f" updated_at = %s WHERE {downstream.sql} AND {current.sql}"
            " RETURNING id, status, pending_upstreams, attempt, node_key, queue, pool,"
            " timeout_seconds",
            [stamp, *downstream.params, *current.params],
            name="counted_off",
        )
        if not facts.run_pools:
            _add_queue_released(batch, downstream, current, now)
    _add_close_if_done(batch, facts.run_id, now, finishing=(node_run_id, current))
    batch.add(
        f"UPDATE {sql.table(NodeRun)} SET status = %s, output = %s, finished_at = %s,"
        " reason = '', updated_at = %s WHERE id = %s AND status = %s AND attempt = %s"
        " RETURNING pool",
        [
            *(NodeRun.Status.SUCCEEDED, sql.to_db(NodeRun, "output", output), stamp, stamp),
            *(node_run_id, NodeRun.Status.RUNNING, attempt),
        ],
        name="succeeded",
    )
    return batch


@dataclass(frozen=True)
class Condition:
    """A piece of a WHERE clause with its parameters."""

    sql: str
    params: list


def node_facts(node_run_id: int) -> NodeFacts:
    row = sql.fetch_one(
        f"SELECT node.run_id, node.downstream, run.pools FROM {sql.table(NodeRun)} AS node"
        f" JOIN {sql.table(Run)} AS run ON run.id = node.run_id WHERE node.id = %s",
        [node_run_id],
    )
    if row is None:
        raise NodeRun.DoesNotExist(f"Node-run {node_run_id} does not exist.")
    return NodeFacts(
        run_id=row[0],
        downstream=tuple(sql.from_db(NodeRun, "downstream", row[1])),
        run_pools=tuple(sql.from_db(Run, "pools", row[2])),
    )


def _add_queue_released(batch: sql.Batch, downstream: Condition, current: Condition, now):
    """Queue the downstream nodes left with nothing to wait for (in a run without pools)
    and insert their attempts: the queued nodes without an attempt row are those."""
    stamp = sql.to_db(NodeRun, "queued_at", now)
    noderun = sql.table(NodeRun)
    batch.add(
        *_queue_statement(
            f"{downstream.sql} AND status = %s AND pending_upstreams = 0 AND {current.sql}",
            [*downstream.params, NodeRun.Status.PENDING, *current.params],
            stamp,
            returning="id, attempt, node_key, queue, timeout_seconds",
        ),
        name="queued",
    )
    batch.add(
        *sql.insert_select(
            NodeAttempt,
            {
                "node_run": sql.Raw(f"{noderun}.id"),
                "number": sql.Raw(f"{noderun}.attempt"),
                "status": NodeAttempt.Status.QUEUED,
                "rq_job_id": sql.Raw(dispatch.job_id_sql(f"{noderun}.id", f"{noderun}.attempt")),
                "queue": sql.Raw(f"{noderun}.queue"),
                "created_at": now,
                "updated_at": now,
            },
            f"FROM {noderun} WHERE {downstream.sql} AND status = %s AND {current.sql}"
            f" AND NOT EXISTS (SELECT 1 FROM {sql.table(NodeAttempt)} AS attempt"
            f" WHERE attempt.node_run_id = {noderun}.id AND attempt.number = {noderun}.attempt)",
            [*downstream.params, NodeRun.Status.QUEUED, *current.params],
        ),
        needs="queued",
    )


def fail_attempt(
    node_run_id: int,
    attempt: int,
    failure: Failure,
    *,
    actor: str = ENGINE,
    run_id: int | None = None,
) -> bool:
    """Record a failed or timed-out attempt; retry it or fail the node. False if stale.

    1. Lock the run, its pools, then the node; reject unless running this attempt.
    2. Close the attempt with the error and traceback.
    3. Attempts left and the error retryable: ``retry_wait`` until the backoff has
       passed (``promote_due_retries`` queues it; a zero delay queues it now).
       Otherwise the node is failed / timed_out and its downstream stays pending.
    4. Free its pool slot; close the run if nothing more can run.
    """
    now = timezone.now()
    with transaction.atomic():
        run, node = _lock_for_outcome(node_run_id, run_id)
        if node.status != NodeRun.Status.RUNNING or node.attempt != attempt:
            _record_stale_message(node_run_id, attempt, actor, "failure")
            return False
        _close_attempt(node, attempt, failure, now)
        _after_failure(run, node, failure, now, actor)
        if node.pool:
            fill_pool(node.pool, now)
        close_run_if_done(run, now)
    return True


def abandon_attempt(
    node_run_id: int, attempt: int, *, reason: str, actor: str, retry: bool = True
) -> bool:
    """End an attempt whose worker can no longer report (killed, lost), then let the
    retry policy act — the next attempt resumes from the node's latest checkpoint.

    Used by the watchdog (worker or job lost) and by operators. The attempt is marked
    ``abandoned``; if its worker does report later, that result is rejected as stale.
    Returns False when the attempt is no longer the node's current running one.
    """
    now = timezone.now()
    # Retried whatever ``retry_on`` lists: the node itself never raised anything.
    failure = Failure(
        error_type="AttemptAbandoned", message=reason, retryable=retry, ignore_retry_on=True
    )
    with transaction.atomic():
        run, node = _lock_for_outcome(node_run_id)
        if (
            node.status not in (NodeRun.Status.RUNNING, NodeRun.Status.QUEUED)
            or node.attempt != attempt
        ):
            return False
        NodeAttempt.objects.filter(node_run=node, number=attempt).update(
            status=NodeAttempt.Status.ABANDONED,
            finished_at=now,
            updated_at=now,
            error_type=failure.error_type,
            error_message=reason[:10_000],
        )
        _after_failure(run, node, failure, now, actor)
        if node.pool:
            fill_pool(node.pool, now)
        close_run_if_done(run, now)
    return True


def _close_attempt(node: NodeRun, attempt: int, failure: Failure, now) -> None:
    NodeAttempt.objects.filter(node_run=node, number=attempt).update(
        status=NodeAttempt.Status.TIMED_OUT if failure.timed_out else NodeAttempt.Status.FAILED,
        finished_at=now,
        updated_at=now,
        error_type=failure.error_type[:200],
        error_message=failure.message[:10_000],
        traceback=failure.traceback[-50_000:],
    )


def _after_failure(run: Run, node: NodeRun, failure: Failure, now, actor: str) -> None:
    what = "timed out" if failure.timed_out else "failed"
    summary = f"attempt {node.attempt} {what}: {failure.error_type}: {failure.message}"[:2000]
    if node.attempt - node.attempts_base < node.max_attempts and _should_retry(
        node.retry_policy, failure
    ):
        delay = backoff_delay(node.retry_policy, node.attempt)
        node.status = NodeRun.Status.RETRY_WAIT
        node.retry_at = now + timedelta(seconds=delay)
        node.reason = (
            f"{summary}; attempt {node.attempt + 1} of {node.max_attempts} in {delay:.1f}s"
        )
        node.save(update_fields=["status", "retry_at", "reason", "updated_at"])
        RunEvent.objects.create(
            run=run,
            node_run=node,
            kind=RunEvent.Kind.RETRY,
            actor=actor,
            reason=node.reason,
            before={"status": NodeRun.Status.RUNNING, "attempt": node.attempt},
            after={"status": NodeRun.Status.RETRY_WAIT, "retry_at": node.retry_at.isoformat()},
        )
        if delay <= 0:
            queue_or_wait(run, [node], now)
        return
    node.status = NodeRun.Status.TIMED_OUT if failure.timed_out else NodeRun.Status.FAILED
    node.finished_at = now
    tries = (
        "no retries left"
        if node.attempt - node.attempts_base >= node.max_attempts
        else "not retryable"
    )
    node.reason = f"{summary} ({tries})"
    node.save(update_fields=["status", "finished_at", "reason", "updated_at"])
    RunEvent.objects.create(
        run=run,
        node_run=node,
        kind=RunEvent.Kind.TRANSITION,
        actor=actor,
        reason=node.reason,
        before={"status": NodeRun.Status.RUNNING},
        after={"status": node.status},
    )
    if node.downstream:
        NodeRun.objects.filter(
            run=run, node_key__in=node.downstream, status=NodeRun.Status.PENDING
        ).update(reason=f"blocked: upstream {node.node_key} {node.status}", updated_at=now)


def _should_retry(policy: dict, failure: Failure) -> bool:
    if not failure.retryable:
        return False
    retry_on = policy.get("retry_on") or []
    return (
        failure.ignore_retry_on or not retry_on or any(name in retry_on for name in failure.names)
    )


def backoff_delay(policy: dict, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, jittered.

    Jitter keeps the delay between half and all of the computed value, so a burst of
    failures does not come back as a burst of retries.
    """
    base = float(policy.get("backoff", 0))
    factor = float(policy.get("factor", 2))
    delay = min(base * factor ** max(attempt - 1, 0), float(policy.get("max_delay", 300)))
    if policy.get("jitter", True) and delay > 0:
        delay = random.uniform(delay / 2, delay)
    return delay


def _lock_for_outcome(node_run_id: int, run_id: int | None = None) -> tuple[Run, NodeRun]:
    if run_id is None:
        run_id = NodeRun.objects.values_list("run_id", flat=True).get(pk=node_run_id)
    run = Run.objects.select_for_update(no_key=True).get(pk=run_id)
    lock_pools(run)
    node = NodeRun.objects.select_for_update(no_key=True).get(pk=node_run_id)
    return run, node


def _lock_run(run_id: int) -> Run:
    """Take the run's lock, first in the lock order."""
    row = sql.fetch_one(*_lock_run_statement(run_id))
    if row is None:
        raise Run.DoesNotExist(f"Run {run_id} does not exist.")
    return _run_from_row(row)


def _lock_run_statement(run_id: int) -> tuple[str, list]:
    return f"SELECT id, status, pools FROM {sql.table(Run)} WHERE id = %s{sql.row_lock()}", [run_id]


def _run_from_row(row: tuple) -> Run:
    """A Run from ``_lock_run_statement``'s row: status and pools loaded, other fields
    load when first read."""
    loaded = {"id": row[0], "status": row[1], "pools": sql.from_db(Run, "pools", row[2])}
    return Run.from_db(
        connection.alias,
        list(loaded),
        [loaded[field.attname] for field in Run._meta.concrete_fields if field.attname in loaded],
    )


def _ready_nodes(run: Run, counted_off: list[tuple]) -> list[NodeRun]:
    """The nodes a success left with nothing to wait for, from its fan-in count's rows."""
    return [
        NodeRun(
            id=pk,
            run_id=run.pk,
            status=status,
            attempt=attempt,
            node_key=node_key,
            queue=queue,
            pool=pool,
            timeout_seconds=timeout,
        )
        for pk, status, pending, attempt, node_key, queue, pool, timeout in sorted(counted_off)
        if pending == 0 and status == NodeRun.Status.PENDING
    ]


def _still_moving(run_id: int, excluding: int | None = None) -> Condition:
    """Something can still happen in the run: a node is queued, running or waiting to
    retry, or a pending node has all upstreams done (it waits for a pool slot). Pending
    nodes behind a failed upstream cannot run and do not count."""
    # One EXISTS per status, each a short index scan on noderun_run_status (run_id,
    # status), the first hit ending the query. Written with OR or IN, the planner may
    # read every node of the run instead, the finished ones too.
    node = f"SELECT 1 FROM {sql.table(NodeRun)} WHERE run_id = %s AND status = %s"
    if excluding is not None:
        node += " AND id <> %s"
    statuses = [*sorted(NodeRun.ACTIVE), NodeRun.Status.PENDING]
    exists = [f"EXISTS ({node})"] * (len(statuses) - 1) + [
        f"EXISTS ({node} AND pending_upstreams = 0)"
    ]
    return Condition(
        "(" + " OR ".join(exists) + ")",
        [
            param
            for status in statuses
            for param in (run_id, status, *(() if excluding is None else (excluding,)))
        ],
    )


def _add_close_if_done(
    batch: sql.Batch, run_id: int, now, *, finishing: tuple[int, Condition] | None = None
) -> None:
    """Close the run if nothing more can happen in it (``_still_moving``), with its
    transition event; the batch's result ``closed`` has the new status and reason.

    Succeeded when every node is done; failed otherwise, the reason naming the first
    unfinished nodes that are not merely pending (or "nodes could not run"). The caller
    holds the run's lock. ``finishing``: a node this batch marks succeeded in a later
    statement, and the condition that it is still running the attempt it reports: it
    counts as done, and nothing is closed unless the condition holds.
    """
    run = sql.table(Run)
    stamp = sql.to_db(Run, "finished_at", now)
    done = sorted(NodeRun.DONE)
    excluding, guard = finishing if finishing else (None, Condition("1 = 1", []))
    others = "run_id = %s" + ("" if excluding is None else " AND id <> %s")
    others_params = [run_id, *(() if excluding is None else (excluding,))]
    unfinished = (
        f"SELECT id, node_key, status FROM {sql.table(NodeRun)} WHERE {others}"
        f" AND status NOT IN ({sql.placeholders(len(done))})"
    )
    named = sql.joined("node_key || ' ' || status", "'; '")
    moving = _still_moving(run_id, excluding)
    batch.add_check(
        "nothing_moves",
        f"SELECT 1 WHERE {guard.sql} AND NOT {moving.sql}",
        [*guard.params, *moving.params],
    )
    batch.add(
        f"UPDATE {run} SET status = CASE WHEN EXISTS ({unfinished}) THEN %s ELSE %s END,"
        f" reason = CASE WHEN EXISTS ({unfinished}) THEN COALESCE((SELECT {named} FROM"
        f" ({unfinished} ORDER BY id LIMIT 5) AS first_unfinished WHERE status <> %s),"
        " 'nodes could not run') ELSE '' END, finished_at = %s, updated_at = %s"
        f" WHERE id = %s AND status = %s AND {guard.sql} AND NOT {moving.sql}"
        " RETURNING status, reason",
        [
            *(*others_params, *done, Run.Status.FAILED, Run.Status.SUCCEEDED),
            *(*others_params, *done, *others_params, *done, NodeRun.Status.PENDING),
            *(stamp, stamp, run_id, Run.Status.RUNNING, *guard.params, *moving.params),
        ],
        name="closed",
        needs="nothing_moves",
    )
    batch.add(
        *sql.insert_select(
            RunEvent,
            {
                "run": sql.Raw(f"{run}.id"),
                "at": now,
                "kind": RunEvent.Kind.TRANSITION,
                "actor": ENGINE,
                "reason": sql.Raw(
                    f"CASE WHEN {run}.reason = '' THEN 'run ' || {run}.status ELSE {run}.reason END"
                ),
                "before": {"status": Run.Status.RUNNING},
                "after": sql.Raw(
                    f"CASE WHEN {run}.status = %s THEN %s ELSE %s END",
                    (
                        Run.Status.SUCCEEDED,
                        sql.to_db(RunEvent, "after", {"status": Run.Status.SUCCEEDED}),
                        sql.to_db(RunEvent, "after", {"status": Run.Status.FAILED}),
                    ),
                ),
            },
            # Closed just now: the run was running under this transaction's lock.
            f"FROM {run} WHERE {run}.id = %s AND {run}.status IN (%s, %s)"
            f" AND {run}.finished_at = %s AND {guard.sql}",
            [run_id, Run.Status.SUCCEEDED, Run.Status.FAILED, stamp, *guard.params],
        ),
        needs="closed",
    )


def close_run_if_done(run: Run, now) -> bool:
    """Close the run when nothing more can happen in it (``_add_close_if_done``).

    The caller holds the run's lock. Returns True if it closed the run.
    """
    if run.status != Run.Status.RUNNING:
        return False
    batch = sql.Batch()
    _add_close_if_done(batch, run.pk, now)
    closed = batch.run()["closed"]
    if not closed:
        return False
    [(run.status, run.reason)] = closed
    run.finished_at = now
    return True


def finish_run(run: Run, status: str, reason: str, now, actor: str) -> None:
    before = run.status
    run.status = status
    run.finished_at = now
    run.reason = reason
    run.save(update_fields=["status", "finished_at", "reason", "updated_at"])
    RunEvent.objects.create(
        run=run,
        kind=RunEvent.Kind.TRANSITION,
        actor=actor,
        reason=reason or f"run {status}",
        before={"status": before},
        after={"status": status},
    )


# --- Stopping a run ---------------------------------------------------------------------------


def cancel_run(run_id: int, *, actor: str, reason: str) -> bool:
    """Cancel every node that has not finished and close the run as cancelled.

    Queued jobs are removed from RQ and running ones stopped (RQ's stop-job command)
    after commit; a running node also sees ``should_stop()`` at its next heartbeat,
    and any result it still reports is rejected. Returns False if already finished.
    """
    return _stop_run(run_id, Run.Status.CANCELLED, f"cancelled by {actor}: {reason}", actor)


def expire_run(run_id: int) -> bool:
    """Fail a run that went past its deadline (the definition's ``timeout``)."""
    return _stop_run(
        run_id, Run.Status.FAILED, "run exceeded its timeout", ENGINE, only_if_overdue=True
    )


def _stop_run(
    run_id: int, final_status: str, reason: str, actor: str, only_if_overdue=False
) -> bool:
    now = timezone.now()
    with transaction.atomic():
        run = Run.objects.select_for_update(no_key=True).get(pk=run_id)
        if run.status in Run.TERMINAL:
            return False
        if only_if_overdue and (run.deadline is None or run.deadline > now):
            return False
        lock_pools(run)
        live = list(
            NodeRun.objects.select_for_update(no_key=True)
            .filter(run=run, status__in=[*NodeRun.ACTIVE, NodeRun.Status.PENDING])
            .values_list("pk", "status", "attempt", "pool")
        )
        to_cancel = [(pk, attempt) for pk, status, attempt, _ in live if status in NodeRun.ACTIVE]
        NodeRun.objects.filter(pk__in=[pk for pk, *_ in live]).update(
            status=NodeRun.Status.CANCELLED,
            finished_at=now,
            reason=reason[:2000],
            updated_at=now,
        )
        for pk, attempt in to_cancel:
            NodeAttempt.objects.filter(
                node_run_id=pk, number=attempt, status__in=NodeAttempt.ACTIVE
            ).update(
                status=NodeAttempt.Status.CANCELLED,
                finished_at=now,
                updated_at=now,
                error_type="Cancelled",
                error_message=reason[:10_000],
            )
        for pool in sorted({pool for *_, pool in live if pool}):
            fill_pool(pool, now)
        finish_run(run, final_status, reason, now, actor)
        job_ids = [dispatch.job_id(pk, attempt) for pk, attempt in to_cancel]
        transaction.on_commit(lambda: dispatch.stop_jobs(job_ids))
    return True


# --- Sweeps the watchdog runs -----------------------------------------------------------------


def promote_due_retries(limit: int = 500) -> int:
    """Queue nodes whose retry backoff has passed. Returns how many were queued.

    Retries live in the database (``retry_wait`` + ``retry_at``), not in a scheduler,
    so none is lost when a scheduler or Redis goes away.
    """
    now = timezone.now()
    due = list(
        NodeRun.objects.filter(status=NodeRun.Status.RETRY_WAIT, retry_at__lte=now)
        .order_by("retry_at")
        .values_list("run_id", flat=True)[:limit]
    )
    promoted = 0
    for run_id in sorted(set(due)):
        with transaction.atomic():
            run = Run.objects.select_for_update(no_key=True).get(pk=run_id)
            if run.status != Run.Status.RUNNING:
                continue
            lock_pools(run)
            nodes = list(
                NodeRun.objects.select_for_update(no_key=True)
                .filter(run=run, status=NodeRun.Status.RETRY_WAIT, retry_at__lte=now)
                .order_by("id")
            )
            promoted += len(queue_or_wait(run, nodes, now))
    return promoted


def expire_overdue_runs() -> int:
    now = timezone.now()
    overdue = Run.objects.filter(status=Run.Status.RUNNING, deadline__lt=now).values_list(
        "pk", flat=True
    )
    return sum(expire_run(run_id) for run_id in list(overdue))


def resend_lost_messages(older_than_seconds: float = 5.0) -> int:
    """Re-send queued nodes whose RQ job is gone (never sent, or Redis lost it).

    The job id is derived from (node-run, attempt), so re-sending the same message
    is safe: the claim's compare-and-set lets only one delivery run the node.
    """
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    queued = list(
        NodeRun.objects.filter(status=NodeRun.Status.QUEUED, queued_at__lte=cutoff).order_by(
            "queued_at"
        )[:1000]
    )
    if not queued:
        return 0
    missing = dispatch.missing_jobs([dispatch.job_id(node.pk, node.attempt) for node in queued])
    lost = [node for node in queued if dispatch.job_id(node.pk, node.attempt) in missing]
    if lost:
        dispatch.send([dispatch.Dispatch.for_node(node, note=" (re-sent)") for node in lost])
    return len(lost)
