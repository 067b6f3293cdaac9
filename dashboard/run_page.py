"""Reads for the run page: the graph, the timeline, the node panel and the history.

``run_page()`` returns everything the page (and its live partial) shows, precomputed,
in a fixed number of queries however many nodes, attempts, log lines or events the
run has (tests/web/test_dashboard.py counts them).
"""

from collections import namedtuple
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from urllib.parse import urlencode

from django.db.models import Max
from django.urls import reverse
from django.utils import timezone

from dashboard import dag, run_summary
from dashboard.run_summary import node_href
from diagnostics import explain
from workflows.definitions import graph
from workflows.models import Checkpoint, LogLine, NodeAttempt, NodeRun, Run, RunEvent

LOG_PAGE_SIZE = 200
CHECKPOINTS_SHOWN = 25
EVENTS_SHOWN = 100
# What the timeline reads of each attempt, as plain values (a 1 000-node run's attempts as
# models took 23 ms, as tuples 16).
TimelineAttempt = namedtuple(
    "TimelineAttempt",
    ["node_run_id", "number", "status", "created_at", "started_at", "finished_at"],
)


@dataclass
class Bar:
    attempt: int
    status: str
    left: float  # percent of the run's span
    width: float
    wait_left: float  # the queued part before the attempt started
    wait_width: float
    title: str


@dataclass
class TimelineRow:
    key: str
    href: str
    bars: list[Bar] = field(default_factory=list)


@dataclass
class Timeline:
    start: datetime
    end: datetime
    span_seconds: float
    rows: list[TimelineRow]
    ticks: list[tuple[float, float]]  # (percent, seconds from start)


@dataclass
class NodeActions:
    retry: bool
    retry_downstream: bool
    skip: bool
    mark_succeeded: bool
    rollback: bool
    stop: bool


@dataclass
class LogPage:
    attempt: NodeAttempt | None
    lines: list[LogLine]
    page: int
    pages: int
    total: int


@dataclass
class NodePanel:
    node: NodeRun
    tries_used: int  # attempts counted against max_attempts (since the last operator reset)
    attempts: list[NodeAttempt]
    log: LogPage
    checkpoints: list[Checkpoint]
    checkpoint_count: int
    inputs: dict
    actions: NodeActions
    progress: dict
    progress_percent: float | None
    progress_stopped: bool  # the figure is where the node stopped, not live
    retry_href: str = ""

    @property
    def error_shown(self) -> bool:
        """Does the latest attempt's row carry the error (so the node's reason, which
        repeats it, need not)?"""
        latest = self.attempts[0] if self.attempts else None
        return bool(latest and (latest.error_type or latest.error_message))


# What the page reads of every node (the open one is read in full): a 1 000-node run's
# full rows took 28 ms to load as models, these few 8 ms.
LIST_FIELDS = ("id", "run_id", "node_key", "status", "attempt", "upstream")


def _percent(moment, start, span) -> float:
    return max(0.0, min(100.0, (moment - start).total_seconds() * 100 / span))


def timeline(run: Run, nodes: list[NodeRun], attempts: list[TimelineAttempt], now) -> Timeline:
    """Each node's attempts as bars on the run's time axis (queued part, then running part)."""
    start = run.started_at or run.created_at
    firsts = [a.created_at for a in attempts if a.created_at]
    if firsts:
        start = min(start, *firsts)
    end = run.finished_at or now
    lasts = [a.finished_at or now for a in attempts]
    if lasts:
        end = max(end, *lasts)
    span = max((end - start).total_seconds(), 1.0)
    by_node: dict[int, list[NodeAttempt]] = {}
    for attempt in attempts:
        by_node.setdefault(attempt.node_run_id, []).append(attempt)
    rows = []
    for node in nodes:
        row = TimelineRow(key=node.node_key, href=node_href(node.node_key))
        for attempt in by_node.get(node.pk, []):
            queued = attempt.created_at or attempt.started_at or start
            began = attempt.started_at or queued
            ended = attempt.finished_at or now
            left = _percent(began, start, span)
            width = max(_percent(ended, start, span) - left, 0.6)
            wait_left = _percent(queued, start, span)
            took = (ended - began).total_seconds() if attempt.started_at else None
            title = f"{node.node_key} attempt {attempt.number}: {attempt.status}" + (
                f", ran {took:.1f}s" if took is not None else ", not started"
            )
            row.bars.append(
                Bar(
                    attempt=attempt.number,
                    status=attempt.status,
                    left=round(left, 3),
                    width=round(min(width, 100 - left), 3),
                    wait_left=round(wait_left, 3),
                    wait_width=round(max(left - wait_left, 0), 3),
                    title=title,
                )
            )
        rows.append(row)
    ticks = [(percent, span * percent / 100) for percent in (0, 25, 50, 75, 100)]
    return Timeline(start=start, end=end, span_seconds=span, rows=rows, ticks=ticks)


