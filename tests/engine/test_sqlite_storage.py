"""SQLite as Keel sets it up: the write-ahead log, and the forking worker's idle connection."""

import sqlite3

import pytest
from django.db import connection, transaction

from workflows.models import Workflow
from workflows.worker import hold_sqlite_database_open

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _sqlite_only():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's journal and locks only")


def test_migrate_leaves_the_database_in_write_ahead_log_mode():
    # The test database was made by migrate; a fresh connection to the file sees WAL.
    with sqlite3.connect(connection.settings_dict["NAME"]) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_the_workers_idle_connection_never_holds_back_a_writer():
    keepalive = hold_sqlite_database_open()
    assert keepalive is not None
    try:
        # A writer takes the write lock at BEGIN (IMMEDIATE); with the idle connection
        # open it must get it at once, not wait out the busy timeout.
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA busy_timeout = 0")
        with transaction.atomic():
            Workflow.objects.create(slug="beside-the-keepalive", name="Beside")
        assert Workflow.objects.filter(slug="beside-the-keepalive").exists()
    finally:
        keepalive.close()
