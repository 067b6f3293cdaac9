"""Stop node: an operator ends a running node's attempt as failed, with no retry.

The engine is driven as a worker would drive it (claims and outcomes), so every
interleaving is exact; tests/web/test_workers_page.py stops a real worker's node.
"""

import io

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError

from workflows import actions, engine, operations
from workflows.models import NodeAttempt, NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)

# ``long`` runs (three attempts allowed), ``after_long`` waits for it, ``side`` runs beside it.
FORK = {
    "name": "Fork",
    "nodes": {
        "long": {"type": "test.record", "retries": {"max_attempts": 3, "backoff": 0}},
        "after_long": {"type": "test.record", "after": ["long"]},
        "side": {"type": "test.record"},
    },
}


def nodes(run) -> dict[str, NodeRun]:
    return {node.node_key: node for node in NodeRun.objects.filter(run=run)}


def claim(run, key, worker="w-7") -> NodeRun:
    """What a worker does first: claim the node's current attempt (it is then running)."""
    node = nodes(run)[key]
    assert engine.claim_attempt(node.pk, node.attempt, worker=worker, pid=77, host="h")
    node.refresh_from_db()
    return node


def operator_events(run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run, kind=RunEvent.Kind.OPERATOR).order_by("id"))


@pytest.fixture
def forked(start_run):
    run = start_run(FORK)
    claim(run, "long")
    return run


def test_stop_fails_the_running_attempt_with_the_reason_and_does_not_retry_it(forked):
    outcome = operations.stop_node(forked.pk, "long", actor="olga", reason="hogs the warehouse")

    assert outcome.changed
    assert outcome.message == (
        f"Node long of run {forked.pk} stopped: attempt 1 on worker w-7 failed and is not "
        "retried; the run is running."
    )
    long = nodes(forked)["long"]
    # Three attempts were allowed; the stop is final all the same.
    assert (long.status, long.attempt, long.retry_at) == (NodeRun.Status.FAILED, 1, None)
    assert long.reason == "stopped by olga: hogs the warehouse"
    assert long.finished_at is not None
    attempt = NodeAttempt.objects.get(node_run=long, number=1)
    assert attempt.status == NodeAttempt.Status.FAILED
    assert attempt.error_type == "StoppedByOperator"
    assert attempt.error_message == "stopped by olga: hogs the warehouse"
    assert nodes(forked)["after_long"].reason == "blocked: upstream long failed"
    # ``side`` still has work to do: the run goes on.
    forked.refresh_from_db()
    assert forked.status == Run.Status.RUNNING


def test_the_stop_is_audited_in_the_runs_history(forked):
    operations.stop_node(forked.pk, "long", actor="olga", reason="hogs the warehouse")

    [event] = operator_events(forked)
    assert (event.actor, event.reason, event.node_run.node_key) == (
        "olga",
        "hogs the warehouse",
        "long",
    )
    assert event.before == {
        "action": "stop_node",
        "node": "long",
        "attempt": 1,
        "worker": "w-7",
        "run_status": "running",
        "nodes": {"long": "running"},
    }
    assert event.after == {"run_status": "running", "nodes": {"long": "failed"}}
    transition = RunEvent.objects.get(
        run=forked, node_run__node_key="long", kind=RunEvent.Kind.TRANSITION, after__status="failed"
    )
    assert transition.reason == "stopped by olga: hogs the warehouse"


def test_the_run_fails_as_after_any_failure_once_nothing_else_can_run(forked):
    side = claim(forked, "side")
    engine.complete_attempt(side.pk, side.attempt, {"ok": True})

    operations.stop_node(forked.pk, "long", actor="olga", reason="wrong input")

    forked.refresh_from_db()
    assert forked.status == Run.Status.FAILED
    assert forked.reason == "long failed"
    assert nodes(forked)["after_long"].status == NodeRun.Status.PENDING


