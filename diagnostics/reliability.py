"""Reliability figures of one workflow over a window: how often it fails, how fast we notice
and how fast it comes back.

* failure rate — failed runs / (succeeded + failed) among runs that finished in the window
  (cancelled runs are an operator's choice, not a failure, and count in neither).
* MTBF — mean time between failures: the time observed in the window (from its start, or
  the workflow's first run if later, to its end) divided by the failed runs in it.
* MTTD — mean time to detect: over findings about the workflow's runs first seen in the
  window whose evidence says when the condition began (``evidence["since"]``, ISO 8601),
  the mean of first_seen - since.
* MTTR — mean time to recover: over those findings resolved in the window, the mean of
  resolved_at - first_seen.
* recovery time — MTTD + MTTR, as one figure (when both are known).
* λ — the failure rate in time, 1 / MTBF, given per day.
* time to restore — from run history: for each failed run in the window, the time from
  its end to the end of the workflow's next succeeded run (failures not yet followed by a
  success are counted in ``unrestored``).

Three aggregate queries, however many runs fail: the runs that finished in the window
(counts, and each failure's next success by a window function; from the run_workflow_finished
index alone), the workflow's first run, and the findings first seen or resolved in the
window (detect and recover times together). Each reads the window's rows once.
"""

from datetime import timedelta

from django.db.models import (
    Avg,
    Case,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Min,
    Q,
    When,
    Window,
)
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
    runs = _run_figures(workflow, start, now)
    judged = runs["failed"] + runs["succeeded"]
    failure_rate = runs["failed"] / judged if judged else None

    first_run = Run.objects.filter(workflow=workflow).aggregate(first=Min("created_at"))["first"]
    observed_from = max(start, first_run) if first_run else None
    observed = (now - observed_from).total_seconds() if observed_from else 0.0
    mtbf = observed / runs["failed"] if runs["failed"] else None

    findings = _finding_figures(workflow, start, now)
    restore = _seconds(runs["restore"])
    mttd, mttr = _seconds(findings["mttd"]), _seconds(findings["mttr"])
    recovery = mttd + mttr if mttd is not None and mttr is not None else None
    per_day = DAY_SECONDS / mtbf if mtbf else None

    figures = {
        "workflow": workflow.slug,
        "window": window,
        "windows": list(WINDOWS),
        "since": start,
        "until": now,
        "runs_finished": runs["finished"],
        "runs_failed": runs["failed"],
        "runs_succeeded": runs["succeeded"],
        "runs_cancelled": runs["cancelled"],
        "failure_rate": failure_rate,
        "observed_seconds": observed,
        "mtbf_seconds": mtbf,
        "mttd_seconds": mttd,
        "mttd_samples": findings["mttd_samples"],
        "mttr_seconds": mttr,
        "mttr_samples": findings["mttr_samples"],
        "recovery_seconds": recovery,
        "failures_per_day": per_day,
        "restore_seconds": restore,
        "restore_samples": runs["restored"],
        "unrestored": runs["failed"] - runs["restored"],
    }
    figures["display"] = {
        "failure_rate": f"{failure_rate:.1%}" if failure_rate is not None else "—",
        "mtbf": format_duration(mtbf) if mtbf is not None else "no failures",
        "mttd": format_duration(figures["mttd_seconds"]),
        "mttr": format_duration(figures["mttr_seconds"]),
        "recovery": format_duration(recovery),
        "lambda": f"{per_day:.3g} / day" if per_day is not None else "—",
        "restore": format_duration(restore),
    }
    return figures


def _run_figures(workflow: Workflow, start, now) -> dict:
    """Runs finished in the window by status, and the mean time from a failure to the end
    of the next succeeded run, in one query.

    1. Read the workflow's runs that finished after ``start`` (later ones too: a failure's
       next success may come after ``now``), newest first, from run_workflow_finished.
    2. Give each the earliest success that finished strictly later: a running minimum over
       the rows before it. Ties on finish time are ordered by status ("failed" before
       "succeeded"), so a success at the very same moment is not later than a failure.
    3. Count and average over the rows that finished in the window. (Counting status, not
       the id, keeps every column the query reads in the index.)
    """
    in_window = Q(finished_at__lte=now)
    failed = in_window & Q(status=Run.Status.FAILED)
    return (
        Run.objects.filter(workflow=workflow, finished_at__gt=start)
        .annotate(
            restored_at=Window(
                Min(Case(When(status=Run.Status.SUCCEEDED, then=F("finished_at")))),
                order_by=[F("finished_at").desc(), F("status").asc()],
            )
        )
        .aggregate(
            finished=Count("status", filter=in_window),
            failed=Count("status", filter=failed),
            succeeded=Count("status", filter=in_window & Q(status=Run.Status.SUCCEEDED)),
            cancelled=Count("status", filter=in_window & Q(status=Run.Status.CANCELLED)),
            restored=Count("restored_at", filter=failed),
            restore=Avg(_duration(F("restored_at"), F("finished_at")), filter=failed),
        )
    )


def _finding_figures(workflow: Workflow, start, now) -> dict:
    """Mean time to detect and to recover over the workflow's findings, in one query.

    Only the findings first seen or resolved in the window are read; when a condition
    began is a column (``began_at``, from the evidence's "since").
    """
    detected = Q(first_seen__gt=start, first_seen__lte=now)
    resolved = Q(resolved_at__gt=start, resolved_at__lte=now)
    known_start = detected & Q(began_at__isnull=False)
    began = F("began_at")
    return (
        Finding.objects.filter(run__workflow=workflow)
        .filter(detected | resolved)
        .aggregate(
            mttd=Avg(
                Case(
                    When(known_start, then=_duration(F("first_seen"), began)),
                    output_field=DurationField(),
                )
            ),
            mttd_samples=Count("pk", filter=known_start),
            mttr=Avg(_duration(F("resolved_at"), F("first_seen")), filter=resolved),
            mttr_samples=Count("pk", filter=resolved),
        )
    )
