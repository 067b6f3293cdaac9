"""One attempt's log: downloaded as streamed text, and tailed live in the node panel while
the attempt runs (only the lines after the last one shown; stopped once it is over)."""

import re
import time
import tracemalloc
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from tests.web.conftest import CHAIN, nodes, user_with, work
from workflows import engine, log_search
from workflows.models import LogLine, NodeAttempt

pytestmark = pytest.mark.django_db


def running_attempt(run, key: str = "a") -> NodeAttempt:
    """Claim the node's attempt as a worker would, and leave it running."""
    node = nodes(run)[key]
    assert engine.claim_attempt(node.pk, node.attempt, worker="w-1", pid=4242, host="host-1")
    return NodeAttempt.objects.get(node_run=node, number=node.attempt)


def log(attempt, *messages, level="INFO", start: int = 1) -> None:
    at = timezone.now()
    LogLine.objects.bulk_create(
        LogLine(
            attempt=attempt, seq=seq, at=at + timedelta(milliseconds=seq), level=level, message=m
        )
        for seq, m in enumerate(messages, start=start)
    )


def url(run, what: str, key: str = "a", number: int = 1) -> str:
    suffix = "log.txt" if what == "download" else "log/tail/"
    return f"/runs/{run.pk}/nodes/{key}/attempts/{number}/{suffix}"


# --- Download ---------------------------------------------------------------------------------


def test_the_download_is_text_with_one_line_per_log_line(operator_client, start_run):
    run = start_run(CHAIN)
    attempt = running_attempt(run)
    log(
        attempt,
        "starting",
        'Traceback (most recent call last):\n  File "x"\nValueError',
        level="ERROR",
    )
    response = operator_client.get(url(run, "download"))
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-a-attempt-1.log"'
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert len(lines) == 2
    first = timezone.localtime(LogLine.objects.get(attempt=attempt, seq=1).at)
    assert lines[0] == f"{first.isoformat(timespec='milliseconds')} ERROR starting"
    assert lines[1].endswith(' ERROR Traceback (most recent call last):\\n  File "x"\\nValueError')


def test_a_big_log_streams_in_bounded_memory(operator_client, start_run):
    """100 000 lines of 500 characters (50 MB of text): the download's peak memory stays
    a few chunks, not the log."""
    run = start_run(CHAIN)
    attempt = running_attempt(run)
    count, width = 100_000, 500
    fill = {
        "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) "
        "SELECT %s, i, strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now'), 'INFO', "
        "substr(replace(hex(zeroblob(%s)), '0', 'x'), 1, %s) FROM n",
        "postgresql": "SELECT %s, i, now(), 'INFO', repeat('x', %s) "
        "FROM generate_series(1, %s) AS n(i)",
    }
    with connection.cursor() as cursor:
        insert = "INSERT INTO workflows_logline (attempt_id, seq, at, level, message) "
        if connection.vendor == "sqlite":
            cursor.execute(insert + fill["sqlite"], [count, attempt.pk, width, width])
        else:
            cursor.execute(insert + fill["postgresql"], [attempt.pk, width, count])

    response = operator_client.get(url(run, "download"))
    tracemalloc.start()
    try:
        received = lines = 0
        started = time.perf_counter()
        for chunk in response.streaming_content:
            received += len(chunk)
            lines += chunk.count(b"\n")
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        response.close()
    assert lines == count
    assert received > count * width
    assert peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for {received / 1e6:.0f} MB of log"
    print(f"\n{received / 1e6:.0f} MB streamed in {took:.1f}s, peak {peak / 1e6:.1f} MB")


def test_the_download_needs_the_view_permission_and_an_attempt(
    client, django_user_model, start_run
):
    run = start_run(CHAIN)
    running_attempt(run)
    assert client.get(url(run, "download")).status_code == 302
    user_with(django_user_model, "nobody")
    nobody = Client()
    nobody.force_login(django_user_model.objects.get(username="nobody"))
    assert nobody.get(url(run, "download")).status_code == 403
    viewer = Client()
    viewer.force_login(user_with(django_user_model, "vera", "view_run"))
    assert viewer.get(url(run, "download")).status_code == 200
    assert viewer.get(url(run, "download", number=2)).status_code == 404
    assert viewer.get(url(run, "download", key="zz")).status_code == 404


