"""Operator actions through the API: each calls the same operation as the dashboard."""

import pytest

from tests.api.conftest import CHAIN, nodes, work
from tests.testapp.models import Execution
from workflows.models import Checkpoint, NodeAttempt, Run, RunEvent

pytestmark = pytest.mark.django_db


def operator_events(run):
    return list(RunEvent.objects.filter(run=run, kind="operator").order_by("id"))


def assert_error(response, status: int, code: str, field: str | None = None) -> str:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error.get("field") == field
    return error["message"]


# --- resume -----------------------------------------------------------------------------------


def test_resume_reopens_the_run_and_answers_with_its_new_state(api, failed_chain):
    response = api.post(f"runs/{failed_chain.pk}/resume", {"reason": "fixed the input"})
    assert response.status_code == 200
    body = response.json()
    assert body["changed"] is True
    assert body["message"] == f"Run {failed_chain.pk} resumed: 2 node(s) will run again."
    assert body["run"]["status"] == "running"
    assert {n["key"]: n["status"] for n in body["run"]["nodes"]} == {
        "a": "succeeded",
        "b": "queued",
        "c": "pending",
    }
    [event] = operator_events(failed_chain)
    assert (event.actor, event.reason, event.request_key) == ("olga", "fixed the input", None)


def test_resume_again_changes_nothing_and_says_so(api, failed_chain):
    api.post(f"runs/{failed_chain.pk}/resume", {"reason": "x"})
    again = api.post(f"runs/{failed_chain.pk}/resume", {"reason": "x"})
    assert again.status_code == 200
    assert again.json()["changed"] is False
    assert "nothing to resume" in again.json()["message"]
    assert len(operator_events(failed_chain)) == 1


def test_the_same_idempotency_key_is_applied_once(api, failed_chain, start_run):
    headers = {"Idempotency-Key": "5f1c-resume"}
    first = api.post(f"runs/{failed_chain.pk}/resume", {"reason": "x"}, **headers)
    assert first.json()["changed"] is True
    work(failed_chain, "b", fail="ValueError")  # fails again: a new resume would act
    repeat = api.post(f"runs/{failed_chain.pk}/resume", {"reason": "x"}, **headers)
    assert repeat.json() | {"run": None} == {
        "changed": False,
        "message": "This request was already applied; nothing changed.",
        "run": None,
    }
    assert len(operator_events(failed_chain)) == 1
    assert (
        operator_events(failed_chain)[0].request_key
        == f"api:{first.wsgi_request.user.pk}:5f1c-resume"
    )


@pytest.mark.parametrize("key", ["", " ", "x" * 65, "caf\u00e9"])
def test_a_bad_idempotency_key_is_400(api, failed_chain, key):
    response = api.post(
        f"runs/{failed_chain.pk}/resume", {"reason": "x"}, **{"Idempotency-Key": key}
    )
    assert_error(response, 400, "invalid", "Idempotency-Key")


# --- input errors shared by every action ------------------------------------------------------


@pytest.mark.parametrize(
    "body, field, says",
    [
        ({}, "reason", "reason: is required."),
        ({"reason": "   "}, "reason", "reason: must not be empty"),
        ({"reason": 5}, "reason", "reason: must be a string, not a number."),
        ({"reason": "x" * 2001}, "reason", "reason: must be at most 2000 characters."),
        ({"reason": "x", "reson": "typo"}, "reson", "reson: is not a field of this request"),
        ({"reason": "nul \u0000"}, "reason", "reason: must not contain NUL"),
    ],
)
def test_bad_input_is_400_naming_the_field(api, failed_chain, body, field, says):
    message = assert_error(api.post(f"runs/{failed_chain.pk}/resume", body), 400, "invalid", field)
    assert message.startswith(says)
    assert operator_events(failed_chain) == []


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"', '{"reason": NaN}'])
def test_a_body_that_is_not_a_json_object_is_400(api, failed_chain, raw):
    assert_error(api.post(f"runs/{failed_chain.pk}/resume", raw=raw), 400, "invalid", "body")


