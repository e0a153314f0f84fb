"""Greedy chaining only where the last stage reaches the first: each route checks before it chains.

A route whose last stage may not send to its first (here: its deployment names only itself, as a
firewall between them would leave it) stays unchained and answers exactly as the unsplit model
does; a route whose stages reach each other chains. And a chained step that fails naming the first
stage turns chaining off on its route without taking the first stage out of service. A route
whose hop was closed chains once a later check finds it open; a check tells a route too busy to
answer from a blocked hop.
"""

from __future__ import annotations

import contextlib
import time

import grpc
import pytest
from tiny_models import reference_greedy
from waiting import eventually

from coordinator import routes as routes_module
from coordinator.chain_check import Verdict, check_chain
from coordinator.engine import Engine, SequenceRequest
from coordinator.routes import Routes
from coordinator.stage_errors import StageCallError
from coordinator.stage_pool import SERVING, StagePool
from protos import stage_pb2
from stage_server.peer_identity import THIS_MACHINE, Peer

PROMPT, NEW_TOKENS = [5, 6, 7, 8], 12


@contextlib.contextmanager
def chained_routes(addresses, servers):
    pool = StagePool(addresses)
    pool.seed((address, server.service.Info(None, None)) for address, server in zip(addresses, servers))
    pool.tell_deployment(raise_errors=True)
    routes = Routes(pool, local_hops=False, chain=True)
    try:
        yield pool, routes
    finally:
        routes.close()
        pool.close()


def test_a_route_whose_last_stage_cannot_reach_its_first_stays_unchained(tiny_model, stages, caplog):
    model_dir = tiny_model("llama")
    expected = reference_greedy(model_dir, [PROMPT], NEW_TOKENS)[0]
    with stages(model_dir, 2, local_hops=False) as (addresses, servers), \
            chained_routes(addresses, servers) as (pool, routes):
        # The last stage may send only to itself: its chained step to the first stage is refused.
        servers[1].service.deployment.set([addresses[1]], Peer(THIS_MACHINE, frozenset(), True, False))
        route = routes.new_route(lambda address: 0)
        assert not route.can_chain
        assert eventually(lambda: any("did not reach its first" in r.getMessage() for r in caplog.records), True,
                          10.0)  # the check found the hop closed
        sent = []
        submit = route.submit
        route.submit = lambda *args, **kwargs: sent.append(kwargs.get("chain_steps", 0)) or submit(*args, **kwargs)
        result = Engine(routes, chain=True).generate([SequenceRequest(PROMPT, NEW_TOKENS)])[0]
        assert result.token_ids == expected
        assert not route.can_chain and len(sent) == NEW_TOKENS and max(sent) == 0


def test_a_route_whose_stages_reach_each_other_chains(tiny_model, stages):
    model_dir = tiny_model("llama")
    expected = reference_greedy(model_dir, [PROMPT], NEW_TOKENS)[0]
    with stages(model_dir, 2, local_hops=False) as (addresses, servers), \
            chained_routes(addresses, servers) as (pool, routes):
        route = routes.new_route(lambda address: 0)
        eventually(lambda: route.can_chain, True, 5.0)
        sent = []
        submit = route.submit
        route.submit = lambda *args, **kwargs: sent.append(kwargs.get("chain_steps", 0)) or submit(*args, **kwargs)
        result = Engine(routes, chain=True).generate([SequenceRequest(PROMPT, NEW_TOKENS)])[0]
        assert result.token_ids == expected
        assert len(sent) < NEW_TOKENS and max(sent) > 0, sent  # the last stage sent the other steps
        chained = StageCallError(grpc.StatusCode.UNAVAILABLE, "next stage is unreachable", addresses[0])
        assert routes.failover(route, chained, chained=True)
        assert not route.can_chain and pool.state(addresses[0]) == SERVING


def test_a_route_checks_again_and_chains_once_the_hop_opens(tiny_model, stages, monkeypatch):
    monkeypatch.setattr(routes_module, "RECHECK_FIRST_S", 0.2)
    model_dir = tiny_model("llama")
    with stages(model_dir, 2, local_hops=False) as (addresses, servers), \
            chained_routes(addresses, servers) as (pool, routes):
        servers[1].service.deployment.set([addresses[1]], Peer(THIS_MACHINE, frozenset(), True, False))
        route = routes.new_route(lambda address: 0)
        assert not route.can_chain
        time.sleep(0.5)  # a check or two found the hop closed
        assert not route.can_chain
        pool.tell_deployment(raise_errors=True)  # the hop opens
        eventually(lambda: route.can_chain, True, 10.0)


class _Future:
    """A step's future that answers `answer` at once, or never (None)."""

    def __init__(self, answer=None, next_in_chain=None) -> None:
        self.answer, self.next_in_chain = answer, next_in_chain

    def result(self, timeout: float):
        if self.answer is None:
            raise TimeoutError(f"no answer in {timeout}s")
        return self.answer


class _Route:
    addresses = ["first:1", "last:2"]

    def __init__(self, future: _Future) -> None:
        self.future, self.ended = future, []

    def submit(self, session_id, *args, **kwargs):
        return self.future

    def end_session(self, session_id, timeout_s: float) -> None:
        self.ended.append(session_id)


def _answer(chained: bool) -> stage_pb2.ForwardResponse:
    return stage_pb2.ForwardResponse(chained=chained)


def _failed(code: grpc.StatusCode) -> stage_pb2.ForwardResponse:
    return stage_pb2.ForwardResponse(status_code=code.value[0], error_message="refused", failed_stage="last:2")


@pytest.mark.parametrize(("future", "verdict"), [
    (_Future(None), Verdict.UNKNOWN),  # the unchained step is slow: the route is busy, the hop unknown
    (_Future(_failed(grpc.StatusCode.UNAVAILABLE)), Verdict.UNKNOWN),  # a stage restarting
    (_Future(_failed(grpc.StatusCode.PERMISSION_DENIED)), Verdict.BLOCKED),  # may not send to the first stage
    (_Future(_answer(False)), Verdict.BLOCKED),  # the last stage could not open the link
    (_Future(_answer(True), _Future(None)), Verdict.BLOCKED),  # the chained step never came back
    (_Future(_answer(True), _Future(_answer(False))), Verdict.WORKS),
])
def test_the_check_tells_a_slow_route_from_a_blocked_hop(future, verdict):
    route = _Route(future)
    assert check_chain(route, first_step_timeout_s=0.1) is verdict
    assert len(route.ended) == 1  # the throwaway session is ended whatever the verdict
