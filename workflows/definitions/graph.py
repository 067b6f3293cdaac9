"""A spec's graph: order, cycles and downstream edges, with ``graphlib``."""

import graphlib


def find_cycle(nodes: dict[str, dict]) -> list[str]:
    """Return one cycle as [a, b, ..., a], or [] when the graph is a DAG.

    Written as "a -> b" meaning "b runs after a", starting from the cycle's node that
    the definition names first.
    """
    try:
        graphlib.TopologicalSorter({key: node["after"] for key, node in nodes.items()}).prepare()
    except graphlib.CycleError as error:
        cycle = list(error.args[1][:-1])
    else:
        return []
    # graphlib lists each node before the one it runs after; reverse to "runs before".
    if len(cycle) > 1 and cycle[0] not in nodes[cycle[1]]["after"]:
        cycle.reverse()
    position = {key: index for index, key in enumerate(nodes)}
    start = min(range(len(cycle)), key=lambda index: position.get(cycle[index], 0))
    cycle = cycle[start:] + cycle[:start]
    return [*cycle, cycle[0]]


def node_keys(spec: dict) -> list[str]:
    """The node keys in the order the definition wrote them."""
    return spec.get("order") or list(spec["nodes"])


def downstream_map(spec: dict) -> dict[str, list[str]]:
    """node key -> keys of the nodes that list it in ``after``, in definition order."""
    downstream: dict[str, list[str]] = {key: [] for key in node_keys(spec)}
    for key in node_keys(spec):
        for upstream in spec["nodes"][key]["after"]:
            downstream[upstream].append(key)
    return downstream


def topological_order(spec: dict) -> list[str]:
    """Every node after its upstreams; among nodes ready together, definition order.

    Raises ``graphlib.CycleError`` (a ValueError) for a cyclic graph, which a validated
    spec never has.
    """
    keys = node_keys(spec)
    position = {key: index for index, key in enumerate(keys)}
    sorter = graphlib.TopologicalSorter({key: spec["nodes"][key]["after"] for key in keys})
    sorter.prepare()
    order = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda key: position.get(key, len(position)))
        order.extend(ready)
        sorter.done(*ready)
    return order
