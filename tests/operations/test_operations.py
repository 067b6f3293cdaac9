"""Operator actions: resume, retry, rollback, cancel, skip, mark succeeded.

The engine is driven directly, as a worker would drive it, so every interleaving is
exact; one test per action family also runs a real worker.
"""

import threading

import pytest
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.db.transaction import TransactionManagementError

from tests.conftest import finished
from tests.testapp.models import Execution
from workflows import engine, operations
from workflows.models import Checkpoint, NodeAttempt, NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)

CHAIN = {
    "name": "Chain",
    "nodes": {
        "a": {"type": "test.effect", "params": {"value": 1}},
        "b": {"type": "test.effect", "params": {"value": 2}, "after": ["a"]},
        "c": {"type": "test.effect", "params": {"value": 3}, "after": ["b"]},
    },
}


def nodes(run) -> dict[str, NodeRun]:
    return {n.node_key: n for n in NodeRun.objects.filter(run=run)}


def work(run, key, *, output=None, fail: str | None = None, checkpoint=None) -> None:
    """Do what a worker does for the node's current attempt."""
    node = nodes(run)[key]
    claim = engine.claim_attempt(node.pk, node.attempt, worker="w", pid=1, host="h")
    assert claim is not None, f"{key} could not be claimed ({node.status} attempt {node.attempt})"
    if checkpoint is not None:
        engine.save_progress_checkpoint(
            node.pk, run.pk, node.attempt, engine.next_checkpoint_sequence(node.pk), checkpoint
        )
    if fail:
        engine.fail_attempt(node.pk, node.attempt, engine.Failure(fail, "boom", retryable=False))
    else:
        engine.complete_attempt(
            node.pk, node.attempt, output if output is not None else {"key": key}
        )


def operator_events(run):
    return list(RunEvent.objects.filter(run=run, kind=RunEvent.Kind.OPERATOR).order_by("id"))


@pytest.fixture
def failed_chain(start_run):
    """a succeeded, b failed after a checkpoint, c never ran: the run failed."""
    run = start_run(CHAIN)
    work(run, "a", output={"a": 1})
    work(run, "b", checkpoint={"offset": 500}, fail="ValueError")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    return run


# --- resume -----------------------------------------------------------------------------------


def test_resume_keeps_succeeded_nodes_and_requeues_the_rest_from_their_checkpoint(failed_chain):
    outcome = operations.resume_run(failed_chain.pk, actor="alice", reason="fixed the input file")

    assert outcome.changed and outcome.run.status == Run.Status.RUNNING
    after = nodes(failed_chain)
    assert after["a"].status == NodeRun.Status.SUCCEEDED and after["a"].output == {"a": 1}
    assert (after["b"].status, after["b"].attempt, after["b"].attempts_base) == (
        NodeRun.Status.QUEUED,
        2,
        1,
    )
    assert (
        after["c"].status == NodeRun.Status.PENDING
        and after["c"].reason == "waiting for upstream: b"
    )
    assert engine.latest_progress_state(after["b"].pk) == {"offset": 500}
    [event] = operator_events(failed_chain)
    assert (event.actor, event.reason) == ("alice", "fixed the input file")
    assert event.before["action"] == "resume" and event.before["run_status"] == "failed"
    assert event.after["run_status"] == "running" and event.after["nodes"]["b"] == "queued"


def test_resumed_run_runs_to_success(failed_chain):
    operations.resume_run(failed_chain.pk, actor="alice", reason="retry")
    work(failed_chain, "b")
    work(failed_chain, "c")
    failed_chain.refresh_from_db()
    assert failed_chain.status == Run.Status.SUCCEEDED


def test_resume_twice_changes_nothing_the_second_time(failed_chain):
    first = operations.resume_run(failed_chain.pk, actor="alice", reason="x", request_key="req-1")
    again = operations.resume_run(failed_chain.pk, actor="alice", reason="x", request_key="req-1")
    plain_repeat = operations.resume_run(failed_chain.pk, actor="alice", reason="x")

    assert first.changed and not again.changed and not plain_repeat.changed
    assert again.message == "This request was already applied; nothing changed."
    assert "is running; nothing to resume" in plain_repeat.message
    assert len(operator_events(failed_chain)) == 1
    assert (
        NodeAttempt.objects.filter(node_run__run=failed_chain, node_run__node_key="b").count() == 2
    )


def test_twenty_simultaneous_resumes_make_exactly_one_transition(failed_chain):
    outcomes, errors = [], []
    barrier = threading.Barrier(20)

    def resume():
        try:
            barrier.wait()
            outcomes.append(
                operations.resume_run(failed_chain.pk, actor="clicker", reason="double click")
            )
        except Exception as error:  # collected and asserted below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=resume) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors
    assert sum(outcome.changed for outcome in outcomes) == 1
    assert len(operator_events(failed_chain)) == 1
    assert (
        NodeAttempt.objects.filter(node_run__run=failed_chain, node_run__node_key="b").count() == 2
    )


