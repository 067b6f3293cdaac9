"""The demo `make run` leaves to recover: the orders import fails on its first run for a
reason it states, and succeeds when resumed (issue 3, item 7)."""

from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import finished
from workflows import operations
from workflows.definitions import versioning
from workflows.models import NodeRun, Run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

NEEDS_FIX = Path(settings.BASE_DIR) / "workflows" / "demo_definitions" / "needs_fix.yaml"


def test_the_orders_import_demo_fails_first_and_succeeds_when_resumed(
    start_worker, settings, tmp_path
):
    settings.KEEL_DATA_DIR = tmp_path
    start_worker(KEEL_DATA_DIR=tmp_path)
    slug = versioning.load_file(NEEDS_FIX, actor="test").version.workflow.slug

    run = finished(operations.start_run(slug, actor="devstack"))

    assert run.status == Run.Status.FAILED
    failed = NodeRun.objects.get(run=run, node_key="import_orders")
    assert "had not arrived when the import ran" in failed.reason
    assert "resume the run" in failed.reason

    operations.resume_run(run.pk, actor="newcomer", reason="the file is there now")
    run = finished(run)

    assert run.status == Run.Status.SUCCEEDED
    imported = NodeRun.objects.get(run=run, node_key="import_orders").output
    assert imported["orders"] == 500 and imported["total"] > 0


def test_a_file_left_from_an_earlier_database_does_not_skip_the_failure(
    start_worker, settings, tmp_path
):
    """Run ids start again at 1 with a fresh database, but var/data stays: a stale file
    with the new run's name must not make the demo succeed at once."""
    settings.KEEL_DATA_DIR = tmp_path
    slug = versioning.load_file(NEEDS_FIX, actor="test").version.workflow.slug
    run = operations.start_run(slug, actor="devstack")
    stale = tmp_path / "inbox" / f"orders-run{run.pk}.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("order_id,amount\n1,10\n")

    start_worker(KEEL_DATA_DIR=tmp_path)

    assert finished(run).status == Run.Status.FAILED
