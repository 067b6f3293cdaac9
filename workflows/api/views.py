"""API views: parse input, call one operation or read, present JSON.

Reads are bounded pages with a ``next`` link (keyset, so a page costs the same at run
100 000 as at run 10). Writes call workflows/operations.py, which checks permission,
audits, and is idempotent and safe under concurrency; the views only map its answers
and errors to HTTP.
"""

import base64
import json
import time
from datetime import datetime

from django.conf import settings
from django.db.models import Max, Q
from django.http import JsonResponse
from django.urls import Resolver404, resolve

from workflows import engine, operations
from workflows.api import inputs, openapi, serializers
from workflows.api.errors import ApiError, error_response, invalid
from workflows.api.http import OPERATE_PERMISSION, VIEW_PERMISSION, endpoint
from workflows.definitions.versioning import latest_version
from workflows.models import Checkpoint, LogLine, NodeAttempt, NodeRun, Run, RunEvent, Workflow

# How often a start request that waits looks at its run.
POLL_SECONDS = 0.25
# A run's version is shown by number; its definition stays in the database.
DEFERRED_RUN_FIELDS = ("version__spec", "version__source")


# --- Documents and workflows ------------------------------------------------------------------


@endpoint("GET", public=True)
def openapi_document(request):
    return JsonResponse(openapi.document())


@endpoint("GET")
def workflow_list(request):
    query = inputs.queries(request, "workflows")
    workflows = Workflow.objects.annotate(latest_number=Max("versions__number")).order_by("slug")
    if query["after"]:
        workflows = workflows.filter(slug__gt=query["after"])
    page, more = _page(workflows, query["limit"])
    return JsonResponse(
        {
            "results": [serializers.workflow_summary(request, w, w.latest_number) for w in page],
            "next": _next_url(request, after=page[-1].slug) if more else None,
        }
    )


@endpoint("GET")
def workflow_detail(request, slug):
    workflow = _get_workflow(slug)
    return JsonResponse(serializers.workflow_detail(request, workflow, latest_version(workflow)))


@endpoint("GET", "POST", permission=None)
def workflow_runs(request, slug):
    """GET: the workflow's runs. POST: start a run, and wait a little for it to finish."""
    if request.method == "POST":
        return _start_run(request, _get_workflow(slug))
    _require(request.user, VIEW_PERMISSION)
    return _run_list(request, inputs.queries(request, "workflow_runs"), _get_workflow(slug))


def _start_run(request, workflow):
    """Start a run; answer 200 with its final state if it finishes within the wait,
    else 202 with its state so far and a Location to poll.

    The wait is the body's ``wait`` (default 10 s, at most 180 s), never longer than the
    workflow's own timeout: after that the run is expired and waiting longer is pointless.
    """
    if not request.user.has_perm(OPERATE_PERMISSION):
        raise ApiError(
            403,
            f"{request.user.get_username()} may not start runs: ask an administrator for the "
            f"'{OPERATE_PERMISSION}' permission.",
        )
    body = inputs.parse_body(request, inputs.BODIES["start"])
    version = latest_version(workflow)
    if version is None:
        raise ApiError(
            409,
            f"Workflow {workflow.slug!r} has no version yet; load its definition with "
            "manage.py load_workflow PATH.",
        )
    try:
        engine.resolve_run_params(version.spec, body["params"])
    except engine.RunParamsError as error:
        raise invalid("params", str(error)) from None
    run = _call_operation(
        operations.start_run,
        workflow.slug,
        actor=operations.Actor.for_user(request.user),
        params=body["params"],
        priority=body["priority"],
        request_key=inputs.idempotency_key(request, request.user),
    )
    wait = body["wait"]
    if run.version.spec.get("timeout"):
        wait = min(wait, run.version.spec["timeout"])
    _wait_until_finished(run.pk, wait)
    run = _get_run(run.pk)
    response = JsonResponse(_run_body(request, run), status=200 if run.is_finished else 202)
    if not run.is_finished:
        response["Location"] = serializers.api_url(request, "run-detail", run.pk)
        response["Retry-After"] = "2"
    return response


