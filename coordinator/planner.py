"""Partition planning: which contiguous layers each stage holds.

Owns: a pure function from (number of layers, number of stages, optional relative
weights such as measured speed or memory) to contiguous ranges that cover every
layer exactly once. Knows nothing about processes, models or the network.
"""

from __future__ import annotations

from collections.abc import Sequence


class PlanError(ValueError):
    """The split asked for is impossible."""


def plan_partition(num_layers: int, num_stages: int,
                   weights: Sequence[float] | None = None, head_cost: float = 0.0) -> list[tuple[int, int]]:
    """Split layers [0, num_layers) into `num_stages` contiguous, non-empty ranges.

    With `weights`, stage i gets a share of the work proportional to weights[i]
    (rounded to the nearest split, every stage at least one layer). `head_cost` is
    the final norm + LM head's work counted in layers: the last stage runs it, so it
    gets that many layers fewer than its share (a large vocabulary costs several layers).

    Example:
        >>> plan_partition(30, 3)
        [(0, 10), (10, 20), (20, 30)]
        >>> plan_partition(10, 2, weights=[3, 1])
        [(0, 8), (8, 10)]
        >>> plan_partition(30, 2, head_cost=8)
        [(0, 19), (19, 30)]
    """
    if num_layers < 1:
        raise PlanError(f"the model must have at least one layer, not {num_layers}")
    if num_stages < 1:
        raise PlanError(f"at least one stage is needed, not {num_stages}")
    if num_stages > num_layers:
        raise PlanError(f"{num_stages} stages cannot split {num_layers} layers: each stage needs a layer")
    if weights is None:
        weights = [1.0] * num_stages
    if len(weights) != num_stages:
        raise PlanError(f"{len(weights)} weights given for {num_stages} stages")
    if any(not (w > 0) for w in weights):
        raise PlanError(f"weights must be positive numbers, got {list(weights)}")
    if not head_cost >= 0:
        raise PlanError(f"head_cost must be zero or more, got {head_cost}")

    total = float(sum(weights))
    ideal = [(num_layers + head_cost) * w / total for w in weights]
    ideal[-1] -= head_cost
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) < num_layers:  # give a layer to the stage furthest below its share
        counts[max(range(num_stages), key=lambda i: ideal[i] - counts[i])] += 1
    while sum(counts) > num_layers:  # take one from the stage furthest above its share
        counts[max((i for i in range(num_stages) if counts[i] > 1), key=lambda i: counts[i] - ideal[i])] -= 1

    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def groups_in_flight(stages: Sequence[tuple[int, int]]) -> int:
    """How many groups of sequences the coordinator keeps in flight by default, from each stage's
    (usable cores, other stages on its machine): one per machine. A machine's stages then compute
    one after another, each step on all of the machine's cores, while different machines overlap.
    Why not one per stage: a second group on the same machine only splits its cores into smaller
    steps (2 float32 stages on 2 cores, 16 clients: 5.4x one client with one group, 3.5x with two).

    Example:
        >>> groups_in_flight([(2, 3)] * 4)  # 4 stages on one 2-core machine
        1
        >>> groups_in_flight([(8, 0), (8, 0)])  # 2 machines, one stage each
        2
        >>> groups_in_flight([(0, 0), (0, 0), (0, 0)])  # not said (a GPU stage, --threads): one each
        3
    """
    machines = sum(1.0 / (1 + others) if cores else 1.0 for cores, others in stages)
    return max(1, round(machines))
