"""Placement: contiguous spans of layers for hosts of measured speed and memory.

Owns: `HostProbe` (one host's figures, as `stage-server --probe` prints them), what a stage of a
span needs in memory (`stage_memory`), and `place`, which gives each host, in the order listed,
a contiguous span (possibly none) so that the slowest stage's time per token is as small as it
can be while every host holds its span; among such plans it takes the one whose stage times add
up to the least (a single request's time per token).

Why min-max: a pipeline's decode rate under load is bounded by its slowest stage, which every
token passes through; a host twice as slow as another then gets about half its layers, and the
last stage, which also runs the final norm and LM head, gets that many layers' worth fewer.
Exact (a dynamic program over hosts and layers) rather than proportional shares rounded
(planner.plan_partition): memory caps and integer spans make rounding miss the optimum.

Does not own: measuring (stage_server/probe.py), reading probe files or printing commands
(plan_command), or an even split (planner).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.planner import PlanError

SPEEDS = ("decode", "prefill")  # which time per token a plan balances
PROBE_FORMATS = (1,)  # the "probe" field values of the lines this reads (stage_server/probe.py's PROBE_FORMAT)
_FIELDS = {"decode_layer_s": float, "prefill_token_layer_s": float, "head_cost_layers": float,
           "layer_bytes": int, "embedding_bytes": int, "kv_bytes_per_token_layer": int, "free_bytes": int,
           "num_layers": int}


@dataclass(frozen=True)
class HostProbe:
    """One host's figures: seconds per layer for one decoding row (and per prefill token), the LM
    head's work in layers, bytes of one layer's weights, of the embedding (and of an untied head),
    KV bytes per token per layer, and the bytes free for a stage."""

    name: str
    decode_layer_s: float
    layer_bytes: int
    free_bytes: int
    num_layers: int
    embedding_bytes: int = 0
    head_cost_layers: float = 0.0
    prefill_token_layer_s: float = 0.0
    kv_bytes_per_token_layer: int = 0
    tied_head: bool = False
    model: str = ""
    fingerprint: str = ""
    dtype: str = ""

    @classmethod
    def from_json(cls, data: dict, name: str = "") -> HostProbe:
        """A probe line's object; PlanError naming the field when one is missing or not a number >= 0."""
        if not isinstance(data, dict):
            raise PlanError("a probe is a JSON object, as stage-server --probe prints it")
        if data.get("probe", PROBE_FORMATS[0]) not in PROBE_FORMATS:
            raise PlanError(f"probe of {name or data.get('host', '?')} is of format {data.get('probe')!r}, which this "
                            f"coordinator does not read ({', '.join(map(str, PROBE_FORMATS))}); use one layerline "
                            "version for both")
        values = {}
        for key, kind in _FIELDS.items():
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise PlanError(f"probe of {name or data.get('host', '?')}: {key} must be a number >= 0, got "
                                f"{value!r}; make it again with stage-server --probe")
            values[key] = kind(value)
        if values["num_layers"] < 1 or values["decode_layer_s"] <= 0 or values["layer_bytes"] < 1:
            raise PlanError(f"probe of {name or data.get('host', '?')}: num_layers, decode_layer_s and layer_bytes "
                            "must be above zero")
        return cls(name=str(name or data.get("host") or "host"), tied_head=bool(data.get("tied_head", False)),
                   model=str(data.get("model", "")), fingerprint=str(data.get("fingerprint", "")),
                   dtype=str(data.get("dtype", "")), **values)

    def layer_seconds(self, speed: str = "decode") -> float:
        return self.prefill_token_layer_s if speed == "prefill" else self.decode_layer_s


@dataclass(frozen=True)
class Span:
    """Layers [start, end) on `host` (start == end: the host holds nothing), the stage's seconds per
    token and the bytes it needs."""

    host: HostProbe
    start: int
    end: int
    seconds: float
    memory_bytes: int

    @property
    def layers(self) -> int:
        return self.end - self.start


def stage_memory(host: HostProbe, start: int, end: int, cache_bytes: int, reserve_bytes: int) -> int:
    """Bytes a stage of layers [start, end) needs on `host`: their weights, the embedding on the
    first stage, the LM head on the last (the embedding's matrix, held once where a tied head shares
    it), its KV-cache budget and a fixed reserve for the process (runtime, buffers of a step)."""
    first, last = start == 0, end == host.num_layers
    weights = (end - start) * host.layer_bytes
    weights += host.embedding_bytes * ((1 if first else 0) + (1 if last and not (first and host.tied_head) else 0))
    return weights + cache_bytes + reserve_bytes


def stage_seconds(host: HostProbe, start: int, end: int, speed: str = "decode") -> float:
    """Seconds per token of a stage of layers [start, end) on `host`, the LM head on the last."""
    head = host.head_cost_layers if end == host.num_layers else 0.0
    return (end - start + head) * host.layer_seconds(speed)


