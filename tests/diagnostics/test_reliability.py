"""Reliability figures per workflow over a window: failure rate, MTBF, MTTD, MTTR."""

from datetime import timedelta

import pytest
from django.db import connection
from django.template.loader import render_to_string
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnostics import reliability
from tests.diagnostics.test_pages import make_finding
from workflows.models import Run

pytestmark = pytest.mark.django_db

DEFINITION = {"name": "Nightly", "nodes": {"a": {"type": "keel.noop"}}}
OTHER = {"name": "Other", "nodes": {"a": {"type": "keel.noop"}}}
NOW = timezone.now().replace(microsecond=0)


@pytest.fixture
def version(make_version):
    return make_version(DEFINITION)


def make_run(version, status, *, finished_ago: float, took: float = 60, created_ago=None) -> Run:
    """A run that ended ``finished_ago`` seconds before NOW after running ``took`` seconds."""
    finished = NOW - timedelta(seconds=finished_ago)
    run = Run.objects.create(
        workflow=version.workflow,
        version=version,
        status=status,
        trigger="test",
        started_at=finished - timedelta(seconds=took),
        finished_at=finished,
    )
    created = NOW - timedelta(
        seconds=created_ago if created_ago is not None else finished_ago + took
    )
    Run.objects.filter(pk=run.pk).update(created_at=created)
    return run


def figures(version, window="7d"):
    return reliability.workflow_reliability(version.workflow, window=window, now=NOW)


DAY = 24 * 3600


def test_failure_rate_is_failed_among_succeeded_and_failed_runs_of_the_window(version):
    for ago in (100, 200, 300):
        make_run(version, Run.Status.SUCCEEDED, finished_ago=ago)
    make_run(version, Run.Status.FAILED, finished_ago=400)
    make_run(version, Run.Status.CANCELLED, finished_ago=500)
    make_run(version, Run.Status.FAILED, finished_ago=8 * DAY)  # before the 7-day window
    result = figures(version)
    assert result["runs_finished"] == 5
    assert (result["runs_succeeded"], result["runs_failed"], result["runs_cancelled"]) == (3, 1, 1)
    assert result["failure_rate"] == 0.25
    assert result["display"]["failure_rate"] == "25.0%"
    assert figures(version, "30d")["failure_rate"] == 2 / 5


def test_mtbf_is_the_observed_time_over_the_failures(version):
    make_run(version, Run.Status.SUCCEEDED, finished_ago=2 * DAY - 60, created_ago=2 * DAY)
    make_run(version, Run.Status.FAILED, finished_ago=DAY + 3600)
    make_run(version, Run.Status.FAILED, finished_ago=3600)
    # The workflow's first run was two days ago: a 7-day window observed it for two days.
    week = figures(version, "7d")
    assert week["observed_seconds"] == 2 * DAY
    assert week["mtbf_seconds"] == DAY
    assert week["display"]["mtbf"] == "24.0 h"
    assert week["failures_per_day"] == 1.0 and week["display"]["lambda"] == "1 / day"
    # Over the last 24 hours: one failure in 24 hours.
    assert figures(version, "24h")["mtbf_seconds"] == DAY


def test_without_runs_or_failures_there_is_nothing_to_divide(version):
    empty = figures(version)
    assert empty["failure_rate"] is None and empty["mtbf_seconds"] is None
    assert empty["display"] == {
        "failure_rate": "—",
        "mtbf": "no failures",
        "mttd": "—",
        "mttr": "—",
        "recovery": "—",
        "lambda": "—",
        "restore": "—",
    }
    make_run(version, Run.Status.SUCCEEDED, finished_ago=60)
    assert figures(version)["failure_rate"] == 0.0
    assert figures(version)["mtbf_seconds"] is None


def test_detect_and_recover_times_come_from_the_workflow_findings(version, make_version):
    run = make_run(version, Run.Status.FAILED, finished_ago=600)
    first_seen = NOW - timedelta(seconds=900)

    def finding(since_before=None, resolved_after=None, run=run, **fields):
        evidence = {"worker": "w1"}
        if since_before is not None:
            evidence["since"] = (first_seen - timedelta(seconds=since_before)).isoformat()
        return make_finding(
            run=run,
            evidence=evidence,
            first_seen=first_seen,
            last_seen=first_seen,
            resolved_at=first_seen + timedelta(seconds=resolved_after)
            if resolved_after is not None
            else None,
            **fields,
        )

    finding(since_before=4, resolved_after=30)
    finding(since_before=6)  # still open: detected, not yet recovered
    finding(resolved_after=90)  # nobody knows when it began: recovered, detection unknown
    make_finding(run=run, evidence={"since": "a while ago"}, first_seen=first_seen)  # skipped
    other = make_run(make_version(OTHER), Run.Status.FAILED, finished_ago=600)
    finding(since_before=500, resolved_after=5000, run=other)  # another workflow's
    result = figures(version)
    assert (result["mttd_seconds"], result["mttd_samples"]) == (5.0, 2)
    assert (result["mttr_seconds"], result["mttr_samples"]) == (60.0, 2)
    assert result["display"]["mttd"] == "5.0s"
    assert result["display"]["mttr"] == "1.0 min"
    assert result["recovery_seconds"] == 65.0, "detect + recover, one figure"
    assert result["display"]["recovery"] == "1.1 min"


