"""The graph and the runs-by-nodes grid in real Chromium: a 50-shard fan-out reads as one
group with its counts, opens with a click, a failed shard is one more click away, the
fan-in is never cut off, and the grid's cells lead to that node of that run."""

import re

import pytest
from playwright.sync_api import expect

from tests.browser.test_run_page import WIDER_THAN_THE_SCREEN
from tests.web.conftest import work
from tests.web.test_graph_pages import fan_out

pytestmark = pytest.mark.django_db(transaction=True)

# Is the element's box inside the graph's scrolling box (seen without scrolling)?
INSIDE_THE_GRAPH_BOX = """
element => {
  const box = element.getBoundingClientRect();
  const wrap = element.closest('.dag-wrap').getBoundingClientRect();
  return box.left >= wrap.left - 1 && box.right <= wrap.right + 1
    && box.top >= wrap.top - 1 && box.bottom <= wrap.bottom + 1;
}
"""


@pytest.fixture
def fan_run(start_run):
    run = start_run(fan_out())
    for i in range(50):
        if i not in (17, 33):
            work(run, f"shard_{i:02d}")
    work(run, "shard_17", fail="ValueError", message="shard 17 is bad")
    work(run, "shard_33", fail="ValueError", message="shard 33 is bad")
    run.refresh_from_db()
    return run


def fits_the_screen(page, path: str) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{path} is {overflow}px too wide: {page.evaluate(WIDER_THAN_THE_SCREEN)}"


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_the_fan_out_folds_opens_and_leads_to_a_failed_shard(
    signed_in, live_server, fan_run, width, height, browser_errors
):
    page = signed_in
    page.set_viewport_size({"width": width, "height": height})
    page.goto(f"{live_server.url}/runs/{fan_run.pk}/")

    group = page.locator('g.dag-group[data-group="shard_00"]')
    expect(group).to_contain_text("shard_00…49")
    expect(group.locator(".dag-counts")).to_have_text("2 ✕ · 48 ✓")
    expect(group.locator("a.dag-link")).to_have_count(2)  # the failed shards, named
    combine = page.locator('a[data-node="combine"] rect')
    expect(combine).to_be_visible()
    assert combine.evaluate(INSIDE_THE_GRAPH_BOX), "the fan-in is cut off"
    fits_the_screen(page, "the run page")

    # Open the group: every shard, in a grid of chips; the fan-in comes after it.
    group.locator("a.dag-toggle").click()
    page.wait_for_url(re.compile(r"\?expand=shard_00#graph$"))
    expect(page.locator("g.dag-group.open g.dag-member")).to_have_count(50)
    expect(page.locator("g.dag-group.open")).to_contain_text("▾ fold into one box")
    fits_the_screen(page, "the run page with the group open")

    # One click on a failed shard opens its panel; the group stays open around it.
    page.locator('a.dag-link[data-node="shard_33"]').click()
    page.wait_for_url(re.compile(r"\?node=shard_33&expand=shard_00$"))
    expect(page.locator("#node h2")).to_contain_text("shard_33")
    expect(page.locator("#node")).to_contain_text("shard 33 is bad")
    expect(page.locator("g.dag-group.open g.dag-member.selected")).to_contain_text("shard_33")

    # Fold it again: the same node stays open and is named in the folded group.
    page.locator("g.dag-group a.dag-toggle").click()
    page.wait_for_url(re.compile(r"\?node=shard_33#graph$"))
    expect(page.locator("g.dag-group.open")).to_have_count(0)
    expect(page.locator("g.dag-group g.dag-member.selected")).to_contain_text("shard_33")
    assert browser_errors == []


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_the_workflow_page_grid_leads_to_a_node_of_a_run(
    signed_in, live_server, fan_run, start_run, width, height, browser_errors
):
    page = signed_in
    page.set_viewport_size({"width": width, "height": height})
    newer = start_run(fan_out())  # running: its shards are queued
    page.goto(f"{live_server.url}/workflows/fan/")
    fits_the_screen(page, "the workflow page")

    combine = page.locator('g.dag-node:has-text("combine") rect')
    expect(combine).to_be_visible()
    assert combine.evaluate(INSIDE_THE_GRAPH_BOX), "the fan-in is cut off"

    grid = page.locator("#grid table.run-matrix")
    expect(grid.locator("th.rm-run")).to_have_text(  # newest first
        [re.compile(rf"^#{newer.pk}\D"), f"#{fan_run.pk}✕"]
    )
    shards = grid.locator("tr.rm-group")
    expect(shards.locator("th")).to_contain_text("shard_00…49 \N{MULTIPLICATION SIGN}50")
    expect(shards.locator("td").nth(0)).to_have_text("50◔")
    expect(shards.locator("td").nth(1)).to_have_text("2✕48✓")
    expect(shards.locator("td a").nth(1)).to_have_attribute(
        "title", f"Run #{fan_run.pk} · shard_00…49: 2 failed, 48 succeeded"
    )

    shards.locator("td a").nth(1).click()
    page.wait_for_url(re.compile(rf"/runs/{fan_run.pk}/\?node=shard_17&expand=shard_00$"))
    expect(page.locator("#node h2")).to_contain_text("shard_17")
    expect(page.locator("g.dag-group.open g.dag-member.selected")).to_contain_text("shard_17")

    page.go_back()
    grid.locator("tr:has(th:text-is('combine')) td a").nth(1).click()
    page.wait_for_url(re.compile(rf"/runs/{fan_run.pk}/\?node=combine$"))
    expect(page.locator("#node h2")).to_contain_text("combine")
    assert browser_errors == []
