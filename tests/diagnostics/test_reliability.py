"""Reliability figures per workflow over a window: failure rate, MTBF, MTTD, MTTR, all
from the same failures, which stay failures after a resume."""

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


def make_run(
    version, status, *, finished_ago: float, took: float = 60, created_ago=None, failed_ago=None
) -> Run:
    """A run that ended ``finished_ago`` seconds before NOW after running ``took`` seconds;
    a failed one failed then, a resumed one (any status) ``failed_ago`` seconds before NOW."""
    finished = NOW - timedelta(seconds=finished_ago)
    if failed_ago is None and status == Run.Status.FAILED:
        failed_ago = finished_ago
    run = Run.objects.create(
        workflow=version.workflow,
        version=version,
        status=status,
        trigger="test",
        started_at=finished - timedelta(seconds=took),
        finished_at=finished,
        first_failed_at=NOW - timedelta(seconds=failed_ago) if failed_ago is not None else None,
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
    }
    make_run(version, Run.Status.SUCCEEDED, finished_ago=60)
    assert figures(version)["failure_rate"] == 0.0
    assert figures(version)["mtbf_seconds"] is None


def test_a_resumed_run_stays_a_failure_and_its_repair_is_its_own_success(version):
    make_run(version, Run.Status.SUCCEEDED, finished_ago=3000, failed_ago=3600)  # resumed
    make_run(version, Run.Status.SUCCEEDED, finished_ago=100)
    result = figures(version)
    assert (result["runs_failed"], result["runs_resumed"], result["runs_succeeded"]) == (1, 1, 1)
    assert result["failure_rate"] == 0.5
    assert (result["mttr_seconds"], result["mttr_samples"], result["unrestored"]) == (600.0, 1, 0)
    assert result["display"]["mtbf"] != "no failures"


def test_detect_times_come_from_the_same_failures(version, make_version):
    def failure(finished_ago: float, unseen: float | None, *, seen_after_failure=False):
        run = make_run(version, Run.Status.FAILED, finished_ago=finished_ago)
        if unseen is not None:
            seen = run.first_failed_at + timedelta(seconds=5 if seen_after_failure else -60)
            make_finding(
                run=run,
                evidence={"since": (seen - timedelta(seconds=unseen)).isoformat()},
                first_seen=seen,
                last_seen=seen,
            )
        return run

    failure(3000, unseen=40)  # hung: the watchdog saw it 40 s after it stopped
    failure(2000, unseen=None)  # raised: known as it happened
    failure(1000, unseen=900, seen_after_failure=True)  # seen after it failed: not its cause
    # Another workflow's failures and findings count in neither figure.
    other = make_run(make_version(OTHER), Run.Status.FAILED, finished_ago=500)
    make_finding(run=other, evidence={"since": (NOW - timedelta(days=1)).isoformat()})
    result = figures(version)
    assert result["mttd_seconds"] == pytest.approx(40 / 3) and result["mttd_samples"] == 3
    assert result["display"]["mttd"] == "13s"
    make_run(version, Run.Status.SUCCEEDED, finished_ago=0)
    result = figures(version)
    assert result["mttr_seconds"] == 2000.0  # (3000 + 2000 + 1000) / 3
    assert result["recovery_seconds"] == pytest.approx(2000 + 40 / 3), "detect + repair, one figure"


def test_failed_resumed_and_succeeded_through_the_engine_counts_one_failure(start_run):
    from tests.web.conftest import CHAIN, work
    from workflows import operations

    run = start_run(CHAIN)
    work(run, "a")
    work(run, "b", fail="ValueError")
    operations.resume_run(run.pk, actor="test", reason="fixed the input")
    work(run, "b")
    work(run, "c")
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.first_failed_at is not None
    result = reliability.workflow_reliability(run.workflow)
    assert (result["runs_failed"], result["runs_resumed"], result["runs_succeeded"]) == (1, 1, 0)
    assert result["failure_rate"] == 1.0
    assert result["mttr_samples"] == 1 and result["mttr_seconds"] > 0
    assert result["mttd_seconds"] == 0.0  # b raised: Keel knew at once


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
    assert (result["mttr_seconds"], result["mttr_samples"]) == (1200.0, 2)
    assert result["unrestored"] == 0


def test_a_success_at_the_same_moment_does_not_restore_a_failure(version):
    make_run(version, Run.Status.FAILED, finished_ago=600)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=600)
    result = figures(version)
    assert (result["mttr_samples"], result["unrestored"]) == (0, 1)


def test_a_failure_in_the_window_is_restored_by_a_success_after_it(version):
    make_run(version, Run.Status.FAILED, finished_ago=8 * DAY)  # before the window: not counted
    make_run(version, Run.Status.FAILED, finished_ago=3600)
    make_run(version, Run.Status.SUCCEEDED, finished_ago=-600)  # after the window's end
    result = figures(version)
    assert (result["mttr_seconds"], result["mttr_samples"]) == (4200.0, 1)
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
    assert (result["runs_failed"], result["mttr_samples"], result["mttd_samples"]) == (20, 20, 20)
    assert result["mttr_seconds"] == 300.0 and result["mttd_seconds"] == 10.0
    assert len(many) == len(few) == 3


def test_the_partial_renders_the_figures_without_queries(version):
    make_run(version, Run.Status.SUCCEEDED, finished_ago=120)
    make_run(version, Run.Status.FAILED, finished_ago=60)
    result = figures(version, "30d")
    with CaptureQueriesContext(connection) as queries:
        html = render_to_string("dashboard/_reliability.html", {"reliability": result})
    assert len(queries) == 0
    assert "50.0%" in html and "1 failed, 1 succeeded" in html
    assert 'href="?window=7d#reliability"' in html
    assert 'class="current" aria-current="true">30d</a>' in html
    assert "Mean time between failures" in html and "Mean time to repair" in html
    assert "over the same 1 failure" in html and "1 repaired" not in html  # none followed
