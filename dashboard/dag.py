"""Lay out a workflow's graph for drawing as server-side SVG.

Pure geometry: nodes in; positioned boxes, folded groups and edge paths out. The
templates draw what this returns (``templates/dashboard/_dag.html``) and escape every
label, so no node key or type can become markup.

Written here rather than taken from a layout library (dagre, ELK): the drawing has to
exist without JavaScript, and what makes a wide workflow readable — folding parallel
copies of one step into a group — is Keel's own rule; once folded, Keel's graphs are a
few dozen boxes, where a layered layout with barycenter sweeps is all a library would do.
"""

import graphlib
import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from urllib.parse import urlencode

from dashboard import dag_layers

NODE_WIDTH = 168
NODE_HEIGHT = 46
GAP_X = 44  # between layers: the room edges curve in
GAP_Y = 12
MARGIN = 8
LABEL_CHARS = 20
CHAR_WIDTH = 7  # a monospace character of a key at 11.5 to 12 px, rounded up
# Nodes with the same upstream and the same downstream nodes are parallel copies of one
# step (and so in one layer); more of them than this fold into one group box.
FOLD_ABOVE = 8
GROUP_LISTED = 4  # members a folded group names itself (selected and failed first)
GROUP_COLUMNS = 5  # an open group shows its members in up to this many columns
GROUP_ROWS = 10  # of about this many rows each
CHIP_HEIGHT = 22
CHIP_GAP = 4
GROUP_PAD = 8
GROUP_HEAD = 44  # label and counts above a group's members
PASS_HEIGHT = 6  # the room an edge takes where it passes through a layer
MAX_NODES = 400  # boxes and members drawn; past this the page lists the nodes instead
MAX_PASSES = 3000  # edge bends through layers; past this, the same
# Worst first: the status that colours a group and orders the members it names.
SEVERITY = (
    "failed",
    "timed_out",
    "running",
    "retry_wait",
    "queued",
    "cancelled",
    "pending",
    "skipped",
    "succeeded",
    "definition",
)
ATTENTION = frozenset({"failed", "timed_out", "running", "retry_wait"})
DONE = frozenset({"succeeded", "skipped"})


@dataclass(frozen=True)
class DagNode:
    key: str
    upstream: list[str]
    status: str  # a NodeRun status, or "definition" for a node that has not run
    detail: str  # the second line: status and attempt, or the node type


@dataclass(frozen=True)
class Links:
    """Where the graph's links lead: ``?node=KEY`` (when nodes can be opened) and the
    group toggles, each carrying the groups open now (``expand``), the node the page
    shows (``node``) and any other parameter the page keeps (``keep``)."""

    nodes: bool = False
    node: str = ""
    keep: tuple[tuple[str, str], ...] = ()

    def to_node(self, key: str, expanded: Iterable[str]) -> str:
        return self._query([("node", key)], expanded) if self.nodes else ""

    def toggle(self, expanded: Iterable[str]) -> str:
        return self._query([("node", self.node)] if self.node else [], expanded) + "#graph"

    def _query(self, pairs: list[tuple[str, str]], expanded: Iterable[str]) -> str:
        params = [*self.keep, *pairs, *(("expand", key) for key in sorted(expanded))]
        return "?" + urlencode(params)


@dataclass(frozen=True)
class Fold:
    """One box of the graph: a node, or a group of parallel nodes named by its first."""

    id: str
    members: tuple[str, ...]
    layer: int

    @property
    def is_group(self) -> bool:
        return len(self.members) > 1

    @property
    def label(self) -> str:
        return group_label(self.members) if self.is_group else self.members[0]


class _Text:
    """Where a box's lines of text go, from its top-left corner."""

    x: int
    y: int

    @property
    def text_x(self) -> int:
        return self.x + 12

    @property
    def label_y(self) -> int:
        return self.y + 19


@dataclass
class PlacedNode(_Text):
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
    def detail_y(self) -> int:
        return self.y + 36


@dataclass
class Member:
    """A group's member drawn inside it: every member of an open group, the few a
    folded group names (``note`` then says its status in words)."""

    key: str
    label: str
    status: str
    note: str
    href: str
    selected: bool
    x: int
    y: int
    width: int
    height: int = CHIP_HEIGHT

    @property
    def text_x(self) -> int:
        return self.x + 6

    @property
    def text_y(self) -> int:
        return self.y + 15


