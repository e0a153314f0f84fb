"""A link to a stage over gRPC: a `Forward` call fed from a queue, or a `Results` subscription.

Owns: `GrpcLink`, the gRPC implementation of protos/link.py's `Link`, used by a stage for its
next hop and by the coordinator for its first stage and its Results subscription. A Forward
link's messages go to a queue that gRPC's request-consuming thread takes them from; with a
handover wait the sender waits (briefly) until that thread has taken each one.

Does not own: channels (the callers keep one per address), reading the answers (link.LinkReader),
or hops to a stage on this machine that listens on its Unix socket (unix_link.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import grpc
from google.protobuf.message import Message

from protos import stage_pb2, stage_pb2_grpc

_CLOSE = object()


class GrpcLink:
    """One gRPC call to a stage: a Forward stream, or with `results_request` a Results subscription
    (the request is the call's; nothing more is sent). On a Forward stream with `handover_wait_s`,
    `send` returns once gRPC's sending thread has taken the message, or after that long: a caller
    that goes straight on with Python work holds the GIL that thread needs to send."""

    kind = "gRPC"
    read_errors = (grpc.RpcError,)

    def __init__(self, stub: stage_pb2_grpc.StageStub, *, handover_wait_s: float = 0.0,
                 results_request: stage_pb2.ResultsRequest | None = None) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._handover_wait_s = handover_wait_s
        if results_request is not None:
            self._call = stub.Results(results_request)
        elif handover_wait_s:
            self._call = stub.Forward(_handed_over(self._outbox))
        else:
            self._call = stub.Forward(iter(self._outbox.get, _CLOSE))

    def send(self, message: Message) -> bool:
        if not self._handover_wait_s:
            self._outbox.put(message)
            return True
        taken = threading.Event()
        self._outbox.put((message, taken))
        taken.wait(self._handover_wait_s)
        return True

    def answers(self) -> Iterable[stage_pb2.ForwardResponse]:
        return self._call

    def close(self) -> None:
        self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        self._call.cancel()

    def release(self) -> None:
        """Nothing to free: the call has ended, and its channel is the caller's."""

    def status(self, failure: Exception) -> grpc.StatusCode:
        return failure.code()

    def describe(self, failure: Exception) -> str:
        details = failure.details()
        return f"{failure.code().name}: {details}" if details else failure.code().name


def _handed_over(outbox: queue.Queue) -> Iterator[Message]:
    """The messages of `outbox` as gRPC's sending thread takes them, each marked taken as it goes."""
    while (item := outbox.get()) is not _CLOSE:
        message, taken = item
        taken.set()
        yield message
