"""The engine's hand-written statements: the claim and the success of an attempt, and the
inserts of a wide start.

The claim and the success are the two transitions every node goes through; each statement
does what the ORM needs two for (an ``UPDATE … RETURNING`` instead of an update and a
read; an ``INSERT … SELECT`` that numbers the checkpoint). A wide start inserts its node
runs from one JSON document and its attempts by ``INSERT … SELECT`` (``bulk_create``
prepared every value in Python). The same SQL text runs on PostgreSQL and SQLite (3.35 or
later, for ``RETURNING``), except the JSON expansion; values go in and out through the
model fields, so both databases see and give back the same Python values. Why they exist
(measurements) is in docs/architecture.md, "Engine"; tests/engine/test_statements.py
runs each on both databases. Callers run them inside ``transaction.atomic()``, in the
engine's lock order.
"""

import json

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection

from workflows.models import Checkpoint, NodeAttempt, NodeRun

# The Claim's fields, read as the node is claimed.
_CLAIMED = (
    "run_id",
    "node_key",
    "node_type",
    "params",
    "upstream",
    "timeout_seconds",
    "soft_timeout_seconds",
)


def claim_node(node_run_id: int, attempt: int, now) -> dict | None:
    """``queued`` → ``running`` for exactly this attempt (compare-and-set); the node's
    fields a worker needs, or None when the node is not queued at that attempt."""
    row = _returning(
        f"""
        UPDATE {_table(NodeRun)}
           SET status = %s, started_at = %s, heartbeat_at = %s, updated_at = %s,
               progress_at = NULL
         WHERE id = %s AND status = %s AND attempt = %s
        RETURNING {", ".join(_column(NodeRun, name) for name in _CLAIMED)}
        """,
        [
            NodeRun.Status.RUNNING,
            *[_datetime(now)] * 3,
            node_run_id,
            NodeRun.Status.QUEUED,
            attempt,
        ],
    )
    if row is None:
        return None
    return {name: _from_db(NodeRun, name, value) for name, value in zip(_CLAIMED, row, strict=True)}


def claim_attempt_row(
    node_run_id: int, attempt: int, *, worker: str, pid: int, host: str, now
) -> int | None:
    """Mark the queued NodeAttempt row running, with who runs it; its id (or None)."""
    row = _returning(
        f"""
        UPDATE {_table(NodeAttempt)}
           SET status = %s, worker = %s, pid = %s, host = %s, started_at = %s, updated_at = %s
         WHERE node_run_id = %s AND number = %s AND status = %s
        RETURNING id
        """,
        [
            NodeAttempt.Status.RUNNING,
            worker,
            pid,
            host,
            *[_datetime(now)] * 2,
            node_run_id,
            attempt,
            NodeAttempt.Status.QUEUED,
        ],
    )
    return None if row is None else row[0]


def succeed_node(node_run_id: int, attempt: int, output, now) -> dict | None:
    """``running`` → ``succeeded`` with its output, for exactly this attempt
    (compare-and-set); the node's downstream and pool, or None if it was not running it."""
    row = _returning(
        f"""
        UPDATE {_table(NodeRun)}
           SET status = %s, output = %s, finished_at = %s, reason = '', updated_at = %s
         WHERE id = %s AND status = %s AND attempt = %s
        RETURNING downstream, pool
        """,
        [
            NodeRun.Status.SUCCEEDED,
            _to_db(NodeRun, "output", output),
            *[_datetime(now)] * 2,
            node_run_id,
            NodeRun.Status.RUNNING,
            attempt,
        ],
    )
    if row is None:
        return None
    return {"downstream": _from_db(NodeRun, "downstream", row[0]), "pool": row[1]}


def insert_node_done_checkpoint(run_id: int, node_run_id: int, attempt: int, output, now) -> None:
    """The ``node_done`` checkpoint, numbered after the node's last checkpoint."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {_table(Checkpoint)}
                   (run_id, node_run_id, kind, sequence, attempt, state, created_at)
            SELECT %s, %s, %s, COALESCE(MAX(sequence), 0) + 1, %s, %s, %s
              FROM {_table(Checkpoint)}
             WHERE node_run_id = %s
            """,
            [
                run_id,
                node_run_id,
                Checkpoint.Kind.NODE_DONE,
                attempt,
                _to_db(Checkpoint, "state", {"output": output}),
                _datetime(now),
                node_run_id,
            ],
        )


# A new node run's columns that come from its definition (engine.runs.new_node_row); the
# others are the run, the two times, or null.
NEW_NODE_COLUMNS = (
    "node_key",
    "node_type",
    "status",
    "attempt",
    "attempts_base",
    "max_attempts",
    "queue",
    "pool",
    "timeout_seconds",
    "soft_timeout_seconds",
    "expected_seconds",
    "stall_after_seconds",
    "pool_timeout_seconds",
    "params",
    "upstream",
    "downstream",
    "retry_policy",
    "pending_upstreams",
    "reason",
)


