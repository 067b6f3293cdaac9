"""In Chromium: tick failed runs on the runs list (one by one, or all at once), see one
preview, give one reason, and find every run resumed."""

import pytest
from playwright.sync_api import expect

from tests.web.conftest import CHAIN, work
from workflows.models import Run

pytestmark = pytest.mark.django_db(transaction=True)


def failed(start_run) -> Run:
    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError", message="bad row 501")
    return run


def test_resume_the_ticked_runs_in_one_go(signed_in, live_server, start_run, browser_errors):
    page = signed_in
    runs = [failed(start_run) for _ in range(3)]
    page.goto(f"{live_server.url}/runs/?status=failed")

    # The box in the header ticks every run on the page; untick one by hand.
    page.get_by_label("Select every run on this page").check()
    for run in runs:
        expect(page.get_by_label(f"Select run #{run.pk}", exact=True)).to_be_checked()
    page.get_by_label(f"Select run #{runs[0].pk}", exact=True).uncheck()
    expect(page.get_by_label("Select every run on this page")).not_to_be_checked()
    page.get_by_role("button", name="Resume selected…").click()

    expect(page.locator("h1")).to_have_text("Resume runs")
    expect(page.locator("table.bulk-preview tr.applies")).to_have_count(2)
    page.fill("textarea[name=reason]", "the input is fixed")
    page.get_by_role("button", name="Resume 2 runs").click()

    expect(page.locator(".messages")).to_contain_text(
        f"2 runs resumed: {runs[1].pk}, {runs[2].pk}."
    )
    statuses = [Run.objects.get(pk=run.pk).status for run in runs]
    assert statuses == [Run.Status.FAILED, Run.Status.RUNNING, Run.Status.RUNNING]
    assert browser_errors == []
