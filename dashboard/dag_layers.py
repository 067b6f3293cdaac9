"""Order and place the layers of a layered graph drawing (for dashboard/dag.py).

Abstract: a layer is a list of ids; ``ups`` and ``downs`` name each id's neighbours in
the layers before and after it; ``heights`` is each id's size across the layer.
"""

from bisect import bisect_right, insort

SWEEPS = 4  # ordering passes (up, down, up, down after the first); the fewest crossings wins


def order(layers: list[list[str]], ups: dict, downs: dict, sweeps: int = SWEEPS) -> list[list[str]]:
    """Each layer's order: barycenter sweeps, keeping the order with fewest crossings."""
    position: dict[str, float] = {}

    def renumber(layer: list[str]) -> None:
        for index, key in enumerate(layer):
            position[key] = index

    def by_mean_of(neighbours: dict, layer: list[str]) -> list[str]:
        def mean(key):
            near = [position[other] for other in neighbours[key]]
            return (sum(near) / len(near) if near else position[key], position[key])

        return sorted(layer, key=mean)

    layers = [list(layer) for layer in layers]
    for layer in layers:
        renumber(layer)
    for index in range(1, len(layers)):
        layers[index] = by_mean_of(ups, layers[index])
        renumber(layers[index])
    best, fewest = [list(layer) for layer in layers], crossings(layers, downs, position)
    for sweep in range(sweeps):
        if fewest == 0:
            break
        down = sweep % 2 == 1
        indexes = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for index in indexes:
            layers[index] = by_mean_of(ups if down else downs, layers[index])
            renumber(layers[index])
        now = crossings(layers, downs, position)
        if now < fewest:
            best, fewest = [list(layer) for layer in layers], now
    return best


def crossings(layers: list[list[str]], downs: dict, position: dict) -> int:
    """Edge crossings between neighbouring layers (inversions of the targets' order)."""
    total = 0
    for layer in layers[:-1]:
        pairs = sorted((position[a], position[b]) for a in layer for b in downs[a])
        seen: list[float] = []
        for _, target in pairs:
            total += len(seen) - bisect_right(seen, target)
            insort(seen, target)
    return total


def place(
    layers: list[list[str]], ups: dict, downs: dict, heights: dict, gap: int
) -> dict[str, float]:
    """Vertical centre of every box and pass-through point: each as near the mean of its
    neighbours as the boxes above it allow (down, up, then down again), ``gap`` apart."""
    centre: dict[str, float] = {}

    def settle(layer: list[str], wanted) -> None:
        tops = pack(
            [wanted(key) - heights[key] / 2 for key in layer], [heights[k] for k in layer], gap
        )
        for key, top in zip(layer, tops, strict=True):
            centre[key] = top + heights[key] / 2

    def mean_of(*neighbourhoods):
        def wanted(key):
            near = [centre[other] for hood in neighbourhoods for other in hood[key]]
            return sum(near) / len(near) if near else centre.get(key, 0.0)

        return wanted

    for index, layer in enumerate(layers):
        settle(layer, mean_of(ups) if index else (lambda key: 0.0))
    for layer in reversed(layers[:-1]):
        settle(layer, mean_of(downs))
    for layer in layers[1:]:
        settle(layer, mean_of(ups, downs))
    return centre


def pack(wanted: list[float], heights: list[float], gap: int) -> list[float]:
    """Tops as near ``wanted`` as possible (least squares) keeping order and gap.

    Pool adjacent violators: a run of boxes that would overlap moves as one block,
    placed at the mean of what its boxes want.
    """
    blocks: list[list] = []  # [first index, count, sum of wanted tops less offsets, size]
    for index, top in enumerate(wanted):
        blocks.append([index, 1, top, heights[index]])
        while len(blocks) > 1:
            before, last = blocks[-2], blocks[-1]
            if before[2] / before[1] + before[3] + gap <= last[2] / last[1]:
                break
            offset = before[3] + gap
            before[2] += last[2] - offset * last[1]
            before[1] += last[1]
            before[3] = offset + last[3]
            blocks.pop()
    tops = []
    for first, count, total, _ in blocks:
        y = total / count
        for index in range(first, first + count):
            tops.append(y)
            y += heights[index] + gap
    return tops
