"""The coordinator's connection to a chain of stages.

Owns: one persistent `Forward` stream to the first stage of the route, multiplexing
every session's micro-batches on it (each answer is matched to its request by
session id and micro-batch id), reopening the stream after a failure, and the
side calls EndSession and Info. Hidden states never pass through here: stage 0
pushes them on to stage 1 itself.

Does not own: what to send (engine) or how to sample (sampling).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import Future

import grpc
import torch

from protos import codec, stage_pb2, stage_pb2_grpc
from protos.channel_options import channel_options

log = logging.getLogger(__name__)
_CLOSE = object()


class StageCallError(Exception):
    """A micro-batch failed somewhere in the chain."""

    def __init__(self, code: grpc.StatusCode, message: str, failed_stage: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.failed_stage = failed_stage


def status_code_from_value(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


class _Stream:
    """One live Forward stream and the futures waiting on it."""

    def __init__(self, stub: stage_pb2_grpc.StageStub, address: str) -> None:
        self.address = address
        self.outbox: queue.Queue = queue.Queue()
        self.pending: dict[tuple[str, int], Future] = {}
        self.lock = threading.Lock()
        self.alive = True
        self.call = stub.Forward(iter(self.outbox.get, _CLOSE))
        threading.Thread(target=self._read, name="pipeline-reader", daemon=True).start()

    def send(self, request: stage_pb2.ForwardRequest) -> Future:
        future: Future = Future()
        with self.lock:
            if not self.alive:
                raise StageCallError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} is closed")
            self.pending[(request.session_id, request.micro_batch_id)] = future
        self.outbox.put(request)
        return future

    def close(self) -> None:
        self.outbox.put(_CLOSE)

    def _read(self) -> None:
        error = StageCallError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} ended")
        try:
            for response in self.call:
                with self.lock:
                    future = self.pending.pop((response.session_id, response.micro_batch_id), None)
                if future is not None:
                    future.set_result(response)
        except grpc.RpcError as err:
            error = StageCallError(err.code(), f"first stage {self.address}: {err.details()}", self.address)
        with self.lock:
            self.alive = False
            pending, self.pending = self.pending, {}
        for future in pending.values():
            future.set_exception(error)


class PipelineClient:
    """Sends micro-batches down a route of stage addresses and gets logits back."""

    def __init__(self, addresses: list[str], *, wire_codec: int = stage_pb2.CODEC_NONE,
                 model_fingerprint: str = "") -> None:
        if not addresses:
            raise ValueError("a pipeline needs at least one stage address")
        self.addresses = list(addresses)
        self.wire_codec = wire_codec
        self.model_fingerprint = model_fingerprint
        self._channels = [grpc.insecure_channel(a, options=channel_options()) for a in self.addresses]
        self._stubs = [stage_pb2_grpc.StageStub(c) for c in self._channels]
        self._stream: _Stream | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _live_stream(self) -> _Stream:
        with self._lock:
            if self._stream is None or not self._stream.alive:
                self._stream = _Stream(self._stubs[0], self.addresses[0])
            return self._stream

    def submit(self, session_id: str, activations: torch.Tensor, position_ids: torch.Tensor,
               attention_mask: torch.Tensor | None, *, start_session: bool = False,
               end_session: bool = False, cache_edit: stage_pb2.CacheEdit | None = None,
               logits_top_k: int = 0) -> Future:
        """Queue one micro-batch; the future resolves to the last stage's ForwardResponse."""
        request = stage_pb2.ForwardRequest(
            session_id=session_id, micro_batch_id=next(self._ids), route=self.addresses[1:],
            activations=codec.encode(activations), position_ids=codec.encode(position_ids),
            wire_codec=self.wire_codec, start_session=start_session, end_session=end_session,
            model_fingerprint=self.model_fingerprint, logits_top_k=logits_top_k)
        if attention_mask is not None:
            request.attention_mask.CopyFrom(codec.encode(attention_mask))
        if cache_edit is not None:
            request.cache_edit.CopyFrom(cache_edit)
        try:
            return self._live_stream().send(request)
        except StageCallError:  # the stream died between the check and the send: one fresh try
            return self._live_stream().send(request)

    def end_session(self, session_id: str, timeout_s: float = 10.0) -> int:
        """Free the session on every stage; returns how many stages held it."""
        request = stage_pb2.EndSessionRequest(session_id=session_id, route=self.addresses[1:])
        return self._stubs[0].EndSession(request, timeout=timeout_s).stages_freed

    def stage_infos(self, timeout_s: float = 10.0) -> list[stage_pb2.InfoResponse]:
        return [stub.Info(stage_pb2.InfoRequest(), timeout=timeout_s) for stub in self._stubs]

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream.call.cancel()
        for channel in self._channels:
            channel.close()


class StepLogits:
    """The last stage's answer for each row: all logits, or the top-k values with their token ids."""

    def __init__(self, values: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        self.values = values  # float32 [B, V], or [B, k] when token_ids is set
        self.token_ids = token_ids  # int64 [B, k] or None

    def row(self, index: int) -> torch.Tensor:
        """All logits of one row [V] (only when the stage sent them all)."""
        if self.token_ids is not None:
            raise ValueError("the stage sent only the top logits; ask for all of them to sample")
        return self.values[index]

    def best(self, index: int) -> int:
        """The greedy token of one row."""
        if self.token_ids is None:
            return int(torch.argmax(self.values[index]))
        return int(self.token_ids[index, int(torch.argmax(self.values[index]))])


def logits_of(response: stage_pb2.ForwardResponse) -> StepLogits:
    """The logits of a response, or the chain's error raised as StageCallError."""
    if response.status_code != 0:
        raise StageCallError(status_code_from_value(response.status_code), response.error_message,
                             response.failed_stage)
    ids = codec.decode(response.top_token_ids) if response.HasField("top_token_ids") else None
    return StepLogits(codec.decode(response.logits), ids)
