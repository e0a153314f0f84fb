"""Greedy chaining only where the last stage reaches the first: each route checks before it chains.

A route whose last stage may not send to its first (here: its deployment names only itself, as a
firewall between them would leave it) stays unchained and answers exactly as the unsplit model
does; a route whose stages reach each other chains. And a chained step that fails naming the first
stage turns chaining off on its route without taking the first stage out of service.
"""

from __future__ import annotations

import contextlib
import threading

import grpc
from tiny_models import reference_greedy
from waiting import eventually

from coordinator.engine import Engine, SequenceRequest
from coordinator.routes import Routes
from coordinator.stage_errors import StageCallError
from coordinator.stage_pool import SERVING, StagePool
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


def test_a_route_whose_last_stage_cannot_reach_its_first_stays_unchained(tiny_model, stages):
    model_dir = tiny_model("llama")
    expected = reference_greedy(model_dir, [PROMPT], NEW_TOKENS)[0]
    with stages(model_dir, 2, local_hops=False) as (addresses, servers), \
            chained_routes(addresses, servers) as (pool, routes):
        # The last stage may send only to itself: its chained step to the first stage is refused.
        servers[1].service.deployment.set([addresses[1]], Peer(THIS_MACHINE, frozenset(), True, False))
        route = routes.new_route(lambda address: 0)
        assert not route.can_chain
        eventually(lambda: any(t.name == "chain-check" for t in threading.enumerate()), False, 10.0)
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
