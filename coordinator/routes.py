"""The engine's way to the stages: a route for each new session, and what a failed call means.

Owns: `Routes`, over a StagePool: one PipelineClient per route in use (sharing the pool's gRPC
channels), handed out by load (`new_route`); whether a route still takes new sessions
(`accepts`); judging a failed call (`failover`: a dead, frozen or restarted server, after which
the engine replays the route's sequences elsewhere, or the request's own fault, which fails it)
and marking the failed server down; freeing a lost route's sessions on each of its servers
directly (`free_session`), since the chain through the lost one is broken; ending a session along
its route (`end_session`); chaining on a route only once its last stage is seen to reach its first
(chain_check), not after a chained step failed to, and again once a later check passes. And `SingleRoute`, the
same face over one PipelineClient with no failover (tests, benchmarks).

Does not own: the servers' states and route choice (stage_pool), the calls (pipeline_client), or
replaying (engine).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Callable

from coordinator.chain_check import Verdict, check_chain
from coordinator.pipeline_client import PipelineClient
from coordinator.stage_errors import SERVER_FAILURES, SESSION_LOST, StageCallError
from coordinator.stage_pool import DOWN, SERVING, StagePool
from protos import stage_pb2, stage_pb2_grpc
from protos.protocol import DRAINING_REFUSAL

log = logging.getLogger(__name__)

FREE_TIMEOUT_S, FREE_DOWN_TIMEOUT_S = 5.0, 30.0  # EndSession on a live server; on one marked down (may resume)
LOST_KEPT = 4096  # sessions of routes lost through a down server, freed again when it serves again
# A route whose chain check did not pass checks again after this, doubling up to the most: a firewall
# opened later, or a stage that was busy or restarting, gets chaining back without a restart.
RECHECK_FIRST_S, RECHECK_MOST_S = 30.0, 600.0


class Routes:
    """Routes over the servers of a StagePool, each a PipelineClient made on first use and kept."""

    def __init__(self, pool: StagePool, *, wire_codec: int = stage_pb2.CODEC_NONE, model_fingerprint: str = "",
                 direct_results: bool = True, local_hops: bool = True, chain: bool = False) -> None:
        """`chain`: greedy chaining is wanted; each route then checks in the background that its last
        stage reaches its first (chain_check) and chains only once it does, checking again from time to
        time until it does."""
        self.pool = pool
        self.chain = chain
        self._client_options = dict(wire_codec=wire_codec, model_fingerprint=model_fingerprint,
                                    direct_results=direct_results, local_hops=local_hops, channels=pool.channels)
        self._clients: dict[tuple[str, ...], PipelineClient] = {}
        # A frozen server that resumes computes what it had queued, which may open the session anew on the
        # servers after it: such sessions are freed once more when it serves again.
        self._lost: deque[tuple[tuple[str, ...], str]] = deque(maxlen=LOST_KEPT)
        self._lock = threading.Lock()
        self._closed = threading.Event()  # ends the routes' chain checks
        pool.subscribe(self._server_changed)

    def new_route(self, load: Callable[[str], int]) -> PipelineClient:
        """The route for a new session: serving servers, fewest hops, least loaded (stage_pool.NoRoute if none)."""
        return self._client(self.pool.choose(load))

    def _client(self, addresses: tuple[str, ...]) -> PipelineClient:
        with self._lock:
            client = self._clients.get(addresses)
            if client is None:
                client = self._clients[addresses] = PipelineClient(list(addresses), **self._client_options)
                if self.chain and client.direct_results:
                    self._start_chain_check(client)
            return client

    def _start_chain_check(self, client: PipelineClient, *, warned: bool = False) -> None:
        client.chain_reachable = False
        threading.Thread(target=self._check_chain, args=(client, warned), name="chain-check", daemon=True).start()

    def _check_chain(self, client: PipelineClient, warned: bool) -> None:
        """Check `client`'s chaining hop until it works (then chain) or the routes close."""
        route, wait = " -> ".join(client.addresses), RECHECK_FIRST_S
        while True:
            verdict = check_chain(client)
            if verdict is Verdict.WORKS:
                client.chain_reachable = True
                log.info("greedy chaining is on for route %s: its last stage reaches its first", route)
                return
            if verdict is Verdict.BLOCKED and not warned:
                warned = True
                log.warning("greedy chaining is off on route %s: its last stage did not reach its first (a "
                            "firewall or routing between them?); every step goes through the coordinator, and "
                            "the hop is checked again from time to time", route)
            if self._closed.wait(wait):
                return
            wait = min(2 * wait, RECHECK_MOST_S)

    def chain_failed(self, route: PipelineClient, error: Exception) -> bool:
        """Whether `error`, ending a step the last stage chained, says the last stage lost its way to the
        first: chaining stops on that route (the first stage itself is not blamed)."""
        if not (isinstance(error, StageCallError) and error.failed_stage == route.addresses[0]
                and error.code in SERVER_FAILURES and route.chain_reachable):
            return False
        log.warning("greedy chaining is off on route %s: a chained step did not reach the first stage (%s); "
                    "the hop is checked again from time to time", " -> ".join(route.addresses), error)
        self._start_chain_check(route, warned=True)
        return True

    def accepts(self, route: PipelineClient) -> bool:
        """Whether new sessions may still join `route` (every server of it serving, none draining or down)."""
        return self.pool.accepts(route.addresses)

    def failover(self, route: PipelineClient, error: Exception, *, chained: bool = False) -> bool:
        """Whether `error`, from a call on `route`, lost the route rather than failed the request; marks the
        server it names (if any, and of the route) down, unless it ended a step the last stage chained and
        names the first stage (`chain_failed`: the hop between them failed, not the first stage)."""
        if not isinstance(error, StageCallError):
            return False
        if error.code == SESSION_LOST:
            return True
        if error.code not in SERVER_FAILURES:
            return False
        if chained and self.chain_failed(route, error):
            return True
        failed = self._server_named(route, error.failed_stage)
        if failed is not None and DRAINING_REFUSAL in str(error):
            self.pool.draining(failed)  # its sessions finish there; new ones go elsewhere
        elif failed is not None:
            self.pool.failed(failed, f"{error.code.name}: {error}")
        return True

    def _server_named(self, route: PipelineClient, failed_stage: str) -> str | None:
        """The server of `route` that an error's failed_stage names: its address (a hop's failure), or the
        stage's own name, "layers A:B @ HOST:PORT" (a stage's refusal), whose span names it on the route."""
        if failed_stage in route.addresses:
            return failed_stage
        named = re.match(r"layers (\d+):(\d+) @", failed_stage)
        if named is None:
            return None
        span = (int(named[1]), int(named[2]))
        return next((view.address for view in self.pool.views() if view.address in route.addresses
                     and view.info is not None and (view.info.layer_start, view.info.layer_end) == span), None)

    def free_session(self, route: PipelineClient, session_id: str) -> None:
        """End `session_id` on every server of a lost route, each on its own (not along the broken route),
        without waiting: a live server frees it at once; one marked down, if it comes back within
        FREE_DOWN_TIMEOUT_S."""
        if any(self.pool.state(address) == DOWN for address in route.addresses):
            with self._lock:
                self._lost.append((tuple(route.addresses), session_id))
        self._free(route.addresses, session_id)

    def _free(self, addresses, session_id: str) -> None:
        for address in addresses:
            timeout_s = FREE_DOWN_TIMEOUT_S if self.pool.state(address) == DOWN else FREE_TIMEOUT_S
            stub = stage_pb2_grpc.StageStub(self.pool.channels.get(address))
            call = stub.EndSession.future(stage_pb2.EndSessionRequest(session_id=session_id), timeout=timeout_s)
            call.add_done_callback(lambda done, address=address: done.exception() and log.debug(
                "could not free session %s on %s: %s", session_id, address, done.exception()))

    def _server_changed(self, address: str, state: str) -> None:
        """A server serves again: free once more the sessions of the routes lost through it."""
        if state != SERVING:
            return
        with self._lock:
            again = [(route, session) for route, session in self._lost if address in route]
            for entry in again:
                self._lost.remove(entry)
        for route, session_id in again:
            self._free(route, session_id)

    def subscribe(self, listener: Callable[[str, str], None]) -> None:
        self.pool.subscribe(listener)

    def stage_infos(self) -> list[stage_pb2.InfoResponse]:
        return [info for _, info in self.pool.serving_infos()]

    @property
    def hop_bytes(self) -> int:
        with self._lock:
            return sum(client.hop_bytes for client in self._clients.values())

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def end_session(route: PipelineClient, session_id: str, *, wait: bool = False) -> None:
    """Free a session on every stage of its route: now (wait=True), or without blocking the caller."""
    def end() -> None:
        try:
            route.end_session(session_id, timeout_s=5.0)
        except Exception as err:  # the stages expire idle sessions anyway
            log.debug("could not end session %s: %s", session_id, err)
    if wait:
        end()
    else:
        threading.Thread(target=end, name="end-session", daemon=True).start()


class SingleRoute:
    """One fixed PipelineClient as Routes: every session on it, no failover."""

    def __init__(self, pipeline: PipelineClient) -> None:
        self.pipeline = pipeline

    def new_route(self, load: Callable[[str], int]) -> PipelineClient:
        return self.pipeline

    def accepts(self, route: PipelineClient) -> bool:
        return True

    def failover(self, route: PipelineClient, error: Exception, *, chained: bool = False) -> bool:
        return False

    def free_session(self, route: PipelineClient, session_id: str) -> None:
        route.end_session(session_id)

    def subscribe(self, listener: Callable[[str, str], None]) -> None:
        pass

    def stage_infos(self) -> list[stage_pb2.InfoResponse]:
        stage_infos = getattr(self.pipeline, "stage_infos", None)
        return stage_infos() if stage_infos is not None else []

    @property
    def hop_bytes(self) -> int:
        return self.pipeline.hop_bytes

    def close(self) -> None:
        self.pipeline.close()
