"""Detectors about releasing versions: runs left on a version no longer deployed, a canary
that fails more often than its baseline, a deployment that cannot finish.

They read deployments (a handful: at most one in flight and one active per workflow) and
the runs running now, never the history of runs: a tick costs a fixed number of queries
plus two per canary in flight (its samples, as the watchdog's own analysis reads them).
"""

import operator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import reduce
from weakref import WeakKeyDictionary

from django.db.models import Count, F, Min, Q, Window
from django.db.models.functions import RowNumber

from diagnostics.detectors.context import WARNING, Context, clock, iso, setting
from diagnostics.detectors.registry import detector
from diagnostics.findings import Detection
from workflows.deployments import analysis, judging
from workflows.models import Deployment, Run

# A canary is reported as failing below this p-value of Fisher's exact test: a lead, well
# before the watchdog's own bar (p < alpha, with min_runs runs) lets it abort.
CANARY_FAILING_P = 0.2
# Runs named in a finding's evidence; the count says how many more.
LISTED_RUNS = 20
ENDED = {
    Deployment.State.ABORTED: "aborted",
    Deployment.State.ROLLED_BACK: "rolled back",
}


@dataclass(frozen=True)
class InFlight:
    """A deployment in flight, with the current step's samples when it is a canary."""

    deployment: Deployment
    canary: analysis.Sample | None
    baseline: analysis.Sample | None


_in_flight_by_tick: WeakKeyDictionary = WeakKeyDictionary()


def in_flight(ctx: Context) -> list[InFlight]:
    """The deployments in flight and their canaries' samples, read once per tick: two
    detectors look at them (deployment_in_flight index)."""
    if ctx not in _in_flight_by_tick:
        found = []
        for deployment in (
            Deployment.objects.filter(state__in=Deployment.IN_FLIGHT)
            .select_related("workflow", "version", "baseline", "validation_run")
            .defer("version__spec", "version__source", "baseline__spec", "baseline__source")
            .order_by("pk")
        ):
            samples = (None, None)
            if deployment.state == Deployment.State.RAMPING:
                samples = judging.canary_samples(deployment)
            found.append(InFlight(deployment, *samples))
        _in_flight_by_tick[ctx] = found
    return _in_flight_by_tick[ctx]


def _name(deployment: Deployment) -> str:
    return f"{deployment.workflow.slug} v{deployment.version.number}"


def _rate(sample: analysis.Sample) -> float | None:
    return sample.failures / sample.runs if sample.runs else None


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f}%"


def _summary(sample: analysis.Sample) -> dict:
    rate = _rate(sample)
    p95 = analysis.p95(sample.durations)
    return {
        "runs": sample.runs,
        "failures": sample.failures,
        "failure_rate": None if rate is None else round(rate, 4),
        "p95_seconds": None if p95 is None else round(p95, 2),
    }


def _deployment_command(action: str, deployment: Deployment, reason: str) -> dict:
    return {
        "kind": "command",
        "command": f'manage.py {action}_deployment {deployment.pk} --reason "{reason}"',
    }


# --- Runs left on a version that is no longer deployed ----------------------------------------


@dataclass(frozen=True)
class Retired:
    """A version whose latest deployment ended, and what that means for its runs."""

    deployment: dict  # the version's latest deployment (values)
    how: str  # "aborted", "rolled back", "retired after its blue-green switch"
    since: datetime  # when running on it became a conflict
    live: int | None  # the version new runs get now


