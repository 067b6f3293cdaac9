"""In real Chromium, as an operator would: find a failed run, preview and confirm a
recovery, and watch the run finish through htmx polling; roll back to a checkpoint;
and see hostile text shown as text, with no script run."""

import re
from pathlib import Path

import pytest
from django.conf import settings
from playwright.sync_api import expect

from tests.browser.conftest import NODE_MODULES
from tests.conftest import finished
from tests.web.test_xss import PAYLOAD, XSS
from workflows import operations
from workflows.definitions import versioning
from workflows.models import Checkpoint, NodeRun, Run, RunEvent

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

NEEDS_FIX = Path(settings.BASE_DIR) / "workflows" / "demo_definitions" / "needs_fix.yaml"
SUCCEEDED = re.compile(r"\bsucceeded\b")


def failed_demo_run() -> Run:
    """A run of the orders-import demo, failed as `make run` leaves it."""
    version = versioning.load_file(NEEDS_FIX, actor="test").version
    run = finished(operations.start_run(version.workflow.slug, actor="devstack"))
    assert run.status == Run.Status.FAILED, run.reason
    return run


def watch_live_requests(page) -> list[int]:
    """Statuses of the live partial's responses, in order."""
    statuses: list[int] = []
    page.on(
        "response", lambda response: "/live/" in response.url and statuses.append(response.status)
    )
    return statuses


def test_a_failed_demo_run_is_resumed_by_clicking_and_finishes_on_screen(
    signed_in, live_server, start_worker, browser_errors
):
    page = signed_in
    worker = start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    run = failed_demo_run()
    # No worker while the operator clicks: the resumed nodes could otherwise finish before
    # the run page first loads, and there would be no live update to watch.
    worker.stop()
    live = watch_live_requests(page)

    # Find the failure on the overview, see why, open the run.
    page.goto(f"{live_server.url}/")
    failure = page.locator("article.failure", has_text=f"#{run.pk}")
    expect(failure).to_contain_text("had not arrived when the import ran")
    failure.get_by_role("link", name="Open run").click()
    status = page.locator("#run-live .run-status")
    expect(status).to_contain_text("failed")
    expect(page.locator("#node")).to_contain_text("import_orders")

    # Preview, give a reason, confirm.
    page.get_by_role("link", name="Resume run…").click()
    expect(page.locator("h1")).to_contain_text("Resume the run")
    expect(page.locator("table.preview-nodes")).to_contain_text("import_orders")
    expect(page.locator("table.preview-nodes")).to_contain_text("runs again")
    expect(page.locator("textarea[name=reason]")).to_have_attribute("required", "")
    page.fill("textarea[name=reason]", "the export has landed now")
    page.get_by_role("button", name="Resume run").click()

    # Back on the run page, which polls until the run is done.
    page.wait_for_url(re.compile(rf"/runs/{run.pk}/$"))
    expect(page.locator(".messages")).to_contain_text(f"Run {run.pk} resumed")
    page.evaluate("window.__stillTheSamePage = true")
    expect(status).to_contain_text("running")
    expect(page.locator(".run-summary .live-dot")).to_have_count(1)
    page.wait_for_event("response", lambda response: "/live/" in response.url)
    start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    expect(status).to_contain_text(SUCCEEDED, timeout=60_000)
    assert page.evaluate("window.__stillTheSamePage") is True  # swapped in by htmx, not reloaded
    expect(page.locator("svg.dag g.dag-node.s-succeeded")).to_have_count(3)
    expect(page.locator("table.history")).to_contain_text("the export has landed now")
    expect(page.locator(".run-summary .live-dot")).to_have_count(0)

    # The page polled while the run went on; then the server said 286 and it stopped.
    assert 200 in live and live[-1] == 286
    count = len(live)
    page.wait_for_timeout(4_500)
    assert len(live) == count
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    [event] = RunEvent.objects.filter(run=run, kind=RunEvent.Kind.OPERATOR)
    assert (event.actor, event.reason) == ("olga", "the export has landed now")
    assert browser_errors == []