# --- retry ------------------------------------------------------------------------------------


def test_retry_node_gives_a_failed_node_a_new_attempt(failed_chain):
    outcome = operations.retry_node(failed_chain.pk, "b", actor="bob", reason="flaky network")
    assert outcome.changed
    b = nodes(failed_chain)["b"]
    assert (b.status, b.attempt) == (NodeRun.Status.QUEUED, 2)
    assert failed_chain.__class__.objects.get(pk=failed_chain.pk).status == Run.Status.RUNNING


def test_retry_with_downstream_resets_succeeded_downstream_nodes_and_their_checkpoints(start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key)
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED

    outcome = operations.retry_node(run.pk, "b", actor="bob", reason="bad output", downstream=True)

    assert (
        outcome.message
        == f"Node b of run {run.pk} queued for a new attempt with 1 downstream node(s) reset."
    )
    after = nodes(run)
    assert after["a"].status == NodeRun.Status.SUCCEEDED
    assert after["b"].status == NodeRun.Status.QUEUED and after["b"].output is None
    assert after["c"].status == NodeRun.Status.PENDING and after["c"].output is None
    assert not Checkpoint.objects.filter(node_run__in=[after["b"], after["c"]]).exists()
    work(run, "b")
    work(run, "c")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED


def test_retry_of_a_stuck_running_node_ends_its_attempt_and_rejects_its_late_result(start_run):
    run = start_run(CHAIN)
    a = nodes(run)["a"]
    assert engine.claim_attempt(a.pk, 1, worker="hung", pid=1, host="h")

    operations.retry_node(run.pk, "a", actor="bob", reason="hung", expected_attempt=1)

    assert NodeAttempt.objects.get(node_run=a, number=1).status == NodeAttempt.Status.ABANDONED
    assert nodes(run)["a"].attempt == 2
    assert engine.complete_attempt(a.pk, 1, {"late": True}) is False
    repeat = operations.retry_node(run.pk, "a", actor="bob", reason="hung", expected_attempt=1)
    assert not repeat.changed and "not 1: it was retried or moved on" in repeat.message


def test_retry_of_a_node_waiting_for_a_failed_upstream_says_what_to_retry(failed_chain):
    with pytest.raises(
        operations.OperationError, match=r"Node c has not run yet: it waits for b\. Retry b"
    ):
        operations.retry_node(failed_chain.pk, "c", actor="bob", reason="x")
    with pytest.raises(operations.OperationError, match="has no node 'zzz'"):
        operations.retry_node(failed_chain.pk, "zzz", actor="bob", reason="x")


# --- rollback ---------------------------------------------------------------------------------


@pytest.fixture
def succeeded_chain(start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key, output={"from": key})
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    return run


def test_rollback_to_a_checkpoint_compensates_newer_nodes_in_reverse_order_and_resumes(
    succeeded_chain,
):
    run = succeeded_chain
    a_done = Checkpoint.objects.get(node_run__node_key="a", node_run__run=run, kind="node_done")
    preview = operations.preview("rollback", run.pk, to_checkpoint=a_done.pk)
    assert [(n.key, n.will) for n in preview.nodes] == [
        ("c", "compensate hook runs, then it runs again"),
        ("b", "compensate hook runs, then it runs again"),
    ]

    outcome = operations.rollback_run(
        run.pk, actor="carol", reason="bad load", to_checkpoint=a_done.pk
    )

    assert outcome.changed
    undo_order = list(
        Execution.objects.filter(node_key__startswith="undo:")
        .order_by("id")
        .values_list("node_key", flat=True)
    )
    assert undo_order == ["undo:c", "undo:b"]
    after = nodes(run)
    assert after["a"].status == NodeRun.Status.SUCCEEDED and after["a"].output == {"from": "a"}
    assert after["b"].status == NodeRun.Status.QUEUED and after["b"].output is None
    assert after["c"].status == NodeRun.Status.PENDING
    assert not Checkpoint.objects.filter(node_run__in=[after["b"], after["c"]]).exists()
    assert Checkpoint.objects.filter(node_run=after["a"]).exists()
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING


def test_rollback_to_just_before_a_node_resets_it_and_everything_after(succeeded_chain):
    operations.rollback_run(succeeded_chain.pk, actor="carol", reason="redo b", to_node="b")
    after = nodes(succeeded_chain)
    assert after["a"].status == NodeRun.Status.SUCCEEDED
    assert (
        after["b"].status == NodeRun.Status.QUEUED and after["c"].status == NodeRun.Status.PENDING
    )
    assert sorted(
        Execution.objects.filter(node_key__startswith="undo:").values_list("node_key", flat=True)
    ) == ["undo:b", "undo:c"]


