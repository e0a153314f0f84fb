"""One upstream stream of micro-batches into a stage, whichever way it came.

Owns: reading the stream's requests on a thread of its own and queueing each one's step on the
compute thread (up to QUEUED_PER_STREAM waiting at a time), the links from this stream to the next
hops its steps go to (one per address, reopened when one fails), the answers that go back up the
stream (this stage's own and those its links relay), who sent each request (its caller, asked
anew per request so that a deployment set while the stream is open counts), and which of its micro-batches are still in
flight on this stage, so that the stage-wide count a shutdown drains stays exact.

Does not own: what a step does (step_runner), the stream slot the stream holds and the stage-wide
in-flight count (servicer), nor how a link reaches its next hop (next_hop).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from protos import stage_pb2
from stage_server.compute_thread import ComputeThread
from stage_server.deployment import Caller
from stage_server.step_runner import StepRunner
from stage_server.step_trace import now_ns

log = logging.getLogger(__name__)

_END = object()
QUEUED_PER_STREAM = 4  # steps one upstream stream may have waiting for the compute thread

# (address, deliver, on_closed) -> a link to the next hop at `address` (the servicer's open_link)
OpenLink = Callable[[str, Callable[[stage_pb2.ForwardResponse], None], Callable[[], None]], object]


class ForwardStream:
    """`answers()` yields what goes back up one upstream stream: a gRPC Forward stream, or a
    same-machine connection (unix_listener).

    A micro-batch read from upstream is in flight here until it is done: when its answer (or
    error) goes back up the stream, or once it is sent on (or answered) towards a reply_to
    collector, whose answer never comes back this way. `count_in_flight(delta)` keeps the
    stage-wide count of such micro-batches."""

    def __init__(self, requests: Iterable[stage_pb2.ForwardRequest], context, *, steps: StepRunner,
                 compute: ComputeThread, open_link: OpenLink, count_in_flight: Callable[[int], None],
                 caller: Callable[[], Caller]) -> None:
        self._requests = requests
        self._context = context
        self._steps = steps
        self._compute = compute
        self._open_link = open_link
        self._count_in_flight = count_in_flight
        self._caller = caller  # the upstream peer, as deployment.Caller
        self._answers: queue.Queue = queue.Queue()
        self._links: dict[str, object] = {}  # next hop address -> its link
        self._lock = threading.Lock()
        self._producers = 1  # the reader of the upstream stream, plus one per open link
        self._in_flight: dict[tuple[str, int], int] = {}  # (session, micro-batch) -> times read, not done
        # The reader hands steps to the compute thread without waiting for them, up to
        # QUEUED_PER_STREAM at a time, so it is already waiting for the next request when a step
        # ends instead of waking then, beside the compute thread sending the step on.
        self._queued = threading.BoundedSemaphore(QUEUED_PER_STREAM)

    def answers(self) -> Iterator[stage_pb2.ForwardResponse]:
        """Start reading the upstream stream; yield the answers for it until the reader and every
        link have ended."""
        self._context.add_callback(self._cancel_links)
        threading.Thread(target=self._read_upstream, name="forward-reader", daemon=True).start()
        try:
            while True:
                answer = self._answers.get()
                if answer is _END:
                    return
                self._done((answer.session_id, answer.micro_batch_id))
                yield answer
        finally:  # the upstream may have left early: what it will never receive leaves the count
            with self._lock:
                left = sum(self._in_flight.values())
                self._in_flight.clear()
            self._count_in_flight(-left)

    def _done(self, key: tuple[str, int]) -> None:
        with self._lock:
            count = self._in_flight.get(key, 0)
            if count == 0:  # done already: an error or relayed answer after the micro-batch went on
                return
            if count == 1:
                del self._in_flight[key]
            else:
                self._in_flight[key] = count - 1
        self._count_in_flight(-1)

    def _producer_done(self) -> None:
        with self._lock:
            self._producers -= 1
            if self._producers == 0:
                self._answers.put(_END)

    def _link_to(self, address: str):
        link = self._links.get(address)
        if link is None or not link.alive:  # first use, or the last link to it failed: reconnect
            with self._lock:
                self._producers += 1
            link = self._open_link(address, self._answers.put, self._producer_done)
            self._links[address] = link
        return link

    def _run_then_release(self, step: Callable[[], None]) -> None:
        try:
            step()
        finally:
            self._queued.release()

    def _read_upstream(self) -> None:
        try:
            for request in self._requests:
                received = now_ns()
                key = (request.session_id, request.micro_batch_id)
                self._count_in_flight(1)
                with self._lock:
                    self._in_flight[key] = self._in_flight.get(key, 0) + 1
                step = functools.partial(self._steps.run, request, self._caller(), self._link_to, self._answers.put,
                                         functools.partial(self._done, key), received)
                if self._steps.loading:  # the compute thread is loading: refuse at once (no torch work)
                    step()
                    continue
                self._queued.acquire()
                try:
                    self._compute.submit(functools.partial(self._run_then_release, step))
                except BaseException:
                    self._queued.release()
                    raise
        except Exception as err:  # the upstream went away; nothing to answer
            log.debug("upstream stream ended: %s", err)
        finally:
            for _ in range(QUEUED_PER_STREAM):  # this stream's queued steps finish before its links close
                self._queued.acquire()
            for link in list(self._links.values()):
                link.close()
            self._producer_done()

    def _cancel_links(self) -> None:
        for link in list(self._links.values()):
            link.cancel()