# --- Live tail --------------------------------------------------------------------------------


def tail(client, run, after: int):
    response = client.get(url(run, "tail"), {"after": after})
    body = response.content.decode()
    seqs = [int(n) for n in re.findall(r'<span class="seq">(\d+)</span>', body)]
    cursor = re.search(r'name="after" id="log-after-\d+" value="(\d+)" hx-swap-oob="true"', body)
    return response.status_code, seqs, int(cursor.group(1)) if cursor else None


def test_the_tail_sends_only_the_lines_after_the_last_one_shown(operator_client, start_run):
    run = start_run(CHAIN)
    attempt = running_attempt(run)
    log(attempt, "one", "two", "three")
    assert tail(operator_client, run, 0) == (200, [1, 2, 3], 3)
    assert tail(operator_client, run, 2) == (200, [3], 3)
    assert tail(operator_client, run, 3) == (200, [], 3)  # nothing new: the cursor stays
    log(attempt, "four", start=4)
    assert tail(operator_client, run, 3) == (200, [4], 4)


def test_the_tail_is_bounded(operator_client, start_run, monkeypatch):
    monkeypatch.setattr(log_search, "TAIL_LINES", 2)
    run = start_run(CHAIN)
    attempt = running_attempt(run)
    log(attempt, *[f"line {n}" for n in range(1, 6)])
    assert tail(operator_client, run, 0) == (200, [1, 2], 2)
    assert tail(operator_client, run, 2) == (200, [3, 4], 4)


def test_the_tail_stops_once_the_attempt_is_over_and_every_line_was_sent(
    operator_client, start_run
):
    run = start_run(CHAIN)
    attempt = running_attempt(run)
    log(attempt, "one", "two")
    engine.complete_attempt(attempt.node_run_id, attempt.number, {"ok": True})
    assert tail(operator_client, run, 0) == (286, [1, 2], 2)  # htmx: stop polling
    assert tail(operator_client, run, 2) == (286, [], 2)


def test_the_tail_of_a_signed_out_user_stops_quietly(client, start_run):
    run = start_run(CHAIN)
    running_attempt(run)
    response = client.get(url(run, "tail"), {"after": 0})
    assert response.status_code == 286 and response.content == b""


# --- In the node panel ------------------------------------------------------------------------


def test_a_running_attempts_log_has_a_download_link_and_a_live_tail(operator_client, start_run):
    run = start_run(CHAIN)
    attempt = running_attempt(run)
    log(attempt, "one", "two")
    page = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    assert f'<a href="{url(run, "download")}" download>' in page
    tail_box = re.search(r'<div class="log log-live"[^>]*>', page).group(0)
    assert f'id="log-live-{attempt.pk}"' in tail_box and "hx-preserve" in tail_box
    assert f'hx-get="{url(run, "tail")}"' in tail_box
    assert 'hx-trigger="every 2s"' in tail_box and 'hx-swap="beforeend"' in tail_box
    assert f'<input type="hidden" name="after" id="log-after-{attempt.pk}" value="2">' in page
    # It comes right after the log's heading and before the page's own copy of the lines.
    assert page.index('<h3 id="log">') < page.index("log-tools") < page.index("log-live")
    assert page.index("log-live") < page.index('<div class="log" role="log">')
    assert '<script src="/static/log_tail.js" defer></script>' in page


def test_no_tail_once_the_attempt_is_over_or_on_an_earlier_log_page(
    operator_client, start_run, monkeypatch
):
    run = start_run(CHAIN)
    work(run, "a", logs=["done"])
    page = operator_client.get(f"/runs/{run.pk}/?node=a").content.decode()
    assert f'href="{url(run, "download")}"' in page
    assert "log-live" not in page

    from dashboard import run_page

    monkeypatch.setattr(run_page, "LOG_PAGE_SIZE", 2)
    attempt = running_attempt(run, "b")
    log(attempt, "1", "2", "3")
    page = operator_client.get(f"/runs/{run.pk}/?node=b&log_page=1").content.decode()
    assert "log-live" not in page
    page = operator_client.get(f"/runs/{run.pk}/?node=b").content.decode()
    assert "log-live" in page and f'id="log-after-{attempt.pk}" value="3"' in page
