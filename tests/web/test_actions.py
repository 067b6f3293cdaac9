"""Operator actions from the dashboard: preview, confirm with a reason, POST, redirect.

Every action URL refuses GET (405), refuses a user without the operate permission
(403, and the refusal is in the run's history), refuses a POST without a CSRF token
(403), and applies a submitted form once however often it is submitted.
"""

import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.web.conftest import CHAIN, nodes, work
from workflows import audit
from workflows.models import AuditEvent, Checkpoint, NodeAttempt, NodeRun, Run, RunEvent

pytestmark = pytest.mark.django_db

ACTIONS = ["resume", "retry", "rollback", "cancel", "skip", "mark-succeeded"]


def action_url(run, slug: str) -> str:
    return f"/runs/{run.pk}/{slug}/"


def operator_events(run):
    return list(RunEvent.objects.filter(run=run, kind=RunEvent.Kind.OPERATOR).order_by("id"))


def form_fields(html: str) -> dict[str, str]:
    """The hidden inputs of the confirm form, as a browser would submit them."""
    return {
        name: value
        for name, value in re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', html)
    }


def valid_post(run, slug: str) -> dict:
    node_for = {"retry": "b", "skip": "c", "mark-succeeded": "b"}
    data = {"reason": "test reason", "request_key": f"key-{slug}"}
    if slug in node_for:
        data["node"] = node_for[slug]
    if slug == "rollback":
        data["to_node"] = "b"
        data["resume"] = "on"
    if slug == "mark-succeeded":
        data["output"] = '{"done": "by hand"}'
    return data


# --- The gate: method, permission, CSRF -------------------------------------------------------


@pytest.mark.parametrize("slug", ACTIONS)
def test_get_on_an_action_url_is_405(operator_client, failed_run, slug):
    response = operator_client.get(action_url(failed_run, slug))
    assert response.status_code == 405
    assert operator_events(failed_run) == []


@pytest.mark.parametrize("slug", ACTIONS)
def test_post_without_operate_permission_is_403_and_the_denial_is_audited(
    viewer_client, failed_run, slug
):
    before = list(NodeRun.objects.filter(run=failed_run).values_list("node_key", "status"))

    response = viewer_client.post(action_url(failed_run, slug), valid_post(failed_run, slug))

    assert response.status_code == 403
    assert "operate_run" in response.content.decode()
    [denial] = operator_events(failed_run)
    assert denial.actor == "victor" and denial.before["denied"] is True
    assert "denied" in denial.reason and "test reason" in denial.reason
    assert list(NodeRun.objects.filter(run=failed_run).values_list("node_key", "status")) == before
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.FAILED


def test_a_burst_of_refusals_is_one_history_row_with_a_count(viewer_client, failed_run):
    for _ in range(5):
        viewer_client.post(action_url(failed_run, "resume"), valid_post(failed_run, "resume"))
    [denial] = operator_events(failed_run)
    assert denial.after == {"refused_again": 4}
    # Another action is another row; so is the same one after the counting window.
    viewer_client.post(action_url(failed_run, "cancel"), valid_post(failed_run, "cancel"))
    RunEvent.objects.filter(pk=denial.pk).update(at=denial.at - audit.REFUSALS_COUNTED_FOR)
    viewer_client.post(action_url(failed_run, "resume"), valid_post(failed_run, "resume"))
    assert len(operator_events(failed_run)) == 3
    page = viewer_client.get(f"/runs/{failed_run.pk}/").content.decode()
    assert "resume: denied (5 times)" in page


@pytest.mark.parametrize("slug", ACTIONS)
def test_post_without_csrf_token_is_403(operator, failed_run, slug):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)

    response = client.post(action_url(failed_run, slug), valid_post(failed_run, slug))

    assert response.status_code == 403
    assert operator_events(failed_run) == []


