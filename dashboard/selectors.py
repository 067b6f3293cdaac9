"""Reads for the pages: precomputed, with a fixed number of queries."""

import difflib
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Case, Count, IntegerField, OuterRef, Subquery, Value, When
from django.utils import timezone

from dashboard import dag
from dashboard.run_grid import run_grid
from workflows.models import NodeRun, Run, Workflow, WorkflowVersion
from workflows.selectors import search_runs, seconds_between

# --- Overview ---------------------------------------------------------------------------------

WINDOW_HOURS = 24
FINISHED = (Run.Status.SUCCEEDED, Run.Status.FAILED, Run.Status.CANCELLED)


@dataclass
class HourBar:
    start: datetime
    counts: dict[str, int]
    total: int = 0
    # (status, count, percent of the tallest bar) from the bottom up, for the chart.
    segments: list[tuple[str, int, float]] = field(default_factory=list)


def window_start(now: datetime, hours: int = WINDOW_HOURS) -> datetime:
    """Start of the overview's window: whole clock hours, the current one included."""
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)


def runs_by_hour(now: datetime, hours: int = WINDOW_HOURS) -> list[HourBar]:
    """Runs created in each of the last ``hours`` hours, by status, in one query.

    The hour is computed with a CASE over fixed boundaries rather than a date function,
    so SQLite does not call back into Python per row; ``status IN (all)`` lets both
    databases read the (status, created_at) index instead of the table.
    """
    since = window_start(now, hours)
    bounds = [since + timedelta(hours=index + 1) for index in range(hours)]
    bucket = Case(
        *[When(created_at__lt=bound, then=Value(index)) for index, bound in enumerate(bounds)],
        default=Value(hours - 1),
        output_field=IntegerField(),
    )
    rows = (
        Run.objects.filter(status__in=Run.Status.values, created_at__gte=since)
        .annotate(bucket=bucket)
        .values_list("bucket", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    bars = [HourBar(start=since + timedelta(hours=index), counts={}) for index in range(hours)]
    for index, status, count in rows:
        bars[index].counts[status] = count
        bars[index].total += count
    tallest = max((bar.total for bar in bars), default=0) or 1
    order = [Run.Status.FAILED, Run.Status.CANCELLED, *Run.ACTIVE, Run.Status.SUCCEEDED]
    for bar in bars:
        bar.segments = [
            (status, bar.counts[status], round(bar.counts[status] * 100 / tallest, 2))
            for status in order
            if bar.counts.get(status)
        ]
    return bars


def live_counts() -> dict[str, object]:
    """Runs and nodes moving now; each count reads one (partial) index."""
    runs = dict(
        Run.objects.filter(status__in=Run.ACTIVE)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
        .order_by()
    )
    oldest_queued = (
        NodeRun.objects.filter(status=NodeRun.Status.QUEUED)
        .order_by("queued_at")
        .values_list("queued_at", flat=True)
        .first()
    )
    return {
        "runs_running": runs.get(Run.Status.RUNNING, 0),
        "runs_pending": runs.get(Run.Status.PENDING, 0),
        "nodes_queued": NodeRun.objects.filter(status=NodeRun.Status.QUEUED).count(),
        "nodes_running": NodeRun.objects.filter(status=NodeRun.Status.RUNNING).count(),
        "nodes_retry_wait": NodeRun.objects.filter(status=NodeRun.Status.RETRY_WAIT).count(),
        "oldest_queued_at": oldest_queued,
    }


def recent_failures(limit: int = 8) -> list[Run]:
    """The newest failed runs, each with ``failed_nodes`` (key, status, reason) attached."""
    runs = list(
        Run.objects.filter(status=Run.Status.FAILED)
        .with_version()
        .order_by("-created_at", "-id")[:limit]
    )
    failed: dict[int, list[NodeRun]] = {}
    for node in (
        NodeRun.objects.filter(
            run__in=runs, status__in=[NodeRun.Status.FAILED, NodeRun.Status.TIMED_OUT]
        )
        .only("run_id", "node_key", "status", "reason", "attempt")
        .order_by("id")
    ):
        failed.setdefault(node.run_id, []).append(node)
    for run in runs:
        run.failed_nodes = failed.get(run.pk, [])
    return runs


def overview(now: datetime | None = None) -> dict:
    """Everything the overview page shows, in a fixed number of queries."""
    now = now or timezone.now()
    bars = runs_by_hour(now)
    window: dict[str, int] = {status: 0 for status in Run.Status.values}
    for bar in bars:
        for status, count in bar.counts.items():
            window[status] += count
    finished = sum(window[status] for status in FINISHED)
    active_runs = list(
        Run.objects.filter(status__in=Run.ACTIVE).with_version().order_by("-created_at", "-id")[:10]
    )
    attach_node_counts(active_runs)
    return {
        "now": now,
        "window_hours": WINDOW_HOURS,
        "since": window_start(now),
        "bars": bars,
        "window_counts": window,
        "window_total": sum(window.values()),
        "failure_rate": (window[Run.Status.FAILED] / finished) if finished else None,
        "finished": finished,
        "live": live_counts(),
        "failures": recent_failures(),
        "active_runs": active_runs,
    }


# --- Workflows --------------------------------------------------------------------------------


def _last_run(field_name: str):
    return Subquery(
        Run.objects.filter(workflow=OuterRef("pk"))
        .order_by("-created_at", "-id")
        .values(field_name)[:1]
    )


def workflow_list(now: datetime | None = None) -> list[Workflow]:
    """Workflows with their latest version, last run and runs of the last 24 h by status.

    No COUNT over all of a workflow's runs: the last run comes from the (workflow,
    created_at) index and the window counts from the (status, created_at) one.
    """
    now = now or timezone.now()
    workflows = list(
        Workflow.objects.annotate(
            latest_version=Subquery(
                WorkflowVersion.objects.filter(workflow=OuterRef("pk"))
                .order_by("-number")
                .values("number")[:1]
            ),
            last_run_id=_last_run("id"),
            last_run_status=_last_run("status"),
            last_run_at=_last_run("created_at"),
        ).order_by("slug")
    )
    window: dict[int, dict[str, int]] = {}
    for workflow_id, status, count in (
        Run.objects.filter(status__in=Run.Status.values, created_at__gte=window_start(now))
        .values_list("workflow_id", "status")
        .annotate(n=Count("id"))
        .order_by()
    ):
        window.setdefault(workflow_id, {})[status] = count
    for workflow in workflows:
        counts = window.get(workflow.pk, {})
        workflow.window_counts = counts
        workflow.window_total = sum(counts.values())
        workflow.window_failed = counts.get(Run.Status.FAILED, 0)
    return workflows


def workflow_versions(workflow: Workflow) -> list[WorkflowVersion]:
    return list(
        workflow.versions.order_by("-number").only(
            "id", "workflow_id", "number", "checksum", "created_by", "created_at", "note"
        )
    )


def definition_graph(
    version: WorkflowVersion | None,
    *,
    expand: Collection[str] = (),
    keep: tuple[tuple[str, str], ...] = (),
) -> dag.Layout | None:
    """The version's graph as it is defined (no run): boxes show the node type; the
    groups named in ``expand`` open; their links keep the page's ``keep`` parameters."""
    if version is None:
        return None
    nodes = version.spec.get("nodes", {})
    return dag.layout(
        [
            dag.DagNode(
                key=key,
                upstream=list(node.get("after", [])),
                status="definition",
                detail=node.get("type", ""),
            )
            for key, node in nodes.items()
        ],
        expanded=expand,
        links=dag.Links(keep=keep),
    )


def workflow_page(
    workflow: Workflow,
    *,
    expand: Collection[str] = (),
    keep: tuple[tuple[str, str], ...] = (),
) -> dict:
    """The workflow page: latest version, its graph and its grid of recent runs by
    nodes, versions, recent runs."""
    latest = workflow.versions.order_by("-number").first()
    runs = list(workflow.runs.with_version().order_by("-created_at", "-id")[:20])
    attach_node_counts(runs)
    return {
        "workflow": workflow,
        "latest": latest,
        "versions": workflow_versions(workflow),
        "runs": runs,
        "graph": definition_graph(latest, expand=expand, keep=keep),
        "grid": run_grid(workflow, latest),
        "declared_params": (latest.spec.get("params") or {}) if latest else {},
    }


def diff_page(workflow: Workflow, *, old: int | None, new: int | None) -> dict:
    """Two versions to compare: ``new`` defaults to the latest, ``old`` to the one before.

    Raises WorkflowVersion.DoesNotExist (with a message) when either is missing.
    """
    numbers = list(workflow.versions.order_by("-number").values_list("number", flat=True))
    if not numbers:
        raise WorkflowVersion.DoesNotExist(f"{workflow.slug} has no versions yet.")
    new = new or numbers[0]
    if old is None:
        old = next((number for number in numbers if number < new), new)
    versions = {
        version.number: version
        for version in WorkflowVersion.objects.filter(workflow=workflow, number__in=[old, new])
    }
    if old not in versions or new not in versions:
        raise WorkflowVersion.DoesNotExist(f"{workflow.slug} has no version {old} or {new}.")
    return {
        "workflow": workflow,
        "numbers": numbers,
        "diff": version_diff(versions[old], versions[new]),
    }


@dataclass(frozen=True)
class DiffLine:
    kind: str  # "context", "added", "removed", "hunk"
    old_number: int | None
    new_number: int | None
    text: str


@dataclass
class VersionDiff:
    old: WorkflowVersion
    new: WorkflowVersion
    lines: list[DiffLine]
    added: int
    removed: int
    nodes_added: list[str]
    nodes_removed: list[str]
    nodes_changed: list[str]

    @property
    def identical(self) -> bool:
        return not self.added and not self.removed


def version_diff(old: WorkflowVersion, new: WorkflowVersion, context: int = 3) -> VersionDiff:
    """A line diff of the stored sources, plus which nodes were added, removed or changed.

    Lines are returned as text; the template escapes them.
    """
    old_lines = old.source.splitlines()
    new_lines = new.source.splitlines()
    matcher = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
    lines: list[DiffLine] = []
    added = removed = 0
    for group in matcher.get_grouped_opcodes(context):
        first, last = group[0], group[-1]
        lines.append(
            DiffLine(
                "hunk",
                None,
                None,
                f"@@ -{first[1] + 1},{last[2] - first[1]} +{first[3] + 1},{last[4] - first[3]} @@",
            )
        )
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                for offset in range(i2 - i1):
                    lines.append(
                        DiffLine(
                            "context", i1 + offset + 1, j1 + offset + 1, old_lines[i1 + offset]
                        )
                    )
                continue
            for index in range(i1, i2):
                lines.append(DiffLine("removed", index + 1, None, old_lines[index]))
                removed += 1
            for index in range(j1, j2):
                lines.append(DiffLine("added", None, index + 1, new_lines[index]))
                added += 1
    old_nodes = old.spec.get("nodes", {})
    new_nodes = new.spec.get("nodes", {})
    return VersionDiff(
        old=old,
        new=new,
        lines=lines,
        added=added,
        removed=removed,
        nodes_added=[key for key in new_nodes if key not in old_nodes],
        nodes_removed=[key for key in old_nodes if key not in new_nodes],
        nodes_changed=[
            key for key in new_nodes if key in old_nodes and new_nodes[key] != old_nodes[key]
        ],
    )


# --- Runs list --------------------------------------------------------------------------------

RUNS_PAGE_SIZE = 50
# Counting every match of a filter is the one query that grows with the table; past
# this many the page says "10 000+" instead of counting on.
COUNT_CAP = 10_000


@dataclass
class RunsPage:
    runs: list[Run]
    older_cursor: int | None  # pass as ?before= for the next (older) page
    newer_cursor: int | None  # pass as ?after= for the previous (newer) page
    matching: int  # capped at COUNT_CAP + 1
    capped: bool
    first_page: bool


def filter_runs(
    *,
    workflow: Workflow | None = None,
    status: str = "",
    version: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    search: str = "",
):
    runs = Run.objects.all()
    if search:
        runs = search_runs(runs, search)
    if workflow is not None:
        runs = runs.filter(workflow=workflow)
    if status:
        runs = runs.filter(status=status)
    if version is not None:
        runs = runs.filter(version__number=version)
    if since is not None:
        runs = runs.filter(created_at__gte=since)
    if until is not None:
        runs = runs.filter(created_at__lt=until)
    return runs


def runs_page(
    runs, *, before: int | None = None, after: int | None = None, size: int | None = None
) -> RunsPage:
    """One page of ``runs``, newest first, by keyset on the id.

    Ids grow with creation, so ``-id`` is the newest-first order, and the primary key
    serves it: page 2 000 costs what page 1 costs (OFFSET would read every row before
    it). Measured at 100 000 runs: every filter under 35 ms on SQLite, under 15 ms on
    PostgreSQL (tests/web/test_runs_list.py). ``before`` pages to older runs,
    ``after`` back to newer ones.
    """
    size = size or RUNS_PAGE_SIZE
    rows = runs.with_version()
    if after is not None:
        page = list(rows.filter(pk__gt=after).order_by("id")[: size + 1])
        has_newer = len(page) > size
        page = list(reversed(page[:size]))
        has_older = bool(page) and runs.filter(pk__lt=page[-1].pk).exists()
    else:
        if before is not None:
            rows = rows.filter(pk__lt=before)
        page = list(rows.order_by("-id")[: size + 1])
        has_older = len(page) > size
        page = page[:size]
        has_newer = before is not None and bool(page) and runs.filter(pk__gt=page[0].pk).exists()
    matching = runs.order_by()[: COUNT_CAP + 1].count()
    attach_node_counts(page)
    return RunsPage(
        runs=page,
        older_cursor=page[-1].pk if page and has_older else None,
        newer_cursor=page[0].pk if page and has_newer else None,
        matching=min(matching, COUNT_CAP),
        capped=matching > COUNT_CAP,
        first_page=not has_newer,
    )


def attach_node_counts(runs: list[Run]) -> None:
    """Give each run ``nodes_total``, ``nodes_done`` and ``nodes_failed``, in one query."""
    counts: dict[int, dict[str, int]] = {}
    for run_id, status, count in (
        NodeRun.objects.filter(run__in=[run.pk for run in runs])
        .values_list("run_id", "status")
        .annotate(n=Count("id"))
        .order_by()
    ):
        counts.setdefault(run_id, {})[status] = count
    for run in runs:
        by_status = counts.get(run.pk, {})
        run.nodes_total = sum(by_status.values())
        run.nodes_done = sum(by_status.get(status, 0) for status in NodeRun.DONE)
        run.nodes_failed = by_status.get(NodeRun.Status.FAILED, 0) + by_status.get(
            NodeRun.Status.TIMED_OUT, 0
        )
        run.duration_seconds = seconds_between(run.started_at, run.finished_at)
