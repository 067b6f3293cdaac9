"""Deployments in the admin: listed read-only with their analysis; promote, abort and a
workflow's rollback as actions that show what happens, ask a reason and call the services."""

from datetime import timedelta

import pytest
import yaml
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.web.conftest import user_with
from workflows import operations
from workflows.definitions import versioning
from workflows.deployments import judging, services
from workflows.models import AuditEvent, Deployment, Run, Workflow

pytestmark = pytest.mark.django_db

DEPLOYMENTS = "/admin/workflows/deployment/"
WORKFLOWS = "/admin/workflows/workflow/"


@pytest.fixture(autouse=True)
def _redis(clean_redis):
    """Runs started and cancelled here send to and revoke from the test Redis."""


def load(version: int, deploying="default"):
    node = {"type": "test.record", "params": {"value": version}}
    source = yaml.safe_dump({"name": "Orders", "slug": "orders", "nodes": {"load": node}})
    return versioning.load_definition(source, actor="test", deploy=deploying).version


def canary(version, steps=(10, 50, 100)) -> Deployment:
    return services.deploy(
        version, actor="test", reason="try it", strategy="canary", steps=list(steps)
    ).deployment


def start(n: int) -> list[Run]:
    return [operations.start_run("orders", actor="test") for _ in range(n)]


def staff_client(django_user_model, username: str, *codenames: str) -> Client:
    user = user_with(
        django_user_model,
        username,
        "view_deployment",
        "view_workflow",
        "view_workflowversion",
        *codenames,
    )
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator(django_user_model) -> Client:
    return staff_client(django_user_model, "olga", "operate_run")


@pytest.fixture
def viewer(django_user_model) -> Client:
    return staff_client(django_user_model, "victor", "view_run")


def state_of(deployment) -> tuple[str, int]:
    deployment.refresh_from_db()
    return deployment.state, deployment.percent


# --- The list and the detail ------------------------------------------------------------------


def test_the_list_shows_each_deployment_and_costs_the_same_for_more_rows(operator):
    load(1)
    canary(load(2, deploying=None))

    with CaptureQueriesContext(connection) as few:
        page = operator.get(DEPLOYMENTS)
    html = page.content.decode()
    assert page.status_code == 200
    assert "v2" in html and "ramping" in html and "10%" in html and "canary" in html
    assert "promote_deployments" in html and "abort_deployments" in html

    workflow = Workflow.objects.get()
    for _ in range(20):
        Deployment.objects.create(
            workflow=workflow,
            version=workflow.versions.get(number=1),
            strategy="immediate",
            state="superseded",
            actor="test",
        )
    with CaptureQueriesContext(connection) as many:
        operator.get(DEPLOYMENTS)
    assert len(many) == len(few), "no query per row"
    assert operator.get(DEPLOYMENTS, {"state__exact": "ramping"}).context["cl"].result_count == 1
    assert operator.get(DEPLOYMENTS, {"strategy__exact": "canary"}).context["cl"].result_count == 1


def test_the_detail_shows_the_analysis_and_the_outcome_readably(operator):
    load(1)
    ramping = canary(load(2, deploying=None), steps=[50, 100])
    Deployment.objects.filter(pk=ramping.pk).update(min_runs=5)
    now = timezone.now()
    runs = start(20)
    Run.objects.filter(pk__in=[r.pk for r in runs if r.version.number == 2]).update(
        status="failed", started_at=now - timedelta(seconds=1), finished_at=now
    )
    Run.objects.filter(pk__in=[r.pk for r in runs if r.version.number == 1]).update(
        status="succeeded", started_at=now - timedelta(seconds=1), finished_at=now
    )
    judging.advance_in_flight()  # the watchdog's judgement: aborted on the failures

    html = operator.get(f"{DEPLOYMENTS}{ramping.pk}/change/").content.decode()

    assert "<strong>abort</strong>: canary failed 10 of 10 runs" in html
    assert "<th>canary</th><td>10</td><td>10</td><td>100.0%</td>" in html
    assert "<th>baseline</th><td>10</td><td>0</td><td>0.0%</td>" in html
    assert "Fisher's exact p = 5.41e-06, Mann-Whitney U p = —" in html
    assert "step 1 at 50%, judged once the canary had 5 finished runs" in html
    assert "Save" not in html, "read-only"


