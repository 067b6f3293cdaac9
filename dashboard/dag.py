"""Lay out a workflow's graph for drawing as server-side SVG.

Pure geometry: nodes in, positioned boxes and edge paths out. The templates draw what
this returns (``templates/workflows/_dag.html``) and escape every label, so no node
key or type can become markup.
"""

from dataclasses import dataclass, field

NODE_WIDTH = 172
NODE_HEIGHT = 46
GAP_X = 48
GAP_Y = 12
MARGIN = 8
# A layer with more nodes than this wraps into several columns, so a 50-way fan-out
# stays about as tall as a screen instead of a scroll of 50 boxes.
MAX_ROWS = 10
# Beyond this the drawing stops being readable; the page shows the node table instead.
MAX_NODES = 400
LABEL_CHARS = 22


@dataclass(frozen=True)
class DagNode:
    key: str
    upstream: list[str]
    status: str  # a NodeRun status, or "definition" for a node that has not run
    detail: str  # the second line: status and attempt, or the node type
    href: str = ""


@dataclass
class PlacedNode:
    key: str
    label: str
    status: str
    detail: str
    href: str
    selected: bool
    x: int
    y: int
    width: int = NODE_WIDTH
    height: int = NODE_HEIGHT

    @property
    def text_x(self) -> int:
        return self.x + 12

    @property
    def label_y(self) -> int:
        return self.y + 19

    @property
    def detail_y(self) -> int:
        return self.y + 36


@dataclass(frozen=True)
class Edge:
    path: str
    done: bool  # the upstream end succeeded or was skipped: drawn solid


@dataclass
class Layout:
    width: int
    height: int
    nodes: list[PlacedNode] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    too_large: bool = False
    node_count: int = 0


def depths(nodes: dict[str, DagNode]) -> dict[str, int]:
    """Longest distance from a root, for every node (the graph is acyclic: spec checked it)."""
    depth: dict[str, int] = {}
    remaining = dict(nodes)
    while remaining:
        ready = [
            key
            for key, node in remaining.items()
            if all(up in depth or up not in nodes for up in node.upstream)
        ]
        if not ready:  # a cycle would be a bug upstream; draw what we can rather than hang
            ready = list(remaining)
        for key in ready:
            ups = [depth[up] for up in remaining[key].upstream if up in depth]
            depth[key] = (max(ups) + 1) if ups else 0
            del remaining[key]
    return depth


def layout(items: list[DagNode], *, selected: str | None = None) -> Layout:
    """Place nodes in columns by depth, ordered to keep edges short.

    1. Each node's depth is its longest distance from a root: its layer.
    2. The first layer keeps definition order; each later layer is sorted by the mean
       row of its upstream nodes (one barycenter pass), so edges mostly run straight.
    3. A layer taller than MAX_ROWS wraps into several columns.
    4. Edges are cubic curves from the right side of the upstream box to the left
       side of the downstream one.
    """
    nodes = {item.key: item for item in items}
    if len(nodes) > MAX_NODES:
        return Layout(width=0, height=0, too_large=True, node_count=len(nodes))
    depth = depths(nodes)
    layers: dict[int, list[str]] = {}
    for key in nodes:  # definition order within a layer
        layers.setdefault(depth[key], []).append(key)

    row_of: dict[str, float] = {}
    columns: list[list[str]] = []
    # Index of the last column of each node's layer: edges leave a wrapped layer from there.
    layer_end: dict[str, int] = {}
    for level in sorted(layers):
        keys = layers[level]
        if level > 0:
            order = {key: index for index, key in enumerate(keys)}

            def barycenter(key, order=order):
                rows = [row_of[up] for up in nodes[key].upstream if up in row_of]
                return (sum(rows) / len(rows) if rows else float("inf"), order[key])

            keys = sorted(keys, key=barycenter)
        for start in range(0, len(keys), MAX_ROWS):
            column = keys[start : start + MAX_ROWS]
            columns.append(column)
            for row, key in enumerate(column):
                row_of[key] = row + start / MAX_ROWS * 0.01  # stable between wrapped columns
        for key in keys:
            layer_end[key] = len(columns) - 1

    tallest = max((len(column) for column in columns), default=0)
    height = tallest * (NODE_HEIGHT + GAP_Y) - GAP_Y + 2 * MARGIN if tallest else 0
    width = len(columns) * (NODE_WIDTH + GAP_X) - GAP_X + 2 * MARGIN if columns else 0
    placed: dict[str, PlacedNode] = {}
    for index, column in enumerate(columns):
        # Centre short columns against the tallest one.
        offset = (tallest - len(column)) * (NODE_HEIGHT + GAP_Y) // 2
        for row, key in enumerate(column):
            item = nodes[key]
            placed[key] = PlacedNode(
                key=key,
                label=key if len(key) <= LABEL_CHARS else key[: LABEL_CHARS - 1] + "…",
                status=item.status,
                detail=item.detail,
                href=item.href,
                selected=key == selected,
                x=MARGIN + index * (NODE_WIDTH + GAP_X),
                y=MARGIN + offset + row * (NODE_HEIGHT + GAP_Y),
            )

    edges = []
    for key, item in nodes.items():
        target = placed[key]
        for up in item.upstream:
            source = placed.get(up)
            if source is None:
                continue
            x1, y1 = source.x + NODE_WIDTH, source.y + NODE_HEIGHT // 2
            x2, y2 = target.x, target.y + NODE_HEIGHT // 2
            # From a wrapped layer, run straight along the row (behind the boxes to the
            # right) to the layer's last column, and curve only in the open gap after it.
            exit_x = MARGIN + layer_end[up] * (NODE_WIDTH + GAP_X) + NODE_WIDTH
            straight = f" H{exit_x}" if exit_x > x1 else ""
            x1 = max(x1, exit_x)
            bend = max((x2 - x1) // 2, 16)
            edges.append(
                Edge(
                    path=f"M{source.x + NODE_WIDTH},{y1}{straight} "
                    f"C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}",
                    done=source.status in ("succeeded", "skipped"),
                )
            )
    return Layout(
        width=width,
        height=height,
        nodes=list(placed.values()),
        edges=edges,
        node_count=len(nodes),
    )
