"""Operator actions: the only way a person changes runs.

Dashboard, admin, commands and the API call these functions. Each one:

* checks permission (``workflows.operate_run``) and records a denial;
* requires a reason, and writes a RunEvent with the actor, the reason, before and after;
* is idempotent: a request key seen before, or a state where the action has nothing
  left to do, changes nothing;
* is safe under concurrency: it decides again and applies under the run's row lock, so
  of twenty simultaneous resumes exactly one re-opens the run (a rollback's compensate
  hooks run before, outside any lock: ``engine.recover``);
* has a ``preview`` that says which nodes run again, which have side effects and no
  compensate hook, and on which version, queue and pool.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from django.db import IntegrityError, transaction
from django.utils import timezone

from workflows import audit, engine
from workflows.definitions import registry
from workflows.deployments import routing
from workflows.models import AuditEvent, Checkpoint, NodeAttempt, NodeRun, Run, RunEvent, Workflow

OPERATE_PERMISSION = "workflows.operate_run"
ACTIONS = ("resume", "retry", "rollback", "cancel", "skip", "mark_succeeded", "stop_node")


class OperationError(Exception):
    """An action that cannot be done; the message says why and what to do instead."""


class OperationDenied(OperationError):
    """The actor lacks permission; the denial is recorded in the run's history."""


@dataclass(frozen=True)
class Actor:
    """Who acts: a user (checked against permissions) or a trusted system/CLI actor."""

    name: str
    user: object | None = None

    @classmethod
    def for_user(cls, user) -> "Actor":
        return cls(name=user.get_username(), user=user)

    def may_operate(self) -> bool:
        return self.user is None or self.user.has_perm(OPERATE_PERMISSION)


@dataclass(frozen=True)
class Outcome:
    run: Run
    changed: bool
    message: str


@dataclass(frozen=True)
class PreviewNode:
    key: str
    type: str
    status: str
    will: str
    queue: str
    pool: str
    side_effects: bool
    has_compensate: bool
    warning: str = ""


@dataclass(frozen=True)
class Preview:
    action: str
    run_id: int
    workflow: str
    version: int
    run_status: str
    nodes: list[PreviewNode] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    noop_message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# --- Starting and finding runs ----------------------------------------------------------------


def start_run(
    workflow_slug: str,
    *,
    actor,
    params: dict | None = None,
    priority: str = "default",
    request_key: str | None = None,
    version_number: int | None = None,
) -> Run:
    """Start a run on the version the workflow's deployments choose (or, asked by
    number, on that version, outside any deployment).

    With a request key, a repeat of the same request returns the run it started.
    """
    actor = _as_actor(actor)
    if request_key:
        earlier = _run_started_by(request_key)
        if earlier is not None:
            return earlier
    try:
        workflow = Workflow.objects.get(slug=workflow_slug)
    except Workflow.DoesNotExist:
        known = ", ".join(Workflow.objects.values_list("slug", flat=True)[:20]) or "none loaded yet"
        raise OperationError(
            f"No workflow {workflow_slug!r} (known: {known}). Load it with manage.py load_workflow PATH."
        ) from None
    check_may_start(actor, workflow)
    if version_number is None:
        version, deployment = routing.version_for_new_run(workflow, params or {})
    else:
        deployment = None
        version = workflow.versions.filter(number=version_number).first()
        if version is None:
            raise OperationError(
                f"Workflow {workflow_slug!r} has no version {version_number}: it has "
                f"{', '.join(f'v{n}' for n in workflow.versions.values_list('number', flat=True))}."
            )
    if version is None:
        raise OperationError(
            f"Workflow {workflow_slug!r} has no version; load its definition first."
        )
    if priority not in Run.Priority.values:
        raise OperationError(f"Priority must be one of {', '.join(Run.Priority.values)}.")
    try:
        return engine.start_run(
            version,
            params=params,
            trigger=actor.name,
            priority=priority,
            request_key=request_key,
            deployment=deployment,
        )
    except engine.RunParamsError as error:
        raise OperationError(str(error)) from None
    except IntegrityError:
        # The same request raced in from another process and started the run first.
        earlier = _run_started_by(request_key) if request_key else None
        if earlier is None:
            raise
        return earlier


def check_may_start(actor, workflow: Workflow) -> None:
    """Refuse an actor who may not start runs; the refusal is audited (rate-limited)."""
    actor = _as_actor(actor)
    if actor.may_operate():
        return
    target = f"workflow:{workflow.slug}"
    audit.record_refusal(actor.name, AuditEvent.Action.START_RUN, target, "", OPERATE_PERMISSION)
    raise OperationDenied(
        f"{actor.name} may not start runs: ask an administrator for the "
        f"'{OPERATE_PERMISSION}' permission."
    )


