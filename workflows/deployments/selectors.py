"""Reads of a workflow's deployments, for the dashboard's release panel and upload page.

A handful of queries whatever the number of runs: the live deployments, the newest
history, the canary's current step (judging.canary_samples, capped), and the hourly
trend per version, aggregated in the database.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Value, Window
from django.db.models.functions import Floor, Greatest, RowNumber, TruncHour
from django.utils import timezone

from workflows.deployments import analysis, judging
from workflows.models import AuditEvent, Deployment, Run, Workflow, WorkflowVersion

HISTORY_SIZE = 20
TREND_HOURS = 24
TREND_VERSIONS = 4  # the newest versions involved; more lines would not be readable
_FINISHED = (Run.Status.SUCCEEDED, Run.Status.FAILED)  # what the canary analysis counts


@dataclass(frozen=True)
class Side:
    """One version's finished runs in the canary's current step."""

    version: int
    runs: int
    failures: int
    failure_rate: float | None
    p95_seconds: float | None

    @classmethod
    def of(cls, version: int, sample: analysis.Sample) -> "Side":
        return cls(
            version=version,
            runs=sample.runs,
            failures=sample.failures,
            failure_rate=sample.failures / sample.runs if sample.runs else None,
            p95_seconds=analysis.p95(sample.durations),
        )

    @classmethod
    def from_evidence(cls, version: int, numbers: dict) -> "Side":
        return cls(
            version=version,
            runs=int(numbers.get("runs") or 0),
            failures=int(numbers.get("failures") or 0),
            failure_rate=numbers.get("failure_rate"),
            p95_seconds=numbers.get("p95_seconds"),
        )


@dataclass(frozen=True)
class LastAnalysis:
    """The verdict kept on the deployment by the watchdog's last look at it."""

    verdict: str
    reason: str
    step: int | None
    percent: int | None
    fisher_p: str
    mann_whitney_p: str
    alpha: float | None


@dataclass(frozen=True)
class HourBucket:
    hour: datetime
    runs: int
    failures: int
    p95_seconds: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.runs


@dataclass(frozen=True)
class VersionTrend:
    version: int
    buckets: list[HourBucket | None]  # one per hour, oldest first; None: no finished run


@dataclass(frozen=True)
class Trend:
    start: datetime  # the first hour shown
    hours: int
    versions: list[VersionTrend]


@dataclass(frozen=True)
class ReleasePanel:
    workflow: Workflow
    current: int | None  # the version every new run gets, outside a canary's share
    active: Deployment | None
    in_flight: Deployment | None
    split: str  # "v3 canary 10% · v2 90%"
    canary: Side | None = None
    baseline: Side | None = None
    last_analysis: LastAnalysis | None = None
    ended: Deployment | None = None  # the last to end, if aborted or rolled back since
    ended_by: str = ""  # who ended it: "watchdog" when Keel's analysis did
    history: list[Deployment] = field(default_factory=list)
    trend: Trend | None = None
    rollback_targets: list[int] = field(default_factory=list)  # version numbers, newest first
    quick_rollback: int | None = None  # the version before the live or in-flight one


def release_panel(
    workflow: Workflow, *, now: datetime | None = None, with_trend: bool = True
) -> ReleasePanel:
    """What the workflow page's release panel shows: which version new runs get, the
    deployment in flight with its split and its current step's numbers, why the last
    one was aborted or rolled back, the newest history and (``with_trend``) the hourly
    trend."""
    now = now or timezone.now()
    active, in_flight = live_deployments(workflow)
    history = list(
        _with_versions(workflow.deployments.order_by("-created_at", "-id"))[:HISTORY_SIZE]
    )
    numbers = list(workflow.versions.order_by("-number").values_list("number", flat=True)[:200])
    current = _current(active, in_flight, numbers[0] if numbers else None)
    ended = _worth_telling(_last_ended(history), in_flight)
    canary = baseline = None
    if in_flight is not None and in_flight.state == Deployment.State.RAMPING:
        canary_sample, baseline_sample = judging.canary_samples(in_flight)
        canary = Side.of(in_flight.version.number, canary_sample)
        if in_flight.baseline is not None:
            baseline = Side.of(in_flight.baseline.number, baseline_sample)
    elif ended is not None and "canary" in ended.evidence:  # the numbers it was judged on
        canary = Side.from_evidence(ended.version.number, ended.evidence["canary"])
        if ended.baseline is not None and "baseline" in ended.evidence:
            baseline = Side.from_evidence(ended.baseline.number, ended.evidence["baseline"])
    shown = in_flight or ended
    return ReleasePanel(
        workflow=workflow,
        current=current,
        active=active,
        in_flight=in_flight,
        split=split(in_flight, current),
        canary=canary,
        baseline=baseline,
        last_analysis=last_analysis(shown) if shown is not None else None,
        ended=ended,
        ended_by=_ended_by(workflow, ended) if ended is not None else "",
        history=history,
        trend=trend(workflow, _involved(active, in_flight, history, now), now=now)
        if with_trend
        else None,
        rollback_targets=_rollback_targets(numbers, current, in_flight),
        quick_rollback=_previous(active, in_flight),
    )