# --- Promote and abort ------------------------------------------------------------------------


def test_promote_shows_what_happens_then_promotes_once(operator):
    load(1)
    ramping = canary(load(2, deploying=None))
    data = {"action": "promote_deployments", "_selected_action": [ramping.pk]}

    page = operator.post(DEPLOYMENTS, data)

    html = page.content.decode()
    assert "From 10% to 50% of new runs (step 2 of 3)" in html and "Reason" in html
    assert state_of(ramping) == ("ramping", 10), "nothing changes before the confirmation"

    seen = page.context["form"]["seen"].value()
    confirm = {**data, "apply": "Confirm", "reason": "dashboards look fine", "seen": seen}
    response = operator.post(DEPLOYMENTS, confirm, follow=True)
    assert "Orders v2 is a canary on 50% of new runs." in response.content.decode()
    assert state_of(ramping) == ("ramping", 50)
    [event] = AuditEvent.objects.filter(action=AuditEvent.Action.PROMOTE_DEPLOYMENT)
    assert (event.actor, event.reason) == ("olga", "dashboards look fine")

    again = operator.post(DEPLOYMENTS, confirm, follow=True)
    assert "changed since the page showed it (now ramping, 50%)" in again.content.decode()
    assert state_of(ramping) == ("ramping", 50), "a double submit does not skip a step"
    assert AuditEvent.objects.filter(action=AuditEvent.Action.PROMOTE_DEPLOYMENT).count() == 1


def test_abort_needs_a_reason_then_sends_new_runs_back_once(operator):
    load(1)
    ramping = canary(load(2, deploying=None))
    data = {"action": "abort_deployments", "_selected_action": [ramping.pk]}
    page = operator.post(DEPLOYMENTS, data)
    assert "New runs get v1 again" in page.content.decode()
    confirm = {**data, "apply": "Confirm", "seen": page.context["form"]["seen"].value()}

    refused = operator.post(DEPLOYMENTS, {**confirm, "reason": ""})
    assert "This field is required" in refused.content.decode()
    assert state_of(ramping) == ("ramping", 10)

    done = operator.post(DEPLOYMENTS, {**confirm, "reason": "errors"}, follow=True)
    again = operator.post(DEPLOYMENTS, {**confirm, "reason": "errors"}, follow=True)

    assert "Orders v2: aborted." in done.content.decode()
    assert "Nothing to abort" in again.content.decode()
    assert state_of(ramping) == ("aborted", 0)
    assert AuditEvent.objects.filter(action=AuditEvent.Action.ABORT_DEPLOYMENT).count() == 1


# --- Rolling a workflow back ------------------------------------------------------------------


def test_rollback_previews_the_chosen_version_then_rolls_back_with_the_reason(operator):
    load(1)
    load(2)
    queued = start(2)
    workflow = Workflow.objects.get()
    data = {"action": "rollback_to_version", "_selected_action": [workflow.pk]}

    page = operator.post(WORKFLOWS, data)

    html = page.content.decode()
    assert "Preview: orders v1" in html, "the version before the live one, by default"
    assert "New runs stop getting v2 and get v1." in html
    assert ", ".join(str(r.pk) for r in reversed(queued)) in html
    assert Deployment.objects.get(state="active").version.number == 2

    confirm = {**data, "version": "1", "previewed": "1", "runs": "cancel", "apply": "Confirm"}
    unexplained = operator.post(WORKFLOWS, {**confirm, "reason": " "})
    assert "Give a reason" in unexplained.content.decode()
    unseen = operator.post(WORKFLOWS, {**confirm, "version": "2", "reason": "bad v2"})
    assert "Check the preview for v2, then confirm." in unseen.content.decode()
    assert "v2 is already live." in unseen.content.decode()
    assert Deployment.objects.get(state="active").version.number == 2

    done = operator.post(WORKFLOWS, {**confirm, "reason": "v2 is broken"}, follow=True)
    again = operator.post(WORKFLOWS, {**confirm, "reason": "v2 is broken"}, follow=True)

    assert "Orders now starts new runs on v1." in done.content.decode()
    assert "Orders v1 is already live." in again.content.decode()
    assert Deployment.objects.get(state="active").version.number == 1
    assert {Run.objects.get(pk=r.pk).status for r in queued} == {"cancelled"}
    [event] = AuditEvent.objects.filter(action=AuditEvent.Action.ROLLBACK_VERSION)
    assert (event.actor, event.reason, event.after["runs"]) == ("olga", "v2 is broken", "cancel")