def test_an_action_on_an_unknown_run_or_node_is_404(api, failed_chain):
    assert_error(api.post("runs/999999/resume", {"reason": "x"}), 404, "not_found")
    message = assert_error(
        api.post(f"runs/{failed_chain.pk}/nodes/zzz/retry", {"reason": "x"}), 404, "not_found"
    )
    assert "has no node 'zzz'" in message


# --- dry run ----------------------------------------------------------------------------------


def test_dry_run_answers_the_preview_and_changes_nothing(api, failed_chain):
    response = api.post(f"runs/{failed_chain.pk}/resume?dry_run=1")
    assert response.status_code == 200
    preview = response.json()["preview"]
    assert (preview["action"], preview["run_status"], preview["noop_message"]) == (
        "resume",
        "failed",
        "",
    )
    assert [(n["key"], n["will"]) for n in preview["nodes"]] == [
        ("b", "runs again from its latest checkpoint"),
        ("c", "runs again from the start"),
    ]
    failed_chain.refresh_from_db()
    assert failed_chain.status == "failed" and operator_events(failed_chain) == []


def test_dry_run_of_a_rollback_warns_about_side_effects_without_compensate(api, start_run):
    run = start_run(
        {
            "name": "Raw",
            "nodes": {
                "w": {"type": "test.batches", "params": {"rows": 2, "batch": 1}},
                "v": {"type": "test.effect", "after": ["w"]},
            },
        }
    )
    work(run, "w")
    work(run, "v", fail="ValueError")
    response = api.post(f"runs/{run.pk}/rollback?dry_run=true", {"to_node": "w"})
    preview = response.json()["preview"]
    assert preview["warnings"] == [
        "w has side effects and no compensate hook: running it again may repeat them"
    ]


def test_dry_run_rejects_a_bad_flag(api, failed_chain):
    assert_error(
        api.post(f"runs/{failed_chain.pk}/resume?dry_run=maybe"), 400, "invalid", "dry_run"
    )


# --- retry ------------------------------------------------------------------------------------


def test_retry_gives_the_node_a_new_attempt(api, failed_chain):
    response = api.post(f"runs/{failed_chain.pk}/nodes/b/retry", {"reason": "flaky"})
    assert response.json()["changed"] is True
    assert (
        response.json()["message"] == f"Node b of run {failed_chain.pk} queued for a new attempt."
    )
    assert (nodes(failed_chain)["b"].status, nodes(failed_chain)["b"].attempt) == ("queued", 2)


def test_retry_with_downstream_resets_what_follows(api, succeeded_chain):
    response = api.post(
        f"runs/{succeeded_chain.pk}/nodes/b/retry", {"reason": "bad output", "downstream": True}
    )
    assert "with 1 downstream node(s) reset" in response.json()["message"]
    assert nodes(succeeded_chain)["c"].status == "pending"


def test_retry_with_a_stale_expected_attempt_changes_nothing(api, failed_chain):
    response = api.post(
        f"runs/{failed_chain.pk}/nodes/b/retry", {"reason": "x", "expected_attempt": 5}
    )
    assert response.status_code == 200 and response.json()["changed"] is False
    assert "not 5: it was retried or moved on" in response.json()["message"]


def test_retry_of_a_node_waiting_for_a_failed_upstream_is_409_saying_what_to_retry(
    api, failed_chain
):
    message = assert_error(
        api.post(f"runs/{failed_chain.pk}/nodes/c/retry", {"reason": "x"}), 409, "conflict"
    )
    assert "it waits for b. Retry b" in message


def test_retry_rejects_a_non_boolean_downstream(api, failed_chain):
    response = api.post(
        f"runs/{failed_chain.pk}/nodes/b/retry", {"reason": "x", "downstream": "yes"}
    )
    assert_error(response, 400, "invalid", "downstream")


# --- rollback ---------------------------------------------------------------------------------


