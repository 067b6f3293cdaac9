"""Hand-written SQL for the statements every node runs: its claim and its completion.

Everywhere else the engine uses the ORM. These few statements run for every node, where
building a query with the ORM costs more than the database does (bench/engine.py
measured it), ``UPDATE … RETURNING`` does in one statement what the ORM needs two or
three for, and ``batch`` sends a whole transition to PostgreSQL in one round trip.

The SQL is plain enough for PostgreSQL and SQLite (3.35 or newer, for RETURNING)
alike. Values go through the model fields' own conversions, so rows are stored and
read exactly as the ORM stores and reads them.
"""

import time
from dataclasses import dataclass
from functools import cache

import psycopg
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import Model

# SQLite allows 32 766 bound parameters per statement, PostgreSQL 65 535.
MAX_PARAMS = 30_000


@cache
def table(model: type[Model]) -> str:
    # Both backends quote names alike ("name"): the answer does not depend on the database.
    return connection.ops.quote_name(model._meta.db_table)


@cache
def _field(model: type[Model], field_name: str):
    return model._meta.get_field(field_name)


def _db():
    """This thread's default connection itself. ``django.db.connection`` is a proxy that
    looks it up again at every attribute; these functions run for every node, where
    those look-ups cost a quarter of the time spent building a success's statements."""
    return connections[DEFAULT_DB_ALIAS]


def to_db(model: type[Model], field_name: str, value):
    """A value as the ORM would send it for that field (JSON encoded, datetimes adapted)."""
    return _field(model, field_name).get_db_prep_value(value, _db(), prepared=False)


def from_db(model: type[Model], field_name: str, value):
    """A JSON column's value as the ORM would load it (both backends return JSON as text)."""
    return _field(model, field_name).from_db_value(value, None, _db())


def joined(expression: str, separator: str) -> str:
    """An aggregate joining ``expression`` over rows with ``separator`` (SQL literals), in
    the order the rows come (select them from an ordered subquery)."""
    function = "string_agg" if _db().vendor == "postgresql" else "group_concat"
    return f"{function}({expression}, {separator})"


def placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def fetch_all(statement: str, params) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        # Read every row: SQLite finishes a statement (and its RETURNING) only then.
        return cursor.fetchall()


def fetch_one(statement: str, params) -> tuple | None:
    rows = fetch_all(statement, params)
    return rows[0] if rows else None


def execute(statement: str, params) -> int:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


class Batch:
    """Statements run in order as one transaction, each added under a name for its rows.

    On PostgreSQL they are sent together in pipeline mode, so the whole batch costs one
    round trip instead of one per statement, and outside ``transaction.atomic()`` needs
    no BEGIN and COMMIT of its own: statements sent before one Sync run as one
    transaction. They are also prepared (KEEL_DB_PREPARED_STATEMENTS), so PostgreSQL
    plans each once per connection instead of at every node. SQLite runs them one by
    one in ``transaction.atomic()``.

    No statement can see what an earlier one returned, only what it changed: a
    statement that must happen only if an earlier one did says so in its WHERE clause.
    It may also name that earlier statement (``needs``): where statements run one by one
    it is then skipped when that one returned no row, as it would change nothing.
    """

    def __init__(self):
        self._statements: list[tuple[str, list, str | None]] = []
        self._names: dict[str, int] = {}

    def add(
        self, statement: str, params, name: str | None = None, needs: str | None = None
    ) -> None:
        if name is not None:
            self._names[name] = len(self._statements)
        self._statements.append((statement, list(params), needs))

    def add_check(self, name: str, statement: str, params) -> None:
        """A query that later statements name in ``needs``, and nothing reads: where
        statements run one by one (SQLite) they are skipped when it finds no row; in a
        pipeline (PostgreSQL), where skipping would save nothing, it is not sent at all."""
        if _db().vendor != "postgresql":
            self.add(statement, params, name=name)

    def run(self) -> dict[str, list[tuple]]:
        """Run the statements; return the rows of each named one ([] if it has none)."""
        pipelined = _db().vendor == "postgresql"
        rows = self._run_pipelined() if pipelined else self._run_one_by_one()
        return {name: rows[index] for name, index in self._names.items()}

    def _run_one_by_one(self) -> list[list[tuple]]:
        rows: list[list[tuple]] = []
        with transaction.atomic(), connection.cursor() as cursor:
            for statement, params, needs in self._statements:
                if needs is not None and not rows[self._names[needs]]:
                    rows.append([])
                    continue
                cursor.execute(statement, params)
                # Read every row: SQLite finishes a statement (and its RETURNING) only then.
                rows.append(cursor.fetchall())
        return rows

    def _run_pipelined(self) -> list[list[tuple]]:
        # Django's own cursors bind parameters client-side, which pipeline mode cannot
        # use; these cursors bind them server-side, on Django's connection and inside
        # its transaction if there is one.
        db = _db()
        db.ensure_connection()
        db.validate_no_broken_transaction()
        started = time.monotonic()
        with db.wrap_database_errors:
            session = db.connection
            cursors = []
            with session.pipeline():  # leaving it sends the Sync and reads every answer
                for statement, params, _ in self._statements:
                    cursor = psycopg.Cursor(session)
                    cursor.execute(statement, params)
                    cursors.append(cursor)
            rows = [cursor.fetchall() if cursor.description else [] for cursor in cursors]
        if db.queries_logged:  # DEBUG, or a test counting queries
            db.queries_log.append(
                {
                    "sql": ";\n".join(statement for statement, *_ in self._statements),
                    "time": f"{time.monotonic() - started:.3f}",
                }
            )
        return rows


