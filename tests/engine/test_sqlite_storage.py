"""SQLite as Keel sets it up."""

import sqlite3

import pytest
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _sqlite_only():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's journal and locks only")


def test_migrate_leaves_the_database_in_write_ahead_log_mode():
    # The test database was made by migrate; a fresh connection to the file sees WAL.
    with sqlite3.connect(connection.settings_dict["NAME"]) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