def test_rollback_is_for_one_workflow_at_a_time(operator):
    load(1)
    other = Workflow.objects.create(slug="other", name="Other")
    data = {
        "action": "rollback_to_version",
        "_selected_action": [Workflow.objects.get(slug="orders").pk, other.pk],
    }
    response = operator.post(WORKFLOWS, data, follow=True)
    assert "Select one workflow" in response.content.decode()


VERSIONS = "/admin/workflows/workflowversion/"


def test_a_versions_runs_left_are_previewed_then_restarted_on_the_live_version(operator):
    load(1)
    load(2)
    queued = start(2)
    workflow = Workflow.objects.get()
    services.rollback_version(workflow, 1, actor="t", reason="v2 slow")
    v2 = workflow.versions.get(number=2)
    data = {"action": "move_runs_off", "_selected_action": [v2.pk]}

    html = operator.post(VERSIONS, data).content.decode()

    assert "Runs left on orders v2" in html
    assert "2 unfinished runs; restarted, they run v1." in html
    assert ", ".join(str(r.pk) for r in reversed(queued)) in html
    confirm = {**data, "runs": "restart", "apply": "Confirm"}
    unexplained = operator.post(VERSIONS, {**confirm, "reason": " "})
    assert "Give a reason" in unexplained.content.decode()
    assert not Run.objects.filter(restarted_from__in=queued).exists()

    done = operator.post(VERSIONS, {**confirm, "reason": "v2 must not finish"}, follow=True)
    again = operator.post(VERSIONS, {**confirm, "reason": "v2 must not finish"}, follow=True)

    assert "2 run(s) of orders v2 restarted on v1." in done.content.decode()
    assert "No unfinished runs of orders v2." in again.content.decode()
    assert Run.objects.filter(restarted_from__in=queued, version__number=1).count() == 2
    [event] = AuditEvent.objects.filter(action=AuditEvent.Action.MOVE_RUNS_OFF)
    assert (event.actor, event.reason) == ("olga", "v2 must not finish")

    v1 = workflow.versions.get(number=1)
    live = operator.post(VERSIONS, {"action": "move_runs_off", "_selected_action": [v1.pk]})
    assert "orders v1 is live: new runs get it." in live.content.decode()
    both = operator.post(
        VERSIONS, {"action": "move_runs_off", "_selected_action": [v1.pk, v2.pk]}, follow=True
    )
    assert "Select one version" in both.content.decode()


# --- Permission -------------------------------------------------------------------------------


def test_staff_without_the_operate_permission_neither_see_nor_use_the_actions(viewer):
    load(1)
    ramping = canary(load(2, deploying=None))
    workflow = Workflow.objects.get()

    listing = viewer.get(DEPLOYMENTS).content.decode()
    assert "v2" in listing and "promote_deployments" not in listing
    assert "rollback_to_version" not in viewer.get(WORKFLOWS).content.decode()
    versions = viewer.get("/admin/workflows/workflowversion/")
    assert versions.status_code == 200 and "move_runs_off" not in versions.content.decode()
    for action in ("promote_deployments", "abort_deployments"):
        viewer.post(
            DEPLOYMENTS,
            {
                "action": action,
                "_selected_action": [ramping.pk],
                "apply": "Confirm",
                "reason": "x",
                "seen": f"{ramping.pk}:ramping:0",
            },
        )
    viewer.post(
        WORKFLOWS,
        {
            "action": "rollback_to_version",
            "_selected_action": [workflow.pk],
            "version": "1",
            "previewed": "1",
            "runs": "finish",
            "apply": "Confirm",
            "reason": "x",
        },
    )

    assert state_of(ramping) == ("ramping", 10)
    assert Deployment.objects.get(state="active").version.number == 1
    assert not AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).exists()
