"""The gRPC face of a stage: its Forward, Results, StopChain, EndSession, Info and SetDeployment calls.

Owns: the stage's RPCs and the same-machine handlers that mirror Forward and Results
(`forward_stream`, `results_stream`, handed to unix_listener); the max_streams stream slots every
stream holds (stream_slots); the stage-wide count of micro-batches in flight and the draining flag, so
that a shutdown takes no new session and waits for the sessions it holds and what is in flight; the
links to next hops (`open_link`, with the stage's gRPC channels, only to addresses of its deployment);
and the parts a stage serves with, built here: the collector registry, the greedy chain and the step runner.

Does not own: one stream's reading and answering (forward_stream), what a step does
(step_runner), answers' encoding (answers), the subscriptions (collectors), the math
(stage_model), the session table (sessions), the allow-list and who may use a session
(deployment), nor the process's lifecycle (server).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import grpc
import psutil

from protos import stage_pb2, stage_pb2_grpc, unix_socket
from protos.channel_pool import ChannelPool
from protos.protocol import PROTOCOL_VERSION
from protos.software_versions import software_versions
from protos.tls import TlsFiles
from stage_server.collectors import Collectors
from stage_server.compute_thread import ComputeThread
from stage_server.deployment import Deployment
from stage_server.errors import StageRequestError
from stage_server.forward_stream import ForwardStream
from stage_server.greedy_chain import GreedyChain
from stage_server.metrics import StageMetrics
from stage_server.next_hop import open_next_hop
from stage_server.peer_identity import peer_of
from stage_server.sessions import check_session_id
from stage_server.stage_model import StageModel
from stage_server.step_bounds import check_side_request
from stage_server.step_runner import ServedSlice, StepRunner
from stage_server.step_trace import StepTrace
from stage_server.stream_slots import DEFAULT_STREAM_IDLE_TIMEOUT_S, StreamSlot, StreamSlots

log = logging.getLogger(__name__)


class StageService(stage_pb2_grpc.StageServicer):
    """Serves one slice. Until `serve` hands it the loaded slice, Forward answers UNAVAILABLE."""

    def __init__(self, name: str, compute: ComputeThread, *, max_streams: int = 64,
                 stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S, trace: StepTrace | None = None,
                 use_local_hops: bool = unix_socket.SUPPORTED, tls: TlsFiles | None = None,
                 deployment: Deployment | None = None, meter: StageMetrics | None = None) -> None:
        """`name`: "layers A:B @ host:port", for error messages; `compute`: the thread every step runs
        on (compute_thread); `stream_idle_timeout_s`: how long a stream may stay silent before a new
        stream may take its slot (stream_slots); `trace`: where step stamps go (--trace-steps);
        `use_local_hops`: whether next hops on this machine are reached over their Unix socket (next_hop);
        `tls`: the stage's certificate, key and CA, with which it dials its next hops over gRPC (None:
        plaintext); `deployment`: the addresses this stage may send to (none but those SetDeployment
        names when not given); `meter`: the stage's metrics (--metrics-port; stage_server/metrics.py)."""
        self.name = name
        self.max_streams = max_streams
        self.stream_slots = StreamSlots(max_streams, stream_idle_timeout_s)  # Forward and Results streams open now
        self._compute = compute
        self._use_local_hops = use_local_hops
        self._channels = ChannelPool(tls)
        self.deployment = deployment if deployment is not None else Deployment()
        self._inflight = 0
        self._inflight_changed = threading.Condition()
        self._draining = threading.Event()
        self.collectors = Collectors()
        self._chain = GreedyChain(self.open_link, self.collectors.get)
        self.steps = StepRunner(name, chain=self._chain, collectors=self.collectors, trace=trace,
                                draining=self._draining, deployment=self.deployment, meter=meter)

    def serve(self, served: ServedSlice) -> None:
        """The weights are in: Forward computes from now on."""
        self.steps.serve(served)

    @property
    def model(self) -> StageModel | None:
        """The slice's model; None while the weights load."""
        return self.steps.served.model if self.steps.served is not None else None

    @property
    def draining(self) -> bool:
        """Set when the stage shuts down: a step that starts a session is refused UNAVAILABLE from then on,
        while the sessions it holds go on stepping (step_runner); Info reports it."""
        return self._draining.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:
        if value:
            self._draining.set()
        else:
            self._draining.clear()

    def open_link(self, address: str, deliver, on_closed):
        """A link to the next hop at `address`: same-machine socket if it has one, else gRPC. Steps check
        their addresses first; this refuses (PermissionDenied) whatever would slip past that."""
        self.deployment.check_addresses([address], "the next hop")
        return open_next_hop(address, self._channels, deliver, on_closed, unix=self._use_local_hops)

    # ---- stream slots --------------------------------------------------------------------

    def reserve_stream_slot(self, end: Callable[[], None]) -> StreamSlot | None:
        """One of max_streams slots for a stream (gRPC or same-machine) that `end()` ends if its slot is
        reclaimed (stream_slots.py); None when none is free."""
        return self.stream_slots.acquire(end)

    def release_stream_slot(self, slot: StreamSlot) -> None:
        self.stream_slots.release(slot)

    @contextlib.contextmanager
    def _stream_slot(self, context):
        """Hold one of max_streams slots for a stream's life; refuse the stream when none is free."""
        slot = self.reserve_stream_slot(context.cancel)
        if slot is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"stage {self.name} already serves {self.max_streams} streams active within the last "
                          f"{self.stream_slots.idle_timeout_s:.0f}s (Forward and Results; a coordinator holds one or "
                          f"two): close some, or restart it with a larger --max-streams")
        try:
            yield slot
        finally:
            self.release_stream_slot(slot)

    # ---- Forward and Results -------------------------------------------------------------

    def Forward(self, request_iterator, context):
        with self._stream_slot(context) as slot:
            yield from slot.watch(self.forward_stream(slot.watch(request_iterator), context))

    def forward_stream(self, request_iterator, context):
        """The answers for one upstream stream of micro-batches, whichever way it came (a gRPC
        Forward stream, or a same-machine connection, unix_listener.py)."""
        peer = peer_of(context)
        return ForwardStream(request_iterator, context, steps=self.steps, compute=self._compute,
                             open_link=self.open_link, count_in_flight=self._count_in_flight,
                             caller=lambda: self.deployment.caller(peer)).answers()

    def Results(self, request, context):
        with self._stream_slot(context) as slot:
            yield from slot.watch(self.results_stream(request, context))

    def results_stream(self, request, context, send: Callable[[stage_pb2.ForwardResponse], bool] | None = None):
        """Answers sent to collector `request.collector_id`, whichever way the subscription came (a
        gRPC Results call, or a same-machine connection whose frame writer is `send`; collectors.py)."""
        _refuse_bad(context, check_side_request, request)
        return self.collectors.subscribe(request, context, send)

    def StopChain(self, request, context):
        """Accepted from a peer that may use the session, or from the subscriber of the collector its
        answers go to (the coordinator; the session here was opened by the stage before)."""
        _refuse_bad(context, check_side_request, request)
        _refuse_bad(context, check_session_id, request.session_id)
        served = self.steps.served
        session = served.sessions.find(request.session_id) if served is not None else None
        if session is not None:
            peer = peer_of(context)
            if not (self.deployment.caller(peer).may_use(session.owner)
                    or self.collectors.subscriber(session.answers_to) == peer.identity):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"session {request.session_id!r} belongs to another peer")
        self._chain.stop(request.session_id)
        return stage_pb2.StopChainResponse()

    # ---- draining ------------------------------------------------------------------------

    def _count_in_flight(self, delta: int) -> None:
        with self._inflight_changed:
            self._inflight += delta
            self._inflight_changed.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no micro-batch is in flight (True) or the timeout passes (False)."""
        with self._inflight_changed:
            return self._inflight_changed.wait_for(lambda: self._inflight <= 0, timeout=timeout_s)

    def wait_drained(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Block until this stage holds no session and no micro-batch is in flight (True), or the
        timeout passes (False). Sessions end by EndSession, by a step's end_session or by idle expiry,
        none of which signals here: the session count is polled."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._inflight_changed:
                idle = self._inflight <= 0
            if idle and self.sessions_held() == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll_s, left))

    def sessions_held(self) -> int:
        served = self.steps.served
        return served.sessions.stats()[0] if served is not None else 0

    # ---- EndSession and Info ---------------------------------------------------------------

    def EndSession(self, request, context):
        """Ends the session here if the caller may use it, then on the route, all of which must be
        stages of the deployment (checked before any connection). The route is told only when the
        session was the caller's here, or the caller is trusted (a stage relaying it)."""
        _refuse_bad(context, check_side_request, request)
        _refuse_bad(context, check_session_id, request.session_id)
        _refuse_bad(context, self.deployment.check_addresses, request.route, "route")
        caller = self.deployment.caller(peer_of(context))
        served = self.steps.served
        freed = 1 if served is not None and _refuse_bad(context, served.sessions.abandon, request.session_id, caller) \
            else 0
        if request.route and (freed or caller.trusted):
            stub = stage_pb2_grpc.StageStub(self._channels.get(request.route[0]))
            try:
                downstream = stub.EndSession(stage_pb2.EndSessionRequest(
                    session_id=request.session_id, route=request.route[1:]), timeout=10)
                freed += downstream.stages_freed
            except grpc.RpcError as err:
                log.warning("could not end session %s on %s: %s", request.session_id, request.route[0],
                            err.details())
        return stage_pb2.EndSessionResponse(stages_freed=freed)

    def Info(self, request, context):
        reply = stage_pb2.InfoResponse(versions=software_versions(), protocol_version=PROTOCOL_VERSION,
                                       rss_bytes=psutil.Process().memory_info().rss, draining=self.draining)
        served = self.steps.served
        if served is None:
            return reply
        model, store = served.model, served.sessions
        loaded = model.loaded
        sessions, cache_bytes = store.stats()
        reply.MergeFrom(stage_pb2.InfoResponse(
            model_fingerprint=loaded.fingerprint, model_type=loaded.config.model_type,
            layer_start=loaded.layer_start, layer_end=loaded.layer_end, num_layers=loaded.num_layers,
            has_embeddings=loaded.is_first, has_head=loaded.is_last,
            dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device),
            parameter_bytes=loaded.parameter_bytes, active_sessions=sessions, cache_bytes=cache_bytes,
            hidden_size=model.hidden_size, vocab_size=model.vocab_size,
            max_sessions=store.max_sessions, max_cache_bytes=store.max_cache_bytes,
            micro_batches_served=self.steps.micro_batches_served, compute_seconds=self.steps.compute_seconds,
            attention=loaded.attention,
            weights_manifest_id=loaded.weights_manifest_id))
        if served.threads is not None:
            reply.compute_threads, reply.small_step_threads = served.threads.full, served.threads.small_step
            if served.threads.share is not None:
                reply.colocated_stages = served.threads.share.neighbours()
        return reply

    def SetDeployment(self, request, context):
        peers = _refuse_bad(context, self.deployment.set, request.stages, peer_of(context))
        log.info("deployment set: this stage sends to %d addresses", peers)
        return stage_pb2.SetDeploymentResponse(peers=peers)

    def close(self) -> None:
        """Close the greedy chain's links and the gRPC channels to next hops."""
        self._chain.close()
        self._channels.close()


def _refuse_bad(context, check, *args):
    """`check(*args)`'s result; a StageRequestError it raises aborts the call with its status code."""
    try:
        return check(*args)
    except StageRequestError as err:
        context.abort(grpc.StatusCode[err.code], str(err))

