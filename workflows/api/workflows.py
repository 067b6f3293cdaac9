"""Workflows: list, one workflow, its runs, and starting a run."""

import time
from typing import Annotated

from django.db.models import Max, Q
from django.http import HttpResponse
from ninja import Body, Query, Router
from ninja.responses import Status

from workflows import engine, operations
from workflows.api import idempotency, lookups, pages
from workflows.api.auth import VIEW_PERMISSION, require
from workflows.api.errors import ApiError, invalid
from workflows.api.schemas import (
    RunDetail,
    RunPage,
    RunQuery,
    StartRun,
    WorkflowDetail,
    WorkflowPage,
    WorkflowQuery,
    api_url,
    errors,
)
from workflows.definitions.versioning import latest_version
from workflows.models import Run, Workflow
from workflows.selectors import search_runs

router = Router(tags=["workflows"])

# How often a start request that waits looks at its run.
POLL_SECONDS = 0.25


@router.get(
    "/workflows",
    response={200: WorkflowPage, **errors(400)},
    url_name="workflow-list",
    operation_id="listWorkflows",
    summary="Workflows, by slug",
)
def workflow_list(request, query: Query[WorkflowQuery]):
    require(request.user, VIEW_PERMISSION)
    workflows = Workflow.objects.annotate(latest_number=Max("versions__number")).order_by("slug")
    if query.after:
        workflows = workflows.filter(slug__gt=query.after)
    rows, more = pages.page(workflows, query.limit)
    return {"results": rows, "next": pages.next_url(request, after=rows[-1].slug) if more else None}


@router.get(
    "/workflows/{slug}",
    response={200: WorkflowDetail, **errors(400, 404)},
    url_name="workflow-detail",
    operation_id="getWorkflow",
    summary="A workflow and its latest version",
)
def workflow_detail(request, slug: str):
    require(request.user, VIEW_PERMISSION)
    workflow = lookups.get_workflow(slug)
    workflow.latest = latest_version(workflow)
    workflow.latest_number = workflow.latest.number if workflow.latest else None
    return workflow


@router.get(
    "/workflows/{slug}/runs",
    response={200: RunPage, **errors(400, 404)},
    url_name="workflow-runs",
    operation_id="listWorkflowRuns",
    summary="The workflow's runs, newest first",
)
def workflow_runs(request, slug: str, query: Query[RunQuery]):
    require(request.user, VIEW_PERMISSION)
    return run_page(request, query, lookups.get_workflow(slug))


def run_page(request, query, workflow) -> dict:
    """A page of runs, newest first (shared with GET /runs)."""
    runs = lookups.runs().order_by("-created_at", "-id")
    if workflow is not None:
        runs = runs.filter(workflow=workflow)
    if query.status:
        runs = runs.filter(status__in=query.status)
    if query.q:
        runs = search_runs(runs, query.q)
    if query.cursor:
        created_at, pk = pages.decode_cursor(query.cursor)
        # (created_at, id) < cursor, with the created_at bound stated alone so that the
        # run_created index starts at the cursor instead of reading every newer run.
        runs = runs.filter(
            Q(created_at__lte=created_at), Q(created_at__lt=created_at) | Q(pk__lt=pk)
        )
    rows, more = pages.page(runs, query.limit)
    cursor = pages.encode_cursor(rows[-1]) if more else None
    return {"results": rows, "next": pages.next_url(request, cursor=cursor) if more else None}


@router.post(
    "/workflows/{slug}/runs",
    response={200: RunDetail, 202: RunDetail, **errors(400, 404, 409, 413)},
    url_name="workflow-start-run",
    operation_id="startRun",
    summary="Start a run: on the version its deployments choose, or the one asked for",
    description="With `version`, that version runs, outside any deployment. Waits up to "
    "`wait` seconds (default 10, at most 180, never longer than the workflow's timeout) for "
    "the run to finish. Answers 200 with the final state if it did, else 202 with the state "
    "so far and a Location header to poll. Needs the workflows.operate_run permission.",
    openapi_extra=idempotency.OPENAPI,
)
def start_run(
    request, slug: str, response: HttpResponse, body: Annotated[StartRun | None, Body()] = None
):
    """Start a run; 200 with its final state if it finishes within the wait, else 202 with
    its state so far and a Location to poll. The wait never outlasts the workflow's own
    timeout: after that the run is expired and waiting longer is pointless."""
    body = body or StartRun()
    workflow = lookups.get_workflow(slug)
    operations.check_may_start(operations.Actor.for_user(request.user), workflow)
    version = latest_version(workflow)
    if version is None:
        raise ApiError(
            409,
            f"Workflow {workflow.slug!r} has no version yet; load its definition with "
            "manage.py load_workflow PATH.",
        )
    if body.version is not None:
        version = workflow.versions.filter(number=body.version).first()
        if version is None:
            numbers = workflow.versions.order_by("number").values_list("number", flat=True)
            raise invalid(
                "version",
                f"{workflow.slug} has no version {body.version} (it has "
                f"{', '.join(f'v{n}' for n in numbers)}).",
            )
    try:
        engine.resolve_run_params(version.spec, body.params)
    except engine.RunParamsError as error:
        message = str(error)
        # Type errors already start with their path (params.n: ...); others get the field.
        if message.startswith("params"):
            raise ApiError(400, message, field="params") from None
        raise invalid("params", message) from None
    try:
        run = operations.start_run(
            workflow.slug,
            actor=operations.Actor.for_user(request.user),
            params=body.params,
            priority=body.priority,
            request_key=idempotency.request_key(request),
            version_number=body.version,
        )
    except operations.OperationDenied:
        raise
    except operations.OperationError as error:
        raise ApiError(409, str(error)) from None
    wait = body.wait
    if run.version.spec.get("timeout"):
        wait = min(wait, run.version.spec["timeout"])
    _wait_until_finished(run.pk, wait)
    run = lookups.get_run(run.pk, with_nodes=True)
    if run.is_finished:
        return Status(200, run)
    response["Location"] = api_url(request, "run-detail", run.pk)
    response["Retry-After"] = "2"
    return Status(202, run)


def _wait_until_finished(run_id: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        status = Run.objects.filter(pk=run_id).values_list("status", flat=True).first()
        remaining = deadline - time.monotonic()
        if status in Run.TERMINAL or remaining <= 0:
            return
        time.sleep(min(POLL_SECONDS, remaining))
