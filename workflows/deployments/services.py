"""Deployment transitions: deploy, promote, abort, roll back a version (the watchdog's
judging of canaries and validations, which calls promote and abort, is judging.py).

Every transition locks the workflow's row first, then checks the state it expects
(guarded: twenty clicks make one transition, the others say what happened instead),
writes the deployment and one AuditEvent (``workflow:<slug>``), and commits. Runs are
never re-pinned: a deployment only decides the version of new runs (routing.py).

States: ``validating`` (blue-green), ``ramping`` (canary) → ``active``; a later
deployment makes the active one ``superseded``, an operator's rollback ``rolled_back``;
one that never became active ends ``aborted``.
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from workflows import audit, engine
from workflows.definitions.spec import unknown_param_message
from workflows.models import AuditEvent, Deployment, Run, Workflow, WorkflowVersion
from workflows.operations import (
    OPERATE_PERMISSION,
    Actor,
    OperationDenied,
    OperationError,
    _as_actor,
)

logger = logging.getLogger(__name__)

WATCHDOG = "watchdog"
_ACTIONS = {
    "deploy": AuditEvent.Action.DEPLOY,
    "promote": AuditEvent.Action.PROMOTE_DEPLOYMENT,
    "abort": AuditEvent.Action.ABORT_DEPLOYMENT,
    "rollback_version": AuditEvent.Action.ROLLBACK_VERSION,
    "move_runs_off": AuditEvent.Action.MOVE_RUNS_OFF,
}
DEFAULT_STEPS = (10, 50, 100)
DEFAULT_MIN_RUNS = 20
RUN_POLICIES = ("finish", "cancel", "restart")
MOVE_POLICIES = ("restart", "cancel")
MOVED_AT_ONCE = 1000  # runs one move_runs_off handles; the rest are left for the next


@dataclass(frozen=True)
class Change:
    deployment: Deployment | None
    changed: bool
    message: str


# --- Operator actions --------------------------------------------------------------------------


def deploy(
    version: WorkflowVersion,
    *,
    actor,
    reason: str,
    strategy: str | None = None,
    steps: list[int] | None = None,
    min_runs: int | None = None,
    key_param: str | None = None,
    request_key: str | None = None,
) -> Change:
    """Make ``version`` the one new runs get, by a strategy (the definition's ``deploy``
    section, else immediate): at once; as a canary on a share of new runs that grows
    step by step while the analysis finds it no worse; or blue-green, after a validation
    run with the definition's smoke params has succeeded."""
    actor = _permitted(actor, "deploy", version.workflow)
    reason = _required(reason, "deploy a version")
    declared = version.spec.get("deploy") or {}
    strategy = strategy or declared.get("strategy") or Deployment.Strategy.IMMEDIATE
    if strategy not in Deployment.Strategy.values:
        raise OperationError(
            f"Unknown strategy {strategy!r}: use one of {', '.join(Deployment.Strategy.values)}."
        )
    steps = _checked_steps(steps or declared.get("steps") or DEFAULT_STEPS)
    min_runs = int(min_runs or declared.get("min_runs") or DEFAULT_MIN_RUNS)
    key_param = key_param if key_param is not None else declared.get("key_param", "")
    run_params = version.spec.get("params") or {}
    if key_param and key_param not in run_params:
        raise OperationError(
            f"key_param {unknown_param_message(key_param, run_params)} of "
            f"{version.workflow.slug} v{version.number}."
        )
    now = timezone.now()
    with transaction.atomic():
        workflow = _lock(version.workflow_id)
        if (earlier := _applied(request_key)) is not None:
            return earlier
        live = _live(workflow)
        in_flight = live.get(Deployment.State.RAMPING) or live.get(Deployment.State.VALIDATING)
        if in_flight is not None:
            raise OperationError(
                f"v{in_flight.version.number} of {workflow.slug} is being deployed "
                f"({in_flight.strategy}, {in_flight.state}): promote or abort it first "
                "(a definition can be loaded without deploying it: load_workflow --deploy none)."
            )
        active = live.get(Deployment.State.ACTIVE)
        if active is not None and active.version_id == version.pk:
            return Change(active, False, f"{workflow.slug} v{version.number} is already live.")
        if active is None and strategy != Deployment.Strategy.IMMEDIATE:
            strategy = Deployment.Strategy.IMMEDIATE  # nothing to compare against or keep
        deployment = Deployment(
            workflow=workflow,
            version=version,
            baseline=active.version if active else None,
            strategy=strategy,
            steps=steps if strategy == Deployment.Strategy.CANARY else [],
            min_runs=min_runs,
            key_param=key_param,
            actor=actor.name,
            reason=reason,
        )
        if strategy == Deployment.Strategy.IMMEDIATE:
            _supersede(active, now)
            deployment.state = Deployment.State.ACTIVE
            deployment.save()
        elif strategy == Deployment.Strategy.CANARY:
            deployment.state = Deployment.State.RAMPING
            deployment.step_started_at = now
            deployment.save()
        else:
            deployment.state = Deployment.State.VALIDATING
            deployment.save()
            deployment.validation_run = _start_validation(deployment, declared)
            deployment.save(update_fields=["validation_run"])
        _audit(AuditEvent.Action.DEPLOY, deployment, actor.name, reason, active, key=request_key)
    return Change(deployment, True, _describe(deployment))


