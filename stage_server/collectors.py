"""Coordinators subscribed on the last stage for the answers sent straight to them (Results).

Owns: the registry of collectors by id with the identity of each one's subscriber, the subscription
each one reads (a gRPC Results call, or a
same-machine connection, unix_listener), and `SendingCollector`, which writes each answer from the
thread that made it.

Does not own: which answers go to a collector (step_runner), nor the stream slot a subscription
holds (servicer).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from protos import stage_pb2
from stage_server.peer_identity import peer_of

_END = object()


class SendingCollector:
    """A collector that sends each answer at once through `send`; once a send fails it puts _END on
    `ended` (the subscription's own queue), which ends the subscription."""

    def __init__(self, send: Callable[[stage_pb2.ForwardResponse], bool], ended: queue.Queue) -> None:
        self._send, self._ended = send, ended

    def put(self, answer: stage_pb2.ForwardResponse) -> None:
        if not self._send(answer):
            self._ended.put(_END)


Collector = queue.Queue | SendingCollector  # what `put(answer)` hands an answer to its coordinator


class Collectors:
    """The collectors subscribed on this stage, by collector id; safe to use from any thread."""

    def __init__(self) -> None:
        self._by_id: dict[str, Collector] = {}
        self._subscribers: dict[str, str] = {}  # collector id -> its subscriber's identity (peer_identity)
        self._lock = threading.Lock()

    def get(self, collector_id: str) -> Collector | None:
        """The collector subscribed as `collector_id`; None for an empty id or an unknown one."""
        if not collector_id:
            return None
        with self._lock:
            return self._by_id.get(collector_id)

    def subscriber(self, collector_id: str) -> str | None:
        """The identity of the peer subscribed as `collector_id`; None when none is."""
        with self._lock:
            return self._subscribers.get(collector_id) if collector_id else None

    def __contains__(self, collector_id: str) -> bool:
        with self._lock:
            return collector_id in self._by_id

    def subscribe(self, request: stage_pb2.ResultsRequest, context,
                  send: Callable[[stage_pb2.ForwardResponse], bool] | None = None
                  ) -> Iterator[stage_pb2.ForwardResponse]:
        """Answers sent to collector `request.collector_id`, until the subscriber goes away.

        With `send` (a same-machine connection's frame writer: thread-safe, never blocks), each answer
        is sent by the thread that made it, the compute thread, and nothing is yielded: a hand-off to
        the stream's thread costs each token 175-280 µs between the last stage's answer and its write.
        A failed send ends the subscription."""
        if not request.collector_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "collector_id is empty")
        answers: queue.Queue = queue.Queue()
        collector = answers if send is None else SendingCollector(send, answers)
        with self._lock:
            if request.collector_id in self._by_id:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"collector {request.collector_id!r} is already subscribed here")
            self._by_id[request.collector_id] = collector
            self._subscribers[request.collector_id] = peer_of(context).identity
        context.add_callback(lambda: answers.put(_END))
        try:
            while (answer := answers.get()) is not _END:
                yield answer
        finally:
            with self._lock:
                if self._by_id.get(request.collector_id) is collector:
                    del self._by_id[request.collector_id]
                    del self._subscribers[request.collector_id]
