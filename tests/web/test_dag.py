"""The graph layout: layers by longest path, wide layers wrapped, edges between boxes."""

from dashboard import dag


def node(key, *upstream, status="pending"):
    return dag.DagNode(key=key, upstream=list(upstream), status=status, detail=status)


def placed(layout) -> dict[str, dag.PlacedNode]:
    return {item.key: item for item in layout.nodes}


def test_nodes_are_layered_by_their_longest_path_from_a_root():
    layout = dag.layout([node("a"), node("b", "a"), node("c", "b"), node("d", "a", "c"), node("e")])
    at = placed(layout)
    columns = sorted({item.x for item in layout.nodes})
    assert [columns.index(at[key].x) for key in "abcde"] == [0, 1, 2, 3, 0]
    assert len(layout.edges) == 4
    assert layout.width == 4 * dag.NODE_WIDTH + 3 * dag.GAP_X + 2 * dag.MARGIN


def test_a_wide_layer_wraps_into_columns_and_its_edges_leave_from_the_last_one():
    shards = [node(f"s{i:02d}") for i in range(25)]
    layout = dag.layout([*shards, node("sum", *[s.key for s in shards])], selected="sum")
    at = placed(layout)
    assert len({at[s.key].x for s in shards}) == 3  # 10 + 10 + 5
    assert max(item.y for item in layout.nodes) < dag.MAX_ROWS * (dag.NODE_HEIGHT + dag.GAP_Y)
    assert at["sum"].selected and not at["s00"].selected
    last_column_right = max(at[s.key].x for s in shards) + dag.NODE_WIDTH
    from_first_column = layout.edges[0].path
    assert f" H{last_column_right} " in from_first_column


def test_labels_are_shortened_and_huge_graphs_are_not_drawn():
    long_key = "k" * 60
    assert placed(dag.layout([node(long_key)]))[long_key].label.endswith("…")
    huge = dag.layout([node(f"n{i}") for i in range(dag.MAX_NODES + 1)])
    assert huge.too_large and huge.nodes == []


def test_edges_from_done_nodes_are_solid():
    layout = dag.layout([node("a", status="succeeded"), node("b", "a"), node("c", "b")])
    assert [edge.done for edge in layout.edges] == [True, False]