def promote(
    deployment_id: int,
    *,
    actor,
    reason: str,
    evidence: dict | None = None,
    request_key: str | None = None,
    expected_step: int | None = None,
) -> Change:
    """A canary to its next step (or active after its last); a blue-green deployment
    active without waiting for its validation run. The watchdog promotes on evidence.
    With ``expected_step`` (the step a page showed), only from that step: a form sent
    twice promotes once."""
    actor = _permitted(actor, "promote", _get(deployment_id).workflow)
    reason = _required(reason, "promote a deployment")
    now = timezone.now()
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        if (earlier := _applied(request_key)) is not None:
            return earlier
        if deployment.state not in Deployment.IN_FLIGHT:
            return Change(deployment, False, f"Nothing to promote: {_describe(deployment)}.")
        if expected_step is not None and deployment.step != expected_step:
            return Change(
                deployment,
                False,
                f"Not promoted again: it moved on since the page was shown. {_describe(deployment)}",
            )
        before = _snapshot(deployment)
        if evidence is not None:
            deployment.evidence = evidence
        last_step = deployment.step + 1 >= len(deployment.steps)
        if deployment.state == Deployment.State.RAMPING and not last_step:
            deployment.step += 1
            deployment.step_started_at = now
            deployment.routed = 0
            deployment.save()
        else:
            _activate(deployment, now)
        _audit(
            AuditEvent.Action.PROMOTE_DEPLOYMENT,
            deployment,
            actor.name,
            reason,
            before,
            key=request_key,
        )
    return Change(deployment, True, _describe(deployment))


def abort(
    deployment_id: int,
    *,
    actor,
    reason: str,
    evidence: dict | None = None,
    request_key: str | None = None,
) -> Change:
    """Stop a canary or a validation: every new run gets the baseline again (runs already
    on the aborted version finish on it). A validation run still going is cancelled."""
    actor = _permitted(actor, "abort", _get(deployment_id).workflow)
    reason = _required(reason, "abort a deployment")
    now = timezone.now()
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        if (earlier := _applied(request_key)) is not None:
            return earlier
        if deployment.state not in Deployment.IN_FLIGHT:
            return Change(deployment, False, f"Nothing to abort: {_describe(deployment)}.")
        before = _snapshot(deployment)
        _end(deployment, Deployment.State.ABORTED, reason, now, evidence)
        _audit(
            AuditEvent.Action.ABORT_DEPLOYMENT,
            deployment,
            actor.name,
            reason,
            before,
            key=request_key,
        )
        validation = deployment.validation_run
    if validation is not None and validation.status not in Run.TERMINAL:
        engine.cancel_run(validation.pk, actor=actor.name, reason=f"deployment aborted: {reason}")
    return Change(deployment, True, _describe(deployment))


@dataclass(frozen=True)
class RollbackPreview:
    workflow: str
    from_versions: list[int]
    to_version: int
    running: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    noop_message: str = ""

    def as_dict(self) -> dict:
        return {
            "workflow": self.workflow,
            "from_versions": self.from_versions,
            "to_version": self.to_version,
            "runs": {"running": self.running, "queued": self.queued, "failed": self.failed},
            "noop_message": self.noop_message,
        }


