"""Reliability figures of one workflow over a window: how often it fails, how fast we notice
and how fast it comes back, all from the same failures.

* failures — the workflow's runs that failed in the window (``Run.first_failed_at``): a
  run that failed counts even after an operator resumed it and it succeeded; a run counts
  once however often it failed.
* failure rate — failures / (failures + runs that succeeded in the window without failing
  in it). Cancelled runs are an operator's choice, not a failure, and count in neither.
* MTBF — mean time between failures: the time observed in the window (from its start, or
  the workflow's first run if later, to its end) divided by the failures.
* MTTD — mean time to detect, over the failures: for each, how long its cause went unseen,
  from the run's first finding that says when its condition began (``began_at``) and was
  seen by the time the run failed: first_seen - began_at. A failure with no such finding
  was reported by the node itself as it happened: 0.
* MTTR — mean time to repair, over the failures followed by a success: from the failure to
  the end of the workflow's next succeeded run (the same run, when resumed). Failures not
  yet followed by one are ``unrestored``.
* recovery time — MTTD + MTTR, as one figure.
* λ — the failure rate in time, 1 / MTBF, given per day.

Three queries, however many runs fail: the runs that finished in the window by status
(run_workflow_finished), the failures (run_workflow_failed) with their detect and repair
times (for each, one seek into run_workflow_succeeded and one into the run's findings), and
the workflow's first run.
"""

from datetime import timedelta

from django.db.models import (
    Avg,
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    Min,
    OuterRef,
    Q,
    Subquery,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from diagnostics.models import Finding
from workflows.models import Run, Workflow

WINDOWS = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
DEFAULT_WINDOW = "7d"
DAY_SECONDS = 24 * 3600


def with_known_start(findings):
    """The findings whose evidence says when their condition began, annotated ``began``."""
    return findings.filter(began_at__isnull=False).annotate(began=F("began_at"))


def parse_window(value: str | None) -> str:
    """A known window name ("24h", "7d", "30d", "90d"); anything else is the default."""
    return value if value in WINDOWS else DEFAULT_WINDOW


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    hours = minutes / 60
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def _seconds(value) -> float | None:
    return value.total_seconds() if value is not None else None


def _duration(end, start) -> ExpressionWrapper:
    return ExpressionWrapper(end - start, output_field=DurationField())


def workflow_reliability(workflow: Workflow, *, window: str = DEFAULT_WINDOW, now=None) -> dict:
    """The figures for ``workflow`` over the named window ending ``now``."""
    window = parse_window(window)
    now = now or timezone.now()
    start = now - WINDOWS[window]
    runs = _finished_runs(workflow, start, now)
    failures = _failures(workflow, start, now)
    failed = failures["failed"]
    judged = failed + runs["succeeded"]
    failure_rate = failed / judged if judged else None

    first_run = Run.objects.filter(workflow=workflow).aggregate(first=Min("created_at"))["first"]
    observed_from = max(start, first_run) if first_run else None
    observed = (now - observed_from).total_seconds() if observed_from else 0.0
    mtbf = observed / failed if failed else None

    mttd, mttr = _seconds(failures["mttd"]), _seconds(failures["mttr"])
    recovery = mttd + mttr if mttd is not None and mttr is not None else None
    per_day = DAY_SECONDS / mtbf if mtbf else None

    figures = {
        "workflow": workflow.slug,
        "window": window,
        "windows": list(WINDOWS),
        "since": start,
        "until": now,
        "runs_finished": runs["finished"],
        "runs_failed": failed,
        "runs_resumed": failures["resumed"],
        "runs_succeeded": runs["succeeded"],
        "runs_cancelled": runs["cancelled"],
        "failure_rate": failure_rate,
        "observed_seconds": observed,
        "mtbf_seconds": mtbf,
        "mttd_seconds": mttd,
        "mttd_samples": failed,
        "mttr_seconds": mttr,
        "mttr_samples": failures["restored"],
        "recovery_seconds": recovery,
        "failures_per_day": per_day,
        "unrestored": failed - failures["restored"],
    }
    figures["display"] = {
        "failure_rate": f"{failure_rate:.1%}" if failure_rate is not None else "—",
        "mtbf": format_duration(mtbf) if mtbf is not None else "no failures",
        "mttd": format_duration(mttd),
        "mttr": format_duration(mttr),
        "recovery": format_duration(recovery),
        "lambda": f"{per_day:.3g} / day" if per_day is not None else "—",
    }
    return figures


def _finished_runs(workflow: Workflow, start, now) -> dict:
    """Runs finished in the window by status; a success counts only if the run did not
    fail in the window too (it is a failure, resumed). From run_workflow_finished."""
    failed_in_window = Q(first_failed_at__gt=start, first_failed_at__lte=now)
    return Run.objects.filter(
        workflow=workflow, finished_at__gt=start, finished_at__lte=now
    ).aggregate(
        finished=Count("pk"),
        succeeded=Count("pk", filter=Q(status=Run.Status.SUCCEEDED) & ~failed_in_window),
        cancelled=Count("pk", filter=Q(status=Run.Status.CANCELLED)),
    )


def _failures(workflow: Workflow, start, now) -> dict:
    """The window's failures, how long each went unseen and how long until the workflow
    succeeded again, averaged in one query (see the module's docstring)."""
    failed_at = OuterRef("first_failed_at")
    next_success = (
        Run.objects.filter(
            workflow=workflow, status=Run.Status.SUCCEEDED, finished_at__gt=failed_at
        )
        .order_by("finished_at")
        .values("finished_at")[:1]
    )
    unseen = (
        Finding.objects.filter(
            run=OuterRef("pk"), began_at__isnull=False, first_seen__lte=failed_at
        )
        .order_by("first_seen")
        .annotate(unseen=_duration(F("first_seen"), F("began_at")))
        .values("unseen")[:1]
    )
    return (
        Run.objects.filter(workflow=workflow, first_failed_at__gt=start, first_failed_at__lte=now)
        .annotate(
            restored_at=Subquery(next_success, output_field=DateTimeField()),
            unseen=Coalesce(Subquery(unseen, output_field=DurationField()), Value(timedelta(0))),
        )
        .aggregate(
            failed=Count("pk"),
            resumed=Count("pk", filter=~Q(status=Run.Status.FAILED)),
            restored=Count("restored_at"),
            mttd=Avg("unseen"),
            mttr=Avg(_duration(F("restored_at"), F("first_failed_at"))),
        )
    )
