"""Runs: the list, one run with its nodes, its history and checkpoints, a node's attempts
and logs. Reads only; the actions on runs are in actions.py."""

from ninja import Query, Router

from workflows import log_search
from workflows.api import lookups, pages
from workflows.api.auth import VIEW_PERMISSION, require
from workflows.api.errors import ApiError, invalid
from workflows.api.log_schemas import LogCounts, LogSearchPage, LogSearchPageQuery, LogSearchQuery
from workflows.api.schemas import (
    AfterQuery,
    AllRunsQuery,
    AttemptPage,
    AttemptQuery,
    CheckpointPage,
    EventPage,
    LogPage,
    LogQuery,
    RunDetail,
    RunPage,
    errors,
)
from workflows.api.workflows import run_page
from workflows.models import Checkpoint, LogLine, NodeAttempt, RunEvent, Workflow

router = Router(tags=["runs"])

_EVENT_FIELDS = ("id", "run", "node_run", "at", "kind", "actor", "reason", "before", "after")
_CHECKPOINT_FIELDS = ("id", "run", "node_run", "kind", "sequence", "attempt", "state", "created_at")


@router.get(
    "/runs",
    response={200: RunPage, **errors(400)},
    url_name="run-list",
    operation_id="listRuns",
    summary="Runs, newest first",
)
def run_list(request, query: Query[AllRunsQuery]):
    require(request.user, VIEW_PERMISSION)
    workflow = None
    if query.workflow:
        workflow = Workflow.objects.filter(slug=query.workflow).first()
        if workflow is None:
            raise invalid(
                "workflow",
                f"there is no workflow {query.workflow!r}; list them at GET /api/v1/workflows.",
            )
    return run_page(request, query, workflow)


@router.get(
    "/runs/{int:run_id}",
    response={200: RunDetail, **errors(400, 404)},
    url_name="run-detail",
    operation_id="getRun",
    summary="A run with its nodes",
)
def run_detail(request, run_id: int):
    require(request.user, VIEW_PERMISSION)
    return lookups.get_run(run_id, with_nodes=True)


@router.get(
    "/runs/{int:run_id}/events",
    response={200: EventPage, **errors(400, 404)},
    url_name="run-events",
    operation_id="listRunEvents",
    summary="The run's history: transitions and operator actions, oldest first",
)
def run_events(request, run_id: int, query: Query[AfterQuery]):
    require(request.user, VIEW_PERMISSION)
    run = lookups.get_run(run_id)
    events = (
        RunEvent.objects.filter(run=run, pk__gt=query.after or 0)
        .select_related("node_run")
        .only(*_EVENT_FIELDS, "node_run__node_key")
        .order_by("pk")
    )
    rows, more = pages.page(events, query.limit)
    return {
        "run": run.pk,
        "results": rows,
        "next": pages.next_url(request, after=rows[-1].pk) if more else None,
    }


@router.get(
    "/runs/{int:run_id}/checkpoints",
    response={200: CheckpointPage, **errors(400, 404)},
    url_name="run-checkpoints",
    operation_id="listRunCheckpoints",
    summary="The run's checkpoints (what rollback can go back to), oldest first",
)
def run_checkpoints(request, run_id: int, query: Query[AfterQuery]):
    require(request.user, VIEW_PERMISSION)
    run = lookups.get_run(run_id)
    checkpoints = (
        Checkpoint.objects.filter(run=run, pk__gt=query.after or 0)
        .select_related("node_run")
        .only(*_CHECKPOINT_FIELDS, "node_run__node_key")
        .order_by("pk")
    )
    rows, more = pages.page(checkpoints, query.limit)
    return {
        "run": run.pk,
        "results": rows,
        "next": pages.next_url(request, after=rows[-1].pk) if more else None,
    }


@router.get(
    "/runs/{int:run_id}/nodes/{node_key}/attempts",
    response={200: AttemptPage, **errors(400, 404)},
    url_name="node-attempts",
    operation_id="listNodeAttempts",
    summary="A node's attempts, with errors and tracebacks",
)
def node_attempts(request, run_id: int, node_key: str, query: Query[AttemptQuery]):
    require(request.user, VIEW_PERMISSION)
    run = lookups.get_run(run_id)
    node = lookups.get_node(run, node_key)
    attempts = NodeAttempt.objects.filter(node_run=node, number__gt=query.after or 0)
    rows, more = pages.page(attempts.order_by("number"), query.limit)
    return {
        "run": run.pk,
        "node": node.node_key,
        "results": rows,
        "next": pages.next_url(request, after=rows[-1].number) if more else None,
    }