def live_deployments(workflow: Workflow) -> tuple[Deployment | None, Deployment | None]:
    """The active deployment and the one in flight (either may be None): one query."""
    live = {
        d.state: d
        for d in _with_versions(
            Deployment.objects.filter(workflow=workflow, state__in=Deployment.LIVE)
        )
    }
    in_flight = live.get(Deployment.State.RAMPING) or live.get(Deployment.State.VALIDATING)
    return live.get(Deployment.State.ACTIVE), in_flight


def new_runs_now(workflow: Workflow) -> str:
    """Who gets new runs now, in one line (the rollback page's "before")."""
    active, in_flight = live_deployments(workflow)
    if active is None and in_flight is None:
        latest = workflow.versions.order_by("-number").values_list("number", flat=True).first()
        return split(None, latest)
    return split(in_flight, _current(active, in_flight, None))


def split(in_flight: Deployment | None, current: int | None) -> str:
    """Who gets new runs, in one line."""
    if current is None:
        return "No version loaded yet."
    if in_flight is None:
        return f"All new runs on v{current}."
    new = f"v{in_flight.version.number}"
    if in_flight.state == Deployment.State.VALIDATING:
        run = f"run #{in_flight.validation_run_id}" if in_flight.validation_run_id else "no run"
        return f"{new} validating ({run}) · all new runs on v{current}"
    return f"{new} canary {in_flight.percent}% · v{current} {100 - in_flight.percent}%"


def last_analysis(deployment: Deployment) -> LastAnalysis | None:
    evidence = deployment.evidence or {}
    if "verdict" in evidence:  # a canary step judged (or waiting)
        return LastAnalysis(
            verdict=str(evidence.get("verdict", "")),
            reason=str(evidence.get("reason", "")),
            step=evidence.get("step"),
            percent=evidence.get("percent"),
            fisher_p=_p(evidence.get("fisher_p")),
            mann_whitney_p=_p(evidence.get("mann_whitney_p")),
            alpha=evidence.get("alpha"),
        )
    if "validation_run" in evidence:  # a blue-green validation that ended
        reason = f"validation run #{evidence['validation_run']} {evidence.get('status', '')}"
        if evidence.get("run_reason"):
            reason += f": {evidence['run_reason']}"
        return LastAnalysis("validation", reason, None, None, "", "", None)
    return None


def trend(workflow: Workflow, versions: list[WorkflowVersion], *, now: datetime) -> Trend | None:
    """Failure rate and p95 duration of each version's finished runs, per hour over the
    last TREND_HOURS hours: two queries, one row per version and hour."""
    if not versions:
        return None
    local = timezone.localtime(now)
    start = local.replace(minute=0, second=0, microsecond=0) - timedelta(hours=TREND_HOURS - 1)
    by_id = {version.pk: version.number for version in versions}
    finished = Run.objects.filter(
        workflow=workflow, version_id__in=by_id, finished_at__gte=start, status__in=_FINISHED
    ).order_by()
    counts = (
        finished.annotate(hour=TruncHour("finished_at"))
        .values_list("version_id", "hour")
        .annotate(runs=Count("id"), failures=Count("id", filter=Q(status=Run.Status.FAILED)))
    )
    # The p95 is picked in the database (nearest rank, as analysis.p95): one row per
    # version and hour, not every run.
    took = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    group = [F("version_id"), TruncHour("finished_at")]
    p95s = (
        finished.filter(started_at__isnull=False)
        .annotate(
            hour=TruncHour("finished_at"),
            took=took,
            place=Window(RowNumber(), partition_by=group, order_by=[took.asc(), F("id").asc()]),
            timed=Window(Count("id"), partition_by=group),
        )
        .filter(place=Greatest(Floor(F("timed") * Value(0.95) + Value(0.99)), Value(1.0)))
        .values_list("version_id", "hour", "took")
    )
    p95_of = {(version_id, _hour_index(hour, start)): took for version_id, hour, took in p95s}
    buckets = {version_id: [None] * TREND_HOURS for version_id in by_id}
    for version_id, hour, runs, failures in counts:
        index = _hour_index(hour, start)
        if 0 <= index < TREND_HOURS:
            took = p95_of.get((version_id, index))
            buckets[version_id][index] = HourBucket(
                hour=hour,
                runs=runs,
                failures=failures,
                p95_seconds=took.total_seconds() if took is not None else None,
            )
    return Trend(
        start=start,
        hours=TREND_HOURS,
        versions=[
            VersionTrend(version=by_id[version_id], buckets=buckets[version_id])
            for version_id in sorted(by_id, key=by_id.get, reverse=True)
        ],
    )


