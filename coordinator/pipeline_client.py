"""The coordinator's connection to a chain of stages.

Owns: `PipelineClient` (one persistent stream to the first stage of the route, multiplexing
every session's micro-batches on it, and a Results subscription on the last stage; reopening
either after a failure; the side calls EndSession, Info, StopChain and SetDeployment), `_Pending` (matching
each answer to its request's future by session id and micro-batch id, whichever stream it came
on), and `StepLogits` / `logits_of` (reading an answer). Hidden states never pass through
here: stage 0 pushes them on to stage 1 itself.

Does not own: the streams and their transports (stage_streams), what to send (engine, scheduler)
or how to sample (sampling).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import grpc
import numpy as np
import torch

from coordinator.stage_errors import StageCallError, status_code_from_value
from coordinator.stage_streams import (
    FirstStageStream,
    ResultsSubscription,
    open_first_stage_stream,
    open_results_subscription,
)
from coordinator.step_future import StepFuture
from protos import codec, stage_pb2, stage_pb2_grpc
from protos.channel_pool import ChannelPool
from protos.tls import TlsFiles, open_channel

log = logging.getLogger(__name__)


class _Pending:
    """Futures waiting for answers, keyed by (session, micro-batch), whichever stream answers.

    A chained step's answer (or error) may overtake the answer that announces it (the last
    stage sends the next step before answering); such an early answer waits in `_early`.
    A stage whose next hop fails reports the recent micro-batches it sent there towards a
    collector, answered or not (stage_server/next_hop.py): a report for a micro-batch
    resolved here already is dropped, so it cannot crowd a real early answer out of `_early`."""

    EARLY_KEPT = 256  # unclaimed early answers kept (older ones belonged to abandoned sessions)
    RESOLVED_KEPT = 1024  # keys of recently resolved micro-batches (a stage reports up to 256 at once)

    def __init__(self) -> None:
        self._futures: dict[tuple[str, int], tuple[StepFuture, object, bool]] = {}
        self._early: dict[tuple[str, int], stage_pb2.ForwardResponse] = {}
        self._resolved: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def _note_resolved(self, key: tuple[str, int]) -> None:
        """Under the lock."""
        self._resolved[key] = None
        if len(self._resolved) > self.RESOLVED_KEPT:
            self._resolved.popitem(last=False)

    def count(self) -> int:
        """Micro-batches waiting for their answers (racy by design: a hint for the stages' threads)."""
        return len(self._futures)

    def add(self, key: tuple[str, int], future: StepFuture, stream: object, direct: bool) -> None:
        with self._lock:
            self._futures[key] = (future, stream, direct)

    def resolve(self, response: stage_pb2.ForwardResponse) -> None:
        key = (response.session_id, response.micro_batch_id)
        with self._lock:
            entry = self._futures.pop(key, None)
            if entry is None:
                if key in self._resolved:
                    return  # a late report of a micro-batch already answered (or failed)
                self._early[key] = response
                while len(self._early) > self.EARLY_KEPT:
                    del self._early[next(iter(self._early))]
                return
            self._note_resolved(key)
        future: StepFuture | None = entry[0]
        while future is not None:  # this answer, then any early answers of the steps it chained to
            early = None
            if response.chained:  # expect the step the last stage sent on
                following = (response.session_id, response.micro_batch_id + 1)
                future.next_in_chain = StepFuture()
                with self._lock:
                    early = self._early.pop(following, None)
                    if early is None:
                        self._futures[following] = (future.next_in_chain, None, True)
                    else:
                        self._note_resolved(following)
            future.set_result(response)
            future, response = (future.next_in_chain, early) if early is not None else (None, None)

    def fail(self, error: Exception, *, stream: object = None, direct_only: bool = False) -> None:
        """Fail the futures sent on `stream` (or every one), or only those awaiting a direct answer."""
        with self._lock:
            doomed = [key for key, (_, sent_on, direct) in self._futures.items()
                      if (stream is None or sent_on is stream) and (direct or not direct_only)]
            entries = [self._futures.pop(key) for key in doomed]
            for key in doomed:
                self._note_resolved(key)
        for future, _, _ in entries:
            future.set_exception(error)


class PipelineClient:
    """Sends micro-batches down a route of stage addresses and gets logits back."""

    def __init__(self, addresses: list[str], *, wire_codec: int = stage_pb2.CODEC_NONE,
                 model_fingerprint: str = "", direct_results: bool = True, local_hops: bool = True,
                 tls: TlsFiles | None = None, channels: ChannelPool | None = None) -> None:
        """`local_hops`: reach stages on this machine over their Unix sockets where they have one
        (stage_streams), else gRPC; `tls`: the certificate, key and CA the gRPC channels to the stages
        use (mutual TLS; the Forward streams and the Results subscription go over them), None: plaintext;
        `channels`: a pool the channels come from (shared with other routes, and left open by `close`)."""
        if not addresses:
            raise ValueError("a pipeline needs at least one stage address")
        self.addresses = list(addresses)
        self.wire_codec = wire_codec
        self.model_fingerprint = model_fingerprint
        self._own_channels = channels is None
        self._channels = [open_channel(a, tls) for a in self.addresses] if channels is None else \
            [channels.get(a) for a in self.addresses]
        self._stubs = [stage_pb2_grpc.StageStub(c) for c in self._channels]
        self.direct_results = direct_results and len(self.addresses) > 1
        # Whether the last stage can reach the first one (greedy chaining's hop): routes.Routes checks
        # it for each route it makes (chain_check) and sets it when the check passes.
        self.chain_reachable = True
        self.local_hops = local_hops
        self.hop_bytes = 0  # activation bytes the stages sent each other, as they report them
        self._pending = _Pending()
        self._stream: FirstStageStream | None = None
        self._results: ResultsSubscription | None = None
        self._lock = threading.Lock()
        self._next_id = 1  # micro-batch ids; a chained step takes the ids after its own (see submit)

    def _on_answer(self, response: stage_pb2.ForwardResponse) -> None:
        """An answer from either stream: count its hop sizes and hand it to its future."""
        if response.hop_bytes:
            with self._lock:
                self.hop_bytes += sum(response.hop_bytes)
        self._pending.resolve(response)

    def _live_stream(self) -> FirstStageStream:
        with self._lock:
            if self._stream is None or not self._stream.alive:
                self._stream = open_first_stage_stream(self.addresses[0], self._stubs[0], self._pending,
                                                       self._on_answer, unix=self.local_hops)
            return self._stream

    def _collector_id(self) -> str:
        """The id answers may be sent to directly (a Results subscription on the last stage), or ""."""
        if not self.direct_results:
            return ""
        with self._lock:
            if self._results is None or not self._results.alive:
                self._results = open_results_subscription(self.addresses[-1], self._stubs[-1], self._pending,
                                                          self._on_answer, unix=self.local_hops)
            return self._results.collector_id

    def submit(self, session_id: str, activations: torch.Tensor | np.ndarray, position_ids: torch.Tensor | np.ndarray,
               attention_mask: torch.Tensor | None, *, start_session: bool = False,
               end_session: bool = False, cache_edit: stage_pb2.CacheEdit | None = None,
               logits_top_k: int = 0, chain_steps: int = 0, chain_stop_ids: frozenset[int] = frozenset(),
               request_ids: Sequence[str] = ()) -> StepFuture:
        """Queue one micro-batch; the future resolves to the last stage's ForwardResponse. Token ids and
        positions may come as int64 numpy arrays (a decode step's; encoded without torch).

        `chain_steps` > 0 (greedy, logits_top_k = 1, `can_chain`) lets the last stage send up
        to that many next steps itself; see StepFuture.next_in_chain and `stop_chain`."""
        request = stage_pb2.ForwardRequest(
            session_id=session_id, micro_batch_id=self._reserve_ids(1 + chain_steps), route=self.addresses[1:],
            activations=_encoded(activations), position_ids=_encoded(position_ids),
            wire_codec=self.wire_codec, start_session=start_session, end_session=end_session,
            model_fingerprint=self.model_fingerprint, logits_top_k=logits_top_k, reply_to=self._collector_id(),
            in_flight=self._pending.count() + 1)
        if attention_mask is not None:
            request.attention_mask.CopyFrom(codec.encode(attention_mask))
        if request_ids and start_session:  # for the stages' log lines about the session
            request.request_ids.extend(request_ids)
        if cache_edit is not None:
            request.cache_edit.CopyFrom(cache_edit)
        if chain_steps:
            if not self.direct_results:
                raise ValueError("chaining needs answers sent directly by the last stage of 2 or more")
            request.chain_steps = chain_steps
            request.chain_route.extend(self.addresses)
            request.chain_stop_ids.extend(sorted(chain_stop_ids))
        try:
            return self._live_stream().send(request)
        except StageCallError:  # the stream died between the check and the send: one fresh try
            return self._live_stream().send(request)

    def _reserve_ids(self, count: int) -> int:
        """Reserve `count` consecutive micro-batch ids (a step and the steps it may chain); returns the first."""
        with self._lock:
            first, self._next_id = self._next_id, self._next_id + count
            return first

    @property
    def can_chain(self) -> bool:
        """Whether decode steps may be chained by the last stage: it answers here directly, and it can
        reach the first stage."""
        return self.direct_results and self.chain_reachable

    def stop_chain(self, session_id: str, timeout_s: float = 10.0) -> None:
        """Ask the last stage to stop chaining the session's steps; does not wait for the answer."""
        call = self._stubs[-1].StopChain.future(stage_pb2.StopChainRequest(session_id=session_id), timeout=timeout_s)
        call.add_done_callback(lambda done: done.exception() and log.warning(
            "could not stop the chain of session %s: %s", session_id, done.exception()))

    def end_session(self, session_id: str, timeout_s: float = 10.0) -> int:
        """Free the session on every stage; returns how many stages held it."""
        request = stage_pb2.EndSessionRequest(session_id=session_id, route=self.addresses[1:])
        return self._stubs[0].EndSession(request, timeout=timeout_s).stages_freed

    def set_deployment(self, timeout_s: float = 10.0) -> list[str]:
        """Tell every stage the route's addresses, the only ones it may send to (besides its --peers);
        returns the stages that refused (a plaintext stage on another machine takes them from --peers)."""
        request = stage_pb2.SetDeploymentRequest(stages=self.addresses)
        refused = []
        for address, stub in zip(self.addresses, self._stubs):
            try:
                stub.SetDeployment(request, timeout=timeout_s)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                refused.append(address)
        return refused

    def stage_infos(self, timeout_s: float = 10.0) -> list[stage_pb2.InfoResponse]:
        return [stub.Info(stage_pb2.InfoRequest(), timeout=timeout_s) for stub in self._stubs]

    def stage_states(self, timeout_s: float = 5.0) -> list[stage_pb2.InfoResponse | grpc.RpcError]:
        """Each stage's Info, or the error its call ended with: one stage that does not answer
        leaves the others' answers readable."""
        states: list[stage_pb2.InfoResponse | grpc.RpcError] = []
        for stub in self._stubs:
            try:
                states.append(stub.Info(stage_pb2.InfoRequest(), timeout=timeout_s))
            except grpc.RpcError as err:
                states.append(err)
        return states

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream.cancel()
            if self._results is not None:
                self._results.cancel()
        if self._own_channels:
            for channel in self._channels:
                channel.close()


def _encoded(values: torch.Tensor | np.ndarray) -> stage_pb2.Tensor:
    return codec.encode_int64(values) if isinstance(values, np.ndarray) else codec.encode(values)


class StepLogits:
    """The last stage's answer for each row: all logits, or the top-k values with their token ids.
    Decoded when first read: a greedy step reads only each row's best token id, and takes it from
    the wire bytes with neither torch nor numpy (a decode step's few torch calls each cost ~100 µs on caches
    the stages' forwards have just flushed)."""

    def __init__(self, values: stage_pb2.Tensor, token_ids: stage_pb2.Tensor | None = None) -> None:
        self._values_message, self._ids_message = values, token_ids
        self._values: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._best_ids: list[int] | None = None

    @property
    def values(self) -> torch.Tensor:
        """float32 [B, V], or [B, k] when token_ids is set."""
        if self._values is None:
            self._values = codec.decode(self._values_message)
        return self._values

    @property
    def token_ids(self) -> torch.Tensor | None:
        """int64 [B, k], or None when the stage sent every logit."""
        if self._ids is None and self._ids_message is not None:
            self._ids = codec.decode(self._ids_message)
        return self._ids

    def row(self, index: int) -> torch.Tensor:
        """All logits of one row [V] (only when the stage sent them all)."""
        if self._ids_message is not None:
            raise ValueError("the stage sent only the top logits; ask for all of them to sample")
        return self.values[index]

    def best(self, index: int) -> int:
        """The greedy token of one row."""
        if self._ids_message is None:
            return int(torch.argmax(self.values[index]))
        if len(self._ids_message.shape) == 2 and self._ids_message.shape[1] == 1:
            if self._best_ids is None:  # the stage sent each row's best alone (greedy decode)
                self._best_ids = codec.int64_values(self._ids_message)
            return self._best_ids[index]
        return int(self.token_ids[index, int(torch.argmax(self.values[index]))])


def logits_of(response: stage_pb2.ForwardResponse) -> StepLogits:
    """The logits of a response, or the chain's error raised as StageCallError."""
    if response.status_code != 0:
        raise StageCallError(status_code_from_value(response.status_code), response.error_message,
                             response.failed_stage)
    return StepLogits(response.logits, response.top_token_ids if response.HasField("top_token_ids") else None)
