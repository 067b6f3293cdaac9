"""workflows/sql.py: a batch of statements is one transaction, and on PostgreSQL one round
trip in pipeline mode. These run on both backends: SQLite takes the one-by-one path."""

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from workflows.engine import sql
from workflows.models import NodeRun, Run

pytestmark = pytest.mark.django_db(transaction=True)

ONE_NODE = {"name": "One", "nodes": {"n": {"type": "keel.noop"}}}


def set_reason(batch: sql.Batch, run: Run, reason: str) -> None:
    batch.add(f"UPDATE {sql.table(Run)} SET reason = %s WHERE id = %s", [reason, run.pk])


def break_a_constraint(batch: sql.Batch, run: Run) -> None:
    # pending_upstreams is a PositiveIntegerField: its check constraint refuses -1.
    batch.add(f"UPDATE {sql.table(NodeRun)} SET pending_upstreams = -1 WHERE run_id = %s", [run.pk])


def test_a_batch_returns_the_rows_of_its_named_statements_in_order(start_run):
    run = start_run(ONE_NODE)
    batch = sql.Batch()
    batch.add(f"SELECT reason FROM {sql.table(Run)} WHERE id = %s", [run.pk], name="before")
    set_reason(batch, run, "changed")
    batch.add(f"SELECT reason FROM {sql.table(Run)} WHERE id = %s", [run.pk], name="after")
    batch.add(
        f"UPDATE {sql.table(NodeRun)} SET reason = %s WHERE run_id = %s AND node_key = %s"
        " RETURNING node_key",
        ["touched", run.pk, "nobody"],
        name="no_rows",
    )

    assert batch.run() == {"before": [("",)], "after": [("changed",)], "no_rows": []}


def test_a_failing_statement_undoes_the_statements_before_it(start_run):
    run = start_run(ONE_NODE)
    batch = sql.Batch()
    set_reason(batch, run, "half-written")
    break_a_constraint(batch, run)

    with pytest.raises(IntegrityError):
        batch.run()

    run.refresh_from_db()
    assert run.reason == ""
    # The connection is usable again at once (no aborted pipeline or transaction left).
    assert Run.objects.filter(pk=run.pk, reason="").exists()


def test_a_batch_inside_a_transaction_commits_or_rolls_back_with_it(start_run):
    run = start_run(ONE_NODE)
    with pytest.raises(RuntimeError), transaction.atomic():
        batch = sql.Batch()
        set_reason(batch, run, "rolled back")
        batch.run()
        assert Run.objects.get(pk=run.pk).reason == "rolled back"
        raise RuntimeError("the surrounding transaction fails")
    assert Run.objects.get(pk=run.pk).reason == ""

    with transaction.atomic():
        batch = sql.Batch()
        set_reason(batch, run, "kept")
        batch.run()
    assert Run.objects.get(pk=run.pk).reason == "kept"


def test_a_batch_is_counted_where_queries_are_counted(start_run):
    run = start_run(ONE_NODE)
    batch = sql.Batch()
    set_reason(batch, run, "a")
    set_reason(batch, run, "b")
    with CaptureQueriesContext(connection) as queries:
        batch.run()
    statements = [query["sql"] for query in queries.captured_queries]
    assert sum(statement.count("SET reason") for statement in statements) == 2
    if connection.vendor == "postgresql":
        assert len(statements) == 1  # one round trip


def test_the_same_statements_run_again_once_prepared(start_run):
    """PostgreSQL prepares a statement the second time it sees it on a connection; the
    third run uses the prepared statement (with new values)."""
    run = start_run(ONE_NODE)
    for reason in ("first", "second", "third"):
        batch = sql.Batch()
        set_reason(batch, run, reason)
        batch.add(f"SELECT reason FROM {sql.table(Run)} WHERE id = %s", [run.pk], name="now")
        assert batch.run()["now"] == [(reason,)]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            assert cursor.fetchone()[0] >= 2


def test_a_statement_that_needs_an_empty_result_changes_nothing(start_run):
    """``needs`` names the statement a later one depends on; the later one's own WHERE
    says so too. Where statements run one by one (SQLite) it is not even run."""
    run = start_run(ONE_NODE)
    batch = sql.Batch()
    batch.add(f"SELECT id FROM {sql.table(Run)} WHERE id = %s", [-1], name="missing")
    batch.add(
        f"UPDATE {sql.table(Run)} SET reason = %s WHERE id = %s"
        f" AND EXISTS (SELECT 1 FROM {sql.table(Run)} WHERE id = %s) RETURNING id",
        ["changed", run.pk, -1],
        name="dependent",
        needs="missing",
    )
    with CaptureQueriesContext(connection) as queries:
        assert batch.run() == {"missing": [], "dependent": []}
    assert Run.objects.get(pk=run.pk).reason == ""
    if connection.vendor == "sqlite":
        assert not any("SET reason" in query["sql"] for query in queries.captured_queries)


def test_a_check_runs_only_where_statements_run_one_by_one(start_run):
    """``add_check``: a query that only lets later statements be skipped. SQLite runs it
    (and skips the statement that needs it when it finds nothing); a pipeline would
    gain nothing from it, so PostgreSQL is not sent it. The outcome is the same."""
    run = start_run(ONE_NODE)
    for reason, run_id in (("skipped", -1), ("changed", run.pk)):
        batch = sql.Batch()
        batch.add_check("found", f"SELECT id FROM {sql.table(Run)} WHERE id = %s", [run_id])
        batch.add(
            f"UPDATE {sql.table(Run)} SET reason = %s WHERE id = %s"
            f" AND EXISTS (SELECT 1 FROM {sql.table(Run)} WHERE id = %s) RETURNING id",
            [reason, run.pk, run_id],
            name="dependent",
            needs="found",
        )
        with CaptureQueriesContext(connection) as queries:
            rows = batch.run()
        sent = ";".join(query["sql"] for query in queries.captured_queries)
        assert ("SELECT id FROM" in sent) is (connection.vendor == "sqlite")
        assert rows["dependent"] == ([] if run_id == -1 else [(run.pk,)])
    assert Run.objects.get(pk=run.pk).reason == "changed"
