"""The gRPC boundary of a stage: Forward streams, EndSession and Info.

Owns: decoding requests, mapping errors to status codes (in-band on Forward, so one
bad micro-batch never tears down a stream other sessions share), pushing outputs to
the next stage of the route and relaying its answers back, and counting in-flight
work so a shutdown can drain it.

Does not own: the math (stage_model), the session table (sessions), process
lifecycle (server).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from importlib import metadata

import grpc
import numpy as np
import psutil
import torch

from protos import codec, stage_pb2, stage_pb2_grpc
from stage_server import local_hops
from stage_server.cache_edits import PlannedEdit
from stage_server.compute_thread import ComputeThread
from stage_server.thread_counts import ThreadCounts
from stage_server.downstream import ChannelPool, unreachable
from stage_server.errors import InvalidRequest, StageRequestError, StageUnavailable, WrongRoute
from stage_server.greedy_chain import GreedyChain, check_chain_fields, next_step
from stage_server.sessions import SessionStore
from stage_server.split_head import SplitHead
from stage_server.stage_model import StageModel
from stage_server.step_trace import StepRecord, StepTrace, now_ns

log = logging.getLogger(__name__)

_END = object()
QUEUED_PER_STREAM = 4  # steps one upstream stream may have waiting for the compute thread
_CODEC_VALUES = frozenset(stage_pb2.Codec.values())


def _status_value(code_name: str) -> int:
    return getattr(grpc.StatusCode, code_name).value[0]


def error_response(request: stage_pb2.ForwardRequest, code_name: str, message: str,
                   stage: str) -> stage_pb2.ForwardResponse:
    return stage_pb2.ForwardResponse(session_id=request.session_id, micro_batch_id=request.micro_batch_id,
                                     status_code=_status_value(code_name), error_message=message,
                                     failed_stage=stage)


def _numpy_view(logits: torch.Tensor) -> np.ndarray | None:
    """The logits as a numpy array without a copy when they are CPU float32 (every stage's answer;
    torch's argmax, gather and encoding of a decode step's logits took 130 µs warm against 14 in
    numpy, on the last stage's critical path, and several times that on caches the forward has
    just flushed); None otherwise."""
    return logits.numpy() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None


def greedy_ids(logits: torch.Tensor) -> np.ndarray:
    """Each row's best token id, int64 [B]: the first of equal maxima, as greedy decoding on all
    logits picks (in numpy where it can, see _numpy_view)."""
    array = _numpy_view(logits)
    return array.argmax(axis=-1) if array is not None else logits.argmax(dim=-1).cpu().numpy()


def logits_response(request: stage_pb2.ForwardRequest, logits: torch.Tensor,
                    best: np.ndarray | None = None) -> stage_pb2.ForwardResponse:
    """The last stage's answer: every logit, or only each row's `logits_top_k` largest with their ids.
    `best` is each row's greedy_ids [B] when the caller has them already."""
    response = stage_pb2.ForwardResponse(session_id=request.session_id, micro_batch_id=request.micro_batch_id)
    k = min(request.logits_top_k, logits.shape[-1])
    if k == 0:
        response.logits.CopyFrom(codec.encode(logits))
        return response
    if k == 1:
        ids = best if best is not None else greedy_ids(logits)
        array = _numpy_view(logits)
        if array is not None:
            response.logits.CopyFrom(codec.encode_float32(array[np.arange(len(ids)), ids].reshape(-1, 1)))
        else:
            column = torch.from_numpy(ids).to(logits.device).view(-1, 1)
            response.logits.CopyFrom(codec.encode(logits.gather(-1, column).contiguous()))
        response.top_token_ids.CopyFrom(codec.encode_int64(ids.reshape(-1, 1)))
        return response
    values, top_ids = logits.topk(k, dim=-1)
    response.logits.CopyFrom(codec.encode(values.contiguous()))
    response.top_token_ids.CopyFrom(codec.encode(top_ids))
    return response


