"""The Logs page: search across runs by text, level, workflow, node, run and time window,
newest first, with capped counts by level and keyset pages."""

import html
import re
from datetime import datetime, timedelta
from urllib.parse import unquote

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.web.conftest import CHAIN, nodes, user_with, work
from workflows import log_search
from workflows.models import LogLine, NodeAttempt

pytestmark = pytest.mark.django_db

OTHER = {**CHAIN, "slug": "other", "name": "Other"}


def add_lines(run, key: str, *lines) -> NodeAttempt:
    """(minutes ago, level, message) lines for the node's current attempt, numbered on."""
    attempt = NodeAttempt.objects.filter(node_run=nodes(run)[key]).order_by("-number").first()
    start = LogLine.objects.filter(attempt=attempt).count()
    now = timezone.now()
    LogLine.objects.bulk_create(
        LogLine(
            attempt=attempt,
            seq=start + index,
            at=now - timedelta(minutes=minutes),
            level=level,
            message=message,
        )
        for index, (minutes, level, message) in enumerate(lines, start=1)
    )
    return attempt


@pytest.fixture
def logged(start_run):
    """Two workflows' runs with lines at every level, from 2 days to 10 minutes ago."""
    chain = start_run(CHAIN)
    work(chain, "a")
    work(chain, "b", fail="ValueError", message="bad row 501")
    add_lines(chain, "a", (180, "INFO", "reading input file"), (120, "WARNING", "slow disk"))
    add_lines(chain, "b", (30, "ERROR", "Error: bad row 501"), (29, "CRITICAL", "giving up"))
    other = start_run(OTHER)
    work(other, "a")
    add_lines(other, "a", (2 * 24 * 60, "DEBUG", "connecting"), (10, "INFO", "error budget fine"))
    return {"chain": chain, "other": other}


def found(client, query: str = "") -> list[str]:
    """The messages the Logs page lists, in its order."""
    page = client.get(f"/logs/{query}")
    assert page.status_code == 200, page.content[:300]
    cells = re.findall(r'<td class="msg">(.*?)</td>', page.content.decode(), re.S)
    return [html.unescape(re.sub(r"</?mark>", "", cell)) for cell in cells]


def test_text_search_ignores_case_and_lists_the_newest_first(operator_client, logged):
    assert found(operator_client, "?q=ERROR") == ["error budget fine", "Error: bad row 501"]
    page = operator_client.get("/logs/?q=error").content.decode()
    assert "<mark>Error</mark>: bad row 501" in page
    assert re.search(r"lines match\s+in the last 24 hours\.", page)


def test_level_is_at_least_the_level_chosen(operator_client, logged):
    assert found(operator_client, "?level=WARNING") == [
        "giving up",
        "Error: bad row 501",
        "slow disk",
    ]
    assert found(operator_client, "?level=ERROR") == ["giving up", "Error: bad row 501"]
    assert found(operator_client, "?level=critical") == ["giving up"]
    assert "Level at least" in operator_client.get("/logs/").content.decode()


def test_filters_by_workflow_node_and_run(operator_client, logged):
    chain, other = logged["chain"], logged["other"]
    assert found(operator_client, "?workflow=other") == ["error budget fine"]
    assert found(operator_client, "?node=b") == ["giving up", "Error: bad row 501"]
    assert found(operator_client, "?workflow=chain&node=a") == ["slow disk", "reading input file"]
    assert found(operator_client, f"?run={other.pk}&window=all") == [
        "error budget fine",
        "connecting",
    ]
    assert found(operator_client, f"?run={chain.pk}&node=a&level=WARNING") == ["slow disk"]


def test_the_time_window(operator_client, logged):
    assert found(operator_client, "?window=1h") == [
        "error budget fine",
        "giving up",
        "Error: bad row 501",
    ]
    assert found(operator_client, "?window=all")[-1] == "connecting"
    assert re.search(
        r"lines match\s+at any time\.", operator_client.get("/logs/?window=all").content.decode()
    )
    # Left out, "When" is the last 24 hours, and the form says so.
    page = operator_client.get("/logs/?q=e").content.decode()
    assert '<option value="24h" selected>Last 24 hours</option>' in page
    assert "connecting" not in found(operator_client)  # the last 24 hours by default
    now = timezone.localtime()
    since = (now - timedelta(minutes=190)).strftime("%Y-%m-%dT%H:%M")
    until = (now - timedelta(minutes=60)).strftime("%Y-%m-%dT%H:%M")
    assert found(operator_client, f"?since={since}&until={until}") == [
        "slow disk",
        "reading input file",
    ]


def test_counts_in_all_and_by_level(operator_client, logged):
    page = operator_client.get("/logs/").content.decode()
    assert re.search(r"<strong>5</strong> lines match", page)
    levels = re.findall(
        r'<li class="lvl-(\w+)"><span class="lvl">\w+</span> <span class="n">(\d+)', page
    )
    assert levels == [("critical", "1"), ("error", "1"), ("warning", "1"), ("info", "2")]
    page = operator_client.get("/logs/?q=bad+row").content.decode()
    assert re.search(r"<strong>1</strong> line matches", page)