@router.get(
    "/runs/{int:run_id}/nodes/{node_key}/logs",
    response={200: LogPage, **errors(400, 404)},
    url_name="node-logs",
    operation_id="listNodeLogs",
    summary="One attempt's log lines (by default the current attempt's), oldest first",
)
def node_logs(request, run_id: int, node_key: str, query: Query[LogQuery]):
    require(request.user, VIEW_PERMISSION)
    run = lookups.get_run(run_id)
    node = lookups.get_node(run, node_key)
    number = query.attempt or node.attempt
    attempt = NodeAttempt.objects.filter(node_run=node, number=number).first() if number else None
    if attempt is None and query.attempt:
        raise ApiError(
            404,
            f"Node {node.node_key} of run {run.pk} has no attempt {query.attempt} "
            f"(its current attempt is {node.attempt}).",
        )
    rows, more = [], False
    if attempt is not None:
        lines = LogLine.objects.filter(attempt=attempt, seq__gt=query.after or 0).order_by("seq")
        rows, more = pages.page(lines, query.limit)
    return {
        "run": run.pk,
        "node": node.node_key,
        "attempt": attempt.number if attempt else None,
        "results": rows,
        "next": pages.next_url(request, attempt=attempt.number, after=rows[-1].seq)
        if more
        else None,
    }


# --- Log search across runs -------------------------------------------------------------------


def _log_filter(query: LogSearchQuery) -> log_search.LogFilter:
    """The search the query asks for; a 400 naming the field for what cannot be found."""
    workflow_id = None
    if query.workflow:
        workflow_id = Workflow.objects.filter(slug=query.workflow).values_list("pk", flat=True)
        workflow_id = workflow_id.first()
        if workflow_id is None:
            raise invalid(
                "workflow",
                f"there is no workflow {query.workflow!r}; list them at GET /api/v1/workflows.",
            )
    since = query.since if query.since is not None else log_search.default_since()
    if query.until is not None and since >= query.until:
        raise invalid("until", "must be after since (the window is since ≤ at < until).")
    return log_search.LogFilter(
        text=query.q or "",
        level=query.level or "",
        workflow_id=workflow_id,
        node=query.node or "",
        run_id=query.run,
        since=since,
        until=query.until,
    )


@router.get(
    "/logs",
    response={200: LogSearchPage, **errors(400)},
    url_name="log-search",
    operation_id="searchLogs",
    summary="Log lines across runs, newest first",
    description="Filters combine: text (case-insensitive contains), level and above, "
    "workflow, node key, run, and a time window (default: the last 24 hours). Keyset pages "
    "by (at, id): follow `next`.",
)
def log_search_page(request, query: Query[LogSearchPageQuery]):
    require(request.user, VIEW_PERMISSION)
    search = _log_filter(query)
    cursor = None
    if query.cursor:
        try:
            cursor = log_search.Cursor.decode(query.cursor)
        except ValueError:
            raise invalid(
                "cursor", "is not one this API gave out; copy the next link of the previous page."
            ) from None
    found = log_search.page(search, cursor=cursor, size=query.limit)
    return {
        "since": search.since,
        "until": search.until,
        "results": found.lines,
        # The window is pinned in the link: "24 hours ago" must not move between pages.
        "next": pages.next_url(
            request, cursor=found.next_cursor.encode(), since=search.since.isoformat()
        )
        if found.next_cursor
        else None,
    }


@router.get(
    "/logs/counts",
    response={200: LogCounts, **errors(400)},
    url_name="log-counts",
    operation_id="countLogs",
    summary="How many log lines match, in all and by level",
    description=f"The same filters as GET /logs. Counting stops at {log_search.COUNT_CAP} "
    "lines (`capped`), so it costs the same however many match.",
)
def log_counts(request, query: Query[LogSearchQuery]):
    require(request.user, VIEW_PERMISSION)
    search = _log_filter(query)
    counted = log_search.counts(search)
    return {
        "since": search.since,
        "until": search.until,
        "total": counted.total,
        "capped": counted.capped,
        "cap": counted.cap,
        "by_level": dict(counted.by_level),
    }
