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
* time to restore — from run history: for each failed run in the window, the time from
  its end to the end of the workflow's next succeeded run (failures not yet followed by a
  success are counted in ``unrestored``).

Five aggregate queries and one bounded read (the window's latest failed runs, at most
MAX_FAILURES_FOR_RESTORE, each with its next success found by a subquery).
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
)
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
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
# Bounds the restore-time query: the latest failures of the window are enough for a mean.
MAX_FAILURES_FOR_RESTORE = 1000
# evidence["since"] as detectors write it (datetime.isoformat() of an aware time). Anything
# else is skipped rather than cast: a failed cast would fail the whole query.
SINCE_PATTERN = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)$"


def with_known_start(findings):
    """The findings whose evidence says when their condition began, annotated ``began``."""
    return findings.filter(evidence__since__regex=SINCE_PATTERN).annotate(
        began=Cast(KT("evidence__since"), DateTimeField())
    )


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


def _duration(end: str, start: str) -> ExpressionWrapper:
    return ExpressionWrapper(F(end) - F(start), output_field=DurationField())


def workflow_reliability(workflow: Workflow, *, window: str = DEFAULT_WINDOW, now=None) -> dict:
    """The figures for ``workflow`` over the named window ending ``now``."""
    window = parse_window(window)
    now = now or timezone.now()
    start = now - WINDOWS[window]
    finished = Run.objects.filter(workflow=workflow, finished_at__gt=start, finished_at__lte=now)
    counts = finished.aggregate(
        finished=Count("pk"),
        failed=Count("pk", filter=Q(status=Run.Status.FAILED)),
        succeeded=Count("pk", filter=Q(status=Run.Status.SUCCEEDED)),
        cancelled=Count("pk", filter=Q(status=Run.Status.CANCELLED)),
    )
    judged = counts["failed"] + counts["succeeded"]
    failure_rate = counts["failed"] / judged if judged else None

    first_run = Run.objects.filter(workflow=workflow).aggregate(first=Min("created_at"))["first"]
    observed_from = max(start, first_run) if first_run else None
    observed = (now - observed_from).total_seconds() if observed_from else 0.0
    mtbf = observed / counts["failed"] if counts["failed"] else None

    findings = Finding.objects.filter(run__workflow=workflow)
    detect = (
        with_known_start(findings.filter(first_seen__gt=start, first_seen__lte=now))
        .annotate(elapsed=_duration("first_seen", "began"))
        .aggregate(mean=Avg("elapsed"), samples=Count("pk"))
    )
    recover = (
        findings.filter(resolved_at__gt=start, resolved_at__lte=now)
        .annotate(elapsed=_duration("resolved_at", "first_seen"))
        .aggregate(mean=Avg("elapsed"), samples=Count("pk"))
    )
    restore = _time_to_restore(finished.filter(status=Run.Status.FAILED), workflow)

    figures = {
        "workflow": workflow.slug,
        "window": window,
        "windows": list(WINDOWS),
        "since": start,
        "until": now,
        "runs_finished": counts["finished"],
        "runs_failed": counts["failed"],
        "runs_succeeded": counts["succeeded"],
        "runs_cancelled": counts["cancelled"],
        "failure_rate": failure_rate,
        "observed_seconds": observed,
        "mtbf_seconds": mtbf,
        "mttd_seconds": _seconds(detect["mean"]),
        "mttd_samples": detect["samples"],
        "mttr_seconds": _seconds(recover["mean"]),
        "mttr_samples": recover["samples"],
        "restore_seconds": restore["mean"],
        "restore_samples": restore["samples"],
        "unrestored": restore["unrestored"],
    }
    figures["display"] = {
        "failure_rate": f"{failure_rate:.1%}" if failure_rate is not None else "—",
        "mtbf": format_duration(mtbf) if mtbf is not None else "no failures",
        "mttd": format_duration(figures["mttd_seconds"]),
        "mttr": format_duration(figures["mttr_seconds"]),
        "restore": format_duration(restore["mean"]),
    }
    return figures


def _time_to_restore(failed_runs, workflow: Workflow) -> dict:
    """Mean time from a failed run's end to the end of the next succeeded run."""
    next_success = (
        Run.objects.filter(
            workflow=workflow,
            status=Run.Status.SUCCEEDED,
            finished_at__gt=OuterRef("finished_at"),
        )
        .order_by("finished_at")
        .values("finished_at")[:1]
    )
    rows = list(
        failed_runs.order_by("-finished_at")
        .annotate(restored_at=Subquery(next_success))
        .values_list("finished_at", "restored_at")[:MAX_FAILURES_FOR_RESTORE]
    )
    gaps = [(restored - failed).total_seconds() for failed, restored in rows if restored]
    unrestored = sum(1 for _failed, restored in rows if restored is None)
    return {
        "mean": sum(gaps) / len(gaps) if gaps else None,
        "samples": len(gaps),
        "unrestored": unrestored,
    }