def test_counting_stops_at_the_cap(operator_client, logged, monkeypatch):
    monkeypatch.setattr(log_search, "COUNT_CAP", 3)
    page = operator_client.get("/logs/").content.decode()
    assert "<strong>More than 3</strong> lines match" in page
    assert "counting stopped at 3" in page
    assert len(found(operator_client)) == 5  # the list is not capped, only the count


def test_keyset_pages_list_every_line_once_even_at_equal_times(
    operator_client, start_run, monkeypatch
):
    monkeypatch.setattr(log_search, "PAGE_SIZE", 3)
    run = start_run(CHAIN)
    work(run, "a")
    # Eight lines in the same millisecond: the id breaks the tie.
    attempt = NodeAttempt.objects.get(node_run=nodes(run)["a"])
    at = timezone.now() - timedelta(minutes=5)
    LogLine.objects.bulk_create(
        LogLine(attempt=attempt, seq=n, at=at, level="INFO", message=f"line {n}")
        for n in range(1, 9)
    )
    add_lines(run, "a", (1, "INFO", "line 9"), (50, "INFO", "line 10"))
    seen, query = [], "?q=line"
    while query is not None:
        page = operator_client.get(f"/logs/{query}").content.decode()
        seen += found(operator_client, query)
        older = re.search(r'rel="next" href="\?([^"]+)"', page)
        query = "?" + html.unescape(older.group(1)) if older else None
    assert seen == ["line 9", *[f"line {n}" for n in range(8, 0, -1)], "line 10"]


def test_a_line_links_to_its_run_node_attempt_and_log_page(operator_client, start_run):
    run = start_run(CHAIN)
    work(run, "a")
    attempt = NodeAttempt.objects.get(node_run=nodes(run)["a"])
    at = timezone.now()
    LogLine.objects.bulk_create(
        LogLine(attempt=attempt, seq=n, at=at, level="INFO", message=f"row {n}")
        for n in range(1, 251)
    )
    page = operator_client.get("/logs/?q=row+250").content.decode()
    assert f'href="/runs/{run.pk}/?node=a&amp;attempt=1&amp;log_page=2#log"' in page
    assert "attempt 1, line 250" in page


def test_messages_are_escaped(operator_client, start_run):
    run = start_run(CHAIN)
    work(run, "a", logs=["<script>alert('x')</script> error here"])
    page = operator_client.get("/logs/?q=ERROR").content.decode()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; <mark>error</mark> here" in page


def test_bad_input_says_so_and_shows_the_last_24_hours(operator_client, logged):
    page = operator_client.get("/logs/?level=LOUD&run=x&cursor=nonsense").content.decode()
    assert "Showing every line of the last 24 hours instead" in page
    assert "Level at least: Select a valid choice" in page
    assert len(re.findall(r'<td class="msg">', page)) == 5
    page = operator_client.get("/logs/?since=2026-01-02T00:00&until=2026-01-01T00:00").content
    assert "“From” must be before “To”." in page.decode()


def test_the_page_needs_the_view_permission(client, django_user_model, logged):
    assert client.get("/logs/").status_code == 302
    user_with(django_user_model, "nobody")
    nobody = Client()
    nobody.force_login(django_user_model.objects.get(username="nobody"))
    assert nobody.get("/logs/").status_code == 403
    assert 'href="/logs/"' not in nobody.get("/runs/", follow=True).content.decode()


def test_the_menu_links_to_logs_for_viewers(viewer_client, logged):
    page = viewer_client.get("/logs/").content.decode()
    assert '<a href="/logs/" aria-current="page">Logs</a>' in page


def test_the_page_runs_the_same_queries_however_many_lines(operator_client, logged, start_run):
    def count(url):
        with CaptureQueriesContext(connection) as captured:
            assert operator_client.get(url).status_code == 200
        return len(captured)

    urls = ["/logs/", "/logs/?q=error&workflow=chain&node=b&level=INFO&window=7d"]
    few = [count(url) for url in urls]
    for _ in range(3):
        run = start_run(CHAIN)
        work(run, "a", logs=[f"error {n}" for n in range(40)])
    assert [count(url) for url in urls] == few


def test_the_next_page_keeps_the_window_where_the_first_page_began(
    operator_client, start_run, monkeypatch
):
    monkeypatch.setattr(log_search, "PAGE_SIZE", 1)
    run = start_run(CHAIN)
    work(run, "a")
    add_lines(run, "a", (1, "INFO", "line 1"), (2, "INFO", "line 2"))
    before = timezone.now()
    page = operator_client.get("/logs/?q=line").content.decode()
    older = html.unescape(re.search(r'rel="next" href="\?([^"]+)"', page).group(1))
    query = dict(pair.split("=", 1) for pair in older.split("&"))
    assert "window" not in query
    since = datetime.fromisoformat(unquote(query["since"]))
    assert before - timedelta(hours=24, seconds=5) < since <= timezone.now() - timedelta(hours=24)
    assert found(operator_client, "?" + older) == ["line 2"]
