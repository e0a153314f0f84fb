"""A stage's link to the next stage of a route (its next hop), over either transport.

Owns: `NextHop` (per upstream stream and next-hop address, the link micro-batches go on through,
and the answers relayed back to the upstream stream), `open_next_hop` (over the next stage's
Unix socket where it has one, else a gRPC Forward stream over the stage's ChannelPool), and `KeptSends` (what a
next hop was sent and may still hear about). When a next hop fails, every micro-batch still
kept for it is answered with UNAVAILABLE naming the hop (`unreachable`), so the coordinator can
re-route or replay. A micro-batch whose answer goes to a reply_to collector sends nothing back
on success, so the link cannot know when it is done: it reports the last RECENT_KEPT of them as
failed too (the coordinator ignores a failure of a micro-batch it has its answer for).

Does not own: the transports (protos/grpc_link.py, protos/unix_link.py), the reader thread
(protos/link.py's LinkReader), computing anything, or the upstream side of the stream (servicer).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import grpc

from protos import stage_pb2, stage_pb2_grpc
from protos.channel_pool import ChannelPool
from protos.grpc_link import GrpcLink
from protos.link import Link, LinkReader
from protos.unix_link import UnixLink
from protos.unix_socket import FORWARD

log = logging.getLogger(__name__)

RECENT_KEPT = 256  # micro-batches sent towards a reply_to collector that a failed link reports


class KeptSends:
    """What a link sent and may still hear about: per micro-batch, the bytes sent. A micro-batch
    whose answer goes to a reply_to collector sends nothing back on success, so of those only the
    latest RECENT_KEPT are kept, for a failure to report (or a relayed answer to find)."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], int] = {}  # (session, micro-batch) → bytes sent
        self._recent: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def record(self, request: stage_pb2.ForwardRequest, sent_bytes: int) -> bool:
        """Keep a request about to be sent; False once closed (the link has failed)."""
        key = (request.session_id, request.micro_batch_id)
        with self._lock:
            if self._closed:
                return False
            if request.reply_to:
                self._recent[key] = sent_bytes
                self._recent.move_to_end(key)
                if len(self._recent) > RECENT_KEPT:
                    self._recent.popitem(last=False)
            else:
                self._pending[key] = sent_bytes
        return True

    def pop(self, session_id: str, micro_batch_id: int) -> int:
        """Stop keeping a micro-batch (answered, or known to be done); returns the bytes it sent (0 if unknown)."""
        key = (session_id, micro_batch_id)
        with self._lock:
            sent = self._pending.pop(key, None)
            return sent if sent is not None else self._recent.pop(key, 0)

    def __len__(self) -> int:
        """Micro-batches kept: awaiting an answer, or recent ones sent towards a collector."""
        with self._lock:
            return len(self._pending) + len(self._recent)

    def answered(self, response: stage_pb2.ForwardResponse) -> stage_pb2.ForwardResponse:
        """An answer that came back: its micro-batch stops being kept, and the bytes this hop sent
        for it go first in its hop_bytes."""
        hops = [self.pop(response.session_id, response.micro_batch_id), *response.hop_bytes]
        del response.hop_bytes[:]
        response.hop_bytes.extend(hops)
        return response

    def fail_all(self, address: str, detail: str, deliver: Callable[[stage_pb2.ForwardResponse], None]) -> None:
        """The link to `address` has ended: refuse further records and answer every kept micro-batch
        with UNAVAILABLE naming the hop."""
        with self._lock:
            self._closed = True
            kept = [*self._pending, *self._recent]
            self._pending, self._recent = {}, OrderedDict()
        for session_id, micro_batch_id in kept:
            deliver(unreachable(address, session_id, micro_batch_id, detail))


class NextHop(LinkReader):
    """An outgoing stream to one next hop, on behalf of one upstream stream: micro-batches go out on
    `link`, answers (errors, or every answer when none goes to a collector) go to `deliver`, and
    `on_closed` runs once the link has ended and every kept micro-batch has been answered."""

    def __init__(self, link: Link, address: str, deliver: Callable[[stage_pb2.ForwardResponse], None],
                 on_closed: Callable[[], None]) -> None:
        super().__init__(link, address, self._relay)
        self._deliver = deliver
        self._on_closed = on_closed
        self._sends = KeptSends()
        self._send = link.send
        self._start_reading(f"next-hop-{address}")

    def send(self, request: stage_pb2.ForwardRequest, sent_bytes: int) -> bool:
        """Send a request (written now, or queued); False if the link has failed (open a new one)."""
        if not self.alive or not self._sends.record(request, sent_bytes):
            return False
        if self._send(request):
            return True
        self._sends.pop(request.session_id, request.micro_batch_id)
        return False

    def forget(self, session_id: str, micro_batch_id: int) -> None:
        """Stop waiting for a micro-batch's answer: it is known to be done (no answer comes this way)."""
        self._sends.pop(session_id, micro_batch_id)

    def close(self) -> None:
        """No more requests; answers still in flight are delivered before the link ends."""
        self.link.close()

    def cancel(self) -> None:
        self.link.cancel()

    def _relay(self, response: stage_pb2.ForwardResponse) -> None:
        self._deliver(self._sends.answered(response))

    def _ended(self, failure: Exception | None) -> None:
        detail = "stream ended before answering"
        if failure is not None:
            detail = self.link.describe(failure)
            if self.link.status(failure) != grpc.StatusCode.CANCELLED:  # cancelled: this stage ended it
                log.warning("next stage %s failed: %s", self.address, detail)
        self._sends.fail_all(self.address, detail, self._deliver)
        self._on_closed()


def open_next_hop(address: str, channels: ChannelPool, deliver: Callable[[stage_pb2.ForwardResponse], None],
                  on_closed: Callable[[], None], *, unix: bool = True) -> NextHop:
    """A link to the next hop at `address`: over its Unix socket when `unix` and it takes the
    connection, else a gRPC Forward stream on `channels`' channel to it."""
    link = UnixLink.connect(address, FORWARD, f"next-hop-{address}") if unix else None
    if link is None:
        link = GrpcLink(stage_pb2_grpc.StageStub(channels.get(address)))
    return NextHop(link, address, deliver, on_closed)


def unreachable(address: str, session_id: str, micro_batch_id: int, detail: str) -> stage_pb2.ForwardResponse:
    """The answer for a micro-batch whose next hop failed."""
    return stage_pb2.ForwardResponse(
        session_id=session_id, micro_batch_id=micro_batch_id, status_code=grpc.StatusCode.UNAVAILABLE.value[0],
        error_message=f"next stage {address} is unreachable or failed: {detail}", failed_stage=address)
