"""The release panel in real Chromium: a failing canary aborted by Keel's analysis says why
on the workflow page (an open page learns it by itself), a rollback is done from the page (preview, reason, confirm), and
the pages fit a laptop and a phone. Screenshots go to /tmp/keel-shots/."""

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from diagnostics import watchdog
from tests.browser.test_graph import fits_the_screen
from tests.web.test_deployments_page import canary, finish, load, start
from workflows.deployments import judging, services
from workflows.models import Deployment, Run, Workflow

pytestmark = pytest.mark.django_db(transaction=True)

SHOTS = Path("/tmp/keel-shots")
SIZES = [(1280, 800), (390, 844)]


def shoot(page, name: str, width: int, height: int) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}-{width}x{height}.png"), full_page=True)


def test_a_failing_canary_is_aborted_and_the_workflow_page_says_why(
    signed_in, live_server, clean_redis, browser_errors
):
    page = signed_in
    deployment = canary(steps=(20, 100), min_runs=10)
    runs = start(100)
    finish([run for run in runs if run.version.number == 1], Run.Status.SUCCEEDED, seconds=2)
    on_v2 = [run for run in runs if run.version.number == 2]
    finish(on_v2[:8], Run.Status.FAILED, seconds=3)
    url = f"{live_server.url}/workflows/orders/"

    for width, height in SIZES:
        page.set_viewport_size({"width": width, "height": height})
        page.goto(url)
        release = page.locator("#release")
        expect(release.locator(".release-split")).to_have_text("v2 canary 20% · v1 80%")
        expect(release.locator("table.release-compare")).to_contain_text("v2 canary")
        expect(release.locator(".release-chart svg")).to_have_count(2)
        fits_the_screen(page, f"the workflow page with a canary, {width}px")
        shoot(page, "canary-in-flight", width, height)

    finish(on_v2[8:], Run.Status.FAILED, seconds=3)  # 20 of 20 canary runs failed
    assert "aborted" in judging.advance_in_flight()[0]
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.ABORTED

    # The open page learns it by itself: the release state polls while a canary is in flight.
    moved = page.locator("#release-status .release-moved")
    expect(moved).to_contain_text("v2 canary is aborted now.", timeout=15_000)
    expect(page.locator("#release-status .release-ended")).to_contain_text("by watchdog")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#release-status").screenshot(
        path=str(SHOTS / "canary-aborted-while-watching.png")
    )
    moved.get_by_role("link", name="Reload the page").click()
    expect(page.locator(".release-moved")).to_have_count(0)
    expect(page.get_by_role("button", name="Abort v2")).to_have_count(0)

    for width, height in SIZES:
        page.set_viewport_size({"width": width, "height": height})
        page.goto(url)
        alert = page.locator(".release-ended[role=alert]")
        expect(alert).to_be_visible()
        expect(alert).to_contain_text("v2 canary aborted")
        expect(alert).to_contain_text("by watchdog")
        expect(alert).to_contain_text("Why: canary failed 20 of 20 runs (100.0%)")
        expect(page.locator(".release-split")).to_have_text("All new runs on v1.")
        fits_the_screen(page, f"the workflow page after the abort, {width}px")
        shoot(page, "canary-aborted", width, height)
    assert browser_errors == []


@pytest.mark.parametrize("width,height", SIZES)
def test_a_version_is_rolled_back_from_the_workflow_page(
    signed_in, live_server, clean_redis, browser_errors, width, height
):
    page = signed_in
    page.set_viewport_size({"width": width, "height": height})
    load(1)
    load(2)
    left = start(2)
    page.goto(f"{live_server.url}/workflows/orders/")

    page.get_by_role("link", name="Roll back to v1…").click()
    page.wait_for_url(re.compile(r"/workflows/orders/rollback-version/\?to=1$"))
    preview = page.locator(".panel.preview")
    expect(preview).to_contain_text("Every new run of orders gets v1, at once.")
    for run in left:
        expect(preview.get_by_role("link", name=f"#{run.pk}", exact=True)).to_be_visible()
    fits_the_screen(page, f"the rollback preview, {width}px")
    page.get_by_label("Cancel them and start them again on the chosen version").check()
    page.get_by_label("Reason").fill("v2 writes wrong totals")
    page.get_by_role("button", name="Roll back to v1").click()

    page.wait_for_url(re.compile(r"/workflows/orders/#release$"))
    expect(page.locator(".messages")).to_contain_text("orders now starts new runs on v1.")
    expect(page.locator(".release-split")).to_have_text("All new runs on v1.")
    expect(page.locator(".release-ended")).to_contain_text("Why: rolled back to v1: v2 writes")
    assert Deployment.objects.get(state=Deployment.State.ACTIVE).version.number == 1
    assert sorted(
        Run.objects.filter(restarted_from__in=left).values_list("version__number", flat=True)
    ) == [1, 1]
    fits_the_screen(page, f"the workflow page after a rollback, {width}px")

    page.goto(f"{live_server.url}/definitions/upload/?workflow=orders")
    page.get_by_role("button", name="Check").click()
    expect(page.locator("#check")).to_contain_text("Valid: orders")
    fits_the_screen(page, f"the upload page, {width}px")
    assert browser_errors == []


@pytest.mark.parametrize("width,height", SIZES)
def test_runs_left_on_a_rolled_back_version_are_restarted_from_their_finding(
    signed_in, live_server, clean_redis, browser_errors, django_user_model, width, height
):
    page = signed_in
    django_user_model.objects.filter(username="olga").update(is_staff=True)  # findings: staff
    page.set_viewport_size({"width": width, "height": height})
    load(1)
    load(2)
    left = start(2)
    services.rollback_version(Workflow.objects.get(slug="orders"), 1, actor="t", reason="slow")
    watchdog.tick()

    page.goto(f"{live_server.url}/findings/")
    finding = page.locator("article.finding", has_text="still run v2, which was rolled back")
    expect(finding).to_contain_text("restart them on v1")
    finding.get_by_role("link", name="Restart or cancel the runs left on v2…").click()

    page.wait_for_url(re.compile(r"/workflows/orders/versions/2/runs-left/$"))
    preview = page.locator(".panel.preview")
    expect(preview).to_contain_text("2 unfinished runs of orders v2; restarted, they run v1")
    for run in left:
        expect(preview.get_by_role("link", name=f"#{run.pk}", exact=True)).to_be_visible()
    fits_the_screen(page, f"the runs-left page, {width}px")
    shoot(page, "runs-left", width, height)
    page.get_by_label("Reason").fill("v2 was rolled back: its runs must not finish")
    page.get_by_role("button", name="End the runs left on v2").click()

    page.wait_for_url(re.compile(r"/workflows/orders/#release$"))
    expect(page.locator(".messages")).to_contain_text("2 run(s) of orders v2 restarted on v1.")
    assert sorted(
        Run.objects.filter(restarted_from__in=left).values_list("version__number", flat=True)
    ) == [1, 1]
    watchdog.tick()
    page.goto(f"{live_server.url}/findings/")
    expect(page.locator("article.finding", has_text="still run v2")).to_have_count(0)
    assert browser_errors == []