def _run_started_by(request_key: str) -> Run | None:
    event = RunEvent.objects.filter(request_key=request_key).select_related("run").first()
    return event.run if event is not None else None


def get_run(run_id) -> Run:
    try:
        return Run.objects.select_related("workflow", "version").get(pk=int(run_id))
    except (Run.DoesNotExist, ValueError, TypeError):
        raise OperationError(
            f"No run with id {run_id!r}. List runs in the dashboard or the admin."
        ) from None


# --- The actions ------------------------------------------------------------------------------


def resume_run(run_id, *, actor, reason: str, request_key: str | None = None) -> Outcome:
    """Re-open a failed or cancelled run on its pinned version: succeeded nodes keep their
    outputs; every other node runs again from its latest progress checkpoint."""
    return _operate(
        "resume",
        run_id,
        actor=actor,
        reason=reason,
        request_key=request_key,
        make_plan=lambda run, nodes: engine.plan_resume(run, nodes),
        done=lambda plan: f"Run {plan.run.pk} resumed: {len(plan.reset)} node(s) will run again.",
    )


def retry_node(
    run_id,
    node_key: str,
    *,
    actor,
    reason: str,
    downstream: bool = False,
    expected_attempt: int | None = None,
    request_key: str | None = None,
) -> Outcome:
    """A new attempt of one node (ending a stuck attempt), optionally resetting its downstream."""
    return _operate(
        "retry",
        run_id,
        actor=actor,
        reason=reason,
        request_key=request_key,
        make_plan=lambda run, nodes: engine.plan_retry(
            run, nodes, node_key, downstream=downstream, expected_attempt=expected_attempt
        ),
        done=lambda plan: (
            f"Node {node_key} of run {plan.run.pk} queued for a new attempt"
            + (f" with {len(plan.reset) - 1} downstream node(s) reset." if downstream else ".")
        ),
        details={"node": node_key, "downstream": downstream},
    )


def rollback_run(
    run_id,
    *,
    actor,
    reason: str,
    to_checkpoint: int | None = None,
    to_node: str | None = None,
    resume: bool = True,
    request_key: str | None = None,
) -> Outcome:
    """Back to a checkpoint (or just before a node): compensate what completed after it,
    newest first, reset those nodes and their downstream, then (by default) resume."""
    return _operate(
        "rollback",
        run_id,
        actor=actor,
        reason=reason,
        request_key=request_key,
        make_plan=lambda run, nodes: engine.plan_rollback(
            run, nodes, checkpoint_id=to_checkpoint, node_key=to_node, resume=resume
        ),
        done=lambda plan: (
            f"Run {plan.run.pk} rolled back: {len(plan.compensate)} compensated, "
            f"{len(plan.reset)} reset"
            + ("; resumed." if resume else "; left cancelled until resumed.")
        ),
        details={"to_checkpoint": to_checkpoint, "to_node": to_node, "resume": resume},
    )


def skip_node(
    run_id, node_key: str, *, actor, reason: str, request_key: str | None = None
) -> Outcome:
    """Mark a node skipped: its downstream may proceed as if it had succeeded."""
    return _operate(
        "skip",
        run_id,
        actor=actor,
        reason=reason,
        request_key=request_key,
        make_plan=lambda run, nodes: engine.plan_skip(run, nodes, node_key),
        done=lambda plan: f"Node {node_key} of run {plan.run.pk} skipped.",
        details={"node": node_key},
    )


def mark_node_succeeded(
    run_id, node_key: str, *, actor, reason: str, output=None, request_key: str | None = None
) -> Outcome:
    """Mark a node succeeded with an output the operator gives (e.g. done by hand)."""
    output = {} if output is None else output
    return _operate(
        "mark_succeeded",
        run_id,
        actor=actor,
        reason=reason,
        request_key=request_key,
        make_plan=lambda run, nodes: engine.plan_mark_succeeded(run, nodes, node_key, output),
        done=lambda plan: f"Node {node_key} of run {plan.run.pk} marked succeeded.",
        details={"node": node_key, "output": output},
    )


def cancel_run(run_id, *, actor, reason: str, request_key: str | None = None) -> Outcome:
    """Cancel a run: queued nodes are dropped, running ones stopped."""
    actor = _as_actor(actor)
    reason = _required_reason(reason, "cancel")
    run = get_run(run_id)
    _check_permission(actor, run, "cancel", reason)
    with transaction.atomic():
        run = Run.objects.select_for_update(no_key=True).get(pk=run.pk)
        if request_key and RunEvent.objects.filter(request_key=request_key).exists():
            return Outcome(run, False, "This request was already applied; nothing changed.")
        before = run.status
        if not engine.cancel_run(run.pk, actor=actor.name, reason=reason):
            return Outcome(run, False, f"Run {run.pk} is already {run.status}; nothing to cancel.")
        RunEvent.objects.create(
            run=run,
            kind=RunEvent.Kind.OPERATOR,
            actor=actor.name,
            reason=reason,
            request_key=request_key,
            before={"action": "cancel", "run_status": before},
            after={"run_status": Run.Status.CANCELLED},
        )
    run.refresh_from_db()
    return Outcome(run, True, f"Run {run.pk} cancelled.")