def test_rollback_to_a_checkpoint_from_the_run_page(signed_in, live_server, worker, browser_errors):
    page = signed_in
    run = failed_demo_run()
    operations.resume_run(run.pk, actor="setup", reason="make it succeed first")
    run = finished(run)
    assert run.status == Run.Status.SUCCEEDED
    imported = NodeRun.objects.get(run=run, node_key="import_orders")
    first_output = imported.output
    second = Checkpoint.objects.get(node_run=imported, kind="progress", sequence=2)

    # Open the run, pick the import node in the graph, roll back to its second checkpoint.
    page.goto(f"{live_server.url}/runs/{run.pk}/")
    page.locator('svg.dag a[data-node="import_orders"]').click()
    panel = page.locator("#node")
    expect(panel.locator("h2")).to_contain_text("import_orders")
    row = panel.locator("table.checkpoints tr", has_text=re.compile(r"^\s*#2 "))
    row.get_by_role("link", name="Roll back to here…").click()

    expect(page.locator("h1")).to_contain_text("Roll the run back")
    preview = page.locator("table.preview-nodes")
    expect(preview).to_contain_text("import_orders")
    expect(preview).to_contain_text("runs again from its latest checkpoint")
    expect(preview).to_contain_text("report")
    page.fill("textarea[name=reason]", "re-import from the 200th order")
    page.get_by_role("button", name="Roll back").click()

    page.wait_for_url(re.compile(rf"/runs/{run.pk}/"))
    expect(page.locator(".messages")).to_contain_text("rolled back")
    expect(page.locator("#run-live .run-status")).to_contain_text(SUCCEEDED, timeout=60_000)

    imported.refresh_from_db()
    assert imported.output == first_output  # resumed from the checkpoint: same totals
    event = RunEvent.objects.filter(run=run, kind=RunEvent.Kind.OPERATOR).last()
    assert event.before["to_checkpoint"] == second.pk and event.actor == "olga"
    resumed = imported.attempts.order_by("-number").first()
    assert resumed.log_lines.filter(message="resuming after 200 imported orders").exists()
    assert browser_errors == []


def test_hostile_text_is_shown_as_text_and_runs_no_script(
    signed_in, live_server, worker, browser_errors, make_version
):
    page = signed_in
    version = make_version(
        {
            "name": "<script>alert(1)</script> xss",
            "slug": "xss",
            "description": PAYLOAD,
            "params": {"note": PAYLOAD},
            "nodes": {
                "echo": {"type": "browser.echo", "params": {"text": PAYLOAD}},
                "boom": {
                    "type": "browser.fail_with",
                    "params": {"text": PAYLOAD},
                    "after": ["echo"],
                },
            },
        }
    )
    run = finished(
        operations.start_run(version.workflow.slug, actor="test", params={"note": PAYLOAD})
    )
    assert run.status == Run.Status.FAILED

    for path in (
        "/",
        "/workflows/",
        "/workflows/xss/",
        "/runs/",
        f"/runs/{run.pk}/?node=echo",
        f"/runs/{run.pk}/?node=boom",
        f"/runs/{run.pk}/resume/preview/",
        f"/runs/{run.pk}/mark-succeeded/preview/?node=boom",
    ):
        page.goto(live_server.url + path)
        expect(page.locator("main")).to_be_visible()
        assert page.locator("main script, main img, main iframe").count() == 0, path

    page.goto(f"{live_server.url}/runs/{run.pk}/?node=echo")
    log = page.locator(".log")
    for text in XSS:
        expect(log).to_contain_text(text)
    expect(page.locator("pre.json").last).to_contain_text("<script>alert(1)</script>")
    page.goto(f"{live_server.url}/runs/{run.pk}/?node=boom")
    expect(page.locator("table.attempts")).to_contain_text('"><img src=x onerror=alert(1)>')
    page.wait_for_timeout(500)
    assert browser_errors == []
