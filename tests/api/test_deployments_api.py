"""Deployments through the API: each endpoint calls the deployment services, with the
API's auth, errors and Idempotency-Key."""

from datetime import timedelta

import pytest
import yaml
from django.utils import timezone

from tests.api.test_actions import assert_error
from workflows import operations
from workflows.definitions import versioning
from workflows.deployments import judging, services
from workflows.models import AuditEvent, Deployment, Run, Workflow

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _redis(clean_redis):
    """Runs are queued in the test Redis."""


def load(version: int, deploying="default", **extra):
    node = {"type": "test.record", "params": {"value": version}}
    definition = {"name": "Orders", "slug": "orders", "nodes": {"load": node}, **extra}
    source = yaml.safe_dump(definition, sort_keys=False)
    return versioning.load_definition(source, actor="test", deploy=deploying).version


def canary(version, steps=(10, 50, 100)) -> Deployment:
    return services.deploy(
        version, actor="test", reason="try it", strategy="canary", steps=list(steps)
    ).deployment


def start(n: int) -> list[Run]:
    return [operations.start_run("orders", actor="test") for _ in range(n)]


def finish(runs, status: str) -> None:
    """Give runs an outcome as the engine would record it (the analysis reads only these)."""
    now = timezone.now()
    Run.objects.filter(pk__in=[run.pk for run in runs]).update(
        status=status, started_at=now - timedelta(seconds=1), finished_at=now
    )


def audit(action) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def state_of(deployment) -> tuple[str, int]:
    deployment.refresh_from_db()
    return deployment.state, deployment.percent


# --- Reading ----------------------------------------------------------------------------------


def test_the_list_is_newest_first_with_the_canary_analysis(api, django_assert_max_num_queries):
    load(1)
    load(2)
    ramping = canary(load(3, deploying=None), steps=[50, 100])
    Deployment.objects.filter(pk=ramping.pk).update(min_runs=5)
    finish(start(20), Run.Status.SUCCEEDED)
    judging.advance_in_flight()  # judged on the evidence: promoted to 100 %

    # The token, its last use, the user's and groups' permissions, the workflow, the list.
    with django_assert_max_num_queries(6):
        response = api.get("workflows/orders/deployments")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["workflow"] == "orders"
    rows = body["results"]
    assert [(r["version"], r["state"]) for r in rows] == [
        (3, "ramping"),
        (2, "active"),
        (1, "superseded"),
    ]
    newest = rows[0]
    assert newest | {"evidence": None, "created_at": None, "url": None} == {
        "id": ramping.pk,
        "url": None,
        "workflow": "orders",
        "version": 3,
        "baseline_version": 2,
        "strategy": "canary",
        "state": "ramping",
        "percent": 100,
        "steps": [50, 100],
        "step": 1,
        "min_runs": 5,
        "key_param": "",
        "validation_run": None,
        "actor": "test",
        "reason": "try it",
        "outcome": "",
        "evidence": None,
        "created_at": None,
        "finished_at": None,
    }
    assert newest["evidence"]["verdict"] == "promote"
    assert newest["evidence"]["canary"]["runs"] == 10
    assert newest["url"].endswith(f"/api/v1/deployments/{ramping.pk}")
    assert rows[2]["outcome"] == "a later deployment took over" and rows[2]["finished_at"]


def test_the_list_is_capped_at_fifty(api):
    first = load(1)
    for number in range(55):
        Deployment.objects.create(
            workflow=first.workflow,
            version=first,
            strategy="immediate",
            state="superseded",
            actor="test",
            reason=f"old {number}",
        )
    assert len(api.get("workflows/orders/deployments").json()["results"]) == 50


def test_one_deployment_is_read_by_id(api):
    load(1)
    deployment = Deployment.objects.get()
    body = api.get(f"deployments/{deployment.pk}").json()
    assert (body["id"], body["version"], body["state"], body["baseline_version"]) == (
        deployment.pk,
        1,
        "active",
        None,
    )