def test_rollback_to_a_progress_checkpoint_resumes_the_node_from_it(start_run):
    run = start_run(
        {
            "name": "Progress",
            "nodes": {"load": {"type": "test.batches", "params": {"rows": 10, "batch": 1}}},
        }
    )
    load = nodes(run)["load"]
    engine.claim_attempt(load.pk, 1, worker="w", pid=1, host="h")
    early = engine.save_progress_checkpoint(load.pk, run.pk, 1, 1, {"next": 4})
    engine.save_progress_checkpoint(load.pk, run.pk, 1, 2, {"next": 8})
    engine.complete_attempt(load.pk, 1, {"rows": 10})

    preview = operations.preview("rollback", run.pk, to_checkpoint=early.pk)
    assert [n.will for n in preview.nodes] == ["runs again from its latest checkpoint"]
    assert preview.warnings == [
        "load has side effects and no compensate hook: running it again may repeat them"
    ]
    operations.rollback_run(run.pk, actor="carol", reason="redo the tail", to_checkpoint=early.pk)

    assert engine.latest_progress_state(load.pk) == {"next": 4}
    assert nodes(run)["load"].status == NodeRun.Status.QUEUED


def test_rollback_without_resume_leaves_the_run_cancelled_until_resumed(succeeded_chain):
    outcome = operations.rollback_run(
        succeeded_chain.pk, actor="carol", reason="pause", to_node="c", resume=False
    )
    assert outcome.run.status == Run.Status.CANCELLED
    operations.resume_run(succeeded_chain.pk, actor="carol", reason="go")
    assert nodes(succeeded_chain)["c"].status == NodeRun.Status.QUEUED


def test_rollback_of_a_running_run_asks_to_cancel_first(start_run):
    run = start_run(CHAIN)
    with pytest.raises(operations.OperationError, match="still running; cancel it first"):
        operations.rollback_run(run.pk, actor="carol", reason="x", to_node="a")


# --- skip, mark succeeded, cancel --------------------------------------------------------------


def test_skip_lets_the_downstream_proceed(failed_chain):
    operations.skip_node(failed_chain.pk, "b", actor="dan", reason="not needed today")
    after = nodes(failed_chain)
    assert after["b"].status == NodeRun.Status.SKIPPED
    assert after["c"].status == NodeRun.Status.QUEUED
    work(failed_chain, "c")
    failed_chain.refresh_from_db()
    assert failed_chain.status == Run.Status.SUCCEEDED


def test_mark_node_succeeded_passes_the_given_output_downstream(failed_chain):
    operations.mark_node_succeeded(
        failed_chain.pk, "b", actor="erin", reason="loaded by hand", output={"rows": 7}
    )
    after = nodes(failed_chain)
    assert after["b"].status == NodeRun.Status.SUCCEEDED and after["b"].output == {"rows": 7}
    claim = engine.claim_attempt(after["c"].pk, 1, worker="w", pid=1, host="h")
    assert engine.upstream_outputs(claim.run_id, claim.upstream) == {"b": {"rows": 7}}


def test_marking_the_last_failed_node_succeeded_closes_the_run(start_run):
    run = start_run({"name": "One", "nodes": {"x": {"type": "test.effect"}}})
    work(run, "x", fail="ValueError")
    operations.mark_node_succeeded(run.pk, "x", actor="erin", reason="done by hand", output={})
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED


def test_every_action_requires_a_reason(failed_chain):
    for call in (
        lambda: operations.resume_run(failed_chain.pk, actor="x", reason=""),
        lambda: operations.retry_node(failed_chain.pk, "b", actor="x", reason="  "),
        lambda: operations.skip_node(failed_chain.pk, "b", actor="x", reason=None),
        lambda: operations.cancel_run(failed_chain.pk, actor="x", reason=""),
    ):
        with pytest.raises(operations.OperationError, match="A reason is required"):
            call()
    assert operator_events(failed_chain) == []


# --- permissions ------------------------------------------------------------------------------


