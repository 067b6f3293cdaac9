"""The watchdog's step: judge every deployment in flight, each tick.

A blue-green deployment whose validation run ended is switched or aborted; a canary step
with enough finished runs is promoted or aborted on ``analysis.judge``'s verdict, through
the same audited services an operator uses (actor ``watchdog``).
"""

import logging

from django.utils import timezone

from workflows.deployments import analysis
from workflows.deployments.services import WATCHDOG, abort, promote
from workflows.models import Deployment, Run
from workflows.operations import OperationError

logger = logging.getLogger(__name__)


def advance_in_flight(now=None) -> list[str]:
    """Judge every deployment in flight: a validation run that ended promotes or aborts
    its blue-green deployment; a canary step with enough finished runs is promoted or
    aborted on the analysis's verdict (its evidence kept on the deployment). Returns
    what it did, one line each."""
    now = now or timezone.now()
    done = []
    for deployment in Deployment.objects.filter(state__in=Deployment.IN_FLIGHT).select_related(
        "workflow", "version", "baseline", "validation_run"
    ):
        try:
            if deployment.state == Deployment.State.VALIDATING:
                line = _judge_validation(deployment)
            else:
                line = _judge_canary(deployment)
        except OperationError as error:  # e.g. an operator acted first; the next tick sees
            logger.warning("Deployment %s not judged: %s", deployment.pk, error)
            continue
        if line:
            done.append(line)
    return done


def canary_samples(deployment: Deployment) -> tuple[analysis.Sample, analysis.Sample]:
    """Finished runs routed by this deployment in its current step: the canary's and the
    baseline's, over the same window."""
    finished = Run.objects.filter(
        deployment=deployment,
        status__in=[Run.Status.SUCCEEDED, Run.Status.FAILED],
        created_at__gte=deployment.step_started_at,
    ).exclude(pk=deployment.validation_run_id)
    samples = []
    for version_id in (deployment.version_id, deployment.baseline_id):
        rows = list(
            finished.filter(version_id=version_id)
            .order_by()
            .values_list("status", "started_at", "finished_at")[:5000]
        )
        samples.append(
            analysis.Sample(
                runs=len(rows),
                failures=sum(1 for status, *_ in rows if status == Run.Status.FAILED),
                durations=tuple(
                    (end - start).total_seconds() for _, start, end in rows if start and end
                ),
            )
        )
    return samples[0], samples[1]


def _judge_canary(deployment: Deployment) -> str:
    canary, baseline = canary_samples(deployment)
    verdict = analysis.judge(canary, baseline, min_runs=deployment.min_runs)
    evidence = {**verdict.evidence, "step": deployment.step, "percent": deployment.percent}
    evidence["verdict"] = verdict.decision
    evidence["reason"] = verdict.reason
    label = f"{deployment.workflow.slug} v{deployment.version.number} canary"
    if verdict.decision == "promote":
        change = promote(deployment.pk, actor=WATCHDOG, reason=verdict.reason, evidence=evidence)
        return (
            f"{label} promoted past {deployment.percent}%: {verdict.reason}"
            if change.changed
            else ""
        )
    if verdict.decision == "abort":
        change = abort(deployment.pk, actor=WATCHDOG, reason=verdict.reason, evidence=evidence)
        return f"{label} aborted: {verdict.reason}" if change.changed else ""
    Deployment.objects.filter(pk=deployment.pk, state=Deployment.State.RAMPING).update(
        evidence=evidence, updated_at=timezone.now()
    )
    return ""


def _judge_validation(deployment: Deployment) -> str:
    run = deployment.validation_run
    label = f"{deployment.workflow.slug} v{deployment.version.number} blue-green"
    if run is None:
        reason = "its validation run is gone"
        abort(deployment.pk, actor=WATCHDOG, reason=reason)
        return f"{label} aborted: {reason}"
    if run.status not in Run.TERMINAL:
        return ""
    evidence = {"validation_run": run.pk, "status": run.status, "run_reason": run.reason}
    if run.status == Run.Status.SUCCEEDED:
        reason = f"validation run {run.pk} succeeded"
        promote(deployment.pk, actor=WATCHDOG, reason=reason, evidence=evidence)
        return f"{label} switched: {reason}"
    reason = f"validation run {run.pk} {run.status}: {run.reason or 'no reason given'}"
    abort(deployment.pk, actor=WATCHDOG, reason=reason, evidence=evidence)
    return f"{label} aborted, v{deployment.baseline.number} kept: {reason}"
