"""The graph layout: layers by longest path, parallel nodes side by side in one column,
wide layers folded into a group with counts, no overlaps, edges between the right boxes."""

import re
from itertools import pairwise

from dashboard import dag, dag_layers


def node(key, *upstream, status="pending"):
    return dag.DagNode(key=key, upstream=list(upstream), status=status, detail=status)


def placed(layout) -> dict[str, dag.PlacedNode | dag.PlacedGroup]:
    return {item.key: item for item in layout.nodes} | {group.id: group for group in layout.groups}


def centre(box) -> float:
    return box.y + box.height / 2


def overlap(a, b) -> bool:
    return (
        a.x < b.x + b.width
        and b.x < a.x + a.width
        and a.y < b.y + b.height
        and b.y < a.y + a.height
    )


def fan_out(count=50, failed=(17, 33), **layout_args):
    shards = [
        node(f"shard_{i:02d}", status="failed" if i in failed else "succeeded")
        for i in range(count)
    ]
    items = [*shards, node("combine", *[s.key for s in shards])]
    return dag.layout(items, links=dag.Links(nodes=True), **layout_args)


def assert_well_drawn(layout):
    """No two boxes overlap; every box and every member chip lies inside the drawing;
    each edge starts on its source's right side and ends on its target's left side."""
    boxes = list(placed(layout).values())
    for index, box in enumerate(boxes):
        assert box.x >= 0 and box.y >= 0, box
        assert box.x + box.width <= layout.width and box.y + box.height <= layout.height, box
        for other in boxes[index + 1 :]:
            assert not overlap(box, other), (box, other)
    for group in layout.groups:
        for member in group.members:
            assert group.x <= member.x and member.x + member.width <= group.x + group.width
            assert group.y + 40 <= member.y and member.y + member.height <= group.y + group.height
        for a, b in zip(group.members, group.members[1:], strict=False):
            assert not overlap(a, b), (a, b)
    at = placed(layout)
    for edge in layout.edges:
        source, target = at[edge.source], at[edge.target]
        assert edge.start == (source.x + source.width, round(centre(source))), edge
        assert edge.end == (target.x, round(centre(target))), edge
        assert edge.path.startswith(f"M{edge.start[0]},{edge.start[1]}")
        assert edge.path.endswith(f"{edge.end[0]},{edge.end[1]}")


# --- Layers -----------------------------------------------------------------------------------


def test_nodes_are_layered_by_their_longest_path_from_a_root():
    layout = dag.layout([node("a"), node("b", "a"), node("c", "b"), node("d", "a", "c"), node("e")])
    at = placed(layout)
    columns = sorted({item.x for item in layout.nodes})
    assert [columns.index(at[key].x) for key in "abcde"] == [0, 1, 2, 3, 0]
    assert len(layout.edges) == 4
    assert layout.width == 4 * dag.NODE_WIDTH + 3 * dag.GAP_X + 2 * dag.MARGIN
    assert_well_drawn(layout)


def test_parallel_nodes_stand_in_one_column_with_the_fan_centred_on_them():
    middle = [node(f"m{i}", "split") for i in range(6)]
    layout = dag.layout([node("split"), *middle, node("join", *[m.key for m in middle])])
    at = placed(layout)
    assert len({at[m.key].x for m in middle}) == 1  # one column, not wrapped into several
    tops = sorted(at[m.key].y for m in middle)
    assert all(b - a == dag.NODE_HEIGHT + dag.GAP_Y for a, b in pairwise(tops))
    mean = sum(centre(at[m.key]) for m in middle) / len(middle)
    assert abs(centre(at["split"]) - mean) <= 1 and abs(centre(at["join"]) - mean) <= 1
    assert_well_drawn(layout)


def test_a_chain_runs_straight():
    layout = dag.layout([node("a"), node("b", "a"), node("c", "b")])
    assert len({item.y for item in layout.nodes}) == 1
    assert layout.height == dag.NODE_HEIGHT + 2 * dag.MARGIN


