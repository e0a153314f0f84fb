"""The stage pool: which servers serve, the routes it makes over them, and what it says when it cannot.

Routes are chosen from seeded Info answers (no network): fewest hops first, then the least loaded
replica; spans that differ are routed over; a span with no serving server is named. States
change on failed calls, on probes that answer draining or another model, and listeners hear of
servers that went down or started draining.
"""

from __future__ import annotations

import grpc
import pytest

from coordinator.app import parse_stages
from coordinator.route_choice import NoRoute
from coordinator.routes import Routes
from coordinator.stage_errors import StageCallError
from coordinator.stage_pool import DOWN, DRAINING, SERVING, StagePool
from protos import stage_pb2
from protos.protocol import DRAINING_REFUSAL, PROTOCOL_VERSION


def info(start: int, end: int, *, layers: int = 4, fingerprint: str = "f1", sessions: int = 0,
         draining: bool = False) -> stage_pb2.InfoResponse:
    return stage_pb2.InfoResponse(model_fingerprint=fingerprint, layer_start=start, layer_end=end, num_layers=layers,
                                  active_sessions=sessions, draining=draining, protocol_version=PROTOCOL_VERSION,
                                  weights_manifest_id="m1", versions={"torch": "2", "transformers": "5"})


def pool_of(spans: dict[str, tuple[int, int]]) -> StagePool:
    pool = StagePool(list(spans))
    pool.seed([(address, info(*span)) for address, span in spans.items()])
    return pool


def test_replicas_of_aligned_spans_route_through_the_least_loaded():
    pool = pool_of({"a1:1": (0, 2), "a2:1": (0, 2), "b1:1": (2, 4), "b2:1": (2, 4)})
    loads = {"a1:1": 3, "b2:1": 1}
    assert pool.choose(lambda address: loads.get(address, 0)) == ("a2:1", "b1:1")
    loads = {"a2:1": 3, "b1:1": 1}
    assert pool.choose(lambda address: loads.get(address, 0)) == ("a1:1", "b2:1")


def test_fewer_hops_win_and_differing_spans_are_routed_over():
    pool = pool_of({"whole:1": (0, 4), "front:1": (0, 1), "middle:1": (1, 3), "back:1": (3, 4), "tail:1": (1, 4)})
    assert pool.choose() == ("whole:1",)
    pool.failed("whole:1", "gone")
    assert pool.choose() == ("front:1", "tail:1")
    pool.failed("tail:1", "gone")
    assert pool.choose() == ("front:1", "middle:1", "back:1")


def test_a_span_without_a_serving_server_is_named():
    pool = pool_of({"a1:1": (0, 2), "b1:1": (2, 4), "b2:1": (2, 4)})
    pool.failed("b1:1", "UNAVAILABLE: reset")
    assert pool.choose() == ("a1:1", "b2:1")
    pool.failed("b2:1", "UNAVAILABLE: reset")
    with pytest.raises(NoRoute, match=r"no live stage server for layers 2:4 .*b1:1 \(layers 2:4\): down"):
        pool.choose()
    assert not pool.accepts(("a1:1", "b1:1")) and pool.accepts(("a1:1",))


def test_listeners_hear_of_down_and_draining_servers_once():
    pool = pool_of({"a1:1": (0, 2), "b1:1": (2, 4)})
    heard = []
    pool.subscribe(lambda address, state: heard.append((address, state)))
    pool.failed("a1:1", "reset")
    pool.failed("a1:1", "reset again")
    pool._probe_answered("b1:1", info(2, 4, draining=True))
    assert heard == [("a1:1", DOWN), ("b1:1", DRAINING)]
    assert pool.state("b1:1") == DRAINING and not pool.accepts(("b1:1",))


def test_a_server_of_another_model_is_kept_out():
    pool = pool_of({"a1:1": (0, 2), "b1:1": (2, 4)})
    pool.join("b2:1")
    pool._probe_answered("b2:1", info(2, 4, fingerprint="other"))
    assert pool.state("b2:1") == DOWN
    view = next(v for v in pool.views() if v.address == "b2:1")
    assert "different models" in view.down_reason


def test_a_stage_still_loading_joins_later():
    pool = pool_of({"a1:1": (0, 2), "b1:1": (2, 4)})
    pool.join("b2:1")
    pool._probe_answered("b2:1", stage_pb2.InfoResponse())  # no fingerprint yet: loading its weights
    assert pool.state("b2:1") == "joining"
    pool.failed("b1:1", "gone")
    with pytest.raises(NoRoute):
        pool.choose()
    assert pool.state("a1:1") == SERVING


@pytest.mark.parametrize("text, spans", [
    ("a:1,b:2", [["a:1"], ["b:2"]]),
    ("a:1|a:2, b:1|b:2", [["a:1", "a:2"], ["b:1", "b:2"]]),
])
def test_stages_parse_spans_and_replicas(text, spans):
    assert parse_stages(text) == spans


def test_an_empty_span_is_refused():
    with pytest.raises(ValueError, match="replicas of a span separated by"):
        parse_stages("a:1,,b:1")


def test_a_draining_refusal_keeps_new_sessions_away_without_failing_the_server():
    pool = pool_of({"a1:1": (0, 2), "a2:1": (0, 2), "b1:1": (2, 4)})
    routes = Routes(pool)
    heard = []
    pool.subscribe(lambda address, state: heard.append((address, state)))
    route = routes.new_route(lambda address: {"a2:1": 1}.get(address, 0))
    assert route.addresses == ["a1:1", "b1:1"]
    # A stage names itself in its own refusals ("layers A:B @ its host:port"): its span on the route tells which.
    refusal = StageCallError(grpc.StatusCode.UNAVAILABLE, f"stage {DRAINING_REFUSAL}; try a replica",
                             "layers 0:2 @ 0.0.0.0:1")
    assert routes.failover(route, refusal)
    assert pool.state("a1:1") == DRAINING and heard == [("a1:1", DRAINING)]
    assert routes.new_route(lambda address: 0).addresses == ["a2:1", "b1:1"]
    routes.failover(route, StageCallError(grpc.StatusCode.UNAVAILABLE, "connection reset", "b1:1"))
    assert pool.state("b1:1") == DOWN