@dataclass(frozen=True)
class Raw:
    """An SQL expression for ``insert_select``, in place of a value."""

    expression: str
    params: tuple = ()


def insert_select(model: type[Model], values: dict, rest: str, rest_params) -> tuple[str, list]:
    """``INSERT INTO <model> (…) SELECT <values> <rest>``: rows made by a query, or one
    row made only if a condition holds (``rest`` = ``"WHERE …"``).

    ``values`` maps field names to values (converted as the ORM converts them) or to
    ``Raw`` expressions over the rows ``rest`` selects. A field left out gets its
    default as the ORM would give it; a nullable one without a default is NULL.
    """
    db = _db()
    columns, expressions, params = [], [], []
    for field in _insert_shape(model)[0]:
        if field.name in values:
            value = values[field.name]
        elif field.null and not field.has_default():
            continue
        else:
            value = field.get_default()  # "" for a text field without a default, as the ORM
        columns.append(db.ops.quote_name(field.column))
        if isinstance(value, Raw):
            expressions.append(value.expression)
            params.extend(value.params)
        else:
            expressions.append("%s")
            params.append(field.get_db_prep_save(value, db))
    statement = (
        f"INSERT INTO {table(model)} ({', '.join(columns)}) SELECT {', '.join(expressions)} {rest}"
    )
    return statement, [*params, *rest_params]


def commit_without_waiting_for_disk(batch: Batch) -> None:
    """Let ``batch`` commit without waiting for PostgreSQL to flush its log to disk
    (asynchronous commit, for this transaction only).

    Other sessions see the commit at once, so it orders and excludes exactly as any
    other. Only a crash of PostgreSQL itself can undo it, and only if it came within
    the last fraction of a second: the log is written in order, so the next commit that
    does wait makes every earlier one durable. SQLite (WAL, synchronous=NORMAL) never
    waits at commit anyway.
    """
    if _db().vendor == "postgresql":
        batch.add("SET LOCAL synchronous_commit TO OFF", [])


def row_lock() -> str:
    """The engine's row lock (see workflows/engine.py); SQLite locks the whole database."""
    return " FOR NO KEY UPDATE" if has_row_locks() else ""


def has_row_locks() -> bool:
    """False on SQLite, where a writing transaction holds the whole database instead."""
    return _db().features.has_select_for_no_key_update


def insert(objects: list[Model]) -> None:
    """INSERT model instances in as few statements as the parameter limit allows.

    Every concrete field but the auto primary key, through ``pre_save`` and
    ``get_db_prep_save`` as ``bulk_create`` does; ids are not read back.
    """
    if not objects:
        return
    db = _db()
    fields, statement_start, row = _insert_shape(type(objects[0]))
    per_statement = max(1, MAX_PARAMS // len(fields))
    for start in range(0, len(objects), per_statement):
        chunk = objects[start : start + per_statement]
        params = [
            field.get_db_prep_save(field.pre_save(obj, add=True), db)
            for obj in chunk
            for field in fields
        ]
        execute(statement_start + ", ".join([row] * len(chunk)), params)


@cache
def _insert_shape(model: type[Model]) -> tuple[list, str, str]:
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    return (
        fields,
        f"INSERT INTO {table(model)} ({columns}) VALUES ",
        f"({placeholders(len(fields))})",
    )
