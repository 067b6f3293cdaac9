"""Admin actions call the same operations: preview first, a reason, permission, audit."""

import pytest
from django.contrib.auth.models import Permission

from tests.operations.test_operations import CHAIN, nodes, work
from tests.testapp.models import Execution
from workflows.models import Checkpoint, NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def failed_run(start_run):
    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError")
    return run


@pytest.fixture
def succeeded_run(start_run):
    run = start_run(CHAIN)
    for key in "abc":
        work(run, key, output={"from": key})
    return run


@pytest.fixture
def operator(client, django_user_model):
    user = django_user_model.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["view_run", "view_noderun", "view_checkpoint", "operate_run"]
        )
    )
    client.force_login(user)
    return client


def test_resume_action_shows_the_preview_then_applies_with_the_reason(operator, failed_run):
    data = {"action": "resume_runs", "_selected_action": [failed_run.pk]}
    page = operator.post("/admin/workflows/run/", data)
    assert page.status_code == 200
    html = page.content.decode()
    assert "runs again from the start" in html and "Reason" in html
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.FAILED, "nothing changes before the confirmation"

    key = page.context["form"]["request_key"].value()
    confirm = {**data, "apply": "Confirm", "reason": "input fixed", "request_key": key}
    response = operator.post("/admin/workflows/run/", confirm, follow=True)
    assert f"Run {failed_run.pk} resumed: 2 node(s) will run again." in response.content.decode()
    assert f"Run {failed_run.pk}: Run" not in response.content.decode()
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.RUNNING
    event = RunEvent.objects.get(run=failed_run, kind=RunEvent.Kind.OPERATOR)
    assert (event.actor, event.reason) == ("op", "input fixed")

    again = operator.post("/admin/workflows/run/", confirm, follow=True)
    assert "This request was already applied; nothing changed." in again.content.decode()
    assert RunEvent.objects.filter(run=failed_run, kind=RunEvent.Kind.OPERATOR).count() == 1


def test_confirm_without_a_reason_changes_nothing(operator, failed_run):
    data = {
        "action": "resume_runs",
        "_selected_action": [failed_run.pk],
        "apply": "Confirm",
        "reason": "",
        "request_key": "k",
    }
    response = operator.post("/admin/workflows/run/", data)
    assert response.status_code == 200 and "This field is required" in response.content.decode()
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.FAILED


def test_retry_node_action_with_downstream(operator, failed_run):
    b = nodes(failed_run)["b"]
    data = {
        "action": "retry_nodes_with_downstream",
        "_selected_action": [b.pk],
        "apply": "Confirm",
        "reason": "again",
        "request_key": "k1",
    }
    operator.post("/admin/workflows/noderun/", data)
    assert NodeRun.objects.get(pk=b.pk).status == NodeRun.Status.QUEUED


def test_actions_are_hidden_from_staff_without_the_operate_permission(
    client, django_user_model, failed_run
):
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(viewer)
    page = client.get("/admin/workflows/run/").content.decode()
    assert "resume_runs" not in page
    response = client.post(
        "/admin/workflows/run/",
        {
            "action": "resume_runs",
            "_selected_action": [failed_run.pk],
            "apply": "1",
            "reason": "x",
            "request_key": "k",
        },
    )
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.FAILED
    assert response.status_code in (200, 302)