@detector("retired_version_running")
def retired_version_running(ctx: Context) -> list[Detection]:
    """Runs still running on a version whose latest deployment ended aborted or rolled
    back, or that a blue-green deployment replaced longer ago than its retention.

    1. The (workflow, version) pairs of the runs running now (current state only).
    2. The deployments of those versions, the blue-green ones that replaced them, and the
       live ones of their workflows: one query.
    3. For each retired version, its runs started before it stopped getting new ones (a
       run someone starts on it later, by number, is their choice): count, oldest start
       and the first ids, in one query.
    """
    running = set(
        Run.objects.filter(status=Run.Status.RUNNING)
        .order_by()
        .values_list("workflow_id", "version_id")
        .distinct()
    )
    if not running:
        return []
    retired = _retired_versions(ctx, running)
    if not retired:
        return []
    stopped = [
        Q(version_id=version_id, created_at__lt=item.deployment["finished_at"])
        for version_id, item in retired.items()
    ]
    by_version: dict[int, dict] = {}
    for version_id, pk, total, oldest in (
        Run.objects.filter(status=Run.Status.RUNNING)
        .filter(reduce(operator.or_, stopped))
        .annotate(
            rank=Window(RowNumber(), partition_by=[F("version_id")], order_by=F("pk").asc()),
            total=Window(Count("pk"), partition_by=[F("version_id")]),
            oldest=Window(Min("started_at"), partition_by=[F("version_id")]),
        )
        .filter(rank__lte=LISTED_RUNS)
        .order_by("version_id", "pk")
        .values_list("version_id", "pk", "total", "oldest")
    ):
        row = by_version.setdefault(version_id, {"ids": [], "total": total, "oldest": oldest})
        row["ids"].append(pk)
    return [
        _retired_detection(retired[version_id], row)
        for version_id, row in sorted(by_version.items())
    ]


def _retired_versions(ctx: Context, running: set[tuple[int, int]]) -> dict[int, Retired]:
    versions = {version_id for _, version_id in running}
    workflows = {workflow_id for workflow_id, _ in running}
    rows = list(
        Deployment.objects.filter(
            Q(version_id__in=versions)
            | Q(baseline_id__in=versions, retire_baseline_at__isnull=False)
            | Q(workflow_id__in=workflows, state=Deployment.State.ACTIVE)
        )
        .order_by("pk")
        .values(
            "pk",
            "workflow_id",
            "workflow__slug",
            "version_id",
            "version__number",
            "baseline_id",
            "state",
            "finished_at",
            "retire_baseline_at",
        )
    )
    latest = {row["version_id"]: row for row in rows if row["version_id"] in versions}
    live = {
        row["workflow_id"]: row["version__number"]
        for row in rows
        if row["state"] == Deployment.State.ACTIVE
    }
    retired = {}
    for version_id, row in latest.items():
        live_now = live.get(row["workflow_id"])
        if row["state"] in ENDED and row["finished_at"] is not None:
            retired[version_id] = Retired(row, ENDED[row["state"]], row["finished_at"], live_now)
        elif row["state"] == Deployment.State.SUPERSEDED and row["finished_at"] is not None:
            # Replaced by a blue-green switch: its runs may finish during the retention
            # (the instant rollback target), not after.
            switch = next(
                (
                    other
                    for other in rows
                    if other["baseline_id"] == version_id
                    and other["pk"] > row["pk"]
                    and other["retire_baseline_at"] is not None
                ),
                None,
            )
            if switch is not None and switch["retire_baseline_at"] <= ctx.now:
                how = "retired after its blue-green switch"
                retired[version_id] = Retired(row, how, switch["retire_baseline_at"], live_now)
    return retired


def _retired_detection(item: Retired, runs: dict) -> Detection:
    row = item.deployment
    slug, number = row["workflow__slug"], row["version__number"]
    count, ids = runs["total"], runs["ids"]
    live = f"v{item.live}" if item.live is not None else "no version"
    reason = f"{slug} v{number} was {item.how}"
    command = f'manage.py move_runs_off {slug} {number} --runs restart --reason "{reason}"'
    return Detection(
        code="retired_version_running",
        subject=f"version:{row['version_id']}",
        severity=WARNING,
        title=(
            f"{count} run(s) of {slug} still run v{number}, which was {item.how} at "
            f"{clock(item.since)}; new runs get {live}"
        ),
        suggestion=(
            f"These runs stay on v{number} until they end, whatever is live now. If v{number} "
            f"must not finish them, restart them on {live} (each is cancelled and started "
            f"again with the same params, linked to its original) or cancel them: `{command}` "
            "(`--runs cancel` only cancels; `--preview` lists them first)."
        ),
        evidence={
            "workflow": slug,
            "version": number,
            "live_version": item.live,
            "deployment": row["pk"],
            "deployment_state": row["state"],
            "retired_at": iso(item.since),
            "since": iso(item.since),
            "running_runs": count,
            "run_ids": ids,
            "oldest_started_at": iso(runs["oldest"]),
        },
        action={
            "kind": "move_runs_off",
            "label": f"Restart or cancel the runs left on v{number}",
            "workflow": slug,
            "version": number,
            "command": command,
        },
    )