def test_post_with_the_csrf_token_of_the_confirm_page_works(operator, failed_run):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    page = client.get(f"/runs/{failed_run.pk}/resume/preview/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)

    response = client.post(
        action_url(failed_run, "resume"),
        {**form_fields(page), "reason": "fixed", "csrfmiddlewaretoken": token},
    )

    assert response.status_code == 302
    assert len(operator_events(failed_run)) == 1


def test_anonymous_post_is_sent_to_log_in(client, failed_run):
    response = client.post(action_url(failed_run, "resume"), valid_post(failed_run, "resume"))
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert operator_events(failed_run) == []


def test_unknown_run_is_404(operator_client):
    assert operator_client.post("/runs/999999/resume/", {"reason": "x"}).status_code == 404
    assert operator_client.get("/runs/999999/resume/preview/").status_code == 404


# --- Previews ---------------------------------------------------------------------------------


def test_resume_preview_lists_what_runs_again_and_carries_a_fresh_request_key(
    operator_client, failed_run
):
    first = operator_client.get(f"/runs/{failed_run.pk}/resume/preview/")
    second = operator_client.get(f"/runs/{failed_run.pk}/resume/preview/")
    page = first.content.decode()

    assert first.status_code == 200
    assert "chain v1" in page
    assert "runs again from its latest checkpoint" in page  # b has a progress checkpoint
    assert "<code>b</code>" in page and "<code>c</code>" in page and "<code>a</code>" not in page
    assert 'name="reason"' in page
    key = form_fields(page)["request_key"]
    assert key and key != form_fields(second.content.decode())["request_key"]
    assert operator_events(failed_run) == []  # a preview changes nothing


def test_retry_preview_pins_the_attempt_and_offers_the_downstream_variant(
    operator_client, failed_run
):
    page = operator_client.get(f"/runs/{failed_run.pk}/retry/preview/?node=b").content.decode()
    fields = form_fields(page)
    assert fields["node"] == "b" and fields["expected_attempt"] == "1"
    assert fields["downstream"] == "False"
    assert "downstream=on" in page

    wide = operator_client.get(f"/runs/{failed_run.pk}/retry/preview/?node=b&downstream=on")
    assert form_fields(wide.content.decode())["downstream"] == "True"
    assert "<code>c</code>" in wide.content.decode()


def test_rollback_preview_without_a_target_offers_checkpoints_and_nodes(
    operator_client, succeeded_run
):
    page = operator_client.get(f"/runs/{succeeded_run.pk}/rollback/preview/").content.decode()
    checkpoint = Checkpoint.objects.filter(run=succeeded_run).first()
    assert f"?to_checkpoint={checkpoint.pk}" in page
    assert "?to_node=b" in page
    assert 'name="reason"' not in page  # pick a target first


def test_rollback_preview_warns_about_side_effects_without_compensation(
    operator_client, succeeded_run
):
    a_done = Checkpoint.objects.get(run=succeeded_run, node_run__node_key="a", kind="node_done")
    page = operator_client.get(
        f"/runs/{succeeded_run.pk}/rollback/preview/?to_checkpoint={a_done.pk}"
    ).content.decode()
    assert "compensate hook runs, then it runs again" in page
    assert "undone by its compensate hook" in page


def test_preview_of_an_impossible_action_says_why_and_offers_no_confirm(
    operator_client, failed_run
):
    page = operator_client.get(f"/runs/{failed_run.pk}/retry/preview/?node=c").content.decode()
    assert "Node c has not run yet: it waits for b" in page
    assert 'name="reason"' not in page


def test_preview_of_a_noop_says_nothing_would_change(operator_client, succeeded_run):
    page = operator_client.get(f"/runs/{succeeded_run.pk}/resume/preview/").content.decode()
    assert "already succeeded; nothing to resume" in page
    assert 'name="reason"' not in page


WIDE = {
    "name": "Wide",
    "slug": "wide",
    "nodes": {
        "a": {"type": "test.effect"},
        "b": {"type": "test.effect", "after": ["a"]},
        **{f"c{i}": {"type": "test.effect", "after": ["b"]} for i in range(30)},
    },
}
PREVIEWS = [
    "resume/preview/",
    "retry/preview/?node=b",
    "retry/preview/?node=b&downstream=on",
    "rollback/preview/",
    "rollback/preview/?to_node=a",
    "cancel/preview/",
    "skip/preview/?node=c0",
    "mark-succeeded/preview/?node=b",
]


def preview_queries(client, run) -> list[int]:
    counts = []
    for preview in PREVIEWS:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(f"/runs/{run.pk}/{preview}").status_code == 200, preview
        counts.append(len(captured))
    return counts


def test_previews_keep_a_constant_number_of_queries(operator_client, start_run):
    """A run of 32 nodes with 40 checkpoints costs what a run of 3 nodes does."""
    small = start_run(CHAIN)
    work(small, "a")
    work(small, "b", checkpoint={"row": 1}, fail="ValueError")
    wide = start_run(WIDE)
    work(wide, "a", checkpoint={"row": 0})
    work(wide, "b", checkpoint={"row": 1}, fail="ValueError")
    Checkpoint.objects.bulk_create(
        Checkpoint(
            run=wide,
            node_run=nodes(wide)["a"],
            kind=Checkpoint.Kind.PROGRESS,
            sequence=100 + index,
            attempt=1,
            state={"row": index},
        )
        for index in range(40)
    )
    assert preview_queries(operator_client, wide) == preview_queries(operator_client, small)


def test_viewer_sees_the_preview_but_no_confirm_form(viewer_client, failed_run):
    page = viewer_client.get(f"/runs/{failed_run.pk}/resume/preview/").content.decode()
    assert "runs again" in page and 'name="reason"' not in page
    assert "operate_run" in page


# --- Happy paths, one per action --------------------------------------------------------------


def test_resume_from_the_dashboard(operator_client, failed_run):
    response = operator_client.post(
        action_url(failed_run, "resume"), {"reason": "input fixed", "request_key": "k1"}
    )

    assert response.status_code == 302 and response["Location"] == f"/runs/{failed_run.pk}/"
    failed_run.refresh_from_db()
    assert failed_run.status == Run.Status.RUNNING
    assert nodes(failed_run)["b"].status == NodeRun.Status.QUEUED
    [event] = operator_events(failed_run)
    assert (event.actor, event.reason, event.request_key) == ("olga", "input fixed", "k1")
    page = operator_client.get(response["Location"]).content.decode()
    assert f"Run {failed_run.pk} resumed" in page


def test_retry_with_downstream_from_the_dashboard(operator_client, succeeded_run):
    response = operator_client.post(
        action_url(succeeded_run, "retry"),
        {"reason": "bad output", "request_key": "k2", "node": "b", "downstream": "True"},
    )
    assert response.status_code == 302 and response["Location"].endswith("?node=b")
    after = nodes(succeeded_run)
    assert (
        after["b"].status == NodeRun.Status.QUEUED and after["c"].status == NodeRun.Status.PENDING
    )
    assert operator_events(succeeded_run)[0].before["downstream"] is True


# The compensate hooks run in a thread of their own, on a connection of their own.
@pytest.mark.django_db(transaction=True)
def test_rollback_to_a_checkpoint_from_the_dashboard(operator_client, succeeded_run):
    a_done = Checkpoint.objects.get(run=succeeded_run, node_run__node_key="a", kind="node_done")
    response = operator_client.post(
        action_url(succeeded_run, "rollback"),
        {"reason": "bad load", "request_key": "k3", "to_checkpoint": a_done.pk, "resume": "on"},
    )
    assert response.status_code == 302
    after = nodes(succeeded_run)
    assert after["a"].status == NodeRun.Status.SUCCEEDED
    assert after["b"].status == NodeRun.Status.QUEUED
    assert operator_events(succeeded_run)[0].before["to_checkpoint"] == a_done.pk


# The compensate hooks run in a thread of their own, on a connection of their own.
@pytest.mark.django_db(transaction=True)
def test_rollback_without_resume_leaves_the_run_cancelled(operator_client, succeeded_run):
    operator_client.post(
        action_url(succeeded_run, "rollback"),
        {"reason": "hold", "request_key": "k4", "to_node": "c"},
    )
    succeeded_run.refresh_from_db()
    assert succeeded_run.status == Run.Status.CANCELLED
    assert operator_events(succeeded_run)[0].before["resume"] is False


def test_cancel_from_the_dashboard(operator_client, start_run):
    run = start_run(CHAIN)
    response = operator_client.post(
        action_url(run, "cancel"), {"reason": "wrong day", "request_key": "k5"}
    )
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED


def test_skip_from_the_dashboard(operator_client, failed_run):
    operator_client.post(
        action_url(failed_run, "skip"), {"reason": "not needed", "request_key": "k6", "node": "b"}
    )
    after = nodes(failed_run)
    assert after["b"].status == NodeRun.Status.SKIPPED
    assert after["c"].status == NodeRun.Status.QUEUED  # its downstream may proceed


def test_mark_succeeded_with_an_output_from_the_dashboard(operator_client, failed_run):
    operator_client.post(
        action_url(failed_run, "mark-succeeded"),
        {
            "reason": "loaded by hand",
            "request_key": "k7",
            "node": "b",
            "output": '{"rows": 12, "note": "by hand"}',
        },
    )
    b = nodes(failed_run)["b"]
    assert b.status == NodeRun.Status.SUCCEEDED and b.output == {"rows": 12, "note": "by hand"}


# --- Bad input and double submits -------------------------------------------------------------


def test_a_missing_reason_is_a_400_that_shows_the_form_again(operator_client, failed_run):
    response = operator_client.post(
        action_url(failed_run, "resume"), {"reason": "  ", "request_key": "k8"}
    )
    assert response.status_code == 400
    page = response.content.decode()
    assert "Say why" in page and 'value="k8"' in page
    assert operator_events(failed_run) == []


def test_bad_output_json_is_a_400_that_says_where(operator_client, failed_run):
    response = operator_client.post(
        action_url(failed_run, "mark-succeeded"),
        {"reason": "x", "request_key": "k9", "node": "b", "output": '{"rows": }'},
    )
    assert response.status_code == 400
    assert "Not valid JSON" in response.content.decode()
    assert nodes(failed_run)["b"].status == NodeRun.Status.FAILED


def test_an_operation_error_is_a_400_with_its_message(operator_client, failed_run):
    response = operator_client.post(
        action_url(failed_run, "retry"), {"reason": "x", "request_key": "k10", "node": "c"}
    )
    assert response.status_code == 400
    assert "Retry b" in response.content.decode()
    assert operator_events(failed_run) == []


# The compensate hooks run in a thread of their own, on a connection of their own.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("slug", ACTIONS)
def test_submitting_the_same_form_twice_changes_nothing_the_second_time(
    operator_client, start_run, slug
):
    run = start_run(CHAIN)
    if slug != "cancel":
        work(run, "a")
        if slug == "rollback":
            work(run, "b")
            work(run, "c")
        else:
            work(run, "b", fail="ValueError")
    data = valid_post(run, slug)
    if slug == "rollback":
        data["to_node"] = "c"

    first = operator_client.post(action_url(run, slug), data)
    state = list(NodeRun.objects.filter(run=run).values_list("node_key", "status", "attempt"))
    attempts = NodeAttempt.objects.filter(node_run__run=run).count()
    second = operator_client.post(action_url(run, slug), data, follow=True)

    assert first.status_code == 302 and second.status_code == 200
    assert len(operator_events(run)) == 1
    assert list(NodeRun.objects.filter(run=run).values_list("node_key", "status", "attempt")) == (
        state
    )
    assert NodeAttempt.objects.filter(node_run__run=run).count() == attempts
    assert "already applied; nothing changed" in second.content.decode()


# --- Starting a run ---------------------------------------------------------------------------

PARAMS = {
    "name": "With params",
    "slug": "with-params",
    "params": {"day": "2026-01-01"},
    "nodes": {"n": {"type": "keel.noop"}},
}


def test_start_run_with_params(operator_client, make_version):
    make_version(PARAMS)
    response = operator_client.post(
        "/workflows/with-params/start/", {"params": '{"day": "2026-02-02"}', "priority": "high"}
    )
    run = Run.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/runs/{run.pk}/"
    assert run.params == {"day": "2026-02-02"} and run.priority == "high"
    assert run.trigger == "olga"


def test_submitting_the_same_start_form_twice_starts_one_run(operator_client, make_version):
    make_version(PARAMS)
    page = operator_client.get("/workflows/with-params/")
    key = page.context["start_form"]["request_key"].value()
    data = {"params": "{}", "priority": "default", "request_key": key}
    first = operator_client.post("/workflows/with-params/start/", data)
    second = operator_client.post("/workflows/with-params/start/", data)
    run = Run.objects.get()
    assert first["Location"] == second["Location"] == f"/runs/{run.pk}/"


def test_start_form_is_prefilled_with_the_declared_params(operator_client, make_version):
    make_version(PARAMS)
    page = operator_client.get("/workflows/with-params/").content.decode()
    assert "&quot;day&quot;: &quot;2026-01-01&quot;" in page
    assert 'action="/workflows/with-params/start/"' in page


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('{"day": ', "Not valid JSON"),
        ("[1, 2]", "Give a JSON object"),
        ('{"nope": 1}', "Unknown run param(s) nope"),
        (
            '{"day": 5}',
            "params.day: expected a string (the default is &quot;2026-01-01&quot;), got 5",
        ),
    ],
)
def test_start_run_with_bad_params_shows_the_error_and_starts_nothing(
    operator_client, make_version, params, message
):
    make_version(PARAMS)
    response = operator_client.post(
        "/workflows/with-params/start/", {"params": params, "priority": "default"}
    )
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Run.objects.exists()


def test_start_run_needs_the_operate_permission(viewer_client, make_version):
    make_version(PARAMS)
    response = viewer_client.post("/workflows/with-params/start/", {"params": "{}"})
    assert response.status_code == 403
    assert "workflows.operate_run" in response.content.decode()
    assert not Run.objects.exists()
    assert viewer_client.get("/workflows/with-params/start/").status_code == 405
    # The refusal is audited; a burst of them is one row with a count.
    viewer_client.post("/workflows/with-params/start/", {"params": "{}"})
    [refusal] = AuditEvent.objects.exclude(action=AuditEvent.Action.DEPLOY).all()
    assert (refusal.actor, refusal.action, refusal.target) == (
        "victor",
        "start_run",
        "workflow:with-params",
    )
    assert refusal.before["denied"] is True and refusal.after == {"refused_again": 1}


def test_post_without_permission_or_reason_is_still_a_recorded_403(viewer_client, failed_run):
    response = viewer_client.post(action_url(failed_run, "retry"), {"node": "b"})
    assert response.status_code == 403
    [denial] = operator_events(failed_run)
    assert denial.before == {"action": "retry", "denied": True}
    assert "(no reason given)" in denial.reason
