"""Hand-written SQL for the statements every node runs: its claim and its completion.

Everywhere else the engine uses the ORM. These few statements run once per node in a
freshly forked work horse, where building a query with the ORM costs more than the
database does (bench/engine.py measured it), and ``UPDATE … RETURNING`` does in one
statement what the ORM needs two or three for.

The SQL is plain enough for PostgreSQL and SQLite (3.35 or newer, for RETURNING)
alike. Values go through the model fields' own conversions, so rows are stored and
read exactly as the ORM stores and reads them.
"""

from functools import cache

from django.db import connection
from django.db.models import Model

# SQLite allows 32 766 bound parameters per statement, PostgreSQL 65 535.
MAX_PARAMS = 30_000


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def to_db(model: type[Model], field_name: str, value):
    """A value as the ORM would send it for that field (JSON encoded, datetimes adapted)."""
    return model._meta.get_field(field_name).get_db_prep_value(value, connection, prepared=False)


def from_db(model: type[Model], field_name: str, value):
    """A JSON column's value as the ORM would load it (both backends return JSON as text)."""
    return model._meta.get_field(field_name).from_db_value(value, None, connection)


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


def row_lock() -> str:
    """The engine's row lock (see workflows/engine.py); SQLite locks the whole database."""
    return " FOR NO KEY UPDATE" if connection.features.has_select_for_no_key_update else ""


def insert(objects: list[Model]) -> None:
    """INSERT model instances in as few statements as the parameter limit allows.

    Every concrete field but the auto primary key, through ``pre_save`` and
    ``get_db_prep_save`` as ``bulk_create`` does; ids are not read back.
    """
    if not objects:
        return
    fields, statement_start, row = _insert_shape(type(objects[0]))
    per_statement = max(1, MAX_PARAMS // len(fields))
    for start in range(0, len(objects), per_statement):
        chunk = objects[start : start + per_statement]
        params = [
            field.get_db_prep_save(field.pre_save(obj, add=True), connection)
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