def _wait_until_finished(run_id: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        status = Run.objects.filter(pk=run_id).values_list("status", flat=True).first()
        remaining = deadline - time.monotonic()
        if status in Run.TERMINAL or remaining <= 0:
            return
        time.sleep(min(POLL_SECONDS, remaining))


# --- Runs -------------------------------------------------------------------------------------


@endpoint("GET")
def run_list(request):
    query = inputs.queries(request, "runs")
    workflow = None
    if query["workflow"]:
        workflow = Workflow.objects.filter(slug=query["workflow"]).first()
        if workflow is None:
            raise invalid(
                "workflow",
                f"there is no workflow {query['workflow']!r}; list them at GET /api/v1/workflows.",
            )
    return _run_list(request, query, workflow)


def _run_list(request, query: dict, workflow):
    runs = (
        Run.objects.select_related("workflow", "version")
        .defer(*DEFERRED_RUN_FIELDS)
        .order_by("-created_at", "-id")
    )
    if workflow is not None:
        runs = runs.filter(workflow=workflow)
    if query["status"]:
        runs = runs.filter(status__in=query["status"])
    if query["cursor"]:
        created_at, pk = _decode_cursor(query["cursor"])
        runs = runs.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, pk__lt=pk))
    page, more = _page(runs, query["limit"])
    return JsonResponse(
        {
            "results": [serializers.run_summary(request, run) for run in page],
            "next": _next_url(request, cursor=_encode_cursor(page[-1])) if more else None,
        }
    )


@endpoint("GET")
def run_detail(request, run_id):
    return JsonResponse(_run_body(request, _get_run(run_id)))


@endpoint("GET")
def run_events(request, run_id):
    run = _get_run(run_id)
    query = inputs.queries(request, "events")
    events = (
        RunEvent.objects.filter(run=run, pk__gt=query["after"] or 0)
        .select_related("node_run")
        .only(*_EVENT_FIELDS, "node_run__node_key")
        .order_by("pk")
    )
    page, more = _page(events, query["limit"])
    return JsonResponse(
        {
            "run": run.pk,
            "results": [serializers.event(event) for event in page],
            "next": _next_url(request, after=page[-1].pk) if more else None,
        }
    )


_EVENT_FIELDS = ("id", "run", "node_run", "at", "kind", "actor", "reason", "before", "after")


@endpoint("GET")
def run_checkpoints(request, run_id):
    run = _get_run(run_id)
    query = inputs.queries(request, "checkpoints")
    checkpoints = (
        Checkpoint.objects.filter(run=run, pk__gt=query["after"] or 0)
        .select_related("node_run")
        .only(*_CHECKPOINT_FIELDS, "node_run__node_key")
        .order_by("pk")
    )
    page, more = _page(checkpoints, query["limit"])
    return JsonResponse(
        {
            "run": run.pk,
            "results": [serializers.checkpoint(checkpoint) for checkpoint in page],
            "next": _next_url(request, after=page[-1].pk) if more else None,
        }
    )


_CHECKPOINT_FIELDS = ("id", "run", "node_run", "kind", "sequence", "attempt", "state", "created_at")


# --- Nodes ------------------------------------------------------------------------------------


@endpoint("GET")
def node_attempts(request, run_id, node_key):
    run = _get_run(run_id)
    node = _get_node(run, node_key)
    query = inputs.queries(request, "attempts")
    attempts = NodeAttempt.objects.filter(node_run=node, number__gt=query["after"] or 0).order_by(
        "number"
    )
    page, more = _page(attempts, query["limit"])
    return JsonResponse(
        {
            "run": run.pk,
            "node": node.node_key,
            "results": [serializers.attempt(attempt) for attempt in page],
            "next": _next_url(request, after=page[-1].number) if more else None,
        }
    )


