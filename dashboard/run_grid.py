"""The workflow page's grid: its recent runs (columns, newest first) by the nodes of its
latest version (rows, in the graph's order).

Two queries however many runs and nodes: the runs, then their nodes' states. Parallel
copies of a step fold into one row with counts, as they fold into one box in the graph.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlencode

from django.urls import reverse

from dashboard import dag
from workflows.models import NodeRun, Run, Workflow, WorkflowVersion

GRID_RUNS = 25
GRID_ROWS = 200  # rows after folding; a longer definition shows its first ones


@dataclass(frozen=True)
class GridRun:
    id: int
    status: str
    version: int
    created_at: datetime
    href: str


@dataclass(frozen=True)
class GridCell:
    status: str  # the node's, or a group's worst; "" where the run has no such node
    counts: list[tuple[str, int]]  # a group's members by status, worst first
    title: str
    href: str


@dataclass
class GridRow:
    id: str
    label: str
    title: str
    size: int
    cells: list[GridCell] = field(default_factory=list)


@dataclass
class Grid:
    runs: list[GridRun]
    rows: list[GridRow]
    rows_cut: int  # rows left out past GRID_ROWS
    version: int

    @property
    def legend(self) -> list[str]:
        """The states shown, worst first: each glyph with its word under the grid."""
        shown = {status for row in self.rows for cell in row.cells for status, _ in cell.counts}
        shown |= {cell.status for row in self.rows for cell in row.cells if cell.status}
        return sorted(shown, key=_severity)


def _severity(status: str) -> int:
    return dag.SEVERITY.index(status) if status in dag.SEVERITY else len(dag.SEVERITY)


def _words(counts: list[tuple[str, int]]) -> str:
    return ", ".join(f"{count} {status.replace('_', ' ')}" for status, count in counts)


def run_grid(
    workflow: Workflow, version: WorkflowVersion | None, limit: int = GRID_RUNS
) -> Grid | None:
    """The last ``limit`` runs of ``workflow`` by the nodes of ``version``."""
    if version is None:
        return None
    runs = [
        GridRun(
            id=run_id,
            status=status,
            version=number,
            created_at=created_at,
            href=reverse("dashboard:run-detail", args=[run_id]),
        )
        for run_id, status, number, created_at in Run.objects.filter(workflow=workflow)
        .order_by("-created_at", "-id")
        .values_list("id", "status", "version__number", "created_at")[:limit]
    ]
    states: dict[tuple[int, str], tuple[str, int]] = {
        (run_id, key): (status, attempt)
        for run_id, key, status, attempt in NodeRun.objects.filter(
            run_id__in=[run.id for run in runs]
        ).values_list("run_id", "node_key", "status", "attempt")
    }
    spec_nodes = version.spec.get("nodes", {})
    boxes = dag.folds(
        [
            dag.DagNode(
                key=key,
                upstream=list(node.get("after", [])),
                status="definition",
                detail=node.get("type", ""),
            )
            for key, node in spec_nodes.items()
        ]
    )
    rows = []
    for fold in boxes[:GRID_ROWS]:
        row = GridRow(
            id=fold.id,
            label=fold.label,
            title=(
                f"{fold.members[0]} … {fold.members[-1]}: {len(fold.members)} parallel nodes"
                if fold.is_group
                else f"{fold.id} ({spec_nodes[fold.id].get('type', '')})"
            ),
            size=len(fold.members),
        )
        for run in runs:
            row.cells.append(_cell(run, fold, states))
        rows.append(row)
    return Grid(
        runs=runs, rows=rows, rows_cut=max(len(boxes) - GRID_ROWS, 0), version=version.number
    )


def _cell(run: GridRun, fold: dag.Fold, states: dict) -> GridCell:
    found = [(key, states[(run.id, key)]) for key in fold.members if (run.id, key) in states]
    if not found:
        return GridCell(
            status="",
            counts=[],
            title=f"Run #{run.id} (v{run.version}) has no node {fold.label}.",
            href="",
        )
    if not fold.is_group:
        key, (status, attempt) = found[0]
        words = status.replace("_", " ") + (f", attempt {attempt}" if attempt > 1 else "")
        return GridCell(
            status=status,
            counts=[],
            title=f"Run #{run.id} · {key}: {words}",
            href=f"{run.href}?{urlencode({'node': key})}",
        )
    counts = sorted(
        Counter(status for _, (status, _) in found).items(), key=lambda item: _severity(item[0])
    )
    worst = counts[0][0]
    # Open the group and its first member in the worst state: a failed shard is one click.
    first = next(key for key, (status, _) in found if status == worst)
    return GridCell(
        status=worst,
        counts=counts,
        title=f"Run #{run.id} · {fold.label}: {_words(counts)}",
        href=f"{run.href}?{urlencode({'node': first, 'expand': fold.id})}",
    )