def test_a_late_result_of_the_stopped_attempt_is_rejected(forked):
    operations.stop_node(forked.pk, "long", actor="olga", reason="wrong input")
    long = nodes(forked)["long"]

    assert engine.complete_attempt(long.pk, 1, {"rows": 9}) is False

    long.refresh_from_db()
    assert (long.status, long.output) == (NodeRun.Status.FAILED, None)
    assert RunEvent.objects.filter(run=forked, kind=RunEvent.Kind.STALE).count() == 1


def test_a_second_stop_changes_nothing_and_says_why(forked):
    operations.stop_node(forked.pk, "long", actor="olga", reason="first click")
    written = RunEvent.objects.filter(run=forked).count()

    again = operations.stop_node(forked.pk, "long", actor="olga", reason="second click")

    assert not again.changed
    assert again.message == f"Node long of run {forked.pk} is failed, not running; nothing to stop."
    assert RunEvent.objects.filter(run=forked).count() == written
    assert NodeAttempt.objects.get(
        node_run__run=forked, node_run__node_key="long"
    ).error_message == ("stopped by olga: first click")


def test_the_same_request_applied_twice_changes_nothing_the_second_time(forked):
    first = operations.stop_node(forked.pk, "long", actor="olga", reason="x", request_key="k-1")
    second = operations.stop_node(forked.pk, "long", actor="olga", reason="x", request_key="k-1")

    assert first.changed and not second.changed
    assert second.message == "This request was already applied; nothing changed."
    assert len(operator_events(forked)) == 1


def test_a_node_that_finished_meanwhile_is_left_alone(forked):
    long = nodes(forked)["long"]
    engine.complete_attempt(long.pk, 1, {"rows": 3})

    outcome = operations.stop_node(
        forked.pk, "long", actor="olga", reason="too slow", expected_attempt=1
    )

    assert not outcome.changed
    assert "is succeeded, not running; nothing to stop" in outcome.message
    long.refresh_from_db()
    assert (long.status, long.output) == (NodeRun.Status.SUCCEEDED, {"rows": 3})
    assert operator_events(forked) == []


def test_a_node_that_moved_on_to_another_attempt_is_left_alone(forked):
    long = nodes(forked)["long"]
    engine.fail_attempt(long.pk, 1, engine.Failure("ConnectionError", "reset"))
    claim(forked, "long")  # no backoff: attempt 2 was queued at once, and runs now

    outcome = operations.stop_node(
        forked.pk, "long", actor="olga", reason="stale page", expected_attempt=1
    )

    assert not outcome.changed
    assert outcome.message.startswith(f"Node long of run {forked.pk} is at attempt 2, not 1")
    assert nodes(forked)["long"].status == NodeRun.Status.RUNNING


def test_a_queued_node_is_not_running_so_there_is_nothing_to_stop(start_run):
    run = start_run(FORK)

    outcome = operations.stop_node(run.pk, "long", actor="olga", reason="not yet")

    assert not outcome.changed and "is queued, not running" in outcome.message
    assert nodes(run)["long"].status == NodeRun.Status.QUEUED


def test_an_unknown_node_is_refused_with_what_to_do(forked):
    with pytest.raises(operations.OperationError, match="has no node 'nope'"):
        operations.stop_node(forked.pk, "nope", actor="olga", reason="typo")


def test_a_stop_needs_a_reason(forked):
    with pytest.raises(operations.OperationError, match="A reason is required"):
        operations.stop_node(forked.pk, "long", actor="olga", reason="  ")
    assert nodes(forked)["long"].status == NodeRun.Status.RUNNING