def check_same_model(hosts: Sequence[HostProbe]) -> int:
    """The model's number of layers; PlanError when the probes were made for different models or dtypes."""
    if not hosts:
        raise PlanError("no probes given: pass one per host, e.g. --probe node1=node1.json")
    if len({h.name for h in hosts}) != len(hosts):
        raise PlanError("two probes name the same host; name them HOST=FILE")
    first = hosts[0]
    for host in hosts[1:]:
        for field in ("num_layers", "fingerprint", "dtype"):
            if getattr(host, field) != getattr(first, field):
                raise PlanError(f"the probes of {first.name} and {host.name} differ in {field} "
                                f"({getattr(first, field)!r} vs {getattr(host, field)!r}): probe every host "
                                "with the same --model and --dtype")
    return first.num_layers


def place(hosts: Sequence[HostProbe], *, cache_bytes: int = 0, reserve_bytes: int = 0,
          speed: str = "decode") -> list[Span]:
    """A span per host, in order, covering every layer once, that minimises the slowest stage's
    seconds per token (then their sum) with every stage within its host's free bytes.

    Example (a host twice as slow as the other, no head):
        >>> fast = HostProbe("a", decode_layer_s=1.0, layer_bytes=1, free_bytes=100, num_layers=30)
        >>> slow = HostProbe("b", decode_layer_s=2.0, layer_bytes=1, free_bytes=100, num_layers=30)
        >>> [(s.start, s.end) for s in place([fast, slow])]
        [(0, 20), (20, 30)]
    """
    if speed not in SPEEDS:
        raise PlanError(f"speed must be one of {', '.join(SPEEDS)}, not {speed!r}")
    layers = check_same_model(hosts)
    if speed == "prefill" and any(h.prefill_token_layer_s <= 0 for h in hosts):
        raise PlanError("a probe has no prefill figure (prefill_token_layer_s): probe again, or plan for decode")
    count = len(hosts)

    def cost(i: int, start: int, end: int) -> float | None:
        """Stage seconds of host i holding [start, end); None when it does not fit (0 for no layers)."""
        if start == end:
            return 0.0
        need = stage_memory(hosts[i], start, end, cache_bytes, reserve_bytes)
        return stage_seconds(hosts[i], start, end, speed) if need <= hosts[i].free_bytes else None

    def solve(bound: float, objective) -> tuple[float, list[int]] | None:
        """Best value of `objective` (how a stage's seconds combine with the rest) over plans whose
        every stage takes at most `bound`; with the first layer each host holds."""
        best = [[math.inf] * (layers + 1) for _ in range(count + 1)]
        came_from = [[0] * (layers + 1) for _ in range(count + 1)]
        best[0][0] = 0.0
        for i in range(count):
            for start in range(layers + 1):
                if best[i][start] == math.inf:
                    continue
                for end in range(start, layers + 1):
                    seconds = cost(i, start, end)
                    if seconds is None:
                        break  # a longer span needs more memory still
                    if seconds > bound:
                        break  # a longer span takes longer still
                    value = objective(best[i][start], seconds)
                    if value < best[i + 1][end]:
                        best[i + 1][end], came_from[i + 1][end] = value, start
        if best[count][layers] == math.inf:
            return None
        starts, end = [], layers
        for i in range(count, 0, -1):
            starts.append(came_from[i][end])
            end = starts[-1]
        return best[count][layers], starts[::-1]

    slowest = solve(math.inf, max)
    if slowest is None:
        raise PlanError(_cannot_hold(hosts, layers, cache_bytes, reserve_bytes))
    _, starts = solve(slowest[0] * (1 + 1e-9), lambda a, b: a + b)
    ends = [*starts[1:], layers]
    return [Span(host, start, end, stage_seconds(host, start, end, speed) if end > start else 0.0,
                 stage_memory(host, start, end, cache_bytes, reserve_bytes) if end > start else 0)
            for host, start, end in zip(hosts, starts, ends, strict=True)]


def _cannot_hold(hosts: Sequence[HostProbe], layers: int, cache_bytes: int, reserve_bytes: int) -> str:
    """The one line of a plan that does not fit: what the model needs and what the hosts have free."""
    host = hosts[0]
    weights = layers * host.layer_bytes + host.embedding_bytes * (1 if host.tied_head else 2)
    free = sum(h.free_bytes for h in hosts)
    return (f"the hosts together cannot hold the model: {weights / 2**30:.2f} GiB of weights plus "
            f"{(cache_bytes + reserve_bytes) / 2**20:.0f} MiB of KV cache and reserve per stage, against "
            f"{free / 2**30:.2f} GiB free over {len(hosts)} host(s); add hosts, lower --cache-mb or use a "
            "smaller --dtype")
