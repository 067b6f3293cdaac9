"""``manage.py search_logs``: the runbook's "grep -i error" and "count errors between 10:00
and 11:00" are one command each."""

from datetime import datetime, time, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tests.web.conftest import CHAIN, nodes, work
from workflows.models import LogLine, NodeAttempt

pytestmark = pytest.mark.django_db


def search_logs(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("search_logs", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def today_at(hour: int, minute: int, second: int = 0) -> datetime:
    today = timezone.localtime().date()
    return timezone.make_aware(datetime.combine(today, time(hour, minute, second)))


@pytest.fixture
def run(start_run):
    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError")
    return run


def add(run, key, *lines):
    """(moment, level, message) lines of the node's attempt."""
    attempt = NodeAttempt.objects.get(node_run=nodes(run)[key])
    LogLine.objects.bulk_create(
        LogLine(attempt=attempt, seq=seq, at=at, level=level, message=message)
        for seq, (at, level, message) in enumerate(lines, start=1)
    )


def test_grep_i_error(run):
    now = timezone.now()
    add(
        run,
        "a",
        (now - timedelta(minutes=50), "INFO", "connected"),
        (now - timedelta(minutes=40), "WARNING", "Retrying after an Error"),
    )
    add(
        run,
        "b",
        (now - timedelta(minutes=30), "ERROR", "Error: bad row 501\nin orders.csv"),
        (now - timedelta(days=3), "ERROR", "an error from three days ago"),
    )
    out, err = search_logs("error")
    lines = out.splitlines()
    assert len(lines) == 2
    # Oldest first, as grep prints a log file; a message's line breaks stay on its line.
    assert lines[0].endswith(f"WARNING  run {run.pk} chain a #1: Retrying after an Error")
    assert lines[1].endswith(
        f"ERROR    run {run.pk} chain b #1: Error: bad row 501\\nin orders.csv"
    )
    assert lines[1].startswith(timezone.localtime(now - timedelta(minutes=30)).isoformat()[:16])
    assert "2 matching lines from" in err
    out, _ = search_logs("error", "--since", "7d")
    assert "three days ago" in out.splitlines()[0]


def test_count_errors_between_10_and_11(run):
    add(
        run,
        "b",
        (today_at(9, 59, 59), "ERROR", "too early"),
        (today_at(10, 0), "ERROR", "at ten"),
        (today_at(10, 30), "INFO", "not an error"),
        (today_at(10, 45), "ERROR", "quarter to"),
        (today_at(10, 59, 59), "CRITICAL", "just in time"),
        (today_at(11, 0), "ERROR", "too late"),
    )
    out, _ = search_logs("--level", "error", "--since", "10:00", "--until", "11:00", "--count")
    lines = out.splitlines()
    assert lines[:2] == ["CRITICAL  1", "ERROR     2"]
    assert lines[2].startswith("total     3 (ERROR and above, from ")
    assert today_at(10, 0).isoformat(timespec="milliseconds") in lines[2]
    assert len(lines) == 3  # counts only, no log lines


def test_limit_prints_the_newest_lines_and_says_there_are_more(run):
    now = timezone.now()
    add(run, "a", *[(now - timedelta(minutes=10 - n), "INFO", f"step {n}") for n in range(1, 6)])
    out, err = search_logs("step", "--limit", "3")
    assert [line.rsplit(": ", 1)[1] for line in out.splitlines()] == ["step 3", "step 4", "step 5"]
    assert "3 matching lines" in err and "older ones" in err


def test_filters_by_workflow_node_and_run(run, start_run):
    now = timezone.now()
    add(run, "a", (now, "INFO", "from a"))
    add(run, "b", (now, "INFO", "from b"))
    out, _ = search_logs("from", "--workflow", "chain", "--node", "b", "--run", str(run.pk))
    assert [line.rsplit(": ", 1)[1] for line in out.splitlines()] == ["from b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "'yesterday' is not a moment: give a time today (10:00)"),
        (["--level", "loud"], "'LOUD' is not a level; use one of DEBUG, INFO"),
        (["--workflow", "nope"], "There is no workflow 'nope'; workflows: chain."),
        (["--since", "11:00", "--until", "10:00"], "must be before --until"),
        (["--limit", "0"], "--limit must be 1 or more."),
    ],
)
def test_bad_arguments_say_what_to_give(run, args, message):
    with pytest.raises(CommandError, match=None) as raised:
        search_logs(*args)
    assert message in str(raised.value)
