"""GET /api/v1/logs and /logs/counts: the Logs page's search as data, keyset-paged."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from tests.api.conftest import CHAIN, Api, nodes, work
from workflows import log_search
from workflows.models import LogLine, NodeAttempt

pytestmark = pytest.mark.django_db


def add_lines(run, key, *lines):
    """(minutes ago, level, message) lines of the node's current attempt."""
    attempt = NodeAttempt.objects.get(node_run=nodes(run)[key])
    now = timezone.now()
    LogLine.objects.bulk_create(
        LogLine(attempt=attempt, seq=seq, at=now - timedelta(minutes=ago), level=lvl, message=m)
        for seq, (ago, lvl, m) in enumerate(lines, start=1)
    )


@pytest.fixture
def logged(start_run):
    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError")
    add_lines(run, "a", (90, "INFO", "reading"), (80, "WARNING", "slow ERROR-prone disk"))
    add_lines(run, "b", (30, "ERROR", "bad row 501"), (20, "INFO", "cleaning up"))
    return run


def messages(api, params=None) -> list[str]:
    response = api.get("logs", params)
    assert response.status_code == 200, response.content
    return [line["message"] for line in response.json()["results"]]


def test_lines_are_found_newest_first_with_where_they_come_from(api, logged):
    body = api.get("logs", {"q": "error"}).json()
    assert [line["message"] for line in body["results"]] == ["slow ERROR-prone disk"]
    line = body["results"][0]
    assert {k: line[k] for k in ("level", "seq", "run", "workflow", "node", "attempt")} == {
        "level": "WARNING",
        "seq": 2,
        "run": logged.pk,
        "workflow": "chain",
        "node": "a",
        "attempt": 1,
    }
    assert line["logs_url"] == f"http://testserver/api/v1/runs/{logged.pk}/nodes/a/logs?attempt=1"
    assert line["web_url"] == f"http://testserver/runs/{logged.pk}/?node=a&attempt=1#log"
    assert body["since"] and body["until"] is None


def test_filters_level_workflow_node_run_and_window(api, logged, start_run):
    assert messages(api, {"level": "warning"}) == ["bad row 501", "slow ERROR-prone disk"]
    assert messages(api, {"node": "b"}) == ["cleaning up", "bad row 501"]
    assert messages(api, {"workflow": "chain", "node": "a", "run": logged.pk}) == [
        "slow ERROR-prone disk",
        "reading",
    ]
    since = (timezone.now() - timedelta(minutes=85)).isoformat()
    until = (timezone.now() - timedelta(minutes=25)).isoformat()
    assert messages(api, {"since": since, "until": until}) == [
        "bad row 501",
        "slow ERROR-prone disk",
    ]
    # Without an offset, a moment is in the server's time zone (UTC in the tests).
    naive = timezone.localtime(timezone.now() - timedelta(minutes=25)).strftime("%Y-%m-%dT%H:%M:%S")
    assert messages(api, {"since": naive}) == ["cleaning up"]


def test_pages_follow_the_next_link_and_keep_the_window(api, logged):
    seen, response = [], api.get("logs", {"limit": 1})
    while True:
        body = response.json()
        seen += [line["message"] for line in body["results"]]
        if not body["next"]:
            break
        assert "since=" in body["next"] and "cursor=" in body["next"]
        response = api.get(body["next"].removeprefix("http://testserver"))
    assert seen == ["cleaning up", "bad row 501", "slow ERROR-prone disk", "reading"]


def test_counts_in_all_and_by_level_capped(api, logged, monkeypatch):
    body = api.get("logs/counts").json()
    assert body["total"] == 4 and body["capped"] is False
    assert body["by_level"] == {"ERROR": 1, "WARNING": 1, "INFO": 2}
    assert list(body["by_level"]) == ["ERROR", "WARNING", "INFO"]  # highest first
    body = api.get("logs/counts", {"level": "error"}).json()
    assert (body["total"], body["by_level"]) == (1, {"ERROR": 1})
    monkeypatch.setattr(log_search, "COUNT_CAP", 2)
    body = api.get("logs/counts").json()
    assert (body["total"], body["capped"], body["cap"]) == (2, True, 2)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"level": "LOUD"}, "level"),
        ({"workflow": "nope"}, "workflow"),
        ({"workflow": "Not A Slug"}, "workflow"),
        ({"cursor": "garbage"}, "cursor"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
        ({"limit": 501}, "limit"),
        ({"q": "a\x00b"}, "q"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(api, logged, params, field):
    response = api.get("logs", params)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == field


def test_the_search_needs_the_view_permission(logged, viewer_api, nobody, token_for):
    assert viewer_api.get("logs").status_code == 200
    assert Api(Client()).get("logs").status_code == 401
    assert Api(Client(), token_for(nobody)).get("logs/counts").status_code == 403
