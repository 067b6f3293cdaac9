"""In real Chromium: the Workers page shows a real worker running a long node; "Stop current
node…", confirmed with a reason, fails the node and frees the worker."""

import re

import psutil
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import NODE_MODULES
from tests.conftest import wait_for
from tests.web.conftest import PASSWORD, user_with
from workflows import engine
from workflows.definitions import versioning
from workflows.models import NodeAttempt, NodeRun

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

LONG = """
name: Nightly export
nodes:
  export:
    type: test.sleep_first
    params: {seconds: 600}
    timeout: 900
    retries: {max_attempts: 3}
  publish:
    type: test.record
    after: [export]
"""


@pytest.fixture
def staff_operator(page, live_server, django_user_model):
    """Signed in through the login form as staff who may operate runs."""
    user = user_with(django_user_model, "olga", "view_run", "operate_run")
    user.is_staff = True
    user.save()
    page.goto(f"{live_server.url}/login/?next=/workers/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/workers/")
    return page


def test_stopping_a_workers_current_node_from_the_workers_page(
    staff_operator, live_server, start_worker, browser_errors, tmp_path
):
    page = staff_operator
    worker = start_worker(KEEL_NODE_MODULES=NODE_MODULES)
    run = engine.start_run(versioning.load_definition(LONG, actor="test").version, trigger="test")
    horse = wait_for(
        lambda: (
            NodeAttempt.objects.filter(node_run__run=run, status="running")
            .values_list("pid", flat=True)
            .first()
        ),
        message="the export node running",
    )

    # The table updates itself: the worker turns busy with the node, without a reload.
    row = page.locator(f'tr[data-worker="{worker.name}"]')
    expect(row).to_contain_text("busy", timeout=30_000)
    expect(row).to_contain_text(f"run #{run.pk}")
    expect(row).to_contain_text("export")
    page.screenshot(path=str(tmp_path / "workers-busy.png"), full_page=True)
    row.get_by_role("link", name=re.compile("Stop current node")).click()

    expect(page.locator("h1")).to_contain_text("Stop a running node")
    expect(page.locator("table.preview-nodes")).to_contain_text("is stopped and fails")
    page.fill("textarea[name=reason]", "exports the wrong day")
    page.get_by_role("button", name="Stop node").click()

    page.wait_for_url(re.compile(rf"/runs/{run.pk}/\?node=export"))
    expect(page.locator(".messages")).to_contain_text("Node export of run")
    expect(page.locator(".messages")).to_contain_text("failed and is not retried")
    expect(page.locator("main")).to_contain_text("stopped by olga: exports the wrong day")
    node = NodeRun.objects.get(run=run, node_key="export")
    assert (node.status, node.attempt) == ("failed", 1)
    wait_for(lambda: not psutil.pid_exists(horse), message="the work horse stopped")

    page.goto(f"{live_server.url}/workers/")
    expect(page.locator(f'tr[data-worker="{worker.name}"]')).to_contain_text("idle")
    expect(page.get_by_role("link", name=re.compile("Stop current node"))).to_have_count(0)
    page.screenshot(path=str(tmp_path / "workers-idle.png"), full_page=True)
    assert browser_errors == []