def test_an_unknown_workflow_or_deployment_is_404_saying_where_to_look(api):
    message = assert_error(api.get("workflows/nope/deployments"), 404, "not_found")
    assert "No workflow 'nope'" in message and "GET /api/v1/workflows" in message
    message = assert_error(api.get("deployments/999999"), 404, "not_found")
    assert "No deployment 999999" in message
    assert_error(api.post("deployments/999999/promote", {"reason": "x"}), 404, "not_found")
    assert_error(api.post("deployments/999999/abort", {"reason": "x"}), 404, "not_found")
    assert_error(
        api.post("workflows/nope/deployments", {"version": 1, "reason": "x"}), 404, "not_found"
    )
    assert_error(
        api.post("workflows/nope/rollback", {"version": 1, "reason": "x"}), 404, "not_found"
    )
    assert_error(api.get("workflows/nope/rollback-preview", {"version": 1}), 404, "not_found")


def test_reading_needs_the_view_permission(client, nobody, token_for):
    from tests.api.conftest import Api

    load(1)
    response = Api(client, token_for(nobody)).get("workflows/orders/deployments")
    assert "lacks the 'workflows.view_run' permission" in assert_error(response, 403, "forbidden")


# --- Deploying --------------------------------------------------------------------------------


def test_deploying_a_canary_answers_201_with_the_deployment_and_audits_it(api):
    load(1)
    load(2, deploying=None)

    response = api.post(
        "workflows/orders/deployments",
        {"version": 2, "strategy": "canary", "steps": [25, 100], "min_runs": 8, "reason": "v2"},
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["changed"], body["message"]) == (True, "orders v2 is a canary on 25% of new runs.")
    deployment = body["deployment"]
    assert (deployment["state"], deployment["percent"], deployment["min_runs"]) == (
        "ramping",
        25,
        8,
    )
    assert response["Location"].endswith(f"/api/v1/deployments/{deployment['id']}")
    [event] = audit(AuditEvent.Action.DEPLOY)[1:]  # the first is v1's load
    assert (event.actor, event.reason, event.target) == ("olga", "v2", "workflow:orders")


def test_deploying_the_live_version_answers_200_and_changes_nothing(api):
    load(1)
    response = api.post("workflows/orders/deployments", {"version": 1, "reason": "again"})
    assert response.status_code == 200
    assert response.json()["changed"] is False
    assert response.json()["message"] == "orders v1 is already live."
    assert len(audit(AuditEvent.Action.DEPLOY)) == 1


def test_deploying_while_another_version_is_in_flight_is_409_saying_what_to_do(api):
    load(1)
    canary(load(2, deploying=None))
    load(3, deploying=None)
    response = api.post("workflows/orders/deployments", {"version": 3, "reason": "v3"})
    assert "promote or abort it first" in assert_error(response, 409, "conflict")
    assert not Deployment.objects.filter(version__number=3).exists()


def test_the_same_idempotency_key_deploys_once(api):
    load(1)
    load(2, deploying=None)
    body = {"version": 2, "strategy": "canary", "reason": "v2"}
    headers = {"Idempotency-Key": "deploy-v2"}

    first = api.post("workflows/orders/deployments", body, **headers)
    repeat = api.post("workflows/orders/deployments", body, **headers)

    assert (first.status_code, repeat.status_code) == (201, 200)
    assert repeat.json()["changed"] is False
    assert repeat.json()["message"] == "Already done: this request was applied before."
    assert repeat.json()["deployment"]["id"] == first.json()["deployment"]["id"]
    assert len(audit(AuditEvent.Action.DEPLOY)) == 2  # v1's load, then this one