def test_a_user_without_the_operate_permission_is_denied_and_the_denial_recorded(
    forked, django_user_model
):
    user = django_user_model.objects.create_user("vic", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_run"))

    with pytest.raises(operations.OperationDenied, match=r"workflows\.operate_run"):
        operations.stop_node(
            forked.pk, "long", actor=operations.Actor.for_user(user), reason="let me"
        )

    assert nodes(forked)["long"].status == NodeRun.Status.RUNNING
    [denial] = operator_events(forked)
    assert denial.before == {"action": "stop_node", "denied": True}
    assert denial.actor == "vic"


def test_the_stopped_nodes_pool_slot_goes_to_the_node_waiting_for_it(start_run):
    run = start_run(
        {
            "name": "Pooled",
            "pools": {"warehouse": 1},
            "nodes": {
                "holder": {"type": "test.record", "pool": "warehouse"},
                "waiter": {"type": "test.record", "pool": "warehouse"},
            },
        }
    )
    claim(run, "holder")
    assert nodes(run)["waiter"].status == NodeRun.Status.PENDING

    operations.stop_node(run.pk, "holder", actor="olga", reason="let the other one in")

    assert nodes(run)["waiter"].status == NodeRun.Status.QUEUED


def test_the_preview_says_what_will_happen_and_changes_nothing(forked):
    preview = actions.get("stop_node").preview(forked.pk, node="long", expected_attempt=1)

    assert preview.noop_message == ""
    [node] = preview.nodes
    assert (node.key, node.status) == ("long", "running")
    assert node.will == "attempt 1 on worker w-7 is stopped and fails; it is not retried"
    assert preview.warnings == ["after_long will not run until you retry or skip long."]
    assert nodes(forked)["long"].status == NodeRun.Status.RUNNING

    operations.stop_node(forked.pk, "long", actor="olga", reason="done with it")
    after = actions.get("stop_node").preview(forked.pk, node="long")
    assert (
        after.noop_message
        == f"Node long of run {forked.pk} is failed, not running; nothing to stop."
    )
    assert after.nodes == []


def test_the_registry_checks_the_stop_input():
    stop = actions.get("stop-node")
    assert stop.acts_on_node and stop.danger
    assert stop.clean({"reason": "x", "node": "long", "expected_attempt": 2}) == {
        "reason": "x",
        "node": "long",
        "expected_attempt": 2,
    }
    with pytest.raises(actions.ActionInputError) as caught:
        stop.clean({"reason": "x", "node": "long", "expected_attempt": "2"})
    assert caught.value.field == "expected_attempt"


def test_the_stop_node_command_stops_and_then_says_there_is_nothing_to_stop(forked):
    out = io.StringIO()
    call_command(
        "stop_node",
        str(forked.pk),
        "long",
        "--reason",
        "from the shell",
        "--expected-attempt",
        "1",
        stdout=out,
    )
    assert f"Node long of run {forked.pk} stopped" in out.getvalue()
    assert nodes(forked)["long"].reason.startswith("stopped by cli:")

    out = io.StringIO()
    call_command("stop_node", str(forked.pk), "long", "--reason", "again", stdout=out)
    assert "is failed, not running; nothing to stop" in out.getvalue()

    with pytest.raises(CommandError, match="has no node 'nope'"):
        call_command("stop_node", str(forked.pk), "nope", "--reason", "typo")


def test_the_stop_node_command_previews_with_dry_run(forked):
    out = io.StringIO()
    call_command("stop_node", str(forked.pk), "long", "--reason", "x", "--dry-run", stdout=out)

    assert "stop_node run" in out.getvalue()
    assert "attempt 1 on worker w-7 is stopped and fails" in out.getvalue()
    assert nodes(forked)["long"].status == NodeRun.Status.RUNNING


def test_the_admin_stops_selected_running_nodes_after_a_preview(forked, client, django_user_model):
    user = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_run", "view_noderun", "operate_run"])
    )
    client.force_login(user)
    long = nodes(forked)["long"]
    data = {"action": "stop_nodes", "_selected_action": [long.pk]}

    page = client.post("/admin/workflows/noderun/", data)

    assert "attempt 1 on worker w-7 is stopped and fails" in page.content.decode()
    assert nodes(forked)["long"].status == NodeRun.Status.RUNNING
    key = page.context["form"]["request_key"].value()
    confirm = {**data, "apply": "Confirm", "reason": "from the admin", "request_key": key}
    done = client.post("/admin/workflows/noderun/", confirm, follow=True)
    assert f"Node long of run {forked.pk} stopped" in done.content.decode()
    assert nodes(forked)["long"].reason == "stopped by op: from the admin"
