"""Generations of the HTTP API: run on engine threads, their events handed to the event loop.

Owns: `Generation` (one request on an engine thread, its text deltas released as its tokens come,
its cancel flag read at every step), `EventPump` (events from engine threads into the loop's
queues, one wake-up of the loop for all that arrive together) and `HttpCall` (one request as the
request log and the metrics see it, as they see a gRPC call).

Does not own: the routes and answers (http_api) or generation itself (service, engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import namedtuple

from coordinator.metrics import RequestMeter
from coordinator.request_log import REQUEST_ID_KEY, RequestLog
from coordinator.service import CoordinatorService
from coordinator.text import TextStream
from coordinator.validation import PreparedRequest


class EventPump:
    """Hands events from engine threads to queues of the event loop, with one wake-up of the loop
    for all events that arrive together (a decode step gives every stream its token at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []

    def put(self, queue: asyncio.Queue, event: tuple) -> bool:
        """False when the loop has closed (the server stopped: nobody reads)."""
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:  # a wake-up is on its way already
                return True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_Status = namedtuple("_Status", "name")  # what RequestLog reads of a call's code


class HttpCall:
    """One HTTP request for the request log (coordinator/request_log.py) and the metrics: the caller's
    X-Request-Id (kept when sane, as gRPC's metadata is), the status it ends with, written once by
    `finish`; `drop` for a request refused before it is one (a bad key, as gRPC's interceptor)."""

    def __init__(self, request_id: str | None, method: str) -> None:
        self._given = request_id
        self._status: str | None = None
        self.meter = RequestMeter("http")
        self._ends = contextlib.ExitStack()
        self.record = self._ends.enter_context(RequestLog(self, "http", method))

    def invocation_metadata(self) -> tuple:
        return ((REQUEST_ID_KEY, self._given),) if self._given else ()

    def send_initial_metadata(self, metadata) -> None:
        pass  # the id goes back as a response header (http_api)

    def code(self):
        return None if self._status is None else _Status(self._status)

    def finish(self, status: str) -> None:
        if self._status is not None:
            return
        self._status = status
        self.meter.finish(status)
        self._ends.close()

    def drop(self) -> None:
        self._ends.pop_all()


class Generation:
    """One request run on an engine thread; its tokens' text deltas and its end arrive on `events`
    in the event loop as ("token", delta), then ("done", result) or ("error", exception)."""

    def __init__(self, service: CoordinatorService, prepared: PreparedRequest, stopping: threading.Event,
                 stream: bool, pump: EventPump, call: HttpCall) -> None:
        self.stream = stream  # an answer in one piece needs no token events
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.text = TextStream(service.tokenization, prepared.stop)
        self._service, self._prepared, self._stopping, self._pump = service, prepared, stopping, pump
        self._call = call
        self.outcome = "499"  # a streamed answer's status for the metrics: its client left unless set

    def _put(self, event: tuple) -> None:
        if not self._pump.put(self.events, event):
            self.cancelled.set()

    def run(self) -> None:
        def keep_going() -> bool:
            return not (self.cancelled.is_set() or self._stopping.is_set())

        try:
            on_token = (lambda _: self._put(("token", self.text.release()))) if self.stream else None
            result = self._service.generate_one(self._prepared, self.text, keep_going, on_token,
                                                record=self._call.record, meter=self._call.meter)
        except Exception as err:  # every failure reaches the client, mapped as the gRPC API maps it
            self._put(("error", err))
        else:
            self._put(("done", result))
