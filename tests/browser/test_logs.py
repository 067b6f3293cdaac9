"""In real Chromium with a real worker: a running node's log is tailed live in its panel
(new lines appear without a reload, none twice, while the run page's own 2-second refresh
goes on around it), its log downloads as text, and the Logs page finds its error line."""

import re

import pytest
from playwright.sync_api import expect

import tests.browser.log_nodes  # noqa: F401  (registers browser.log_when_told here)
from tests.browser.conftest import NODE_MODULES
from tests.conftest import finished, wait_for
from workflows import engine
from workflows.definitions import versioning
from workflows.models import LogLine, NodeAttempt, Run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

DEFINITION = """
name: Slow logger
slug: slow-logger
nodes:
  talk:
    type: browser.log_when_told
    params: {{gate: "{gate}", lines: 3}}
    timeout: 300
"""

# Counts the page's htmx swaps by what they replaced: the run page's refresh (#run-live)
# and the tail (its log box). Installed from the test, not shipped.
COUNT_SWAPS = """
window.swaps = {refresh: 0, tail: 0};
document.addEventListener("htmx:afterSwap", (event) => {
  const target = event.detail.target;
  if (target.classList.contains("log-live")) window.swaps.tail += 1;
  else if (target.id === "run-live" || !document.body.contains(target)) window.swaps.refresh += 1;
});
"""


def shown_seqs(page) -> list[int]:
    return [int(text) for text in page.locator("#node .log-live .seq").all_inner_texts()]


def test_a_running_nodes_log_is_tailed_live_and_the_logs_page_finds_its_error(
    signed_in, live_server, start_worker, browser_errors, tmp_path
):
    page = signed_in
    start_worker(KEEL_NODE_MODULES=f"{NODE_MODULES},tests.browser.log_nodes")
    gate = tmp_path / "gate"
    gate.mkdir()
    version = versioning.load_definition(DEFINITION.format(gate=gate), actor="test").version
    run = engine.start_run(version, trigger="test")
    wait_for(
        lambda: LogLine.objects.filter(attempt__node_run__run=run, seq=1).exists(),
        message="the node's first line stored",
    )
    tail_answers: list[int] = []
    page.on(
        "response",
        lambda response: "/log/tail/" in response.url and tail_answers.append(response.status),
    )

    page.goto(f"{live_server.url}/runs/{run.pk}/?node=talk")
    live_box = page.locator("#node .log-live")
    expect(live_box).to_contain_text("line 1: working")
    expect(page.locator("#node .log-tools")).to_contain_text("live tail")
    # The page's own copy of the lines hides behind the tail: each line shows once.
    expect(page.locator("#node .log-live + .log")).to_be_hidden()
    page.evaluate(COUNT_SWAPS)
    page.evaluate("document.querySelector('#node .log-live').keelMark = 'same box'")

    for number in (2, 3):
        (gate / f"go-{number}").touch()
        expect(live_box).to_contain_text(f"line {number}:", timeout=20_000)
    # The run page refreshed meanwhile, and the box with its lines lived through it.
    wait_for(lambda: page.evaluate("window.swaps.refresh") >= 2, message="two page refreshes")
    assert page.evaluate("document.querySelector('#node .log-live').keelMark") == "same box"
    assert page.evaluate("window.swaps.tail") >= 1
    assert 200 in tail_answers
    assert shown_seqs(page) == [1, 2, 3]
    expect(page.locator("#node .log-live .log-line.lvl-error")).to_contain_text("could not parse")
    page.screenshot(path=str(tmp_path / "tail-live.png"), full_page=True)

    # Finished: the tail stops, and the panel shows the log as a finished attempt's.
    (gate / "finish").touch()
    assert finished(run).status == Run.Status.SUCCEEDED
    expect(page.locator("#run-live .run-status")).to_contain_text("succeeded", timeout=20_000)
    expect(page.locator("#node .log-live")).to_have_count(0)
    expect(page.locator("#node .log")).to_contain_text("line 3: could not parse")
    assert page.locator("#node .log .log-line").count() == 3

    # The download link gives the whole log as text.
    download = page.locator("#node .log-tools a[download]")
    expect(download).to_have_text(re.compile(r"Download attempt 1.s log"))
    answer = page.request.get(live_server.url + download.get_attribute("href"))
    assert answer.status == 200 and answer.headers["content-type"] == "text/plain; charset=utf-8"
    text = answer.text().splitlines()
    assert [line.split(" ", 2)[1] for line in text] == ["INFO", "INFO", "ERROR"]

    # The Logs page finds the error line, and its link opens the node's log.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Logs").click()
    page.get_by_label("Text").fill("could not PARSE")
    page.get_by_label("Level at least").select_option("ERROR")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(".result-count")).to_contain_text("1 line matches")
    row = page.locator("table.log-results tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("line 3: could not parse row 7")
    expect(row.locator("mark")).to_have_text("could not parse")
    expect(row).to_contain_text("slow-logger")
    page.screenshot(path=str(tmp_path / "logs-page.png"), full_page=True)
    row.get_by_role("link", name=f"run #{run.pk}").click()
    page.wait_for_url(re.compile(rf"/runs/{run.pk}/\?node=talk&attempt=1&log_page=1#log"))
    expect(page.locator("#node .log")).to_contain_text("could not parse row 7")
    attempt = NodeAttempt.objects.get(node_run__run=run)
    assert attempt.status == NodeAttempt.Status.SUCCEEDED
    assert browser_errors == []
