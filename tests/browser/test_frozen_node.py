"""In real Chromium: a node frozen in C code is diagnosed on its run page, and the one
click the finding offers (retry, confirmed with a reason) frees the worker and finishes
the run."""

import re

import psutil
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import NODE_MODULES
from tests.conftest import wait_for
from workflows import engine
from workflows.definitions import versioning
from workflows.models import NodeAttempt, NodeRun

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

FROZEN = """
name: Frozen import
nodes:
  frozen:
    type: test.hang_masked
    params: {seconds: 600}
    timeout: 900
    stall_after: 3
    retries: {max_attempts: 1}
"""


def test_a_frozen_node_is_diagnosed_and_one_retry_click_frees_its_worker(
    signed_in, live_server, start_worker, start_watchdog, browser_errors, tmp_path
):
    page = signed_in
    beat = {"KEEL_HEARTBEAT_SECONDS": 1, "KEEL_NODE_MODULES": NODE_MODULES}
    worker = start_worker(KEEL_KILL_GRACE_SECONDS=2, **beat)
    start_watchdog(**beat)
    run = engine.start_run(versioning.load_definition(FROZEN, actor="test").version, trigger="test")
    horse = wait_for(
        lambda: (
            NodeAttempt.objects.filter(
                node_run__run=run, number=1, status=NodeAttempt.Status.RUNNING
            )
            .values_list("pid", flat=True)
            .first()
        ),
        message="the frozen node running",
    )

    # The run page says what is wrong and offers the fix.
    page.goto(f"{live_server.url}/runs/{run.pk}/")
    summary = page.locator("#run-live section.run-summary")
    expect(summary).to_contain_text("declared stall_after 3 s", timeout=30_000)
    expect(summary.locator("article.finding-box table.evidence")).to_be_visible()
    page.screenshot(path=str(tmp_path / "frozen-run-page.png"), full_page=True)
    summary.get_by_role("link", name=re.compile(r"Retry")).first.click()

    expect(page.locator("h1")).to_contain_text("Retry a node")
    expect(page.locator("table.preview-nodes")).to_contain_text("frozen")
    page.fill("textarea[name=reason]", "frozen in the C driver")
    page.get_by_role("button", name="Retry node").click()

    page.wait_for_url(re.compile(rf"/runs/{run.pk}/"))
    expect(page.locator(".messages")).to_contain_text("queued for a new attempt")
    # The worker stops the old attempt's process (asked, then killed after the grace)
    # and runs the new attempt itself: it is the only worker.
    wait_for(lambda: not psutil.pid_exists(horse), timeout=30, message="the old horse gone")
    expect(page.locator("#run-live .run-status")).to_contain_text("succeeded", timeout=60_000)
    second = NodeAttempt.objects.get(node_run__run=run, number=2)
    assert second.worker == worker.name and second.status == NodeAttempt.Status.SUCCEEDED
    assert NodeRun.objects.get(run=run).status == NodeRun.Status.SUCCEEDED
    page.screenshot(path=str(tmp_path / "frozen-fixed.png"), full_page=True)
    assert browser_errors == []