class StageService(stage_pb2_grpc.StageServicer):
    """Serves one slice. Until `attach` is called (weights loading) Forward answers UNAVAILABLE."""

    def __init__(self, name: str, max_streams: int = 64) -> None:
        self.name = name  # "layers A:B @ host:port", used in error messages
        self.max_streams = max_streams
        self._streams = 0  # Forward and Results streams open now
        self._streams_lock = threading.Lock()
        self.model: StageModel | None = None
        self.sessions: SessionStore | None = None
        self.draining = False
        self.compute = ComputeThread()  # every step runs on it, one at a time (compute_thread.py)
        self.threads: ThreadCounts | None = None  # None: leave torch's thread count alone
        self.split_head: SplitHead | None = None  # the last stage's head, when split (split_head.py)
        self.trace: StepTrace | None = None  # per-micro-batch timestamps (--trace-steps; step_trace.py)
        self._channels = ChannelPool()
        self._inflight = 0
        self.micro_batches_served = 0
        self._inflight_changed = threading.Condition()
        self._collectors: dict[str, queue.Queue] = {}  # Results subscribers by collector id
        self._collectors_lock = threading.Lock()
        self.local_hops = local_hops.SUPPORTED  # next hops on this machine over their Unix socket (local_hops.py)
        self._chain = GreedyChain(self.open_link, self._collector)

    def attach(self, model: StageModel, sessions: SessionStore) -> None:
        self.model, self.sessions = model, sessions

    def open_link(self, address: str, deliver, on_closed):
        """A link to the next hop at `address`: same-machine socket if it has one, else gRPC."""
        return local_hops.open_link(address, self._channels, deliver, on_closed, local=self.local_hops)

    # ---- Forward -------------------------------------------------------------------------

    def take_stream_slot(self) -> bool:
        """Reserve one of max_streams slots for a stream (gRPC or same-machine); False when none is free."""
        with self._streams_lock:
            if self._streams >= self.max_streams:
                return False
            self._streams += 1
            return True

    def free_stream_slot(self) -> None:
        with self._streams_lock:
            self._streams -= 1

    @contextlib.contextmanager
    def _stream_slot(self, context):
        """Hold one of max_streams slots for a stream's life; refuse the stream when none is free."""
        if not self.take_stream_slot():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"stage {self.name} already serves {self.max_streams} streams (Forward and Results; a "
                          f"coordinator holds one or two): close some, or restart it with a larger --max-streams")
        try:
            yield
        finally:
            self.free_stream_slot()

    def Forward(self, request_iterator, context):
        with self._stream_slot(context):
            yield from self.forward_stream(request_iterator, context)

    def forward_stream(self, request_iterator, context):
        """One upstream stream of micro-batches, whichever way it came (a gRPC Forward stream, or a
        same-machine connection, local_hops.py); yields the answers that go back up it."""
        answers: queue.Queue = queue.Queue()
        links: dict[str, object] = {}  # next hop address -> its link (local_hops.open_link)
        producers = [1]  # the reader of the upstream stream, plus one per open link
        producers_lock = threading.Lock()
        # Micro-batches read from upstream that this stage has not settled yet: settled when their
        # answer (or error) goes back upstream, or once they are sent on (or answered) towards a
        # reply_to collector, whose answer never comes back this way.
        unsettled: dict[tuple[str, int], int] = {}

        def settle(key: tuple[str, int]) -> None:
            with producers_lock:
                count = unsettled.get(key, 0)
                if count == 0:  # already settled: an error or relayed answer after the micro-batch went on
                    return
                if count == 1:
                    del unsettled[key]
                else:
                    unsettled[key] = count - 1
            self._add_inflight(-1)

        def producer_done() -> None:
            with producers_lock:
                producers[0] -= 1
                if producers[0] == 0:
                    answers.put(_END)

        def link_to(address: str):
            link = links.get(address)
            if link is None or not link.alive:  # first use, or the last link to it failed: reconnect
                with producers_lock:
                    producers[0] += 1
                link = self.open_link(address, answers.put, producer_done)
                links[address] = link
            return link

        # The reader hands steps to the compute thread without waiting for them, up to
        # QUEUED_PER_STREAM at a time, so it is already waiting for the next request when a step
        # ends instead of waking then, beside the compute thread sending the step on.
        queued = threading.BoundedSemaphore(QUEUED_PER_STREAM)

        def run_then_free(step) -> None:
            try:
                step()
            finally:
                queued.release()

        def read_upstream() -> None:
            try:
                for request in request_iterator:
                    received = now_ns()
                    key = (request.session_id, request.micro_batch_id)
                    self._add_inflight(1)
                    with producers_lock:
                        unsettled[key] = unsettled.get(key, 0) + 1
                    step = functools.partial(self._step, request, link_to, answers.put,
                                             functools.partial(settle, key), received)
                    if self.model is None:  # the compute thread is loading: refuse at once (no torch work)
                        step()
                        continue
                    queued.acquire()
                    try:
                        self.compute.submit(functools.partial(run_then_free, step))
                    except BaseException:
                        queued.release()
                        raise
            except Exception as err:  # the upstream went away; nothing to answer
                log.debug("upstream stream ended: %s", err)
            finally:
                for _ in range(QUEUED_PER_STREAM):  # this stream's queued steps finish before its links close
                    queued.acquire()
                for link in list(links.values()):
                    link.close()
                producer_done()

        def on_done() -> None:
            for link in list(links.values()):
                link.cancel()

        context.add_callback(on_done)
        threading.Thread(target=read_upstream, name="forward-reader", daemon=True).start()
        try:
            while True:
                answer = answers.get()
                if answer is _END:
                    return
                settle((answer.session_id, answer.micro_batch_id))
                yield answer
        finally:  # the upstream left early: what it will never receive is no longer in flight
            with producers_lock:
                left = sum(unsettled.values())
                unsettled.clear()
            self._add_inflight(-left)

    def _step(self, request: stage_pb2.ForwardRequest, link_to, deliver, settle: Callable[[], None],
              received_ns: int) -> None:
        """Compute one micro-batch, then forward it or answer it; never raises. Runs on the compute
        thread, so that every torch call of the stage, the answer's argmax included, runs there
        (only while the weights load does it run on the reader's thread, and then only refuses).

        A micro-batch whose answer goes to a reply_to collector is settled here, once sent on or
        answered: no receipt comes back for it. Receipts cost each token a message per hop and
        woke two threads on each side of it while the next stage computed (alternated decode,
        2 bfloat16 stages: 0.969 -> 1.020 of the unsplit model; 4 float32 stages 0.849 -> 0.859).
        The link to the next stage still reports it as failed if that stage goes away.
        With a trace (--trace-steps), the step's stamps are written once it is sent on or answered;
        a forwarded step's `sent` is stamped as it is handed to the link (over a same-machine socket
        the next stage may have it before the write returns)."""
        started, computed, handed, outcome = now_ns(), 0, 0, "failed"
        try:
            output, positions, mask = self._compute(request)
            computed = now_ns()
            if request.route:
                activations = codec.encode(output, request.wire_codec)
                sent_bytes = codec.payload_bytes(activations)
                sent = stage_pb2.ForwardRequest(
                    session_id=request.session_id, micro_batch_id=request.micro_batch_id,
                    route=request.route[1:], activations=activations,
                    position_ids=request.position_ids, wire_codec=request.wire_codec,
                    start_session=request.start_session, end_session=request.end_session,
                    model_fingerprint=request.model_fingerprint, logits_top_k=request.logits_top_k,
                    reply_to=request.reply_to, chain_steps=request.chain_steps,
                    chain_route=request.chain_route, chain_stop_ids=request.chain_stop_ids,
                    hop_bytes=[*request.hop_bytes, sent_bytes])
                if request.HasField("cache_edit"):
                    sent.cache_edit.CopyFrom(request.cache_edit)
                if request.HasField("attention_mask"):
                    sent.attention_mask.CopyFrom(request.attention_mask)
                handed = now_ns()
                if not link_to(request.route[0]).send(sent, sent_bytes):
                    deliver(unreachable(request.route[0], request.session_id, request.micro_batch_id,
                                        "the link failed while sending"))
                else:
                    outcome = "forwarded"
                    if request.reply_to:
                        settle()
            else:
                collector = self._collector(request.reply_to)
                if collector is None:
                    deliver(logits_response(request, output))
                else:  # straight to the coordinator; nothing goes back upstream
                    self._answer_and_chain(request, output, positions, mask, collector)
                    settle()
                outcome = "answered"
        except StageRequestError as err:
            deliver(error_response(request, err.code, str(err), self.name))
        except codec.WireFormatError as err:
            deliver(error_response(request, "INVALID_ARGUMENT", f"malformed tensor: {err}", self.name))
        except Exception as err:
            log.exception("micro-batch %s of session %s failed", request.micro_batch_id, request.session_id)
            deliver(error_response(request, "INTERNAL", f"{type(err).__name__}: {err}", self.name))
        if self.trace is not None:
            self._write_trace(request, outcome, received_ns, started, computed, handed if outcome == "forwarded" else 0)

    def _write_trace(self, request: stage_pb2.ForwardRequest, outcome: str, received: int, started: int,
                     computed: int, handed: int) -> None:
        sent = handed or now_ns()
        record = StepRecord(stage=self.name, session_id=request.session_id, micro_batch_id=request.micro_batch_id,
                            outcome=outcome, received=received, started=started, computed=computed or sent,
                            sent=sent)
        try:
            self.trace.write(record)
        except OSError as err:  # a full disk must not fail the steps: stop tracing instead
            log.warning("stopped writing the step trace %s: %s", self.trace.path, err)
            trace, self.trace = self.trace, None
            trace.close()

    def _answer_and_chain(self, request: stage_pb2.ForwardRequest, logits: torch.Tensor, positions: torch.Tensor,
                          mask: torch.Tensor | None, collector: queue.Queue) -> None:
        """If the chain goes on, send the next step first (it is what the stages wait for), then
        hand this step's answer, with the sizes of the hops it took, to the coordinator's collector.
        The coordinator keeps an answer that overtakes the one announcing it (pipeline_client), so
        the order is free."""
        self._chain.arrived(request.session_id, request.micro_batch_id)  # if chained here, it is done
        best = greedy_ids(logits) if request.logits_top_k == 1 else None
        tokens = best.tolist() if best is not None and request.chain_steps else []
        chained = False
        if self._chain.continues(request, tokens):
            following = next_step(request, tokens, positions, mask)
            chained = self._chain.send(following)  # False: the link failed; the coordinator sends it
        answer = logits_response(request, logits, best)
        answer.chained = chained
        answer.hop_bytes.extend(request.hop_bytes)
        collector.put(answer)

    def _compute(self, request: stage_pb2.ForwardRequest
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the request's step; returns (output, its position ids, its attention mask or None)."""
        model, sessions = self.model, self.sessions
        if model is None or sessions is None:
            raise StageUnavailable(f"stage {self.name} is still loading its weights; retry shortly")
        if self.draining:
            raise StageUnavailable(f"stage {self.name} is shutting down")
        loaded = model.loaded
        if request.model_fingerprint and request.model_fingerprint != loaded.fingerprint:
            raise WrongRoute(f"model fingerprint {request.model_fingerprint} does not match this stage's "
                             f"{loaded.fingerprint}: the stages serve different models")
        if not request.route and not loaded.is_last:
            raise WrongRoute(f"the route ends at {self.name}, but the model continues after layer "
                             f"{loaded.layer_end} of {loaded.num_layers}")
        if request.route and loaded.is_last:
            raise WrongRoute(f"{self.name} holds the last layer, yet the route continues to {request.route[0]}")
        if request.wire_codec not in _CODEC_VALUES:
            raise InvalidRequest(f"unknown wire codec {request.wire_codec}; valid: {list(codec.CODEC_NAMES)}")
        if not request.HasField("activations") or not request.HasField("position_ids"):
            raise InvalidRequest("a micro-batch needs activations and position_ids")
        if (problem := check_chain_fields(request)) is not None:
            raise InvalidRequest(problem)
        activations = codec.decode(request.activations)
        position_ids = codec.decode(request.position_ids)
        mask = codec.decode(request.attention_mask) if request.HasField("attention_mask") else None
        if request.start_session:
            batch = activations.shape[0] if activations.dim() else 0
            session = sessions.start(request.session_id, batch)
        else:
            session = sessions.get(request.session_id)
        try:
            with session.lock:
                edit = PlannedEdit(session, request.cache_edit, sessions) if request.HasField("cache_edit") else None
                shape = (edit.batch_size, edit.tokens_seen) if edit is not None else None
                new_tokens = model.check_step(session, activations, position_ids, mask, rows_and_positions=shape)
                if edit is not None:
                    edit.apply(sessions)
                sessions.reserve(session, new_tokens)
                if self.threads is not None:
                    self.threads.for_step(activations.shape[0] * new_tokens)
                if self.split_head is not None:  # chaining fields: the group has the stages to itself
                    self.split_head.alone = bool(request.chain_route)
                started = time.perf_counter()
                output = model.forward(session, activations, position_ids, mask)
                if self.threads is not None:
                    self.threads.record(time.perf_counter() - started)
                self.micro_batches_served += 1
        except Exception:
            if request.start_session:
                sessions.end(request.session_id)  # never leave a half-made session behind
            raise
        if request.end_session:
            sessions.end(request.session_id)
        return output, position_ids, mask

    # ---- Results: answers sent straight to a subscribed coordinator ------------------------

    def _collector(self, collector_id: str) -> queue.Queue | None:
        if not collector_id:
            return None
        with self._collectors_lock:
            return self._collectors.get(collector_id)

    def Results(self, request, context):
        with self._stream_slot(context):
            yield from self.results_stream(request, context)

    def results_stream(self, request, context, send: Callable[[stage_pb2.ForwardResponse], bool] | None = None):
        """Answers sent to collector `request.collector_id`, whichever way the subscription came
        (a gRPC Results call, or a same-machine connection, local_hops.py).

        With `send` (a same-machine connection's frame writer: thread-safe, never blocks), each answer
        is sent by the thread that made it, the compute thread, and nothing is yielded: a hand-off to
        the stream's thread cost each token 175-280 µs between the last stage's answer and its write
        (4 local float32 stages, stamped per token). A failed send ends the subscription."""
        if not request.collector_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "collector_id is empty")
        answers: queue.Queue = queue.Queue()
        collector = answers if send is None else _SendingCollector(send, answers)
        with self._collectors_lock:
            if request.collector_id in self._collectors:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"collector {request.collector_id!r} is already subscribed here")
            self._collectors[request.collector_id] = collector
        context.add_callback(lambda: answers.put(_END))
        try:
            while (answer := answers.get()) is not _END:
                yield answer
        finally:
            with self._collectors_lock:
                if self._collectors.get(request.collector_id) is collector:
                    del self._collectors[request.collector_id]

    def StopChain(self, request, context):
        if not request.session_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        self._chain.stop(request.session_id)
        return stage_pb2.StopChainResponse()

    # ---- draining ------------------------------------------------------------------------

    def _add_inflight(self, delta: int) -> None:
        with self._inflight_changed:
            self._inflight += delta
            self._inflight_changed.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no micro-batch is in flight (True) or the timeout passes (False)."""
        with self._inflight_changed:
            return self._inflight_changed.wait_for(lambda: self._inflight <= 0, timeout=timeout_s)

    # ---- EndSession and Info ---------------------------------------------------------------

    def EndSession(self, request, context):
        if not request.session_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        freed = 1 if self.sessions is not None and self.sessions.end(request.session_id) else 0
        if request.route:
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
        reply = stage_pb2.InfoResponse(versions=software_versions(),
                                       rss_bytes=psutil.Process().memory_info().rss)
        if self.model is None or self.sessions is None:
            return reply
        loaded = self.model.loaded
        sessions, cache_bytes = self.sessions.stats()
        reply.MergeFrom(stage_pb2.InfoResponse(
            model_fingerprint=loaded.fingerprint, model_type=loaded.config.model_type,
            layer_start=loaded.layer_start, layer_end=loaded.layer_end, num_layers=loaded.num_layers,
            has_embeddings=loaded.is_first, has_head=loaded.is_last,
            dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device),
            parameter_bytes=loaded.parameter_bytes, active_sessions=sessions, cache_bytes=cache_bytes,
            hidden_size=self.model.hidden_size, vocab_size=self.model.vocab_size,
            max_sessions=self.sessions.max_sessions, max_cache_bytes=self.sessions.max_cache_bytes,
            micro_batches_served=self.micro_batches_served, attention=loaded.attention))
        if self.threads is not None:
            reply.compute_threads, reply.small_step_threads = self.threads.full, self.threads.small_step
        return reply

    def close(self) -> None:
        self._chain.close()
        self._channels.close()
        self.compute.close()


class _SendingCollector:
    """A collector that sends each answer at once through `send`; once a send fails it puts _END on
    `ended` (the subscription's own queue), which ends the subscription."""

    def __init__(self, send: Callable[[stage_pb2.ForwardResponse], bool], ended: queue.Queue) -> None:
        self._send, self._ended = send, ended

    def put(self, answer: stage_pb2.ForwardResponse) -> None:
        if not self._send(answer):
            self._ended.put(_END)


def software_versions() -> dict[str, str]:
    versions = {}
    for package in ("layerline", "torch", "transformers", "accelerate", "grpcio"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
