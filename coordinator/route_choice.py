"""Choosing a route over stage servers: one per span, the spans tiling every layer exactly once.

Owns: `best_route`, a pure function over candidate servers (address, span, whether it serves, its
load): fewest hops first, then the least total load, found by walking layer boundaries in order;
and `NoRoute`, whose one-line message names the layers where every chain of serving servers stops
and the state of the servers that start there. Does not own the servers' states (stage_pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class NoRoute(Exception):
    """No chain of serving servers covers every layer; the message names the layers without one."""


@dataclass(frozen=True)
class Candidate:
    address: str
    start: int
    end: int
    serving: bool
    load: int = 0  # lower is better
    state: str = ""  # for the message when no route exists, e.g. "down (UNAVAILABLE: ...)"

    def describe(self) -> str:
        return f"{self.address} (layers {self.start}:{self.end}): {self.state}"


def best_route(candidates: Sequence[Candidate], num_layers: int) -> tuple[str, ...]:
    """The serving candidates that cover layers [0, num_layers) in order, fewest hops, then least load."""
    serving = [c for c in candidates if c.serving and c.end > c.start]
    # best[layer] = (hops, load, route) of the best chain covering layers [0, layer)
    best: dict[int, tuple[int, int, tuple[str, ...]]] = {0: (0, 0, ())}
    for start in sorted({c.start for c in serving}):
        if start not in best:
            continue
        hops, load, route = best[start]
        for candidate in serving:
            if candidate.start != start:
                continue
            chain = (hops + 1, load + candidate.load, route + (candidate.address,))
            if candidate.end not in best or chain[:2] < best[candidate.end][:2]:
                best[candidate.end] = chain
    if num_layers in best:
        return best[num_layers][2]
    furthest = max(layer for layer in best if layer < num_layers)
    holders = [c for c in candidates if c.start == furthest]
    others = "; ".join(c.describe() for c in holders) if holders else "no known server starts there"
    raise NoRoute(f"no live stage server for layers {furthest}:{num_layers} of the model ({others}); "
                  "start or restart one, or wait for it to come back")
