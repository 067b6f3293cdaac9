"""The engine's hand-written statements: the claim and the success of an attempt, the
close check, queueing, and the inserts of a wide start.

The claim and the success are the two transitions every node goes through. Each is one
statement on PostgreSQL, a writable CTE (a round trip costs more than the work), and the
same writes one after another on SQLite, which has none. A wide start inserts its node
runs from one JSON document and its attempts by ``INSERT … SELECT`` (``bulk_create``
prepared every value in Python). Otherwise the SQL text is the same on both (SQLite 3.35
or later, for ``RETURNING``); values go in and out through the model fields, so both
databases see and give back the same Python values. Why they exist (measurements) is in
docs/architecture.md, "Engine"; tests/engine/test_statements.py runs each on both
databases. Except the claim, which commits itself, callers run them inside
``transaction.atomic()``, in the engine's lock order.
"""

import json

import psycopg
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction

from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run

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


def claim(node_run_id: int, attempt: int, *, worker: str, pid: int, host: str, now) -> dict | None:
    """``queued`` → ``running`` for exactly this attempt (compare-and-set), its
    NodeAttempt row marked running with who runs it; the node's fields a worker needs
    and ``attempt_id`` (None if that row was not queued), or None when the node is not
    queued at that attempt.

    Committed on its own: on PostgreSQL one statement, a writable CTE (one round trip
    where ``BEGIN``, two updates and ``COMMIT`` took four); on SQLite, which has no
    writable CTEs, the same two updates in one transaction."""
    claimed = ", ".join(_column(NodeRun, name) for name in _CLAIMED)
    claim_node = f"""
        UPDATE {_table(NodeRun)}
           SET status = %s, started_at = %s, heartbeat_at = %s, updated_at = %s,
               progress_at = NULL
         WHERE id = %s AND status = %s AND attempt = %s"""
    node_params = [
        NodeRun.Status.RUNNING,
        *[_datetime(now)] * 3,
        node_run_id,
        NodeRun.Status.QUEUED,
        attempt,
    ]
    claim_attempt = f"""
        UPDATE {_table(NodeAttempt)}
           SET status = %s, worker = %s, pid = %s, host = %s, started_at = %s, updated_at = %s
         WHERE node_run_id = %s AND number = %s AND status = %s"""
    attempt_params = [
        NodeAttempt.Status.RUNNING,
        worker,
        pid,
        host,
        *[_datetime(now)] * 2,
        node_run_id,
        attempt,
        NodeAttempt.Status.QUEUED,
    ]
    if connection.vendor == "postgresql":
        row = _returning(
            f"""
            WITH node AS ({claim_node} RETURNING {claimed}),
                 attempt AS ({claim_attempt} AND EXISTS (SELECT FROM node) RETURNING id)
            SELECT node.*, (SELECT id FROM attempt) FROM node
            """,
            [*node_params, *attempt_params],
        )
    else:
        with transaction.atomic():
            row = _returning(f"{claim_node} RETURNING {claimed}", node_params)
            if row is not None:
                attempt_row = _returning(f"{claim_attempt} RETURNING id", attempt_params)
                row = (*row, attempt_row and attempt_row[0])
    if row is None:
        return None
    *values, attempt_id = row
    node = {
        name: _from_db(NodeRun, name, value) for name, value in zip(_CLAIMED, values, strict=True)
    }
    return {**node, "attempt_id": attempt_id}


def lock_run_for_outcome(run_id: int) -> Run:
    """Take a run's lock (``FOR NO KEY UPDATE``; SQLite's transaction holds the whole
    database) and read what an outcome needs of it: a Run holding its status and pools.
    The ORM's query costs twice this statement, prepared, for every node."""
    lock = " FOR NO KEY UPDATE" if connection.vendor == "postgresql" else ""
    row = _returning(
        f"SELECT status, pools FROM {_table(Run)} WHERE id = %s{lock}",
        [run_id],
    )
    if row is None:
        raise Run.DoesNotExist(f"run {run_id} does not exist")
    return _instance(Run, {"id": run_id, "status": row[0], "pools": _from_db(Run, "pools", row[1])})


# What queueing reads of a downstream node a success made ready (queueing.queue_or_wait,
# dispatch.Dispatch.for_node).
_RELEASED = ("id", "run_id", "node_key", "status", "attempt", "pool", "queue", "timeout_seconds")


