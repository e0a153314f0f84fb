"""Failover by exact replay, in one process: a route that loses a server mid-generation moves its
sequences to a replica, and every answer is token for token the one it gets without the failure,
greedy or sampled with a seed. A span left with no server fails its requests UNAVAILABLE naming
the span; a request that loses more routes than --max-replays allows fails too.

Stage servers here are in-process (two spans, two replicas each) and a "crash" stops one's gRPC
server at once; real processes killed with SIGKILL or frozen with SIGSTOP are in test_failover.py.
"""

from __future__ import annotations

import contextlib
import threading

import grpc
import pytest
from conftest import running_replicas
from tiny_models import save_tiny_model
from waiting import eventually

from coordinator.engine import Engine, SequenceRequest
from coordinator.routes import Routes
from coordinator.sampling import SamplingParams
from coordinator.stage_errors import StageCallError
from coordinator.stage_pool import StagePool
from stage_server.server import StageServer

PROMPTS = [[5 + i, 6, 7 + i, 8, 9] for i in range(6)]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replay-llama")
    save_tiny_model(directory, "llama")
    return directory


@contextlib.contextmanager
def replicated(model_dir):
    """Four in-process stage servers (two spans, two replicas each, gRPC hops only), a pool over them
    and an engine with two groups; yields (engine, pool, servers by address)."""
    with running_replicas(model_dir) as servers:
        pool = StagePool(list(servers), stall_timeout_s=5.0)
        pool.seed((address, server.service.Info(None, None)) for address, server in servers.items())
        pool.tell_deployment(raise_errors=True)
        pool.start()
        routes = Routes(pool, local_hops=False)
        try:
            yield Engine(routes, micro_batches=2, chain=False), pool, servers
        finally:
            pool.close()
            routes.close()


def requests(sampled: bool, on_token=None) -> list[SequenceRequest]:
    return [SequenceRequest(prompt, NEW_TOKENS, SamplingParams(temperature=0.9, top_k=20, seed=7 + i) if sampled
                            else SamplingParams(), on_token=on_token if i == 0 else None)
            for i, prompt in enumerate(PROMPTS)]


def crash(server: StageServer) -> None:
    server.grpc_server.stop(0)  # every stream and call to it ends at once, as when its process dies


def crash_after(engine: Engine, servers: dict, tokens: int, pick) -> tuple[callable, threading.Event]:
    """An on_token callback that, at the `tokens`-th token, crashes the server `pick(route)` names on the
    route of a running group (from another thread: the callback runs under the engine's lock)."""
    seen, crashed = [0], threading.Event()

    def on_token(_token: int) -> bool:
        seen[0] += 1
        if seen[0] == tokens:
            route = next(g.route for g in engine._state.groups if g.route is not None and g.rows)
            victim = servers[pick(route.addresses)]
            threading.Thread(target=lambda: (crash(victim), crashed.set()), daemon=True).start()
        return False
    return on_token, crashed


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("victim", [0, 1], ids=["first-span", "last-span"])
def test_a_crash_mid_generation_changes_no_token(model_dir, sampled, victim):
    with replicated(model_dir) as (engine, pool, servers):
        reference = [r.token_ids for r in engine.generate(requests(sampled))]
        on_token, crashed = crash_after(engine, servers, 6, lambda route: route[victim])
        got = [r.token_ids for r in engine.generate(requests(sampled, on_token))]
        assert crashed.is_set()
        assert got == reference
        assert engine.failover.replayed > 0
        survivors = [address for address, server in servers.items() if pool.state(address) == "serving"]
        assert len(survivors) == 3
        eventually(lambda: sum(servers[a].service.Info(None, None).active_sessions for a in survivors), 0)


def test_a_span_with_no_server_left_fails_naming_it(model_dir):
    with replicated(model_dir) as (engine, pool, servers):
        for address, server in servers.items():
            if server.config.layer_start == 2:
                crash(server)
                pool.failed(address, "crashed")
        with pytest.raises(StageCallError, match="no live stage server for layers 2:4") as failed:
            engine.generate([SequenceRequest(PROMPTS[0], 4)])
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_request_that_loses_more_routes_than_allowed_fails(model_dir):
    with replicated(model_dir) as (engine, pool, servers):
        engine.failover.max_replays = 0
        on_token, crashed = crash_after(engine, servers, 3, lambda route: route[1])
        with pytest.raises(StageCallError, match="giving up") as failed:
            engine.generate([SequenceRequest(PROMPTS[0], NEW_TOKENS, on_token=on_token)])
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and crashed.is_set()