# The compensate hooks run in a thread of their own, on a connection of their own.
@pytest.mark.django_db(transaction=True)
def test_rollback_to_a_node_compensates_and_resumes(api, succeeded_chain):
    response = api.post(
        f"runs/{succeeded_chain.pk}/rollback", {"reason": "bad load", "to_node": "b"}
    )
    assert response.status_code == 200
    assert response.json()["changed"] is True
    assert response.json()["run"]["status"] == "running"
    undone = set(
        Execution.objects.filter(node_key__startswith="undo:").values_list("node_key", flat=True)
    )
    assert undone == {"undo:b", "undo:c"}
    assert nodes(succeeded_chain)["a"].status == "succeeded"


def test_rollback_to_a_checkpoint_without_resume_leaves_the_run_cancelled(api, failed_chain):
    checkpoint = Checkpoint.objects.get(run=failed_chain, kind="progress")
    response = api.post(
        f"runs/{failed_chain.pk}/rollback",
        {"reason": "x", "to_checkpoint": checkpoint.pk, "resume": False},
    )
    assert response.status_code == 200, response.content
    assert response.json()["run"]["status"] == Run.Status.CANCELLED


@pytest.mark.parametrize(
    "body, field",
    [
        ({"reason": "x"}, "to_checkpoint"),
        ({"reason": "x", "to_checkpoint": 1, "to_node": "a"}, "to_checkpoint"),
        ({"reason": "x", "to_checkpoint": 999999}, "to_checkpoint"),
        ({"reason": "x", "to_checkpoint": "1"}, "to_checkpoint"),
        ({"reason": "x", "to_node": "zzz"}, "to_node"),
        ({"reason": "x", "to_node": "a", "resume": "no"}, "resume"),
    ],
)
def test_rollback_input_errors_name_the_field(api, failed_chain, body, field):
    assert_error(api.post(f"runs/{failed_chain.pk}/rollback", body), 400, "invalid", field)


def test_rollback_of_a_running_run_is_409_saying_cancel_first(api, failed_chain):
    api.post(f"runs/{failed_chain.pk}/resume", {"reason": "x"})
    message = assert_error(
        api.post(f"runs/{failed_chain.pk}/rollback", {"reason": "x", "to_node": "b"}),
        409,
        "conflict",
    )
    assert "cancel it first" in message


# --- cancel, skip, mark succeeded -------------------------------------------------------------


def test_cancel_stops_a_running_run_and_a_second_cancel_changes_nothing(api, start_run):
    run = start_run(CHAIN)
    first = api.post(f"runs/{run.pk}/cancel", {"reason": "wrong day"})
    assert first.json()["changed"] is True and first.json()["run"]["status"] == "cancelled"
    second = api.post(f"runs/{run.pk}/cancel", {"reason": "wrong day"})
    assert second.status_code == 200 and second.json()["changed"] is False
    assert "already cancelled" in second.json()["message"]


def test_skip_lets_the_downstream_proceed(api, failed_chain):
    response = api.post(f"runs/{failed_chain.pk}/nodes/b/skip", {"reason": "not needed today"})
    assert response.json()["changed"] is True
    states = {n["key"]: n["status"] for n in response.json()["run"]["nodes"]}
    assert states["b"] == "skipped" and states["c"] == "queued"


def test_mark_succeeded_sets_the_given_output(api, failed_chain):
    response = api.post(
        f"runs/{failed_chain.pk}/nodes/b/mark-succeeded",
        {"reason": "loaded by hand", "output": {"rows": 12}},
    )
    assert response.json()["changed"] is True
    assert nodes(failed_chain)["b"].output == {"rows": 12}


def test_mark_succeeded_refuses_an_output_over_the_size_limit(api, failed_chain, settings):
    settings.KEEL_MAX_OUTPUT_BYTES = 1024
    response = api.post(
        f"runs/{failed_chain.pk}/nodes/b/mark-succeeded",
        {"reason": "x", "output": {"blob": "x" * 2000}},
    )
    message = assert_error(response, 400, "invalid", "output")
    assert "over the limit of 1024" in message
    assert NodeAttempt.objects.filter(node_run__run=failed_chain).count() == 2
