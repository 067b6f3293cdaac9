"""Starting a run through the API, and how long the request waits for it."""

import time

import pytest

from tests.api.conftest import CHAIN
from workflows.models import Run, Workflow

QUICK = {
    "name": "Quick",
    "params": {"value": 1},
    "nodes": {
        "first": {"type": "test.record", "params": {"value": 2}},
        "second": {"type": "test.record", "after": ["first"]},
    },
}


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_a_run_that_finishes_within_the_default_wait_answers_200_with_its_final_state(
    api, make_version, start_worker
):
    make_version(QUICK)
    start_worker()
    response = api.post("workflows/quick/runs", {"params": {"value": 3}})
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["finished"], body["params"]) == ("succeeded", True, {"value": 3})
    assert body["trigger"] == "olga"
    assert {n["key"]: n["output"]["total"] for n in body["nodes"]} == {"first": 2, "second": 2}
    assert "Location" not in response


@pytest.mark.django_db(transaction=True)
def test_a_run_still_going_after_the_wait_answers_202_with_a_location_to_poll(
    api, make_version, clean_redis
):
    make_version(QUICK)  # no worker: the run cannot finish
    started = time.monotonic()
    response = api.post("workflows/quick/runs", {"wait": 0.5, "priority": "high"})
    took = time.monotonic() - started
    assert response.status_code == 202
    assert 0.5 <= took < 3
    body = response.json()
    assert response["Location"] == f"http://testserver/api/v1/runs/{body['id']}"
    assert (body["status"], body["finished"], body["priority"]) == ("running", False, "high")
    assert (
        api.get(response["Location"].removeprefix("http://testserver")).json()["id"] == body["id"]
    )


@pytest.mark.django_db(transaction=True)
def test_the_wait_never_outlasts_the_runs_own_timeout(api, make_version, clean_redis):
    make_version({**QUICK, "timeout": 1})
    started = time.monotonic()
    response = api.post("workflows/quick/runs", {"wait": 30})
    took = time.monotonic() - started
    assert response.status_code == 202
    assert 1 <= took < 4


@pytest.mark.django_db
def test_wait_zero_answers_at_once(api, make_version):
    make_version(QUICK)
    started = time.monotonic()
    assert api.post("workflows/quick/runs", {"wait": 0}).status_code == 202
    assert time.monotonic() - started < 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body, field, says",
    [
        ({"wait": 181}, "wait", "wait: must be at most 180"),
        ({"wait": -1}, "wait", "wait: must be at least 0"),
        ({"wait": "10"}, "wait", "wait: must be a number"),
        ({"wait": True}, "wait", "wait: must be a number"),
        ({"priority": "urgent"}, "priority", "priority: must be one of high, default, low"),
        ({"params": [1]}, "params", "params: must be a JSON object"),
        ({"params": {"colour": "red"}}, "params", "params: Unknown run param(s) colour"),
        ({"params": {"value": "\u0000"}}, "params", "params: must not contain NUL"),
        (
            {"params": {"value": "five"}},
            "params",
            'params.value: expected an integer (the default is 1), got "five"',
        ),
        ({"params": {"value": True}}, "params", "params.value: expected an integer"),
    ],
)
def test_bad_start_input_is_400_naming_the_field_and_starts_nothing(
    api, make_version, body, field, says
):
    make_version(QUICK)
    response = api.post("workflows/quick/runs", {"wait": 0, **body})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["message"].startswith(says)
    assert not Run.objects.exists()


@pytest.mark.django_db
def test_starting_an_unknown_workflow_is_404(api):
    response = api.post("workflows/nope/runs", {"wait": 0})
    assert response.status_code == 404
    assert "load_workflow" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_starting_a_workflow_without_a_version_is_409(api):
    Workflow.objects.create(slug="empty", name="Empty")
    response = api.post("workflows/empty/runs", {"wait": 0})
    assert response.status_code == 409
    assert "has no version yet" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_an_empty_body_starts_with_the_declared_params(api, make_version):
    make_version({**CHAIN, "timeout": 1})  # caps the default 10 s wait at 1 s
    response = api.post("workflows/chain/runs", raw="")
    assert response.status_code == 202
    assert response.json()["params"] == {"day": "2026-01-01"}


@pytest.mark.django_db(transaction=True)
def test_a_start_retried_with_the_same_idempotency_key_starts_one_run(
    api, make_version, clean_redis
):
    make_version(QUICK)
    headers = {"Idempotency-Key": "nightly-2026-11-22"}
    first = api.post("workflows/quick/runs", {"wait": 0}, **headers)
    again = api.post("workflows/quick/runs", {"wait": 0}, **headers)
    assert first.json()["id"] == again.json()["id"]
    assert Run.objects.count() == 1
