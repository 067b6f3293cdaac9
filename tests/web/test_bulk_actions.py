"""Bulk actions on the runs list: tick runs, see one preview of what happens to each, give
one reason; each run is changed through its own audited operation, once."""

import re

import pytest

from tests.web.conftest import CHAIN, work
from workflows.models import Run, RunEvent

pytestmark = pytest.mark.django_db


def failed(start_run) -> Run:
    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError", message="bad row 501")
    return run


def operator_events(run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run, kind=RunEvent.Kind.OPERATOR).order_by("id"))


def test_the_runs_list_lets_an_operator_tick_runs(operator_client, viewer_client, start_run):
    run = failed(start_run)
    page = operator_client.get("/runs/").content.decode()
    assert f'<input type="checkbox" name="run" value="{run.pk}" form="bulk"' in page
    assert 'name="action" value="resume"' in page and 'name="action" value="cancel"' in page
    assert 'data-select-all="run"' in page
    seen_by_viewer = viewer_client.get("/runs/").content.decode()
    assert 'form="bulk"' not in seen_by_viewer and "Resume selected" not in seen_by_viewer


def test_one_preview_says_what_happens_to_each_run(operator_client, start_run, succeeded_run):
    first, second = failed(start_run), failed(start_run)
    query = f"action=resume&run={first.pk}&run={second.pk}&run={succeeded_run.pk}"
    page = operator_client.get(f"/runs/bulk/?{query}").content.decode()

    assert "3 runs selected; the action applies to 2." in page
    rows = re.findall(r'<tr class="(applies|skipped)">.*?#(\d+)</a>', page, re.S)
    assert rows == [  # in id order
        ("skipped", str(succeeded_run.pk)),
        ("applies", str(first.pk)),
        ("applies", str(second.pk)),
    ]
    assert "b runs again" in page and "unchanged:" in page
    for run in (succeeded_run, first, second):
        assert f'<input type="hidden" name="run" value="{run.pk}"' in page
    assert "Resume 2 runs" in page
    assert not operator_events(first)  # a preview changes nothing


def test_confirming_resumes_each_run_with_the_reason_and_once(operator_client, start_run):
    first, second = failed(start_run), failed(start_run)
    cancelled = start_run(CHAIN)
    operator_client.post(
        f"/runs/{cancelled.pk}/cancel/", {"reason": "not today", "request_key": "k-cancel"}
    )
    form = {
        "action": "resume",
        "run": f"{first.pk},{second.pk}",
        "reason": "the input is fixed",
        "request_key": "web-bulk-1",
    }

    response = operator_client.post("/runs/bulk/apply/", form, follow=True)

    assert response.redirect_chain[-1][0] == "/runs/"
    assert f"2 runs resumed: {first.pk}, {second.pk}." in response.content.decode()
    for run in (first, second):
        run.refresh_from_db()
        assert run.status == Run.Status.RUNNING
        [event] = operator_events(run)
        assert (event.actor, event.reason) == ("olga", "the input is fixed")
        assert event.request_key == f"web-bulk-1:{run.pk}"
    # The same form again (a double click): nothing changes twice.
    again = operator_client.post("/runs/bulk/apply/", form, follow=True).content.decode()
    assert "resumed:" not in again and f"Run {first.pk} unchanged" in again
    assert len(operator_events(first)) == len(operator_events(second)) == 1


def test_cancel_in_bulk_skips_finished_runs_and_says_so(operator_client, start_run, succeeded_run):
    running = start_run(CHAIN)
    form = {
        "action": "cancel",
        "run": f"{running.pk},{succeeded_run.pk}",
        "reason": "wrong params",
        "request_key": "web-bulk-2",
    }
    page = operator_client.post("/runs/bulk/apply/", form, follow=True).content.decode()
    running.refresh_from_db()
    assert running.status == Run.Status.CANCELLED
    assert f"1 run cancelled: {running.pk}." in page
    assert f"Run {succeeded_run.pk} unchanged" in page
    assert not operator_events(succeeded_run)


@pytest.mark.parametrize(
    "query,message",
    [
        ("action=resume", "Select at least one run."),
        ("action=resume&run=abc", "Run ids are whole numbers."),
        ("action=resume&run=999999", "No run 999999"),
        ("action=delete&run=1", "Select a valid choice"),
        ("action=resume&" + "&".join(f"run={i}" for i in range(1, 102)), "at most 100 runs"),
    ],
)
def test_a_bad_selection_is_refused_with_what_to_do(operator_client, query, message):
    response = operator_client.get(f"/runs/bulk/?{query}")
    assert response.status_code == 400
    assert message in response.content.decode()


def test_a_viewer_is_refused_and_the_refusal_is_recorded(viewer_client, start_run):
    run = failed(start_run)
    form = {"action": "resume", "run": str(run.pk), "reason": "let me", "request_key": "k"}
    response = viewer_client.post("/runs/bulk/apply/", form)
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    [denial] = operator_events(run)
    assert denial.actor == "victor" and denial.before["denied"] is True


def test_confirming_without_a_reason_shows_the_preview_again(operator_client, start_run):
    run = failed(start_run)
    form = {"action": "resume", "run": str(run.pk), "reason": " ", "request_key": "k"}
    response = operator_client.post("/runs/bulk/apply/", form)
    assert response.status_code == 400
    assert "Say why" in response.content.decode() or "required" in response.content.decode()
    assert not operator_events(run)