def test_rollback_to_a_checkpoint_action_previews_then_rolls_back(operator, succeeded_run):
    run = succeeded_run
    a_done = Checkpoint.objects.get(node_run__run=run, node_run__node_key="a", kind="node_done")
    listing = operator.get("/admin/workflows/checkpoint/", {"run__id": run.pk})
    assert listing.status_code == 200 and "rollback_to_checkpoint" in listing.content.decode()

    data = {"action": "rollback_to_checkpoint", "_selected_action": [a_done.pk]}
    page = operator.post("/admin/workflows/checkpoint/", data)
    html = page.content.decode()
    assert f"run {run.pk} checkpoint {a_done.pk} (node a, node_done #1)" in html
    assert "compensate hook runs, then it runs again" in html
    assert Run.objects.get(pk=run.pk).status == Run.Status.SUCCEEDED, "only a preview so far"

    key = page.context["form"]["request_key"].value()
    confirm = {**data, "apply": "Confirm", "reason": "bad load after a", "request_key": key}
    response = operator.post("/admin/workflows/checkpoint/", confirm, follow=True)

    assert (
        f"Run {run.pk} rolled back: 2 compensated, 2 reset; resumed." in response.content.decode()
    )
    after = nodes(run)
    assert after["a"].status == NodeRun.Status.SUCCEEDED
    assert after["b"].status == NodeRun.Status.QUEUED
    assert list(
        Execution.objects.filter(node_key__startswith="undo:").values_list("node_key", flat=True)
    ) == ["undo:c", "undo:b"]
    event = RunEvent.objects.get(run=run, kind=RunEvent.Kind.OPERATOR)
    assert (event.actor, event.reason) == ("op", "bad load after a")


def test_rollback_to_two_checkpoints_of_one_run_is_refused(operator, succeeded_run):
    done = Checkpoint.objects.filter(node_run__run=succeeded_run).values_list("pk", flat=True)
    data = {
        "action": "rollback_to_checkpoint",
        "_selected_action": list(done),
        "apply": "Confirm",
        "reason": "which one?",
        "request_key": "k2",
    }
    response = operator.post("/admin/workflows/checkpoint/", data, follow=True)
    assert "Select one checkpoint per run" in response.content.decode()
    assert Run.objects.get(pk=succeeded_run.pk).status == Run.Status.SUCCEEDED
    assert not RunEvent.objects.filter(run=succeeded_run, kind=RunEvent.Kind.OPERATOR).exists()


HISTORY = ["run", "noderun", "nodeattempt", "checkpoint", "runevent"]


@pytest.mark.parametrize("model", HISTORY)
def test_the_admin_never_adds_changes_or_deletes_history(client, admin_user, failed_run, model):
    client.force_login(admin_user)  # a superuser: every permission Django knows of
    row = {
        "run": failed_run,
        "noderun": NodeRun.objects.filter(run=failed_run).first(),
        "nodeattempt": NodeRun.objects.filter(run=failed_run).first().attempts.first(),
        "checkpoint": Checkpoint.objects.filter(run=failed_run).first(),
        "runevent": RunEvent.objects.filter(run=failed_run).first(),
    }[model]
    base = f"/admin/workflows/{model}/"

    listing = client.get(base).content.decode()
    page = client.get(f"{base}{row.pk}/change/").content.decode()

    assert "delete_selected" not in listing, "no 'Delete selected' action"
    assert client.get(f"{base}add/").status_code == 403
    assert client.get(f"{base}{row.pk}/delete/").status_code == 403
    assert client.post(f"{base}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.post(f"{base}{row.pk}/change/", {}).status_code == 403
    assert 'name="_save"' not in page and "deletelink" not in page, "a read-only page"
    assert type(row).objects.filter(pk=row.pk).exists()


def test_findings_and_the_audit_are_read_only_too(client, admin_user):
    from diagnostics.admin import FindingAdmin
    from workflows.admin import AuditEventAdmin
    from workflows.admin_lists import HistoryAdmin

    assert issubclass(FindingAdmin, HistoryAdmin) and issubclass(AuditEventAdmin, HistoryAdmin)
    client.force_login(admin_user)
    for path in ("diagnostics/finding", "workflows/auditevent"):
        assert client.get(f"/admin/{path}/add/").status_code == 403
        assert "delete_selected" not in client.get(f"/admin/{path}/").content.decode()


def test_the_history_keeps_its_operator_actions(operator, failed_run):
    listing = operator.get("/admin/workflows/run/").content.decode()

    assert "resume_runs" in listing and "cancel_runs" in listing