def live_version(workflow: Workflow) -> WorkflowVersion | None:
    """The version new runs get outside any canary: the active deployment's, else the
    latest (a workflow never deployed). The upload page diffs a definition against it."""
    active = (
        Deployment.objects.filter(workflow=workflow, state=Deployment.State.ACTIVE)
        .select_related("version")
        .first()
    )
    if active is not None:
        return active.version
    return workflow.versions.order_by("-number").first()


# --- Helpers ----------------------------------------------------------------------------------


def _with_versions(deployments):
    # Lists show versions by number: their definitions stay in the database.
    return deployments.select_related("version", "baseline").defer(
        "version__spec", "version__source", "baseline__spec", "baseline__source"
    )


def _current(active, in_flight, latest: int | None) -> int | None:
    """The version new runs get outside a canary's share."""
    if active is not None:
        return active.version.number
    if in_flight is not None and in_flight.baseline is not None:
        return in_flight.baseline.number
    return latest  # never deployed: routing gives new runs the latest version


def _rollback_targets(numbers: list[int], current, in_flight) -> list[int]:
    """Every version but the live one; in flight, the baseline too (rolling back to it
    aborts the canary, with a runs policy), never the version being deployed."""
    if in_flight is None:
        return [n for n in numbers if n != current]
    return [n for n in numbers if n != in_flight.version.number]


def _previous(active, in_flight) -> int | None:
    for deployment in (in_flight, active):
        if deployment is not None and deployment.baseline is not None:
            return deployment.baseline.number
    return None


def _last_ended(history: list[Deployment]) -> Deployment | None:
    ended = [d for d in history if d.finished_at is not None]
    return max(ended, key=lambda d: (d.finished_at, d.pk)) if ended else None


def _worth_telling(ended: Deployment | None, in_flight: Deployment | None) -> Deployment | None:
    """The last deployment to end, if it was aborted or rolled back and no deployment
    started since: the operator must see why Keel (or someone) stopped it."""
    if ended is None or ended.state not in (Deployment.State.ABORTED, Deployment.State.ROLLED_BACK):
        return None
    if in_flight is not None and in_flight.created_at > ended.finished_at:
        return None
    return ended


def _ended_by(workflow: Workflow, ended: Deployment) -> str:
    """The actor of the audited transition that ended the deployment (the deployment
    keeps who made it, the audit who stopped it)."""
    return (
        AuditEvent.objects.filter(
            target=f"workflow:{workflow.slug}",
            action__in=[AuditEvent.Action.ABORT_DEPLOYMENT, AuditEvent.Action.ROLLBACK_VERSION],
            at__gte=ended.finished_at,
        )
        .order_by("at", "id")
        .values_list("actor", flat=True)
        .first()
        or ""
    )


def _involved(active, in_flight, history, now) -> list[WorkflowVersion]:
    """The versions the trend shows: the live ones and those deployed in the window."""
    since = now - timedelta(hours=TREND_HOURS)
    versions: dict[int, WorkflowVersion] = {}
    for deployment in (in_flight, active):
        if deployment is not None:
            versions[deployment.version_id] = deployment.version
            if deployment.baseline is not None:
                versions[deployment.baseline_id] = deployment.baseline
    for deployment in history:
        if deployment.finished_at is None or deployment.finished_at >= since:
            versions.setdefault(deployment.version_id, deployment.version)
    newest = sorted(versions.values(), key=lambda version: version.number, reverse=True)
    return newest[:TREND_VERSIONS]


def _hour_index(hour: datetime, start: datetime) -> int:
    return int((hour - start).total_seconds() // 3600)


def _p(value) -> str:
    return "" if value is None else f"{value:#.3g}"
