"""Deployments: which version new runs of a workflow get (workflows/deployments/).

Reads: a workflow's deployments, newest first, and one deployment with its last canary
analysis. Writes call the deployment services, which check the operate permission (a
refusal is audited), lock the workflow and check its state, and audit every transition;
so a repeat that finds nothing to do answers ``changed: false``. Promoting is the one
write a blind repeat would apply again (the next canary step): with an ``Idempotency-Key``
the service keeps the key on its audit row, and the same request again changes nothing.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from django.http import HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.responses import Status
from pydantic import ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from workflows import operations
from workflows.api import idempotency, lookups
from workflows.api.auth import OPERATE_PERMISSION, VIEW_PERMISSION, require
from workflows.api.errors import ApiError, invalid
from workflows.api.schemas import MAX_ID, api_url, errors
from workflows.deployments import services
from workflows.models import Deployment, Workflow, WorkflowVersion

router = Router(tags=["deployments"])

MAX_LISTED = 50
MAX_REASON = 2000
MAX_MIN_RUNS = 1000

Strategy = Literal[tuple(Deployment.Strategy.values)]  # type: ignore[valid-type]
State = Literal[tuple(Deployment.State.values)]  # type: ignore[valid-type]
RunPolicy = Literal[services.RUN_POLICIES]  # type: ignore[valid-type]
MovePolicy = Literal[services.MOVE_POLICIES]  # type: ignore[valid-type]
VersionNumber = Annotated[int, Field(ge=1, le=MAX_ID)]


# --- Schemas ----------------------------------------------------------------------------------


class DeploymentOut(Schema):
    id: int
    url: str
    workflow: str = Field(description="The workflow's slug.")
    version: int = Field(description="The version number it deploys.")
    baseline_version: int | None = Field(
        description="The version new runs got before (a canary is compared with it)."
    )
    strategy: Strategy
    state: State
    percent: int = Field(description="The share of new runs it gets now, in % (100 once active).")
    steps: list[int] = Field(description="Canary: the share of new runs at each step, in %.")
    step: int = Field(description="Canary: the current step (an index into steps).")
    min_runs: int = Field(description="Canary: finished runs a step needs before it is judged.")
    key_param: str = Field(description="Canary: the run param that keeps a key on one version.")
    validation_run: int | None = Field(description="Blue-green: the validation run's id.")
    actor: str
    reason: str
    outcome: str = Field(description="Why it ended as it did ('' while live).")
    evidence: dict[str, Any] = Field(
        description="The last canary analysis (canary and baseline runs, failures, p95, "
        "fisher_p, mann_whitney_p, verdict, reason) or the validation run's outcome."
    )
    created_at: datetime
    finished_at: datetime | None

    @staticmethod
    def resolve_url(deployment, context) -> str:
        return api_url(context["request"], "deployment-detail", deployment.pk)

    @staticmethod
    def resolve_workflow(deployment) -> str:
        return deployment.workflow.slug

    @staticmethod
    def resolve_version(deployment) -> int:
        return deployment.version.number

    @staticmethod
    def resolve_baseline_version(deployment) -> int | None:
        return deployment.baseline.number if deployment.baseline_id else None

    @staticmethod
    def resolve_validation_run(deployment) -> int | None:
        return deployment.validation_run_id


class DeploymentList(Schema):
    workflow: str
    results: list[DeploymentOut] = Field(description=f"Newest first, at most {MAX_LISTED}.")


class DeploymentChange(Schema):
    changed: bool = Field(
        description="False when there was nothing to do, or this Idempotency-Key was "
        "already applied."
    )
    message: str
    deployment: DeploymentOut | None = Field(
        description="The deployment acted on, as it is now (null when the workflow has none)."
    )


class RollbackRuns(Schema):
    running: list[int] = Field(description="Run ids with a node started, newest first.")
    queued: list[int] = Field(description="Run ids not started yet.")
    failed: list[int] = Field(description="Run ids that failed since the version went live.")


class RollbackPreview(Schema):
    workflow: str
    from_versions: list[int] = Field(description="The versions new runs would stop getting.")
    to_version: int
    runs: RollbackRuns = Field(description="Runs on those versions, at most 200 of each.")
    noop_message: str = Field(description="Non-empty when the rollback has nothing to do.")


class ReasonBody(Schema):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(min_length=1, max_length=MAX_REASON, description="Why: kept in the audit.")

    @field_validator("reason")
    @classmethod
    def _has_words(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError(
                "reason", "must not be empty; say why, it is kept in the audit."
            )
        return value


class DeployBody(ReasonBody):
    version: VersionNumber = Field(description="The version number to deploy.")
    strategy: Strategy | None = Field(
        None,
        description="How (default: the definition's deploy section, else immediate). Without "
        "a live version there is nothing to compare with: it deploys at once.",
    )
    steps: list[Annotated[int, Field(ge=1, le=100)]] | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Canary: rising percentages of new runs ending at 100, e.g. [10, 50, 100] "
        "(default: the definition's, else [10, 50, 100]).",
    )
    min_runs: int | None = Field(
        None,
        ge=1,
        le=MAX_MIN_RUNS,
        description="Canary: finished runs a step needs before it is judged (default: the "
        f"definition's, else {services.DEFAULT_MIN_RUNS}).",
    )
    key_param: str | None = Field(
        None,
        max_length=100,
        description="Canary: a run param whose value keeps a key on one version (default: "
        "the definition's, else none).",
    )

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, steps):
        if steps is not None and (steps != sorted(set(steps)) or steps[-1] != 100):
            raise PydanticCustomError(
                "steps", "must be rising percentages ending at 100, e.g. [10, 50, 100]."
            )
        return steps


class RollbackBody(ReasonBody):
    version: VersionNumber = Field(description="The version new runs get from now on.")
    runs: RunPolicy = Field(
        "finish",
        description="The runs on the versions left: finish on them, cancel, or restart "
        "(cancelled, then started again on the chosen version with the same params).",
    )


class RunsLeft(Schema):
    running: list[int] = Field(description="Run ids with a node started, newest first.")
    queued: list[int] = Field(description="Run ids not started yet.")


class RunsLeftPreview(Schema):
    workflow: str
    from_version: int
    to_version: int | None = Field(description="The live version a restart would run.")
    runs: RunsLeft = Field(description="The version's unfinished runs, at most 200 of each.")
    total: int = Field(
        description=f"Unfinished runs one move handles (at most {services.MOVED_AT_ONCE})."
    )
    refusal: str = Field(
        description="Non-empty when runs cannot be moved off this version "
        "(it is live, or being deployed), saying what to do instead."
    )


class MoveRunsBody(ReasonBody):
    runs: MovePolicy = Field(
        "restart",
        description="restart (cancelled, then started again on the live version with the "
        "same params, linked to the original) or cancel.",
    )


class RollbackQuery(Schema):
    version: VersionNumber = Field(description="The version to roll back to.")


# --- Reads ------------------------------------------------------------------------------------


def _deployments():
    # A version's definition can be ~100 KB of JSON; the answer needs only its number.
    return Deployment.objects.select_related("workflow", "version", "baseline").defer(
        "version__spec", "version__source", "baseline__spec", "baseline__source"
    )


def _get_deployment(deployment_id: int) -> Deployment:
    deployment = (
        _deployments().filter(pk=deployment_id).first() if 0 < deployment_id <= MAX_ID else None
    )
    if deployment is None:
        raise ApiError(
            404,
            f"No deployment {deployment_id}. List a workflow's deployments at "
            "GET /api/v1/workflows/{slug}/deployments.",
        )
    return deployment


@router.get(
    "/workflows/{slug}/deployments",
    response={200: DeploymentList, **errors(400, 404)},
    url_name="workflow-deployments",
    operation_id="listDeployments",
    summary="The workflow's deployments, newest first",
    description=f"At most {MAX_LISTED}: the live ones and the latest that ended.",
)
def deployment_list(request, slug: str):
    require(request.user, VIEW_PERMISSION)
    workflow = lookups.get_workflow(slug)
    rows = _deployments().filter(workflow=workflow).order_by("-created_at", "-id")[:MAX_LISTED]
    return {"workflow": workflow.slug, "results": list(rows)}


@router.get(
    "/deployments/{int:deployment_id}",
    response={200: DeploymentOut, **errors(400, 404)},
    url_name="deployment-detail",
    operation_id="getDeployment",
    summary="A deployment, with its last canary analysis",
)
def deployment_detail(request, deployment_id: int):
    require(request.user, VIEW_PERMISSION)
    return _get_deployment(deployment_id)


@router.get(
    "/workflows/{slug}/rollback-preview",
    response={200: RollbackPreview, **errors(400, 404)},
    url_name="workflow-rollback-preview",
    operation_id="previewRollback",
    summary="What rolling back to a version would change",
    description="The versions new runs would stop getting, and the runs on them still running, "
    "only queued, or failed since they went live. Changes nothing.",
)
def rollback_preview(request, slug: str, query: Query[RollbackQuery]):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    workflow = lookups.get_workflow(slug)
    _get_version(workflow, query.version)
    return services.preview_rollback(workflow, query.version).as_dict()


@router.get(
    "/workflows/{slug}/versions/{int:version}/runs-left",
    response={200: RunsLeftPreview, **errors(400, 404)},
    url_name="workflow-version-runs-left",
    operation_id="previewRunsLeft",
    summary="The unfinished runs of a version new runs no longer get",
    description="What POST move-runs would end: the runs still running or queued on a version "
    "that was aborted, rolled back or replaced. Changes nothing.",
)
def runs_left(request, slug: str, version: int):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    workflow = lookups.get_workflow(slug)
    _get_version(workflow, version, in_path=True)
    return services.preview_runs_left(workflow, version).as_dict()


# --- Writes -----------------------------------------------------------------------------------

WRITE_ERRORS = errors(400, 404, 409, 413)
NEEDS = (
    f"Needs the {OPERATE_PERMISSION} permission (a refusal is audited). Every transition is "
    "audited on workflow:<slug>."
)


@router.post(
    "/workflows/{slug}/deployments",
    response={200: DeploymentChange, 201: DeploymentChange, **WRITE_ERRORS},
    url_name="workflow-deploy",
    operation_id="deployVersion",
    summary="Deploy a version: at once, as a canary, or blue-green",
    description="Answers 201 with the new deployment, or 200 with changed=false when the "
    "version is already live (or this Idempotency-Key was applied). 409 while another "
    f"version is being deployed: promote or abort it first. {NEEDS}",
    openapi_extra={
        **idempotency.OPENAPI,
        "responses": {
            201: {
                "headers": {
                    "Location": {
                        "description": "The new deployment's URL.",
                        "schema": {"type": "string"},
                    }
                }
            }
        },
    },
)
def deploy(request, slug: str, body: DeployBody, response: HttpResponse):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    workflow = lookups.get_workflow(slug)
    version = _get_version(workflow, body.version)
    change = _once(
        request,
        lambda key: services.deploy(
            version,
            actor=operations.Actor.for_user(request.user),
            reason=body.reason,
            strategy=body.strategy,
            steps=body.steps,
            min_runs=body.min_runs,
            key_param=body.key_param,
            request_key=key,
        ),
    )
    if not change.changed:
        return Status(200, change)
    response["Location"] = api_url(request, "deployment-detail", change.deployment.pk)
    return Status(201, change)


@router.post(
    "/deployments/{int:deployment_id}/promote",
    response={200: DeploymentChange, **WRITE_ERRORS},
    url_name="deployment-promote",
    operation_id="promoteDeployment",
    summary="Promote a deployment: a canary's next step now, a blue-green switch now",
    description="After a canary's last step (or for a blue-green deployment) it becomes the "
    "live version. Answers changed=false when it is no longer being deployed. Send an "
    f"Idempotency-Key to be sure a retried request does not skip a step. {NEEDS}",
    openapi_extra=idempotency.OPENAPI,
)
def promote(request, deployment_id: int, body: ReasonBody):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    deployment = _get_deployment(deployment_id)
    return _once(
        request,
        lambda key: services.promote(
            deployment.pk,
            actor=operations.Actor.for_user(request.user),
            reason=body.reason,
            request_key=key,
        ),
    )


@router.post(
    "/deployments/{int:deployment_id}/abort",
    response={200: DeploymentChange, **WRITE_ERRORS},
    url_name="deployment-abort",
    operation_id="abortDeployment",
    summary="Abort a canary or a blue-green validation: new runs get the live version again",
    description="Runs already on the aborted version finish on it; a validation run still "
    "going is cancelled. Answers changed=false when it is no longer being deployed. " + NEEDS,
    openapi_extra=idempotency.OPENAPI,
)
def abort(request, deployment_id: int, body: ReasonBody):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    deployment = _get_deployment(deployment_id)
    return _once(
        request,
        lambda key: services.abort(
            deployment.pk,
            actor=operations.Actor.for_user(request.user),
            reason=body.reason,
            request_key=key,
        ),
    )


@router.post(
    "/workflows/{slug}/rollback",
    response={200: DeploymentChange, **WRITE_ERRORS},
    url_name="workflow-rollback",
    operation_id="rollbackVersion",
    summary="Roll back to a version: new runs get it at once",
    description="The live deployment ends rolled_back, one being deployed aborted; the runs "
    "on the versions left finish, are cancelled, or are restarted on the chosen version "
    "(see GET rollback-preview first). Answers changed=false when the version is already "
    "live. " + NEEDS,
    openapi_extra=idempotency.OPENAPI,
)
def rollback(request, slug: str, body: RollbackBody):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    workflow = lookups.get_workflow(slug)
    _get_version(workflow, body.version)
    return _once(
        request,
        lambda key: services.rollback_version(
            workflow,
            body.version,
            actor=operations.Actor.for_user(request.user),
            reason=body.reason,
            runs=body.runs,
            request_key=key,
        ),
    )


@router.post(
    "/workflows/{slug}/versions/{int:version}/move-runs",
    response={200: DeploymentChange, **WRITE_ERRORS},
    url_name="workflow-version-move-runs",
    operation_id="moveRunsOff",
    summary="End the runs left on a version: restart them on the live version, or cancel them",
    description="For a version new runs no longer get; refused (409) for the live version "
    f"and one being deployed. At most {services.MOVED_AT_ONCE} runs per request, newest "
    "first. Answers changed=false when none is left. " + NEEDS,
    openapi_extra=idempotency.OPENAPI,
)
def move_runs(request, slug: str, version: int, body: MoveRunsBody):
    require(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    workflow = lookups.get_workflow(slug)
    _get_version(workflow, version, in_path=True)
    return _once(
        request,
        lambda key: services.move_runs_off(
            workflow,
            version,
            actor=operations.Actor.for_user(request.user),
            reason=body.reason,
            runs=body.runs,
            request_key=key,
        ),
    )


def _get_version(workflow: Workflow, number: int, *, in_path: bool = False) -> WorkflowVersion:
    """The workflow's version ``number``; unknown: 404 when the path names it, else 400."""
    version = workflow.versions.filter(number=number).first() if 0 < number <= MAX_ID else None
    if version is None:
        known = ", ".join(
            f"v{n}" for n in workflow.versions.order_by("number").values_list("number", flat=True)
        )
        message = (
            f"{workflow.slug} has no version {number} (it has {known or 'none'}); load a "
            "definition with manage.py load_workflow PATH --deploy none."
        )
        raise ApiError(404, message) if in_path else invalid("version", message)
    return version


def _once(request, perform) -> services.Change:
    """``perform(request_key)``: the service keeps the Idempotency-Key on its audit row, so
    the same request again (same key, same path) changes nothing and answers with what it
    acted on, as it is now."""
    key = idempotency.request_key(request)
    return _fresh(perform(f"{key} {request.path}"[:200] if key else None))


def _fresh(change: services.Change) -> services.Change:
    """The change with its deployment read again with what the answer shows."""
    if change.deployment is None:
        return change
    return services.Change(
        _deployments().get(pk=change.deployment.pk), change.changed, change.message
    )