def insert_node_runs(run_id: int, rows: list[dict], now) -> dict[str, int]:
    """Every node run of a new run in one statement; {node key: id}. Those born
    ``queued`` (a root) are queued at ``now``.

    The rows go in as one JSON document that the database expands (PostgreSQL's
    ``jsonb_to_recordset``, SQLite's ``json_each``): a 1 000-node run took 99 ms through
    ``bulk_create`` (48 000 values prepared one by one), 22 ms this way. The one place
    the two databases need different text: the expansion."""
    columns = [_column(NodeRun, name) for name in NEW_NODE_COLUMNS]
    if connection.vendor == "postgresql":
        types = ", ".join(
            f"{column} {NodeRun._meta.get_field(name).db_type(connection)}"
            for name, column in zip(NEW_NODE_COLUMNS, columns, strict=True)
        )
        source = f"jsonb_to_recordset(%s::jsonb) AS x({types})"
        values = [f"x.{column}" for column in columns]
    else:
        source = "json_each(%s) AS x"
        values = [f"json_extract(x.value, '$.{name}')" for name in NEW_NODE_COLUMNS]
    status = values[NEW_NODE_COLUMNS.index("status")]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {_table(NodeRun)}
                   (run_id, created_at, updated_at, queued_at, {", ".join(columns)})
            SELECT %s, %s, %s, CASE WHEN {status} = %s THEN %s END, {", ".join(values)}
              FROM {source}
            RETURNING id, node_key
            """,
            [
                run_id,
                *[_datetime(now)] * 2,
                NodeRun.Status.QUEUED,
                _datetime(now),
                json.dumps(rows, cls=DjangoJSONEncoder),
            ],
        )
        return {key: pk for pk, key in cursor.fetchall()}


def queue_waiting_nodes(node_run_ids: list[int], attempt: int, now) -> set[int]:
    """``pending``/``retry_wait`` → ``queued`` at the next attempt, for those of these
    nodes still waiting at ``attempt`` (compare-and-set); the ids that moved. One
    statement where the ORM needs a locking read of the ids and an update (a 1 000-node
    start: 8 ms less)."""
    ids, id_params = _id_list(node_run_ids)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {_table(NodeRun)}
               SET status = %s, attempt = attempt + 1, queued_at = %s, retry_at = NULL,
                   heartbeat_at = NULL, reason = '', updated_at = %s
             WHERE id IN ({ids}) AND status IN (%s, %s) AND attempt = %s
            RETURNING id
            """,
            [
                NodeRun.Status.QUEUED,
                *[_datetime(now)] * 2,
                *id_params,
                NodeRun.Status.PENDING,
                NodeRun.Status.RETRY_WAIT,
                attempt,
            ],
        )
        return {pk for (pk,) in cursor.fetchall()}


def insert_queued_attempts(node_run_ids: list[int], now) -> None:
    """The queued NodeAttempt of each node's current attempt (the node was just moved to
    ``queued``), its RQ job id made as ``dispatch.job_id`` makes it."""
    ids, id_params = _id_list(node_run_ids)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {_table(NodeAttempt)}
                   (node_run_id, number, status, rq_job_id, queue, worker, host, error_type,
                    error_message, traceback, resource_samples, created_at, updated_at)
            SELECT id, attempt, %s, 'keel-' || id || '-' || attempt, queue, '', '', '', '',
                   '', %s, %s, %s
              FROM {_table(NodeRun)}
             WHERE id IN ({ids})
            """,
            [
                NodeAttempt.Status.QUEUED,
                _to_db(NodeAttempt, "resource_samples", []),
                *[_datetime(now)] * 2,
                *id_params,
            ],
        )


def _id_list(ids: list[int]) -> tuple[str, list]:
    """``IN (…)`` of many ids as one parameter: PostgreSQL's ``unnest`` of an array,
    SQLite's ``json_each`` of a JSON list (1 000 parameters took ms to bind and plan)."""
    if connection.vendor == "postgresql":
        return "SELECT unnest(%s::bigint[])", [list(ids)]
    return "SELECT value FROM json_each(%s)", [json.dumps(list(ids))]


def _returning(sql: str, params: list):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column(model, name: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(name).column)


def _datetime(value):
    return connection.ops.adapt_datetimefield_value(value)


def _to_db(model, name: str, value):
    return model._meta.get_field(name).get_db_prep_save(value, connection)


def _from_db(model, name: str, value):
    field = model._meta.get_field(name)
    from_db_value = getattr(field, "from_db_value", None)
    return value if from_db_value is None else from_db_value(value, None, connection)