@pytest.mark.parametrize(
    "body, field, says",
    [
        ({"version": 2}, "reason", "reason: is required."),
        ({"version": 2, "reason": "  "}, "reason", "reason: must not be empty"),
        ({"reason": "x"}, "version", "version: is required."),
        ({"version": "2", "reason": "x"}, "version", "version: must be a whole number"),
        (
            {"version": 9, "reason": "x"},
            "version",
            "version: orders has no version 9 (it has v1, v2)",
        ),
        (
            {"version": 2, "reason": "x", "strategy": "big_bang"},
            "strategy",
            "strategy: must be one of",
        ),
        ({"version": 2, "reason": "x", "steps": [50, 10]}, "steps", "steps: must be rising"),
        ({"version": 2, "reason": "x", "steps": [10, 50]}, "steps", "steps: must be rising"),
        ({"version": 2, "reason": "x", "steps": [0, 100]}, "steps", "steps: must be at least 1"),
        ({"version": 2, "reason": "x", "min_runs": 0}, "min_runs", "min_runs: must be at least 1"),
        ({"version": 2, "reason": "x", "stratgy": "canary"}, "stratgy", "stratgy: is not a field"),
    ],
)
def test_bad_deploy_bodies_are_400_naming_the_field(api, body, field, says):
    load(1)
    load(2, deploying=None)
    response = api.post("workflows/orders/deployments", body)
    assert assert_error(response, 400, "invalid", field).startswith(says)
    assert Deployment.objects.count() == 1


def test_a_viewer_cannot_deploy_nothing_changes_and_the_refusal_is_audited(viewer_api):
    load(1)
    load(2, deploying=None)
    response = viewer_api.post("workflows/orders/deployments", {"version": 2, "reason": "v2"})
    message = assert_error(response, 403, "forbidden")
    assert "vic may not deploy on orders" in message and "workflows.operate_run" in message
    assert Deployment.objects.count() == 1
    [refusal] = audit(AuditEvent.Action.DEPLOY)[1:]
    assert (refusal.actor, refusal.before["denied"]) == ("vic", True)


# --- Promote and abort ------------------------------------------------------------------------


def test_promote_moves_a_canary_to_its_next_step_and_a_repeated_key_does_not_skip_one(api):
    load(1)
    ramping = canary(load(2, deploying=None))
    headers = {"Idempotency-Key": "promote-1"}

    first = api.post(f"deployments/{ramping.pk}/promote", {"reason": "looks good"}, **headers)
    repeat = api.post(f"deployments/{ramping.pk}/promote", {"reason": "looks good"}, **headers)

    assert first.status_code == 200 and first.json()["changed"] is True
    assert first.json()["deployment"]["percent"] == 50
    assert repeat.json()["changed"] is False
    assert repeat.json()["deployment"]["percent"] == 50
    assert state_of(ramping) == ("ramping", 50)
    [event] = audit(AuditEvent.Action.PROMOTE_DEPLOYMENT)
    assert (event.actor, event.reason, event.after["percent"]) == ("olga", "looks good", 50)

    api.post(f"deployments/{ramping.pk}/promote", {"reason": "go"})  # a new request acts
    assert state_of(ramping) == ("ramping", 100)


def test_abort_sends_new_runs_back_to_the_live_version_once(api):
    load(1)
    ramping = canary(load(2, deploying=None))

    first = api.post(f"deployments/{ramping.pk}/abort", {"reason": "errors in the logs"})
    again = api.post(f"deployments/{ramping.pk}/abort", {"reason": "errors in the logs"})

    assert first.json()["changed"] is True
    assert first.json()["deployment"]["state"] == "aborted"
    assert first.json()["deployment"]["outcome"] == "errors in the logs"
    assert (again.status_code, again.json()["changed"]) == (200, False)
    assert "Nothing to abort" in again.json()["message"]
    assert len(audit(AuditEvent.Action.ABORT_DEPLOYMENT)) == 1
    assert {run.version.number for run in start(5)} == {1}


def test_promoting_an_ended_deployment_changes_nothing(api):
    load(1)
    deployment = Deployment.objects.get()
    response = api.post(f"deployments/{deployment.pk}/promote", {"reason": "x"})
    assert (response.status_code, response.json()["changed"]) == (200, False)
    assert "Nothing to promote" in response.json()["message"]