@endpoint("GET")
def node_logs(request, run_id, node_key):
    """One attempt's log lines (by default the current attempt's), oldest first."""
    run = _get_run(run_id)
    node = _get_node(run, node_key)
    query = inputs.queries(request, "logs")
    number = query["attempt"] or node.attempt
    attempt = NodeAttempt.objects.filter(node_run=node, number=number).first() if number else None
    if attempt is None and query["attempt"]:
        raise ApiError(
            404,
            f"Node {node.node_key} of run {run.pk} has no attempt {query['attempt']} "
            f"(its current attempt is {node.attempt}).",
        )
    page, more = [], False
    if attempt is not None:
        lines = LogLine.objects.filter(attempt=attempt, seq__gt=query["after"] or 0).order_by("seq")
        page, more = _page(lines, query["limit"])
    return JsonResponse(
        {
            "run": run.pk,
            "node": node.node_key,
            "attempt": attempt.number if attempt else None,
            "results": [serializers.log_line(line) for line in page],
            "next": _next_url(request, attempt=attempt.number, after=page[-1].seq)
            if more
            else None,
        }
    )


# --- Operator actions -------------------------------------------------------------------------


@endpoint("POST", permission=None)
def run_action(request, run_id, action):
    """resume, cancel, rollback: on the whole run."""
    _require_any(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    return _act(request, _get_run(run_id), action, node=None)


@endpoint("POST", permission=None)
def node_action(request, run_id, node_key, action):
    """retry, skip, mark-succeeded: on one node of the run."""
    _require_any(request.user, VIEW_PERMISSION, OPERATE_PERMISSION)
    run = _get_run(run_id)
    return _act(request, run, action, node=_get_node(run, node_key))


_CALLS = {
    "resume": lambda run_id, options, **common: operations.resume_run(run_id, **common),
    "cancel": lambda run_id, options, **common: operations.cancel_run(run_id, **common),
    "rollback": lambda run_id, options, **common: operations.rollback_run(
        run_id,
        to_checkpoint=options.get("to_checkpoint"),
        to_node=options.get("to_node"),
        resume=options["resume"],
        **common,
    ),
    "retry": lambda run_id, options, **common: operations.retry_node(
        run_id,
        options["node"],
        downstream=options["downstream"],
        expected_attempt=options.get("expected_attempt"),
        **common,
    ),
    "skip": lambda run_id, options, **common: operations.skip_node(
        run_id, options["node"], **common
    ),
    "mark_succeeded": lambda run_id, options, **common: operations.mark_node_succeeded(
        run_id, options["node"], output=options["output"], **common
    ),
}


def _act(request, run, action: str, node):
    """Check the input, then preview (``?dry_run=1``) or apply the action.

    Answers 200 with ``changed`` false when there was nothing to do or the same
    Idempotency-Key was already applied, so a double click or a retried request is safe.
    The caller has checked that the user may at least see runs; the operation checks the
    operate permission itself and records a denial in the run's history.
    """
    dry_run = inputs.queries(request, "action")["dry_run"]
    body = inputs.parse_body(request, inputs.BODIES[action], reason_optional=dry_run)
    options = {key: value for key, value in body.items() if key != "reason"}
    if node is not None:
        options["node"] = node.node_key
    _check_options(run, action, options)
    if dry_run:
        preview = _call_operation(operations.preview, action, run.pk, **options)
        return JsonResponse({"preview": serializers.preview(preview)})
    outcome = _call_operation(
        _CALLS[action],
        run.pk,
        options,
        actor=operations.Actor.for_user(request.user),
        reason=body["reason"],
        request_key=inputs.idempotency_key(request, request.user),
    )
    return JsonResponse(
        {
            "changed": outcome.changed,
            "message": outcome.message,
            "run": _run_body(request, _get_run(run.pk)),
        }
    )


def _check_options(run, action: str, options: dict) -> None:
    """What the operation would refuse as bad input, refused here as a 400 naming the field."""
    if action == "rollback":
        if ("to_checkpoint" in options) == ("to_node" in options):
            raise invalid(
                "to_checkpoint",
                "give exactly one of to_checkpoint (an id from GET "
                f"/api/v1/runs/{run.pk}/checkpoints) and to_node (a node key).",
            )
        if (
            "to_checkpoint" in options
            and not Checkpoint.objects.filter(pk=options["to_checkpoint"], run=run).exists()
        ):
            raise invalid(
                "to_checkpoint",
                f"run {run.pk} has no checkpoint {options['to_checkpoint']}; list them at "
                f"GET /api/v1/runs/{run.pk}/checkpoints.",
            )
        if "to_node" in options:
            _get_node(run, options["to_node"], field="to_node")
    if action == "mark_succeeded":
        options.setdefault("output", {})
        size = len(json.dumps(options["output"]))
        if size > settings.KEEL_MAX_OUTPUT_BYTES:
            raise invalid(
                "output",
                f"is {size} bytes as JSON, over the limit of {settings.KEEL_MAX_OUTPUT_BYTES} "
                "(KEEL_MAX_OUTPUT_BYTES); store big results elsewhere and give a reference.",
            )


def _call_operation(function, *args, **kwargs):
    """Call an operation; a refusal is a 409 (the run's state forbids it), with its message."""
    try:
        return function(*args, **kwargs)
    except operations.OperationDenied:
        raise
    except operations.OperationError as error:
        raise ApiError(409, str(error)) from None


# --- Lookups and pages ------------------------------------------------------------------------


def not_found(request, path=""):
    """Anything else under /api/v1/: a JSON 404 that points at the document."""
    hint = ""
    if request.path.endswith("/") and request.path.rstrip("/") != "/api/v1":
        try:
            match = resolve(request.path.rstrip("/"))
        except Resolver404:
            match = None
        if match is not None and match.func is not not_found:
            hint = f" (did you mean {request.path.rstrip('/')}? API paths have no trailing slash)"
    return error_response(
        404,
        f"No API endpoint at {request.path}{hint}. The endpoints are listed at /api/v1/openapi.json.",
    )


not_found.csrf_exempt = True


def _require(user, permission: str) -> None:
    _require_any(user, permission)


def _require_any(user, *permissions: str) -> None:
    if not any(user.has_perm(permission) for permission in permissions):
        wanted = "' or '".join(permissions)
        raise ApiError(
            403,
            f"{user.get_username()} lacks the '{wanted}' permission; ask an administrator "
            "to grant it.",
        )


def _get_workflow(slug: str) -> Workflow:
    workflow = Workflow.objects.filter(slug=slug).first() if "\x00" not in slug else None
    if workflow is None:
        raise ApiError(
            404,
            f"No workflow {slug!r}. List workflows at GET /api/v1/workflows, or load one with "
            "manage.py load_workflow PATH.",
        )
    return workflow


def _get_run(run_id: int) -> Run:
    run = None
    if 0 < run_id <= inputs.MAX_ID:
        run = (
            Run.objects.select_related("workflow", "version")
            .defer(*DEFERRED_RUN_FIELDS)
            .filter(pk=run_id)
            .first()
        )
    if run is None:
        raise ApiError(404, f"No run {run_id}. List runs at GET /api/v1/runs.")
    return run


def _get_node(run: Run, key: str, *, field: str | None = None) -> NodeRun:
    node = NodeRun.objects.filter(run=run, node_key=key).first() if "\x00" not in key else None
    if node is None:
        keys = list(
            NodeRun.objects.filter(run=run).order_by("id").values_list("node_key", flat=True)[:20]
        )
        message = f"run {run.pk} has no node {key!r} (its nodes: {', '.join(keys)})."
        if field:
            raise invalid(field, message)
        raise ApiError(404, message[0].upper() + message[1:])
    return node


def _run_body(request, run: Run) -> dict:
    return serializers.run_detail(request, run, NodeRun.objects.filter(run=run).order_by("id"))


def _page(queryset, limit: int) -> tuple[list, bool]:
    rows = list(queryset[: limit + 1])
    return rows[:limit], len(rows) > limit


def _next_url(request, **params) -> str:
    query = request.GET.copy()
    for name, value in params.items():
        query[name] = str(value)
    return request.build_absolute_uri(f"{request.path}?{query.urlencode()}")


def _encode_cursor(run: Run) -> str:
    raw = f"{run.created_at.isoformat()}|{run.pk}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, pk = raw.split("|")
        when, pk = datetime.fromisoformat(created_at), int(pk)
        if when.tzinfo is None or not 0 < pk <= inputs.MAX_ID:
            raise ValueError("not a cursor")
        return when, pk
    except ValueError:
        raise invalid(
            "cursor", "is not one this API gave out; copy the next link of the previous page."
        ) from None