def test_a_user_without_the_operate_permission_is_denied_and_the_denial_is_recorded(
    failed_chain, django_user_model
):
    viewer = django_user_model.objects.create_user("viewer", password="pw")
    with pytest.raises(
        operations.OperationDenied, match=r"ask an administrator for the 'workflows\.operate_run'"
    ):
        operations.resume_run(
            failed_chain.pk, actor=operations.Actor.for_user(viewer), reason="please"
        )
    failed_chain.refresh_from_db()
    assert failed_chain.status == Run.Status.FAILED
    [denial] = operator_events(failed_chain)
    assert denial.actor == "viewer" and denial.before == {"action": "resume", "denied": True}

    viewer.user_permissions.add(Permission.objects.get(codename="operate_run"))
    viewer = django_user_model.objects.get(pk=viewer.pk)  # fresh permission cache
    assert operations.resume_run(
        failed_chain.pk, actor=operations.Actor.for_user(viewer), reason="please"
    ).changed


# --- with a real worker -----------------------------------------------------------------------


@pytest.mark.workers
def test_failed_run_resumed_with_a_real_worker_reaches_succeeded(start_worker, start_run):
    start_worker()
    run = finished(
        start_run(
            {
                "name": "Once",
                "nodes": {"x": {"type": "test.fail_until", "params": {"succeed_on": 2}}},
            }
        )
    )
    assert run.status == Run.Status.FAILED
    operations.resume_run(run.pk, actor="alice", reason="try again")
    run = finished(run)
    assert run.status == Run.Status.SUCCEEDED
    assert [a.status for a in NodeAttempt.objects.filter(node_run__run=run).order_by("number")] == [
        "failed",
        "succeeded",
    ]


def undoable_run(start_run, undo: str):
    """first and second succeeded; second's compensate hook does ``undo``."""
    run = start_run(
        {
            "name": "Undoable",
            "nodes": {
                "first": {"type": "test.effect"},
                "second": {"type": "test.undoable", "params": {"undo": undo}, "after": ["first"]},
            },
        }
    )
    work(run, "first")
    work(run, "second")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    return run


def test_compensate_hooks_run_before_the_run_is_locked(start_run):
    run = undoable_run(start_run, "record")

    operations.rollback_run(run.pk, actor="carol", reason="undo", to_node="second")

    assert Execution.objects.filter(node_key__startswith="undo:second").get().node_key == (
        "undo:second:unlocked"
    )
    assert nodes(run)["second"].status == NodeRun.Status.QUEUED


@pytest.mark.parametrize(
    ("undo", "message"),
    [
        ("fail", "The compensate hook of node second failed: RuntimeError: the warehouse"),
        ("hang", "The compensate hook of node second did not finish within 1s"),
        ("change", "changed while its compensate hooks ran (second compensated)"),
    ],
)
def test_a_rollback_whose_compensation_fails_or_overruns_resets_nothing(
    start_run, settings, undo, message
):
    settings.KEEL_COMPENSATE_TIMEOUT_SECONDS = 1
    run = undoable_run(start_run, undo)
    before = {key: (node.status, node.attempt) for key, node in nodes(run).items()}

    with pytest.raises(
        operations.OperationError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        operations.rollback_run(run.pk, actor="carol", reason="undo", to_node="second")

    assert "Nothing was reset" in str(caught.value) or "nothing was reset" in str(caught.value)
    after = {key: (node.status, node.attempt) for key, node in nodes(run).items()}
    if undo != "change":
        assert after == before
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert operator_events(run) == []


def probe_run(start_run):
    run = start_run({"name": "Probe", "nodes": {"only": {"type": "test.undo_probe"}}})
    work(run, "only")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    return run


def test_compensate_hooks_run_outside_any_transaction(start_run):
    run = probe_run(start_run)

    outcome = operations.rollback_run(run.pk, actor="carol", reason="undo", to_node="only")

    assert outcome.changed
    assert list(
        Execution.objects.filter(node_key__startswith="undo:").values_list("node_key", flat=True)
    ) == ["undo:only:in_atomic_block=False"]


def test_a_rollback_called_inside_a_transaction_is_refused_and_changes_nothing(start_run):
    run = probe_run(start_run)

    with (
        pytest.raises(TransactionManagementError, match="outside any transaction"),
        transaction.atomic(),
    ):
        operations.rollback_run(run.pk, actor="carol", reason="undo", to_node="only")

    assert not Execution.objects.filter(node_key__startswith="undo:").exists()
    assert nodes(run)["only"].status == NodeRun.Status.SUCCEEDED
    assert operator_events(run) == []


def test_a_rollback_without_compensate_hooks_applies_as_one_transaction(start_run):
    run = start_run(
        {"name": "Plain", "nodes": {"x": {"type": "test.record"}, "y": {"type": "test.record"}}}
    )
    work(run, "x")
    work(run, "y")

    with transaction.atomic():  # nothing to compensate: callers may hold a transaction
        outcome = operations.rollback_run(run.pk, actor="carol", reason="redo", to_node="y")

    assert outcome.changed
    assert nodes(run)["y"].status == NodeRun.Status.QUEUED