def preview_rollback(workflow: Workflow, to_number: int) -> RollbackPreview:
    """What a rollback to version ``to_number`` changes: the versions new runs stop
    getting, and the runs on them that are still running, only queued, or failed since
    they went live (run ids, newest first, at most 200 of each)."""
    target = _version(workflow, to_number)
    live = _live(workflow)
    bad = [d for d in live.values() if d.version_id != target.pk]
    if not bad:
        return RollbackPreview(
            workflow.slug, [], to_number, noop_message=f"v{to_number} is already live."
        )
    runs = _runs_of(bad, target)
    return RollbackPreview(
        workflow=workflow.slug,
        from_versions=sorted({d.version.number for d in bad}),
        to_version=to_number,
        running=[r.pk for r in runs if r.status == Run.Status.RUNNING and r.started_nodes][:200],
        queued=[r.pk for r in runs if r.status == Run.Status.RUNNING and not r.started_nodes][:200],
        failed=[r.pk for r in runs if r.status == Run.Status.FAILED][:200],
    )


def rollback_version(
    workflow: Workflow,
    to_number: int,
    *,
    actor,
    reason: str,
    runs: str = "finish",
    request_key: str | None = None,
) -> Change:
    """Make an earlier (or any other) version the one new runs get, at once. The live
    deployment is ``rolled_back``, one in flight ``aborted``. Runs on the versions left:
    ``finish`` (they end on their version), ``cancel``, or ``restart`` (cancelled, then
    started again on the chosen version with the same params, linked to the original;
    failed ones since the version went live too). Never silently re-pinned."""
    if runs not in RUN_POLICIES:
        raise OperationError(f"runs must be one of {', '.join(RUN_POLICIES)}, not {runs!r}.")
    actor = _permitted(actor, "rollback_version", workflow)
    reason = _required(reason, "roll back a version")
    now = timezone.now()
    with transaction.atomic():
        workflow = _lock(workflow.pk)
        if (earlier := _applied(request_key)) is not None:
            return earlier
        target = _version(workflow, to_number)
        live = _live(workflow)
        active = live.get(Deployment.State.ACTIVE)
        bad = [d for d in live.values() if d.version_id != target.pk]
        if not bad:
            return Change(active, False, f"{workflow.slug} v{to_number} is already live.")
        affected = _runs_of(bad, target) if runs != "finish" else []
        restart_params = _restart_params(affected, target) if runs == "restart" else {}
        for deployment in bad:
            state = (
                Deployment.State.ROLLED_BACK
                if deployment.state == Deployment.State.ACTIVE
                else Deployment.State.ABORTED
            )
            _end(deployment, state, f"rolled back to v{to_number}: {reason}", now)
        if active is not None and active.version_id == target.pk:
            new = active  # a canary of another version was aborted; the baseline stays
        else:
            new = Deployment.objects.create(
                workflow=workflow,
                version=target,
                baseline=active.version if active else None,
                strategy=Deployment.Strategy.IMMEDIATE,
                state=Deployment.State.ACTIVE,
                actor=actor.name,
                reason=reason,
            )
        _audit(
            AuditEvent.Action.ROLLBACK_VERSION,
            new,
            actor.name,
            reason,
            before=active,
            extra={
                "from_versions": sorted({d.version.number for d in bad}),
                "runs": runs,
                "run_ids": [run.pk for run in affected][:200],
            },
            key=request_key,
        )
    why = f"version rolled back: {reason}"
    _handle_runs(affected, restart_params, target, new, actor.name, why)
    return Change(new, True, f"{workflow.slug} now starts new runs on v{to_number}.")


@dataclass(frozen=True)
class RunsLeftPreview:
    """The unfinished runs of a version new runs no longer get (newest first, at most
    200 of each), and the live version they would be restarted on."""

    workflow: str
    from_version: int
    to_version: int | None
    running: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    total: int = 0
    refusal: str = ""  # why nothing can be moved off this version

    def as_dict(self) -> dict:
        return {
            "workflow": self.workflow,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "runs": {"running": self.running, "queued": self.queued},
            "total": self.total,
            "refusal": self.refusal,
        }