def succeed(run_id: int, node_run_id: int, attempt: int, output, now) -> dict | None:
    """A success of exactly the running attempt (compare-and-set): the node
    ``succeeded`` with its output, its ``node_done`` checkpoint numbered after its last
    one, its attempt row closed, and the node counted off each downstream node's
    ``pending_upstreams`` (the fan-in counter). Returns the node's ``pool``; as
    ``ready`` the downstream nodes left pending with nothing to wait for (NodeRun rows
    with what queueing reads), in id order; and whether anything can still happen in
    the run (``moving``, as ``still_moving`` would say after it). None when the node
    was not running that attempt.

    On PostgreSQL one statement, a writable CTE (one round trip for what took five);
    on SQLite the same writes one after another, then ``still_moving``. The caller holds the run's
    and its pools' locks, in a transaction."""
    succeed_node = f"""
        UPDATE {_table(NodeRun)}
           SET status = %s, output = %s, finished_at = %s, reason = '', updated_at = %s
         WHERE id = %s AND status = %s AND attempt = %s
        RETURNING id, {_column(NodeRun, "downstream")}, pool"""
    node_params = [
        NodeRun.Status.SUCCEEDED,
        _to_db(NodeRun, "output", output),
        *[_datetime(now)] * 2,
        node_run_id,
        NodeRun.Status.RUNNING,
        attempt,
    ]
    insert_checkpoint = f"""
        INSERT INTO {_table(Checkpoint)}
               (run_id, node_run_id, kind, sequence, attempt, state, created_at)
        SELECT %s, %s, %s,
               COALESCE((SELECT MAX(sequence) FROM {_table(Checkpoint)} WHERE node_run_id = %s), 0)
               + 1, %s, %s, %s"""
    checkpoint_params = [
        run_id,
        node_run_id,
        Checkpoint.Kind.NODE_DONE,
        node_run_id,
        attempt,
        _to_db(Checkpoint, "state", {"output": output}),
        _datetime(now),
    ]
    close_attempt = f"""
        UPDATE {_table(NodeAttempt)} SET status = %s, finished_at = %s, updated_at = %s
         WHERE node_run_id = %s AND number = %s"""
    attempt_params = [
        NodeAttempt.Status.SUCCEEDED,
        *[_datetime(now)] * 2,
        node_run_id,
        attempt,
    ]
    released = ", ".join(_column(NodeRun, name) for name in _RELEASED)
    count_off = f"""
        UPDATE {_table(NodeRun)} SET pending_upstreams = pending_upstreams - 1, updated_at = %s
         WHERE run_id = %s AND node_key IN ({{downstream}})
        RETURNING {released}, pending_upstreams"""
    count_off_params = [_datetime(now), run_id]
    if connection.vendor == "postgresql":
        # The CTE's reads see the run as it was before its writes: the node itself still
        # running (left out), a node it makes ready still waiting (``ready`` says).
        others_moving, others_params = _moving(run_id, besides=node_run_id)
        released_sql = count_off.format(
            downstream="SELECT jsonb_array_elements_text(downstream) FROM node"
        )
        with _cursor() as cursor:
            cursor.execute(
                f"""
                WITH node AS ({succeed_node}),
                     checkpoint AS ({insert_checkpoint} FROM node),
                     attempt AS ({close_attempt} AND EXISTS (SELECT FROM node)),
                     released AS ({released_sql})
                SELECT node.pool, {others_moving}, released.*
                  FROM node LEFT JOIN released ON true
                 ORDER BY released.id
                """,
                [
                    *node_params,
                    *checkpoint_params,
                    *attempt_params,
                    *count_off_params,
                    *others_params,
                ],
            )
            rows = cursor.fetchall()
        if not rows:
            return None
        pool, others = rows[0][:2]
        counted = [row[2:] for row in rows if row[2] is not None]
    else:
        node = _returning(succeed_node, node_params)
        if node is None:
            return None
        _, downstream, pool = node
        with connection.cursor() as cursor:
            cursor.execute(insert_checkpoint, checkpoint_params)
            cursor.execute(close_attempt, attempt_params)
            cursor.execute(
                count_off.format(downstream="SELECT value FROM json_each(%s)"),
                [*count_off_params, downstream],
            )
            counted = sorted(cursor.fetchall())
        others = still_moving(run_id)
    ready = [
        _instance(NodeRun, dict(zip(_RELEASED, row, strict=False)))
        for row in counted
        if row[_RELEASED.index("status")] == NodeRun.Status.PENDING and row[-1] == 0
    ]
    return {"pool": pool, "ready": ready, "moving": bool(others) or bool(ready)}


def _instance(model, values: dict):
    """A model instance holding only these fields (the others load if ever read)."""
    names = [f.attname for f in model._meta.concrete_fields if f.attname in values]
    return model.from_db(connection.alias, names, [values[name] for name in names])


def still_moving(run_id: int) -> bool:
    """Can anything still happen in the run: a node queued, running or waiting to retry,
    or a pending node with every upstream done (it waits for a pool slot)? Pending nodes
    behind a failed upstream cannot run and do not count. One round trip."""
    sql, params = _moving(run_id)
    return bool(_returning(f"SELECT {sql}", params)[0])


def _moving(run_id: int, *, besides: int | None = None) -> tuple[str, list]:
    """``still_moving``'s condition, leaving out node-run ``besides``: one ``EXISTS`` per
    status, each a short read of the ``noderun_run_status`` index, the first true one
    ending it. Written with OR or IN in one ``EXISTS``, the planner may read every node
    of the run, the finished ones too."""
    exists = f"EXISTS (SELECT 1 FROM {_table(NodeRun)} WHERE run_id = %s AND status = %s"
    each = [run_id]
    if besides is not None:
        exists += " AND id <> %s"
        each.append(besides)
    statuses = sorted(NodeRun.ACTIVE)
    sql = " OR ".join([f"{exists})"] * len(statuses) + [f"{exists} AND pending_upstreams = 0)"])
    params = []
    for status in [*statuses, NodeRun.Status.PENDING]:
        params += [each[0], status, *each[1:]]
    return sql, params


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
    with _cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _cursor():
    """A cursor for the named statements, wrapped as Django wraps its own (errors, query
    logging). On PostgreSQL it binds parameters on the server, so psycopg prepares a
    statement once it has run ``prepare_threshold`` times on the connection (settings):
    planning a writable CTE took longer (~0.3 ms) than running it, and the claim and the
    success run for every node. Django's own cursors bind on the client and are never
    prepared."""
    if connection.vendor != "postgresql":
        return connection.cursor()
    connection.ensure_connection()
    cursor = psycopg.Cursor(connection.connection)
    if connection.queries_logged:
        return connection.make_debug_cursor(cursor)
    return connection.make_cursor(cursor)


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