@pytest.mark.parametrize("action", ["promote", "abort"])
def test_a_viewer_can_neither_promote_nor_abort(viewer_api, action):
    load(1)
    ramping = canary(load(2, deploying=None))
    response = viewer_api.post(f"deployments/{ramping.pk}/{action}", {"reason": "x"})
    assert f"vic may not {action} on orders" in assert_error(response, 403, "forbidden")
    assert state_of(ramping) == ("ramping", 10)


@pytest.mark.parametrize(
    "body, field",
    [({}, "reason"), ({"reason": ""}, "reason"), ({"reason": "x", "step": 2}, "step")],
)
def test_promote_and_abort_need_a_reason(api, body, field):
    load(1)
    ramping = canary(load(2, deploying=None))
    for action in ("promote", "abort"):
        assert_error(api.post(f"deployments/{ramping.pk}/{action}", body), 400, "invalid", field)
    assert state_of(ramping) == ("ramping", 10)


# --- Rollback ---------------------------------------------------------------------------------


def test_the_rollback_preview_lists_the_runs_on_the_versions_left(api):
    load(1)
    load(2)
    queued = start(2)

    response = api.get("workflows/orders/rollback-preview", {"version": 1})

    assert response.status_code == 200, response.content
    assert response.json() == {
        "workflow": "orders",
        "from_versions": [2],
        "to_version": 1,
        "runs": {
            "running": [],
            "queued": sorted((r.pk for r in queued), reverse=True),
            "failed": [],
        },
        "noop_message": "",
    }
    already = api.get("workflows/orders/rollback-preview", {"version": 2}).json()
    assert already["noop_message"] == "v2 is already live."
    assert_error(
        api.get("workflows/orders/rollback-preview", {"version": 7}), 400, "invalid", "version"
    )
    assert_error(api.get("workflows/orders/rollback-preview"), 400, "invalid", "version")


def test_rollback_makes_the_version_live_and_cancels_the_runs_left_once(api):
    load(1)
    bad = Deployment.objects.get(state="active", version__number=load(2).number)
    queued = start(2)
    headers = {"Idempotency-Key": "rollback-to-1"}
    body = {"version": 1, "runs": "cancel", "reason": "v2 is broken"}

    first = api.post("workflows/orders/rollback", body, **headers)
    repeat = api.post("workflows/orders/rollback", body, **headers)
    again = api.post("workflows/orders/rollback", body)

    assert first.status_code == 200, first.content
    assert first.json()["changed"] is True
    assert first.json()["message"] == "orders now starts new runs on v1."
    assert (first.json()["deployment"]["version"], first.json()["deployment"]["state"]) == (
        1,
        "active",
    )
    assert repeat.json()["changed"] is False and again.json()["changed"] is False
    assert again.json()["message"] == "orders v1 is already live."
    assert bad.__class__.objects.get(pk=bad.pk).state == "rolled_back"
    assert {Run.objects.get(pk=run.pk).status for run in queued} == {"cancelled"}
    [event] = audit(AuditEvent.Action.ROLLBACK_VERSION)
    assert (event.actor, event.after["runs"], event.after["from_versions"]) == (
        "olga",
        "cancel",
        [2],
    )


@pytest.mark.parametrize(
    "body, field",
    [
        ({"version": 1}, "reason"),
        ({"version": 1, "reason": "x", "runs": "drop"}, "runs"),
        ({"version": 5, "reason": "x"}, "version"),
    ],
)
def test_bad_rollback_bodies_are_400_and_change_nothing(api, body, field):
    load(1)
    load(2)
    assert_error(api.post("workflows/orders/rollback", body), 400, "invalid", field)
    assert Deployment.objects.get(state="active").version.number == 2


def test_a_viewer_cannot_roll_back(viewer_api):
    load(1)
    load(2)
    response = viewer_api.post("workflows/orders/rollback", {"version": 1, "reason": "x"})
    assert "vic may not rollback version on orders" in assert_error(response, 403, "forbidden")
    assert Deployment.objects.get(state="active").version.number == 2
    assert Workflow.objects.get(slug="orders").deployments.count() == 2


