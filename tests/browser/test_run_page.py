"""The run page in real Chromium: its "… ago" times stay true after polling stops, and
it fits a phone (nothing wider than the screen) as well as a laptop."""

import pytest

from tests.web.conftest import CHAIN, work
from workflows import operations

pytestmark = pytest.mark.django_db(transaction=True)


# What sticks out of the screen outside any scrolling box, to say what to fix.
WIDER_THAN_THE_SCREEN = """
[...document.querySelectorAll('body *')].filter(element => {
  if (element.getBoundingClientRect().right <= window.innerWidth + 1) return false;
  for (let up = element.parentElement; up && up !== document.body; up = up.parentElement) {
    if (getComputedStyle(up).overflowX !== 'visible') return false;
  }
  return true;
}).slice(0, 5).map(element => element.tagName + '.' + (element.className.baseVal ?? element.className))
"""


@pytest.fixture
def failed_run(start_run):
    run = start_run(CHAIN)
    work(run, "a", checkpoint={"offset": 100, "file": "orders.csv"})
    work(run, "b", checkpoint={"offset": 7}, fail="ValueError", message="bad row 501 " * 20)
    run.refresh_from_db()
    return run


def test_times_keep_counting_after_the_page_stops_polling(
    signed_in, live_server, failed_run, browser_errors
):
    page = signed_in
    page.goto(f"{live_server.url}/runs/{failed_run.pk}/")
    assert page.locator("#run-live[hx-get]").count() == 0  # finished: nothing polls
    finished = page.locator(".facts time[data-ago]").last
    before = finished.inner_text()
    assert before.endswith("s ago"), before

    # Rewritten in the page from the moment it carries, with no request to the server.
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.wait_for_function(
        "before => document.querySelectorAll('.facts time[data-ago]')[1].textContent !== before",
        arg=before,
        timeout=15_000,
    )
    assert finished.inner_text().endswith("s ago")
    assert int(finished.inner_text().split("s")[0]) > int(before.split("s")[0])
    assert requests == []
    assert browser_errors == []


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_the_run_pages_fit_the_screen(
    signed_in, live_server, failed_run, width, height, browser_errors
):
    page = signed_in
    page.set_viewport_size({"width": width, "height": height})
    operations.retry_node(failed_run.pk, "b", actor="test", reason="once more " * 30)
    work(failed_run, "b", checkpoint={"offset": 9}, fail="ValueError", message="still bad")
    for path in (
        f"/runs/{failed_run.pk}/",
        f"/runs/{failed_run.pk}/?node=a",
        f"/runs/{failed_run.pk}/rollback/preview/",
        f"/runs/{failed_run.pk}/resume/preview/",
        "/runs/",
    ):
        page.goto(f"{live_server.url}{path}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        wide = page.evaluate(WIDER_THAN_THE_SCREEN)
        assert overflow <= 0, f"{path} is {overflow}px wider than a {width}px screen: {wide}"
    assert browser_errors == []