def stop_node(
    run_id,
    node_key: str,
    *,
    actor,
    reason: str,
    expected_attempt: int | None = None,
    request_key: str | None = None,
) -> Outcome:
    """Stop a running node now: its attempt fails with "stopped by <actor>: <reason>" and
    is not retried; its worker is told to stop the job. A node no longer running that
    attempt (finished meanwhile, a second click) changes nothing and says why."""
    actor = _as_actor(actor)
    reason = _required_reason(reason, "stop a node of")
    run = get_run(run_id)
    _check_permission(actor, run, "stop_node", reason)
    try:
        stopped = engine.stop_node(
            run.pk,
            node_key,
            actor=actor.name,
            reason=reason,
            expected_attempt=expected_attempt,
            request_key=request_key,
        )
    except engine.EngineError as error:
        raise OperationError(
            f"{error} Pick a running node on the run page or the Workers page."
        ) from None
    except IntegrityError:
        # The same request key raced in from another process: it was applied once.
        return Outcome(get_run(run_id), False, "This request was already applied; nothing changed.")
    return Outcome(stopped.run, stopped.changed, stopped.message)


# --- Previews ---------------------------------------------------------------------------------


def preview(action: str, run_id, **options) -> Preview:
    """What ``action`` would do to the run now, without changing anything."""
    run = get_run(run_id)
    nodes = engine.load_nodes(run, lock=False)
    if action == "cancel":
        live = [
            n
            for n in nodes.values()
            if n.status in NodeRun.ACTIVE or n.status == NodeRun.Status.PENDING
        ]
        return _preview(
            run,
            "cancel",
            [
                (n, "is cancelled" + (" (its worker is stopped)" if n.status == "running" else ""))
                for n in live
            ],
            noop="" if run.status in Run.ACTIVE else f"Run {run.pk} is already {run.status}.",
        )
    if action == "stop_node":
        return _stop_preview(run, nodes, options["node"], options.get("expected_attempt"))
    makers: dict[str, Callable] = {
        "resume": lambda: engine.plan_resume(run, nodes),
        "retry": lambda: engine.plan_retry(
            run,
            nodes,
            options["node"],
            downstream=options.get("downstream", False),
            expected_attempt=options.get("expected_attempt"),
        ),
        "rollback": lambda: engine.plan_rollback(
            run,
            nodes,
            checkpoint_id=options.get("to_checkpoint"),
            node_key=options.get("to_node"),
            resume=options.get("resume", True),
        ),
        "skip": lambda: engine.plan_skip(run, nodes, options["node"]),
        "mark_succeeded": lambda: engine.plan_mark_succeeded(
            run, nodes, options["node"], options.get("output") or {}
        ),
    }
    if action not in makers:
        raise OperationError(f"Unknown action {action!r}; use one of {', '.join(ACTIONS)}.")
    try:
        plan = makers[action]()
    except engine.RecoveryError as error:
        raise OperationError(str(error)) from None
    return _preview(run, action, _describe(plan), noop=plan.noop_message)


def _stop_preview(run: Run, nodes: dict[str, NodeRun], key: str, expected_attempt) -> Preview:
    if key not in nodes:
        raise OperationError(
            f"Run {run.pk} has no node {key!r} (nodes: {', '.join(list(nodes)[:20])})."
        )
    node = nodes[key]
    refusal = engine.why_not_stoppable(node, expected_attempt)
    if refusal:
        return _preview(run, "stop_node", [], noop=refusal)
    worker = (
        NodeAttempt.objects.filter(node_run=node, number=node.attempt)
        .values_list("worker", flat=True)
        .first()
    )
    on = f" on worker {worker}" if worker else ""
    preview = _preview(
        run,
        "stop_node",
        [(node, f"attempt {node.attempt}{on} is stopped and fails; it is not retried")],
        noop="",
    )
    if node.downstream:
        preview.warnings.append(
            f"{', '.join(node.downstream)} will not run until you retry or skip {key}."
        )
    if registry.get(node.node_type).side_effects:
        preview.warnings.append(
            f"{key} has side effects: what it wrote before it stops stays (no compensate "
            "hook runs)."
        )
    return preview