def test_time_to_restore_runs_from_a_failure_to_the_next_success(version):
    make_run(version, Run.Status.FAILED, finished_ago=3 * 3600)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=3 * 3600 - 600)  # 10 min later
    make_run(version, Run.Status.SUCCEEDED, finished_ago=3600)
    make_run(version, Run.Status.FAILED, finished_ago=60)  # not followed by a success yet
    result = figures(version)
    assert (result["restore_seconds"], result["restore_samples"]) == (600.0, 1)
    assert result["unrestored"] == 1


def test_an_unknown_window_falls_back_to_the_default(version):
    assert reliability.parse_window("1y") == reliability.DEFAULT_WINDOW == "7d"
    assert reliability.parse_window(None) == "7d"
    assert figures(version, "1y")["window"] == "7d"


def test_each_failure_counts_until_the_first_success_after_it(version):
    make_run(version, Run.Status.FAILED, finished_ago=3600)
    make_run(version, Run.Status.CANCELLED, finished_ago=3000)  # neither failure nor success
    make_run(version, Run.Status.FAILED, finished_ago=2400)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=1800)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=600)
    result = figures(version)
    # 3600 - 1800 and 2400 - 1800 seconds: both end at the first success after them.
    assert (result["restore_seconds"], result["restore_samples"]) == (1200.0, 2)
    assert result["unrestored"] == 0


def test_a_success_at_the_same_moment_does_not_restore_a_failure(version):
    make_run(version, Run.Status.FAILED, finished_ago=600)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=600)
    result = figures(version)
    assert (result["restore_samples"], result["unrestored"]) == (0, 1)


def test_a_failure_in_the_window_is_restored_by_a_success_after_it(version):
    make_run(version, Run.Status.FAILED, finished_ago=8 * DAY)  # before the window: not counted
    make_run(version, Run.Status.FAILED, finished_ago=3600)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=-600)  # after the window's end
    result = figures(version)
    assert (result["restore_seconds"], result["restore_samples"]) == (4200.0, 1)
    assert (result["runs_failed"], result["runs_succeeded"]) == (1, 0)


def failures_with_findings(version, count: int) -> None:
    """``count`` failed runs, each followed by a success and with a resolved finding."""
    for index in range(count):
        run = make_run(version, Run.Status.FAILED, finished_ago=DAY + index * 600)
        make_run(version, Run.Status.SUCCEEDED, finished_ago=DAY + index * 600 - 300)
        first_seen = run.finished_at - timedelta(seconds=120)
        make_finding(
            run=run,
            evidence={"since": (first_seen - timedelta(seconds=10)).isoformat()},
            first_seen=first_seen,
            last_seen=run.finished_at,
            resolved_at=run.finished_at,
        )


def test_figures_cost_three_queries_however_many_runs_fail(version):
    failures_with_findings(version, 4)
    with CaptureQueriesContext(connection) as few:
        assert figures(version)["runs_failed"] == 4
    failures_with_findings(version, 16)
    with CaptureQueriesContext(connection) as many:
        result = figures(version)
    assert (result["runs_failed"], result["restore_samples"], result["mttr_samples"]) == (
        20,
        20,
        20,
    )
    assert result["restore_seconds"] == 300.0 and result["mttd_seconds"] == 10.0
    assert len(many) == len(few) == 3


def test_the_partial_renders_the_figures_without_queries(version):
    make_run(version, Run.Status.SUCCEEDED, finished_ago=120)
    make_run(version, Run.Status.FAILED, finished_ago=60)
    result = figures(version, "30d")
    with CaptureQueriesContext(connection) as queries:
        html = render_to_string("dashboard/_reliability.html", {"reliability": result})
    assert len(queries) == 0
    assert "50.0%" in html and "1 failed of 2 finished" in html
    assert 'href="?window=7d#reliability"' in html
    assert 'class="current" aria-current="true">30d</a>' in html
    assert "Mean time between failures" in html and "Mean time to recover" in html