# --- Runs left on a version -------------------------------------------------------------------


def runs_left_on_v2() -> list[Run]:
    """v1 live after v2 was rolled back; v2's runs left queued."""
    load(1)
    load(2)
    left = start(2)
    services.rollback_version(Workflow.objects.get(slug="orders"), 1, actor="t", reason="bad")
    return left


def test_the_runs_left_on_a_version_are_listed_then_restarted_once(api):
    left = runs_left_on_v2()

    preview = api.get("workflows/orders/versions/2/runs-left")

    assert preview.status_code == 200, preview.content
    assert preview.json() == {
        "workflow": "orders",
        "from_version": 2,
        "to_version": 1,
        "runs": {"running": [], "queued": sorted((r.pk for r in left), reverse=True)},
        "total": 2,
        "refusal": "",
    }
    headers = {"Idempotency-Key": "move-v2"}
    body = {"reason": "v2 is broken"}
    first = api.post("workflows/orders/versions/2/move-runs", body, **headers)
    repeat = api.post("workflows/orders/versions/2/move-runs", body, **headers)

    assert first.status_code == 200, first.content
    assert first.json()["changed"] is True
    assert first.json()["message"] == "2 run(s) of orders v2 restarted on v1."
    assert first.json()["deployment"]["version"] == 1
    assert (repeat.json()["changed"], repeat.json()["message"]) == (
        False,
        "Already done: this request was applied before.",
    )
    assert Run.objects.filter(restarted_from__in=left, version__number=1).count() == 2
    [event] = audit(AuditEvent.Action.MOVE_RUNS_OFF)
    assert (event.actor, event.after["runs"], event.after["from_version"]) == ("olga", "restart", 2)


def test_moving_runs_off_the_live_version_is_409_saying_what_to_do(api):
    runs_left_on_v2()
    refusal = api.get("workflows/orders/versions/1/runs-left").json()["refusal"]
    assert refusal == "orders v1 is live: new runs get it. Roll back to another version first."
    response = api.post("workflows/orders/versions/1/move-runs", {"reason": "x"})
    assert assert_error(response, 409, "conflict") == refusal


@pytest.mark.parametrize(
    "path, body, status, code, field",
    [
        ("versions/2/move-runs", {}, 400, "invalid", "reason"),
        ("versions/2/move-runs", {"reason": "x", "runs": "finish"}, 400, "invalid", "runs"),
        ("versions/7/move-runs", {"reason": "x"}, 404, "not_found", None),
        ("versions/0/move-runs", {"reason": "x"}, 404, "not_found", None),
    ],
)
def test_bad_moves_are_refused_and_change_nothing(api, path, body, status, code, field):
    left = runs_left_on_v2()
    assert_error(api.post(f"workflows/orders/{path}", body), status, code, field)
    assert not Run.objects.filter(pk__in=[r.pk for r in left], status="cancelled").exists()


def test_a_viewer_cannot_move_runs(viewer_api):
    left = runs_left_on_v2()
    response = viewer_api.post("workflows/orders/versions/2/move-runs", {"reason": "x"})
    assert "vic may not move runs off on orders" in assert_error(response, 403, "forbidden")
    assert not Run.objects.filter(pk__in=[r.pk for r in left], status="cancelled").exists()


# --- Starting a run on a version --------------------------------------------------------------


def test_a_run_started_on_a_version_is_outside_any_deployment(api):
    load(1)
    load(2)
    routed = api.post("workflows/orders/runs", {"wait": 0}).json()
    chosen = api.post("workflows/orders/runs", {"wait": 0, "version": 1}).json()

    live = Deployment.objects.get(state="active")
    assert (routed["version"], routed["deployment"]) == (2, live.pk)
    assert (chosen["version"], chosen["deployment"]) == (1, None)
    response = api.post("workflows/orders/runs", {"wait": 0, "version": 4})
    assert "orders has no version 4 (it has v1, v2)" in assert_error(
        response, 400, "invalid", "version"
    )