def _describe(plan: engine.Plan) -> list[tuple[NodeRun, str]]:
    checkpointed = set(
        Checkpoint.objects.filter(
            node_run__in=[plan.nodes[k] for k in plan.reset],
            kind=Checkpoint.Kind.PROGRESS,
            **(
                {"pk__lte": plan.drop_checkpoints_after_id}
                if plan.drop_checkpoints_after_id is not None
                else {}
            ),
        ).values_list("node_run__node_key", flat=True)
    )
    described = []
    for key in plan.compensate:
        described.append((plan.nodes[key], "compensate hook runs, then it runs again"))
    for key in plan.reset:
        if key in plan.compensate:
            continue
        if key in plan.resume_from_checkpoint and key in checkpointed:
            will = "runs again from its latest checkpoint"
        else:
            will = "runs again from the start"
        described.append((plan.nodes[key], will))
    described += [(plan.nodes[key], "is skipped; its downstream may proceed") for key in plan.skip]
    described += [
        (plan.nodes[key], "is marked succeeded with the given output") for key in plan.succeed
    ]
    return described


def _preview(run: Run, action: str, described, *, noop: str) -> Preview:
    nodes, warnings = [], []
    for node, will in described:
        node_type = registry.get(node.node_type)
        warning = ""
        reruns = "runs again" in will
        if (
            reruns
            and node_type.side_effects
            and node_type.compensate_func is None
            and node.status == NodeRun.Status.SUCCEEDED
        ):
            warning = "has side effects and no compensate hook: running it again may repeat them"
            warnings.append(f"{node.node_key} {warning}")
        nodes.append(
            PreviewNode(
                key=node.node_key,
                type=node.node_type,
                status=node.status,
                will=will,
                queue=node.queue,
                pool=node.pool,
                side_effects=node_type.side_effects,
                has_compensate=node_type.compensate_func is not None,
                warning=warning,
            )
        )
    return Preview(
        action=action,
        run_id=run.pk,
        workflow=run.workflow.slug,
        version=run.version.number,
        run_status=run.status,
        nodes=nodes,
        warnings=warnings,
        noop_message=noop,
    )


# --- The shared shape of an action ------------------------------------------------------------


def _operate(
    action, run_id, *, actor, reason, request_key, make_plan, done, details=None
) -> Outcome:
    """Check the reason and the actor's permission (a denial is recorded), then let the
    engine compensate, lock, plan again, apply and audit (``engine.recover``)."""
    actor = _as_actor(actor)
    reason = _required_reason(reason, action)
    run = get_run(run_id)
    _check_permission(actor, run, action, reason)
    try:
        result = engine.recover(
            action,
            run.pk,
            make_plan,
            actor=actor.name,
            reason=reason,
            request_key=request_key,
            details=details,
        )
    except engine.RecoveryError as error:
        raise OperationError(str(error)) from None
    except IntegrityError:
        # The same request key raced in through another run's lock: it was applied once.
        return Outcome(get_run(run_id), False, "This request was already applied; nothing changed.")
    if not result.changed:
        return Outcome(result.run, False, result.message)
    return Outcome(result.run, True, done(result.plan))


def _record_refusal(actor: Actor, run: Run, action: str, reason: str) -> None:
    with transaction.atomic():
        earlier = (
            RunEvent.objects.select_for_update()
            .filter(
                run=run,
                kind=RunEvent.Kind.OPERATOR,
                actor=actor.name,
                at__gte=timezone.now() - audit.REFUSALS_COUNTED_FOR,
                before={"action": action, "denied": True},
            )
            .order_by("-id")
            .first()
        )
        if earlier is not None:
            earlier.after = {"refused_again": ((earlier.after or {}).get("refused_again", 0) + 1)}
            earlier.save(update_fields=["after"])
            return
        RunEvent.objects.create(
            run=run,
            kind=RunEvent.Kind.OPERATOR,
            actor=actor.name,
            reason=f"denied {action}: {actor.name} lacks the {OPERATE_PERMISSION} permission "
            f"(asked: {reason})",
            before={"action": action, "denied": True},
            after=None,
        )


def _as_actor(actor) -> Actor:
    return actor if isinstance(actor, Actor) else Actor(name=str(actor))


def _required_reason(reason, action: str) -> str:
    if not reason or not str(reason).strip():
        raise OperationError(
            f"A reason is required to {action.replace('_', ' ')} a run; it is kept in its history."
        )
    return str(reason).strip()[:2000]


def _check_permission(actor: Actor, run: Run, action: str, reason: str) -> None:
    """Refuse an actor without the permission; the refusal goes in the run's history,
    a burst of the same one (actor, action) within audit.REFUSALS_COUNTED_FOR counted on
    its first event rather than written again."""
    if actor.may_operate():
        return
    _record_refusal(actor, run, action, reason)
    raise OperationDenied(
        f"{actor.name} may not {action.replace('_', ' ')} runs: ask an administrator for the "
        f"'{OPERATE_PERMISSION}' permission."
    )