# --- A canary that fails more often than its baseline --------------------------------------


@detector("canary_failing")
def canary_failing(ctx: Context) -> list[Detection]:
    """A canary step whose canary fails more often than its baseline (Fisher's exact
    test, one-sided, p < CANARY_FAILING_P) while the watchdog's analysis still waits for
    more runs: too few to abort on its own, enough to say so to a person."""
    found = []
    for item in in_flight(ctx):
        deployment, canary, baseline = item.deployment, item.canary, item.baseline
        if deployment.state != Deployment.State.RAMPING or not canary.runs or not baseline.runs:
            continue
        if _rate(canary) <= _rate(baseline):
            continue
        p = analysis.fisher_one_sided(
            canary.failures, canary.runs, baseline.failures, baseline.runs
        )
        if p >= CANARY_FAILING_P:
            continue
        verdict = analysis.judge(canary, baseline, min_runs=deployment.min_runs)
        if verdict.decision != "wait":
            continue  # the watchdog promotes or aborts it this very tick
        found.append(_canary_detection(deployment, canary, baseline, p, verdict.reason))
    return found


def _canary_detection(deployment, canary, baseline, p: float, waiting: str) -> Detection:
    name, base = _name(deployment), f"v{deployment.baseline.number}"
    return Detection(
        code="canary_failing",
        subject=f"deployment:{deployment.pk}",
        severity=WARNING,
        title=(
            f"Canary {name} ({deployment.percent}% of new runs) fails more often than {base}: "
            f"{canary.failures} of {canary.runs} runs ({_pct(_rate(canary))}) against "
            f"{baseline.failures} of {baseline.runs} ({_pct(_rate(baseline))})"
        ),
        suggestion=(
            f"The watchdog has not aborted it yet: {waiting}. If these failures are "
            f"{name}'s own (compare a failed canary run with a {base} run), abort it now: "
            f"every new run goes back to {base}, and the runs already on it finish on it. "
            f"`manage.py abort_deployment {deployment.pk} --reason ...`"
        ),
        evidence={
            "workflow": deployment.workflow.slug,
            "version": deployment.version.number,
            "baseline_version": deployment.baseline.number,
            "deployment": deployment.pk,
            "step": deployment.step,
            "percent": deployment.percent,
            "step_started_at": iso(deployment.step_started_at),
            "canary": _summary(canary),
            "baseline": _summary(baseline),
            "fisher_p": float(f"{p:.4g}"),
            "reported_below_p": CANARY_FAILING_P,
            "min_runs": deployment.min_runs,
        },
        action=_deployment_command("abort", deployment, f"canary {name} fails more often"),
    )


# --- A deployment that cannot finish -----------------------------------------------------------


@detector("deployment_stuck")
def deployment_stuck(ctx: Context) -> list[Detection]:
    """A blue-green deployment validating for longer than KEEL_VALIDATION_STUCK_SECONDS,
    or a canary step older than KEEL_CANARY_STEP_STUCK_SECONDS that still has fewer than
    min_runs finished canary runs (too little traffic to decide)."""
    validation_limit = setting("KEEL_VALIDATION_STUCK_SECONDS", 1800)
    step_limit = setting("KEEL_CANARY_STEP_STUCK_SECONDS", 3600)
    found = []
    for item in in_flight(ctx):
        deployment = item.deployment
        if deployment.state == Deployment.State.VALIDATING:
            run = deployment.validation_run
            if run is None or run.status in Run.TERMINAL:
                continue  # the watchdog switches or aborts it this tick
            if ctx.age(deployment.created_at) < validation_limit:
                continue
            found.append(_validation_stuck(deployment, run, validation_limit))
        elif deployment.state == Deployment.State.RAMPING:
            if item.canary.runs >= deployment.min_runs:
                continue
            if ctx.age(deployment.step_started_at) < step_limit:
                continue
            found.append(_step_stuck(deployment, item.canary, step_limit))
    return found