def preview_runs_left(workflow: Workflow, from_number: int) -> RunsLeftPreview:
    """What ``move_runs_off`` would do to the runs still on version ``from_number``."""
    source = _version(workflow, from_number)
    active, refusal = _move_target(workflow, source, _live(workflow))
    to = active.version.number if active is not None else None
    if refusal:
        return RunsLeftPreview(workflow.slug, from_number, to, refusal=refusal)
    runs = _unfinished(source)
    return RunsLeftPreview(
        workflow=workflow.slug,
        from_version=from_number,
        to_version=to,
        running=[r.pk for r in runs if r.started_nodes][:200],
        queued=[r.pk for r in runs if not r.started_nodes][:200],
        total=len(runs),
    )


def move_runs_off(
    workflow: Workflow,
    from_number: int,
    *,
    actor,
    reason: str,
    runs: str = "restart",
    request_key: str | None = None,
) -> Change:
    """End the unfinished runs of a version new runs no longer get (a canary aborted, a
    version rolled back or replaced): ``cancel`` them, or ``restart`` them — cancelled,
    then started again on the live version with the params their starters gave, each
    linked to its original. What a rollback's run policy does when it happens, for runs left behind.
    Refused for the live version and one being deployed."""
    if runs not in MOVE_POLICIES:
        raise OperationError(f"runs must be one of {', '.join(MOVE_POLICIES)}, not {runs!r}.")
    actor = _permitted(actor, "move_runs_off", workflow)
    reason = _required(reason, f"move runs off v{from_number}")
    with transaction.atomic():
        workflow = _lock(workflow.pk)
        if (earlier := _applied(request_key)) is not None:
            return earlier
        source = _version(workflow, from_number)
        active, refusal = _move_target(workflow, source, _live(workflow))
        if refusal:
            raise OperationError(refusal)
        affected = _unfinished(source)
        if not affected:
            return Change(active, False, f"No unfinished runs of {workflow.slug} v{from_number}.")
        restart_params = _restart_params(affected, active.version) if runs == "restart" else {}
        _audit(
            AuditEvent.Action.MOVE_RUNS_OFF,
            active,
            actor.name,
            reason,
            before={"version": from_number},
            extra={"from_version": from_number, "runs": runs, "run_ids": [r.pk for r in affected]},
            key=request_key,
        )
        # Under the workflow's lock, unlike a rollback's (whose state change is its
        # guard): the same request twice must find these runs ended, not restart them twice.
        why = f"moved off v{from_number}: {reason}"
        _handle_runs(affected, restart_params, active.version, active, actor.name, why)
    done = "restarted on" if runs == "restart" else "cancelled; new runs get"
    more = (
        f" More are left: move them again ({MOVED_AT_ONCE} at a time)."
        if len(affected) == MOVED_AT_ONCE
        else ""
    )
    return Change(
        active,
        True,
        f"{len(affected)} run(s) of {workflow.slug} v{from_number} {done} "
        f"v{active.version.number}.{more}",
    )


def _move_target(
    workflow: Workflow, source: WorkflowVersion, live: dict[str, Deployment]
) -> tuple[Deployment | None, str]:
    """The active deployment runs move to, or why runs cannot move off ``source``."""
    active = live.get(Deployment.State.ACTIVE)
    in_flight = live.get(Deployment.State.RAMPING) or live.get(Deployment.State.VALIDATING)
    name = f"{workflow.slug} v{source.number}"
    if active is None:
        return None, f"{workflow.slug} has never been deployed: every version may get new runs."
    if source.pk == active.version_id:
        return active, f"{name} is live: new runs get it. Roll back to another version first."
    if in_flight is not None and source.pk == in_flight.version_id:
        return active, (
            f"{name} is being deployed ({in_flight.strategy}): abort it, or roll back with "
            "--runs restart, which moves its runs too."
        )
    return active, ""


def _unfinished(version: WorkflowVersion) -> list[Run]:
    """The version's unfinished runs, newest first, each with ``started_nodes``."""
    runs = list(
        Run.objects.filter(version=version, status__in=Run.ACTIVE).order_by("-id")[:MOVED_AT_ONCE]
    )
    _mark_started(runs)
    return runs


