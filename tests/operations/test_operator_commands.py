"""resume_run, retry_node, rollback_run, skip_node, cancel_run: --reason and --dry-run."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tests.operations.test_operations import CHAIN, nodes, work
from workflows.models import Checkpoint, NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)


def run_command(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def failed_run(start_run):
    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError")
    return run


def test_dry_run_prints_the_preview_and_changes_nothing(failed_run):
    text = run_command("resume_run", str(failed_run.pk), "--reason", "x", "--dry-run")
    assert "resume run" in text and "dry run, nothing changed" in text
    assert "b " in text and "runs again from the start (queue default)" in text
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.FAILED
    assert not RunEvent.objects.filter(run=failed_run, kind=RunEvent.Kind.OPERATOR).exists()


def test_resume_then_resume_again(failed_run):
    assert f"Run {failed_run.pk} resumed: 2 node(s) will run again." in run_command(
        "resume_run", str(failed_run.pk), "--reason", "fixed"
    )
    assert "nothing to resume" in run_command("resume_run", str(failed_run.pk), "--reason", "fixed")
    assert RunEvent.objects.get(run=failed_run, kind=RunEvent.Kind.OPERATOR).actor.startswith(
        "cli:"
    )


def test_retry_node_with_downstream(failed_run):
    text = run_command("retry_node", str(failed_run.pk), "b", "--downstream", "--reason", "again")
    assert "queued for a new attempt with 1 downstream node(s) reset" in text
    assert nodes(failed_run)["b"].status == NodeRun.Status.QUEUED


def test_skip_node(failed_run):
    assert "skipped" in run_command("skip_node", str(failed_run.pk), "b", "--reason", "not needed")
    assert nodes(failed_run)["c"].status == NodeRun.Status.QUEUED


def test_rollback_to_a_checkpoint_and_to_a_node(start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key)
    a_done = Checkpoint.objects.get(run=run, node_run__node_key="a", kind="node_done")
    preview = run_command(
        "rollback_run", str(run.pk), "--to-checkpoint", str(a_done.pk), "--reason", "x", "--dry-run"
    )
    assert "compensate hook runs, then it runs again" in preview
    text = run_command(
        "rollback_run", str(run.pk), "--to-checkpoint", str(a_done.pk), "--reason", "bad load"
    )
    assert "rolled back: 2 compensated, 2 reset; resumed." in text
    with pytest.raises(CommandError, match="still running; cancel it first"):
        run_command("rollback_run", str(run.pk), "--to-node", "a", "--reason", "x")


def test_cancel_with_dry_run_then_for_real(failed_run, start_run):
    run = start_run(CHAIN)
    assert "is cancelled" in run_command("cancel_run", str(run.pk), "--reason", "x", "--dry-run")
    assert f"Run {run.pk} cancelled." in run_command(
        "cancel_run", str(run.pk), "--reason", "wrong data"
    )


def test_errors_say_what_to_do(failed_run):
    with pytest.raises(CommandError, match="No run with id '424242'"):
        run_command("resume_run", "424242", "--reason", "x")
    with pytest.raises(CommandError, match="has no node 'nope'"):
        run_command("retry_node", str(failed_run.pk), "nope", "--reason", "x")
    with pytest.raises(CommandError, match="A reason is required"):
        run_command("skip_node", str(failed_run.pk), "b", "--reason", " ")