def fold_timeline(line: Timeline, graph) -> Timeline:
    """The timeline folded as the graph is: a folded group's members on one row (its
    label and size; the row opens the group), where the first of them was. The row shows
    when each member ran; their queued parts, drawn over each other, would hide that."""
    folded = {key: group for group in graph.groups if not group.expanded for key in group.keys}
    if not folded:
        return line
    rows, placed = [], {}
    for row in line.rows:
        group = folded.get(row.key)
        if group is None:
            rows.append(row)
        else:
            if group.id not in placed:
                placed[group.id] = TimelineRow(
                    key=f"{group.label} ({group.size})", href=group.toggle_href
                )
                rows.append(placed[group.id])
            placed[group.id].bars.extend(replace(bar, wait_width=0) for bar in row.bars)
    return replace(line, rows=rows)


def node_actions(run: Run, node: NodeRun) -> NodeActions:
    waiting = node.status == NodeRun.Status.PENDING and node.pending_upstreams > 0
    return NodeActions(
        retry=not waiting,
        retry_downstream=not waiting and bool(node.downstream),
        skip=node.status not in NodeRun.DONE,
        mark_succeeded=node.status != NodeRun.Status.SUCCEEDED,
        rollback=run.status not in Run.ACTIVE,
        stop=node.status == NodeRun.Status.RUNNING,
    )


def _ordered(run: Run, nodes: list[NodeRun]) -> list[NodeRun]:
    """Nodes in the order the definition runs them (topological, then definition order)."""
    try:
        order = graph.topological_order(run.version.spec)
    except (KeyError, TypeError, ValueError):
        return nodes
    position = {key: index for index, key in enumerate(order)}
    return sorted(nodes, key=lambda node: (position.get(node.node_key, len(position)), node.pk))


def default_node(nodes: list[NodeRun]) -> NodeRun | None:
    """The node to open when none is chosen: the first failed, else running, else none."""
    for wanted in (NodeRun.TERMINAL - NodeRun.DONE - {NodeRun.Status.CANCELLED}, NodeRun.ACTIVE):
        for node in nodes:
            if node.status in wanted:
                return node
    return None