@dataclass
class PlacedGroup(_Text):
    id: str
    label: str
    title: str
    size: int
    status: str  # the worst status among the members
    counts: list[tuple[str, int]]  # (status, members in it), worst first
    detail: str  # the members' node type (what a definition's group shows)
    expanded: bool
    selected: bool
    toggle_href: str
    toggle_label: str
    members: list[Member]
    keys: tuple[str, ...] = ()  # every member's key
    x: int = 0
    y: int = 0
    width: int = NODE_WIDTH
    height: int = NODE_HEIGHT

    @property
    def counts_y(self) -> int:
        return self.y + 36

    @property
    def toggle_y(self) -> int:
        return self.y + self.height - 8

    @property
    def foot_y(self) -> int:  # the top of the toggle's click area
        return self.y + self.height - 22


@dataclass(frozen=True)
class Edge:
    path: str
    done: bool  # the upstream end succeeded or was skipped: drawn solid
    source: str  # ids of the boxes it joins (a node's key, a group's id)
    target: str
    start: tuple[int, int]
    end: tuple[int, int]


@dataclass
class Layout:
    width: int
    height: int
    nodes: list[PlacedNode] = field(default_factory=list)
    groups: list[PlacedGroup] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    too_large: bool = False
    node_count: int = 0

    @property
    def min_width(self) -> int:
        """The narrowest the drawing may be scaled to fit its box; narrower, it scrolls."""
        return math.ceil(self.width * 0.75)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def group_label(keys: tuple[str, ...] | list[str]) -> str:
    """``shard_00…49``: the first key, then the last one less what they share."""
    first, last = keys[0], keys[-1]
    common = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b),
        min(len(first), len(last)),
    )
    shared = first[:common].rstrip("0123456789")
    return shorten(f"{first}…{last[len(shared) :]}", LABEL_CHARS + 4)


def depths(nodes: dict[str, DagNode]) -> dict[str, int]:
    """Longest distance from a root, for every node; upstreams not in ``nodes`` ignored."""
    sorter = graphlib.TopologicalSorter(
        {key: [up for up in node.upstream if up in nodes] for key, node in nodes.items()}
    )
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError:  # a validated spec has none; draw the nodes in one layer
        return dict.fromkeys(nodes, 0)
    depth: dict[str, int] = {}
    for key in order:
        ups = [depth[up] for up in nodes[key].upstream if up in depth]
        depth[key] = max(ups) + 1 if ups else 0
    return depth


def folds(items: list[DagNode]) -> list[Fold]:
    """The graph's boxes in layer order (definition order within a layer): nodes that
    share their upstream and downstream sets, past FOLD_ABOVE of them, as one group."""
    nodes = {item.key: item for item in items}
    depth = depths(nodes)
    downstream: dict[str, set[str]] = {key: set() for key in nodes}
    for key, node in nodes.items():
        for up in node.upstream:
            if up in downstream:
                downstream[up].add(key)
    alike: dict[tuple[frozenset, frozenset], list[str]] = {}
    for key, node in nodes.items():
        signature = (
            frozenset(up for up in node.upstream if up in nodes),
            frozenset(downstream[key]),
        )
        alike.setdefault(signature, []).append(key)
    group_of = {
        key: members for members in alike.values() if len(members) > FOLD_ABOVE for key in members
    }
    result, seen = [], set()
    for key in sorted(nodes, key=depth.__getitem__):  # stable: definition order in a layer
        members = group_of.get(key, [key])
        if members[0] not in seen:
            seen.add(members[0])
            result.append(Fold(id=members[0], members=tuple(members), layer=depth[key]))
    return result