def _mark_started(runs: list[Run]) -> None:
    started = set(
        Run.objects.filter(pk__in=[r.pk for r in runs], nodes__started_at__isnull=False)
        .values_list("pk", flat=True)
        .distinct()
    )
    for run in runs:
        run.started_nodes = run.pk in started


# --- Helpers ----------------------------------------------------------------------------------


def _lock(workflow_id: int) -> Workflow:
    return Workflow.objects.select_for_update(no_key=True).get(pk=workflow_id)


def _get(deployment_id: int) -> Deployment:
    try:
        return Deployment.objects.select_related(
            "workflow", "version", "baseline", "validation_run"
        ).get(pk=deployment_id)
    except Deployment.DoesNotExist:
        raise OperationError(
            f"No deployment {deployment_id}; list them with manage.py deployments SLUG."
        ) from None


def _lock_deployment(deployment_id: int) -> Deployment:
    _lock(_get(deployment_id).workflow_id)
    return _get(deployment_id)


def _applied(request_key: str | None) -> Change | None:
    """The answer to a request already applied (its audit row carries the key): what it
    acted on, as it is now, unchanged. The caller holds the workflow's lock, so the same
    request sent twice at once is applied once."""
    if not request_key:
        return None
    event = AuditEvent.objects.filter(request_key=request_key).first()
    if event is None:
        return None
    deployment = Deployment.objects.filter(pk=(event.after or {}).get("deployment")).first()
    return Change(deployment, False, "Already done: this request was applied before.")


def _live(workflow: Workflow) -> dict[str, Deployment]:
    return {
        d.state: d
        for d in Deployment.objects.filter(
            workflow=workflow, state__in=Deployment.LIVE
        ).select_related("version", "baseline")
    }


def _version(workflow: Workflow, number) -> WorkflowVersion:
    try:
        return workflow.versions.get(number=int(number))
    except (WorkflowVersion.DoesNotExist, ValueError, TypeError):
        numbers = workflow.versions.order_by("number").values_list("number", flat=True)
        known = ", ".join(f"v{n}" for n in numbers)
        raise OperationError(
            f"{workflow.slug} has no version {number!r} (it has {known})."
        ) from None


def _checked_steps(steps) -> list[int]:
    """Canary steps given on a command line or the API: the definition's own rule."""
    try:
        steps = [int(step) for step in steps]
    except (TypeError, ValueError):
        steps = []
    if not steps or steps != sorted(set(steps)) or steps[0] < 1 or steps[-1] != 100:
        raise OperationError(
            "Canary steps must be rising percentages of new runs ending at 100, e.g. 10,50,100."
        )
    return steps


def _supersede(active: Deployment | None, now) -> None:
    if active is not None:
        _end(active, Deployment.State.SUPERSEDED, "a later deployment took over", now)


def _activate(deployment: Deployment, now) -> None:
    active = Deployment.objects.filter(
        workflow_id=deployment.workflow_id, state=Deployment.State.ACTIVE
    ).first()
    _supersede(active, now)
    deployment.state = Deployment.State.ACTIVE
    if deployment.strategy == Deployment.Strategy.BLUE_GREEN:
        deployment.retire_baseline_at = now + timedelta(
            seconds=settings.KEEL_BLUE_GREEN_RETENTION_SECONDS
        )
    deployment.save()


def _end(deployment: Deployment, state: str, outcome: str, now, evidence=None) -> None:
    deployment.state = state
    deployment.outcome = outcome[:2000]
    deployment.finished_at = now
    if evidence is not None:
        deployment.evidence = evidence
    deployment.save()


def _start_validation(deployment: Deployment, declared: dict) -> Run:
    try:
        return engine.start_run(
            deployment.version,
            params=declared.get("smoke_params") or {},
            trigger=f"validation of v{deployment.version.number}",
            deployment=deployment,
        )
    except engine.RunParamsError as error:
        raise OperationError(f"The validation run cannot start: {error}") from None