def log_page(attempt: NodeAttempt | None, page: int | None) -> LogPage:
    """One page of an attempt's log, by sequence number; the last page unless asked."""
    if attempt is None:
        return LogPage(attempt=None, lines=[], page=1, pages=1, total=0)
    total = LogLine.objects.filter(attempt=attempt).aggregate(last=Max("seq"))["last"] or 0
    pages = max((total + LOG_PAGE_SIZE - 1) // LOG_PAGE_SIZE, 1)
    page = pages if page is None else min(max(page, 1), pages)
    lines = list(
        LogLine.objects.filter(
            attempt=attempt,
            seq__gt=(page - 1) * LOG_PAGE_SIZE,
            seq__lte=page * LOG_PAGE_SIZE,
        ).order_by("seq")
    )
    return LogPage(attempt=attempt, lines=lines, page=page, pages=pages, total=total)


def node_panel(
    run: Run,
    node: NodeRun,
    *,
    attempt_number: int | None,
    page: int | None,
) -> NodePanel:
    attempts = list(NodeAttempt.objects.filter(node_run=node).order_by("-number"))
    chosen = next((a for a in attempts if a.number == attempt_number), None) or (
        attempts[0] if attempts else None
    )
    checkpoints = list(
        Checkpoint.objects.filter(node_run=node).order_by("-sequence")[:CHECKPOINTS_SHOWN]
    )
    for checkpoint in checkpoints:
        checkpoint.summary = state_summary(checkpoint.state)
    checkpoint_count = (
        len(checkpoints)
        if len(checkpoints) < CHECKPOINTS_SHOWN
        else Checkpoint.objects.filter(node_run=node).count()
    )
    # Progress is reported with heartbeats, so a finished node's last figure is stale.
    progress = {} if node.status in NodeRun.DONE else (node.progress or {})
    done, total = progress.get("done"), progress.get("total")
    progress_percent = None
    if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
        progress_percent = round(min(max(done * 100 / total, 0), 100), 1)
    return NodePanel(
        node=node,
        tries_used=max(node.attempt - node.attempts_base, 0),
        attempts=attempts,
        log=log_page(chosen, page),
        checkpoints=checkpoints,
        checkpoint_count=checkpoint_count,
        inputs=upstream_outputs(run, node),
        actions=node_actions(run, node),
        progress=progress,
        progress_percent=progress_percent,
        progress_stopped=node.status not in NodeRun.ACTIVE,
        retry_href=retry_href(run, node.node_key),
    )


def retry_href(run: Run, node_key: str) -> str:
    return f"{run_summary.preview_url('retry', run)}?{urlencode({'node': node_key})}"


def upstream_outputs(run: Run, node: NodeRun) -> dict:
    """The outputs of the node's upstream nodes, in its ``after`` order (one query)."""
    if not node.upstream:
        return {}
    outputs = dict(
        NodeRun.objects.filter(run=run, node_key__in=node.upstream).values_list(
            "node_key", "output"
        )
    )
    return {key: outputs[key] for key in node.upstream if key in outputs}


def _change(event: RunEvent) -> str:
    """A short "before → after" for the history table."""
    before, after = event.before or {}, event.after or {}
    if event.kind == RunEvent.Kind.OPERATOR:
        action = str(before.get("action", "")).replace("_", " ")
        if before.get("denied"):
            again = after.get("refused_again")
            return f"{action}: denied" + (f" ({again + 1} times)" if again else "")
        if "run_status" in before and "run_status" in after:
            return f"{action}: run {before['run_status']} → {after['run_status']}"
        return action
    if "status" in before or "status" in after:
        return f"{before.get('status', '?')} → {after.get('status', '?')}"
    return ""


def history(run: Run) -> list[RunEvent]:
    events = list(
        RunEvent.objects.filter(run=run)
        .select_related("node_run")
        .order_by("-at", "-id")[:EVENTS_SHOWN]
    )
    for event in events:
        event.change = _change(event)
        event.node_key = event.node_run.node_key if event.node_run_id else ""
    return events


def run_graph(
    nodes: list[NodeRun], selected: NodeRun | None, *, node_key: str | None, expand
) -> dag.Layout:
    """The run's graph: each box says its state in words; group links keep the node
    the page was asked for (``node_key``), so a group opens around the same panel."""
    return dag.layout(
        [
            dag.DagNode(
                key=node.node_key,
                upstream=node.upstream,
                status=node.status,
                detail=node.status.replace("_", " ")
                + (f" · attempt {node.attempt}" if node.attempt > 1 else ""),
            )
            for node in nodes
        ],
        selected=selected.node_key if selected else None,
        expanded=expand,
        links=dag.Links(nodes=True, node=node_key if selected and node_key else ""),
    )


def run_page(
    run: Run,
    *,
    node_key: str | None = None,
    attempt: int | None = None,
    log_page_number: int | None = None,
    expand: Collection[str] = (),
    now: datetime | None = None,
) -> dict:
    """Everything the run page shows, for ``run`` with ``node_key``'s panel open and
    the graph's groups named in ``expand`` open."""
    now = now or timezone.now()
    nodes = _ordered(run, list(NodeRun.objects.filter(run=run).only(*LIST_FIELDS).order_by("id")))
    nodes_by_key = {node.node_key: node for node in nodes}
    attempts = [
        TimelineAttempt(*row)
        for row in NodeAttempt.objects.filter(node_run__run=run)
        .order_by("number")
        .values_list(*TimelineAttempt._fields)
    ]
    selected = nodes_by_key.get(node_key) if node_key else default_node(nodes)
    if selected is not None:
        selected = NodeRun.objects.get(pk=selected.pk)  # the panel shows all of it
    diagnosis = explain.diagnose_run(run)
    node_diagnosis = explain.diagnose_node(selected) if selected else None
    shown = {finding.id for finding in diagnosis.findings}
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.status] = counts.get(node.status, 0) + 1
    graph = run_graph(nodes, selected, node_key=node_key, expand=expand)
    top = run_summary.summary(run, nodes, diagnosis, now)
    panel = (
        node_panel(run, selected, attempt_number=attempt, page=log_page_number)
        if selected
        else None
    )
    if panel and top.recommended and top.recommended.get("href") == panel.retry_href:
        panel.actions.retry = False  # the summary offers it already
    return {
        "run": run,
        "nodes": nodes,
        "node_counts": sorted(counts.items()),
        "nodes_done": sum(counts.get(status, 0) for status in NodeRun.DONE),
        "graph": graph,
        "timeline": fold_timeline(timeline(run, nodes, attempts, now), graph),
        "panel": panel,
        "summary": top,
        "node_findings": [finding for finding in node_diagnosis.findings if finding.id not in shown]
        if node_diagnosis
        else [],
        "events": history(run),
        "duration_seconds": (
            ((run.finished_at or now) - run.started_at).total_seconds() if run.started_at else None
        ),
        "live": not run.is_finished,
        "selected_key": selected.node_key if selected else "",
        "live_url": reverse("dashboard:run-live", args=[run.pk]),
    }