def _stuck_evidence(deployment: Deployment, waiting_since, limit: int) -> dict:
    return {
        "workflow": deployment.workflow.slug,
        "version": deployment.version.number,
        "baseline_version": deployment.baseline.number if deployment.baseline else None,
        "deployment": deployment.pk,
        "strategy": deployment.strategy,
        "deployment_state": deployment.state,
        "waiting_since": iso(waiting_since),
        "stuck_after_seconds": limit,
        # When it became stuck: the threshold passed (time to detect counts from there).
        "since": iso(waiting_since + timedelta(seconds=limit)),
    }


def _validation_stuck(deployment: Deployment, run: Run, limit: int) -> Detection:
    name = _name(deployment)
    base = f"v{deployment.baseline.number}" if deployment.baseline else "the live version"
    return Detection(
        code="deployment_stuck",
        subject=f"deployment:{deployment.pk}",
        severity=WARNING,
        title=(
            f"Blue-green deployment of {name} has been validating since "
            f"{clock(deployment.created_at)}: validation run {run.pk} is still {run.status}"
        ),
        suggestion=(
            f"New runs stay on {base} until validation run {run.pk} ends; see why it has not "
            f"(`manage.py diagnose {run.pk}`). Abort the deployment: {base} stays live and the "
            "validation run is cancelled; deploy again once the cause is fixed. Promote it "
            f"(`manage.py promote_deployment {deployment.pk} --reason ...`) only if you have "
            f"checked {name} another way: it switches every new run without the check."
        ),
        evidence={
            **_stuck_evidence(deployment, deployment.created_at, limit),
            "validation_run": run.pk,
            "validation_run_status": run.status,
            "finished_runs": 0,
            "runs_needed": 1,
        },
        action=_deployment_command(
            "abort", deployment, f"validation run {run.pk} of {name} did not finish"
        ),
    )


def _step_stuck(deployment: Deployment, canary, limit: int) -> Detection:
    """Which way out, and why: on failures, abort; on successes only, promote; on no run
    at all, abort (nothing says it works) and deploy blue-green, which needs no traffic."""
    name, needed = _name(deployment), deployment.min_runs
    since = deployment.step_started_at
    if canary.failures:
        verb = "abort"
        why = (
            f"{canary.failures} of its {canary.runs} canary runs failed, and at this traffic the "
            "watchdog will not have the runs to judge it for a long time: abort it (new runs "
            "go back to the live version) and find out why they failed."
        )
    elif canary.runs:
        verb = "promote"
        last_step = deployment.step + 1 >= len(deployment.steps)
        why = (
            f"Its {canary.runs} runs all succeeded, and at this traffic the step would take "
            f"far longer to reach {needed}: promote it "
            + (
                "(it becomes the live version)"
                if last_step
                else "to the next step (a larger share of new runs gathers runs faster)"
            )
            + ", or abort it if you doubt it."
        )
    else:
        verb = "abort"
        why = (
            "Not one canary run finished, so nothing says it works: abort it, and deploy it "
            "again with `--strategy blue_green` (a validation run proves it without traffic)."
        )
    return Detection(
        code="deployment_stuck",
        subject=f"deployment:{deployment.pk}",
        severity=WARNING,
        title=(
            f"Canary {name} at {deployment.percent}% has too little traffic to decide: "
            f"{canary.runs} finished canary run(s) since {clock(since)}, of the {needed} needed"
        ),
        suggestion=f"{why} `manage.py {verb}_deployment {deployment.pk} --reason ...`",
        evidence={
            **_stuck_evidence(deployment, since, limit),
            "step": deployment.step,
            "percent": deployment.percent,
            "canary": _summary(canary),
            "finished_runs": canary.runs,
            "runs_needed": needed,
        },
        action=_deployment_command(
            verb, deployment, f"too little traffic to judge canary {name} at {deployment.percent}%"
        ),
    )