def test_edges_are_ordered_so_they_do_not_cross():
    # Defined crosswise: x feeds q, y feeds p, but p is defined before q.
    layout = dag.layout([node("x"), node("y"), node("p", "y"), node("q", "x")])
    at = placed(layout)
    assert (at["x"].y < at["y"].y) == (at["q"].y < at["p"].y)


def test_an_edge_that_skips_layers_passes_beside_the_boxes_between():
    layout = dag.layout([node("a"), node("b", "a"), node("c", "b"), node("d", "c", "a")])
    at = placed(layout)
    [long_edge] = [edge for edge in layout.edges if edge.source == "a" and edge.target == "d"]
    passes = re.findall(r"(\d+),(\d+) H(\d+)", long_edge.path)
    assert len(passes) == 2  # through the columns of b and c
    for (left, y, right), box in zip(passes, (at["b"], at["c"]), strict=True):
        assert (int(left), int(right)) == (box.x, box.x + box.width)
        assert not box.y <= int(y) <= box.y + box.height  # beside the box, not through it
    assert_well_drawn(layout)


def test_boxes_never_overlap_and_edges_join_the_right_boxes_in_a_tangled_graph():
    items = [node("r1"), node("r2"), node("r3")]
    for i in range(12):
        ups = [items[(i * 7) % len(items)].key, items[(i * 3 + 1) % len(items)].key]
        items.append(node(f"n{i}", *sorted(set(ups))))
    layout = dag.layout(items)
    expected = {(up, item.key) for item in items for up in item.upstream}
    assert {(edge.source, edge.target) for edge in layout.edges} == expected
    assert_well_drawn(layout)


# --- Folding ----------------------------------------------------------------------------------


def test_a_wide_layer_folds_into_one_group_with_its_counts():
    layout = fan_out()
    [group] = layout.groups
    assert group.id == "shard_00" and group.size == 50 and not group.expanded
    assert group.label == "shard_00…49"
    assert group.counts == [("failed", 2), ("succeeded", 48)]  # worst first
    assert group.status == "failed"
    assert "48 succeeded" in group.title and "2 failed" in group.title
    assert [item.key for item in layout.nodes] == ["combine"]
    [edge] = layout.edges
    assert (edge.source, edge.target) == ("shard_00", "combine")
    assert not edge.done  # two members failed
    assert_well_drawn(layout)


def test_a_folded_group_names_its_failed_members_each_a_link():
    group = fan_out(failed=(3, 17, 33, 40, 41, 42)).groups[0]
    assert [member.key for member in group.members] == [
        "shard_03",
        "shard_17",
        "shard_33",
        "shard_40",
    ]
    assert group.members[0].href == "?node=shard_03"
    assert group.members[0].note == "failed"
    assert group.toggle_label == "▸ show all 50 (+2 more)"
    assert group.toggle_href == "?expand=shard_00#graph"


def test_the_selected_member_is_named_first_in_its_folded_group():
    layout = fan_out(selected="shard_05")
    group = layout.groups[0]
    assert [member.key for member in group.members] == ["shard_05", "shard_17", "shard_33"]
    assert group.members[0].selected and group.selected


def test_eight_parallel_nodes_stay_apart_and_nine_fold():
    assert fan_out(count=8, failed=()).groups == []
    assert fan_out(count=9, failed=()).groups[0].size == 9


def test_only_nodes_with_the_same_upstream_and_downstream_fold():
    # Parallel chains (shard_i -> check_i) are not copies of one step: nothing folds.
    items = [node("split")]
    items += [node(f"shard_{i}", "split") for i in range(10)]
    items += [node(f"check_{i}", f"shard_{i}") for i in range(10)]
    layout = dag.layout(items)
    assert layout.groups == [] and len(layout.nodes) == 21
    assert_well_drawn(layout)