# --- Reads for the action pages ---------------------------------------------------------------


@dataclass
class CheckpointChoice:
    """A node's checkpoints for the rollback picker: the newest first, the earlier ones
    folded under it."""

    node_key: str
    node_status: str
    latest: Checkpoint
    earlier: list[Checkpoint]
    count: int


def rollback_targets(run: Run, limit: int = 200) -> dict:
    """What a rollback can go back to: the run's newest checkpoints grouped by node (in
    the order the nodes run), and its nodes."""
    nodes = _ordered(run, list(NodeRun.objects.filter(run=run).order_by("id").only(*LIST_FIELDS)))
    newest = Checkpoint.objects.filter(run=run).order_by("-id")[:limit]
    by_node: dict[int | None, list[Checkpoint]] = {}
    for checkpoint in newest:
        checkpoint.summary = state_summary(checkpoint.state)
        by_node.setdefault(checkpoint.node_run_id, []).append(checkpoint)
    choices = [
        CheckpointChoice(
            node_key=node.node_key,
            node_status=node.status,
            latest=by_node[node.pk][0],
            earlier=by_node[node.pk][1:],
            count=len(by_node[node.pk]),
        )
        for node in nodes
        if node.pk in by_node
    ]
    return {
        "checkpoint_choices": choices,
        "checkpoints_cut": len(newest) == limit,
        "rollback_nodes": nodes,
    }


def state_summary(state, limit: int = 80) -> str:
    """A checkpoint's state in one short line: ``offset 450 · file orders.csv``."""
    if isinstance(state, dict) and len(state) == 1:
        [(key, value)] = state.items()
        if isinstance(value, dict) and value:  # a node-done checkpoint holds {"output": {…}}
            return _cut(f"{key}: {state_summary(value, limit)}", limit)
    if isinstance(state, dict):
        # Keys sorted: PostgreSQL's jsonb keeps its own order, not the node's.
        parts = [f"{key} {_short(state[key])}" for key in sorted(state)[:4]]
        return _cut(" · ".join(parts) + (" · …" if len(state) > 4 else ""), limit)
    return _cut(_short(state), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(value) -> str:
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}" if value else "{}"
    if isinstance(value, list):
        return f"[{len(value)} items]" if value else "[]"
    if value is None:
        return "null"
    return str(value)


def checkpoint_of(run: Run, checkpoint_id: int) -> Checkpoint | None:
    return Checkpoint.objects.filter(run=run, pk=checkpoint_id).select_related("node_run").first()


def current_attempt(run: Run, node_key: str) -> int | None:
    return (
        NodeRun.objects.filter(run=run, node_key=node_key).values_list("attempt", flat=True).first()
    )