def _runs_of(deployments: list[Deployment], target: WorkflowVersion) -> list[Run]:
    """Runs on the versions being left: unfinished ones, and those that failed since the
    first of these deployments was made, newest first."""
    versions = {d.version_id for d in deployments} - {target.pk}
    since = min(d.created_at for d in deployments)
    unfinished = Run.objects.filter(
        workflow_id=deployments[0].workflow_id, version_id__in=versions, status__in=Run.ACTIVE
    )
    failed = Run.objects.filter(
        workflow_id=deployments[0].workflow_id,
        version_id__in=versions,
        status=Run.Status.FAILED,
        created_at__gte=since,
    )
    runs = list((unfinished | failed).order_by("-id")[:MOVED_AT_ONCE])
    _mark_started(runs)
    return runs


def _restart_params(runs: list[Run], target: WorkflowVersion) -> dict[int, dict]:
    """Each run's params for starting it again on ``target``: those its starter gave,
    without values that were only its version's defaults (the target's own apply).
    Checked before anything changes: OperationError when any run cannot start there."""
    declared = {
        version.pk: version.spec.get("params") or {}
        for version in WorkflowVersion.objects.filter(pk__in={run.version_id for run in runs}).only(
            "spec"
        )
    }
    params, problems = {}, []
    for run in runs:
        defaults = declared[run.version_id]
        given = {
            name: value
            for name, value in run.params.items()
            if name not in defaults or defaults[name] != value
        }
        try:
            engine.resolve_run_params(target.spec, given)
        except engine.RunParamsError as error:
            problems.append(f"run {run.pk}: {str(error).rstrip('.')}")
        else:
            params[run.pk] = given
    if problems:
        raise OperationError(
            f"{len(problems)} run(s) cannot start again on v{target.number} with their params "
            f"({'; '.join(problems[:3])}{' …' if len(problems) > 3 else ''}). Nothing was "
            "changed: cancel them instead, or let them finish."
        )
    return params


def _handle_runs(runs: list[Run], restart_params: dict, target, deployment, actor: str, why):
    """Cancel the runs; start again on ``target`` those with ``restart_params``, linked."""
    for run in runs:
        if run.status in Run.ACTIVE:
            engine.cancel_run(run.pk, actor=actor, reason=why)
        if run.pk in restart_params:
            engine.start_run(
                target,
                params=restart_params[run.pk],
                trigger=actor,
                priority=run.priority,
                deployment=deployment,
                restarted_from=run,
            )


def _permitted(actor, action: str, workflow: Workflow) -> Actor:
    """The actor, if it may operate; a refusal is audited (rate-limited) and raised."""
    actor = _as_actor(actor)
    if not actor.may_operate():
        audit.record_refusal(
            actor.name, _ACTIONS[action], f"workflow:{workflow.slug}", "", OPERATE_PERMISSION
        )
        raise OperationDenied(
            f"{actor.name} may not {action.replace('_', ' ')} on {workflow.slug}: ask an "
            f"administrator for the '{OPERATE_PERMISSION}' permission."
        )
    return actor


def _required(reason, action: str) -> str:
    if not reason or not str(reason).strip():
        raise OperationError(f"A reason is required to {action}; it is kept in the audit.")
    return str(reason).strip()[:2000]


def _snapshot(deployment: Deployment | None) -> dict:
    if deployment is None:
        return {}
    return {
        "deployment": deployment.pk,
        "version": deployment.version.number,
        "strategy": deployment.strategy,
        "state": deployment.state,
        "percent": deployment.percent,
    }


def _audit(action, deployment, actor: str, reason: str, before=None, extra=None, key=None):
    before = before if isinstance(before, dict) else _snapshot(before)
    AuditEvent.objects.create(
        actor=actor,
        action=action,
        target=f"workflow:{deployment.workflow.slug}",
        reason=reason[:2000],
        before=before,
        after={**_snapshot(deployment), **(extra or {})},
        request_key=key or None,
    )


def _describe(deployment: Deployment) -> str:
    version = f"{deployment.workflow.slug} v{deployment.version.number}"
    if deployment.state == Deployment.State.RAMPING:
        return f"{version} is a canary on {deployment.percent}% of new runs."
    if deployment.state == Deployment.State.VALIDATING:
        return f"{version} is being validated (run {deployment.validation_run_id})."
    return f"{version}: {deployment.state}."