def test_an_expanded_group_shows_every_member_and_its_links_keep_it_open():
    layout = fan_out(expanded=["shard_12"], selected="shard_17")  # any member names it
    group = layout.groups[0]
    assert group.expanded and len(group.members) == 50
    assert len({member.x for member in group.members}) == dag.GROUP_COLUMNS
    chip = next(member for member in group.members if member.key == "shard_17")
    assert chip.selected and chip.href == "?node=shard_17&expand=shard_00"
    assert chip.note == ""
    assert group.toggle_href == "?#graph"  # folds it again
    combine = placed(layout)["combine"]
    assert combine.x > group.x + group.width  # the fan-in comes after the open group
    assert_well_drawn(layout)


def test_group_links_keep_the_open_node_and_the_pages_own_parameters():
    links = dag.Links(nodes=True, node="shard_17", keep=(("window", "30d"),))
    items = [node(f"s{i:02d}") for i in range(10)]
    layout = dag.layout(
        [*items, node("sum", *[i.key for i in items])], expanded=["s00"], links=links
    )
    group = layout.groups[0]
    assert group.toggle_href == "?window=30d&node=shard_17#graph"
    assert group.members[0].href == "?window=30d&node=s00&expand=s00"
    definition = dag.layout([node(f"s{i:02d}") for i in range(10)], links=dag.Links())
    assert definition.groups[0].toggle_href == "?expand=s00#graph"


def test_a_definitions_group_shows_the_node_type():
    items = [dag.DagNode(f"s{i}", [], "definition", "demo.square") for i in range(12)]
    group = dag.layout(items).groups[0]
    assert group.counts == [] and group.detail == "demo.square"
    assert group.members == []  # nothing needs a look in a definition
    assert group.label == "s0…11"


def test_group_labels_name_the_first_and_last_member():
    assert dag.group_label(["shard_00", "shard_49"]) == "shard_00…49"
    assert dag.group_label(["part_a", "part_z"]) == "part_a…z"
    assert dag.group_label(["alpha", "omega"]) == "alpha…omega"
    assert dag.group_label(["x_01", "x_09"]) == "x_01…09"


# --- Limits and edges -------------------------------------------------------------------------


def test_labels_are_shortened_and_huge_graphs_are_not_drawn():
    long_key = "k" * 60
    assert placed(dag.layout([node(long_key)]))[long_key].label.endswith("…")
    chain = [node("n0")] + [node(f"n{i}", f"n{i - 1}") for i in range(1, dag.MAX_NODES + 1)]
    huge = dag.layout(chain)
    assert huge.too_large and huge.nodes == [] and huge.node_count == dag.MAX_NODES + 1


def test_a_thousand_parallel_nodes_fold_into_one_box_but_do_not_open():
    folded = fan_out(count=1000, failed=())
    assert not folded.too_large and folded.groups[0].size == 1000
    assert fan_out(count=1000, failed=(), expanded=["shard_00"]).too_large


def test_edges_from_done_nodes_are_solid():
    layout = dag.layout([node("a", status="succeeded"), node("b", "a"), node("c", "b")])
    assert [edge.done for edge in layout.edges] == [True, False]
    assert fan_out(failed=()).edges[0].done


# --- Layer ordering and placement (dashboard/dag_layers.py) -----------------------------------


def test_crossings_are_counted_between_neighbouring_layers():
    layers = [["a", "b"], ["p", "q"]]
    position = {"a": 0, "b": 1, "p": 0, "q": 1}
    crosswise = {"a": ["q"], "b": ["p"], "p": [], "q": []}
    straight = {"a": ["p"], "b": ["q"], "p": [], "q": []}
    assert dag_layers.crossings(layers, crosswise, position) == 1
    assert dag_layers.crossings(layers, straight, position) == 0
    assert dag_layers.order(layers, {"p": ["b"], "q": ["a"], "a": [], "b": []}, crosswise) in (
        [["a", "b"], ["q", "p"]],
        [["b", "a"], ["p", "q"]],
    )


def test_pack_keeps_order_and_gap_and_centres_boxes_that_want_one_place():
    tops = dag_layers.pack([0, 0, 0], [10, 10, 10], gap=5)
    assert tops == [-15, 0, 15]  # centred on what they want, 5 apart
    assert dag_layers.pack([0, 100], [10, 10], gap=5) == [0, 100]  # room enough: as wanted