def layout(
    items: list[DagNode],
    *,
    selected: str | None = None,
    expanded: Collection[str] = (),
    links: Links = Links(),
) -> Layout:
    """Place the graph in layers from left to right, parallel nodes in one column.

    1. Fold: parallel copies of a step (same upstream and downstream nodes, more than
       FOLD_ABOVE) become one group box; a group named in ``expanded`` (by any member)
       opens to show every member, a folded one names the selected and failed ones.
    2. Layer: each box's layer is its longest distance from a root; an edge that skips
       layers gets a pass-through point in each layer between, so it bends around boxes.
    3. Order each layer: barycenter sweeps down and up; the order with the fewest edge
       crossings wins.
    4. Place vertically: each box as near the mean of its neighbours as the boxes above
       it allow (down, up, then down again), so chains run straight and fans centre.
    5. Edges are cubic curves between box sides, straight through pass-through points.
    """
    nodes = {item.key: item for item in items}
    boxes = folds(items)
    open_ids = {
        fold.id for fold in boxes if fold.is_group and not set(fold.members).isdisjoint(expanded)
    }
    drawn = sum(len(fold.members) if fold.id in open_ids else 1 for fold in boxes)
    if drawn > MAX_NODES:
        return Layout(width=0, height=0, too_large=True, node_count=len(nodes))

    unit_of = {key: fold.id for fold in boxes for key in fold.members}
    placed: dict[str, PlacedNode | PlacedGroup] = {}
    for fold in boxes:
        if fold.is_group:
            placed[fold.id] = _group(fold, nodes, fold.id in open_ids, selected, links, open_ids)
        else:
            item = nodes[fold.id]
            placed[fold.id] = PlacedNode(
                key=item.key,
                label=shorten(item.key, LABEL_CHARS + 2),
                status=item.status,
                detail=item.detail,
                href=links.to_node(item.key, open_ids),
                selected=item.key == selected,
                x=0,
                y=0,
            )
    layer_of = {fold.id: fold.layer for fold in boxes}

    # Edges between boxes, each as a route through the layers it crosses.
    joined: dict[tuple[str, str], None] = {}
    for key, item in nodes.items():
        for up in item.upstream:
            if up in unit_of and unit_of[up] != unit_of[key]:
                joined[(unit_of[up], unit_of[key])] = None
    routes: list[list[str]] = []
    heights = {key: box.height for key, box in placed.items()}
    for source, target in joined:
        route = [source]
        for layer in range(layer_of[source] + 1, layer_of[target]):
            point = f"\x00{source}\x00{target}\x00{layer}"  # cannot clash with a key
            layer_of[point] = layer
            heights[point] = PASS_HEIGHT
            route.append(point)
        routes.append([*route, target])
    if len(layer_of) - len(placed) > MAX_PASSES:
        return Layout(width=0, height=0, too_large=True, node_count=len(nodes))

    ups: dict[str, list[str]] = {key: [] for key in layer_of}
    downs: dict[str, list[str]] = {key: [] for key in layer_of}
    for route in routes:
        for a, b in pairwise(route):
            downs[a].append(b)
            ups[b].append(a)
    layers: list[list[str]] = [[] for _ in range(max(layer_of.values(), default=-1) + 1)]
    for key in layer_of:  # boxes in fold order first, then pass-through points
        layers[layer_of[key]].append(key)

    layers = dag_layers.order(layers, ups, downs)
    centre = dag_layers.place(layers, ups, downs, heights, GAP_Y)

    # Columns: as wide as their widest box; boxes sit at the column's left side.
    lefts, rights, x = [], [], MARGIN
    for layer in layers:
        width = max((placed[key].width for key in layer if key in placed), default=0)
        lefts.append(x)
        rights.append(x + width)
        x += width + GAP_X
    top = min((centre[key] - heights[key] / 2 for key in centre), default=0)
    shift = MARGIN - top
    for index, layer in enumerate(layers):
        for key in layer:
            if key in placed:
                _move(placed[key], lefts[index], round(centre[key] - heights[key] / 2 + shift))
    bottom = max((box.y + box.height for box in placed.values()), default=0)

    edges = []
    for route in routes:
        source, target = placed[route[0]], placed[route[-1]]
        x1, y1 = source.x + source.width, round(centre[route[0]] + shift)
        path = f"M{x1},{y1}"
        at_x = rights[layer_of[route[0]]]
        if at_x > x1:
            path += f" H{at_x}"
        at_y = y1
        for point in route[1:]:
            next_x, next_y = lefts[layer_of[point]], round(centre[point] + shift)
            bend = GAP_X // 2
            path += f" C{at_x + bend},{at_y} {next_x - bend},{next_y} {next_x},{next_y}"
            at_x, at_y = next_x, next_y
            if point not in placed:
                at_x = rights[layer_of[point]]
                path += f" H{at_x}"
        edges.append(
            Edge(
                path=path,
                done=_done(source),
                source=route[0],
                target=route[-1],
                start=(x1, y1),
                end=(target.x, at_y),
            )
        )
    return Layout(
        width=(x - GAP_X + MARGIN) if layers else 0,
        height=(bottom + MARGIN) if placed else 0,
        nodes=[box for box in placed.values() if isinstance(box, PlacedNode)],
        groups=[box for box in placed.values() if isinstance(box, PlacedGroup)],
        edges=edges,
        node_count=len(nodes),
    )


def _severity(status: str) -> int:
    return SEVERITY.index(status) if status in SEVERITY else len(SEVERITY)


def _group(
    fold: Fold,
    nodes: dict[str, DagNode],
    is_open: bool,
    selected: str | None,
    links: Links,
    open_ids: set[str],
) -> PlacedGroup:
    """A group box, at (0, 0) until placed: label, counts, members, the toggle link."""
    members = [nodes[key] for key in fold.members]
    counts = Counter(member.status for member in members)
    ordered_counts = sorted(counts.items(), key=lambda item: _severity(item[0]))
    size = len(members)
    types = {member.detail for member in members}
    definition = set(counts) == {"definition"}
    detail = types.pop() if len(types) == 1 else f"{len(types)} node types"
    words = ", ".join(f"{count} {status.replace('_', ' ')}" for status, count in ordered_counts)
    title = f"{fold.members[0]} … {fold.members[-1]}: {size} parallel nodes" + (
        "" if definition else f" — {words}"
    )

    if is_open:
        shown = members
        columns = min(GROUP_COLUMNS, math.ceil(size / GROUP_ROWS))
        chars = min(max(len(member.key) for member in members), LABEL_CHARS)
        chip_width = 14 + (chars + 2) * CHAR_WIDTH
        note = False
    else:
        # The selected member first, then those that need a look, worst first.
        wanted = sorted(
            (m for m in members if m.key == selected or m.status in ATTENTION),
            key=lambda m: (m.key != selected, _severity(m.status)),
        )
        shown = wanted[:GROUP_LISTED]
        columns = 1
        chip_width = NODE_WIDTH - 2 * GROUP_PAD
        note = True
    rows = math.ceil(len(shown) / columns) if shown else 0
    width = max(NODE_WIDTH, 2 * GROUP_PAD + columns * chip_width + (columns - 1) * CHIP_GAP)
    chips = []
    for index, member in enumerate(shown):
        column, row = divmod(index, rows) if rows else (0, 0)
        room = (chip_width - 12) // CHAR_WIDTH - 2  # characters after the glyph
        words_shown = member.status.replace("_", " ") if note else ""
        # The status in words too where it fits beside the whole key (sans: ~5.5 px).
        if len(member.key) + math.ceil((len(words_shown) + 3) * 5.5 / CHAR_WIDTH) > room:
            words_shown = ""
        chips.append(
            Member(
                key=member.key,
                label=shorten(member.key, max(room, 6)),
                status=member.status,
                note=words_shown,
                href=links.to_node(member.key, open_ids),
                selected=member.key == selected,
                x=GROUP_PAD + column * (chip_width + CHIP_GAP),
                y=GROUP_HEAD + row * (CHIP_HEIGHT + CHIP_GAP),
                width=chip_width,
            )
        )
    hidden = 0 if is_open else len(wanted) - len(shown)
    toggle = "▾ fold into one box" if is_open else f"▸ show all {size}"
    if hidden:
        toggle += f" (+{hidden} more)"
    return PlacedGroup(
        id=fold.id,
        keys=fold.members,
        label=fold.label,
        title=title,
        size=size,
        status=ordered_counts[0][0],
        counts=[] if definition else ordered_counts,
        detail=detail,
        expanded=is_open,
        selected=selected in fold.members,
        toggle_href=links.toggle(open_ids ^ {fold.id}),
        toggle_label=toggle,
        members=chips,
        width=width,
        height=GROUP_HEAD + rows * (CHIP_HEIGHT + CHIP_GAP) + 20,
    )


def _move(box: PlacedNode | PlacedGroup, x: int, y: int) -> None:
    box.x, box.y = x, y
    if isinstance(box, PlacedGroup):
        for member in box.members:
            member.x += x
            member.y += y


def _done(box: PlacedNode | PlacedGroup) -> bool:
    if isinstance(box, PlacedGroup):
        return all(status in DONE for status, _ in box.counts) and bool(box.counts)
    return box.status in DONE
