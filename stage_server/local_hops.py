"""Hops into and out of a stage from processes on its machine, over a Unix socket instead of gRPC.

Owns: the stage's listener on its same-machine socket (protos/local_socket.py: named after its
TCP port, framed protobuf messages), which hands a FORWARD connection to the same stream handler a
gRPC `Forward` stream gets and a RESULTS connection to the same handler a `Results` call gets (with
its frame writer, which the handler sends answers through as they are made; so
validation, errors, sessions, draining and stream slots do not know which way a message came);
and the link a stage sends to its next stage through, which keeps the interface of
`downstream.DownstreamLink` (send, forget, close, cancel, alive).

Why: a gRPC hop wakes about four threads in two processes (the sender's request-consuming
thread and its channel's poller, the receiver's poller and its stream reader) and costs each
stage ~0.8 ms of CPU a decode token on those threads, which on shared cores stalls whichever
stage computes meanwhile. Here the sending thread writes the frame itself and the receiver's
stream reader wakes straight from `recv`. Measured (4 local float32 stages of SmolLM2-135M, one
request decoding, 21 rounds alternated with the unsplit model): 0.872 -> 0.906 of the unsplit
model's tokens/s with the stage-to-stage hops moved; the stage processes' other threads went
from ~0.8 to ~0.25 ms CPU a token.

Sending never blocks the compute thread: a frame the socket does not take at once (a long
prompt's activations, or a receiver that is behind) goes to a backlog that a writer thread
drains in order (local_socket.FrameWriter).

Does not own: the framing (protos/local_socket.py), the handlers (servicer), the coordinator's
side (coordinator/local_streams.py), or hops to other machines (gRPC, downstream.py).
`open_link` is asked for every next hop: it picks the socket for a loopback address whose stage
listens, else gRPC.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

from protos import local_socket, stage_pb2
from protos.local_socket import (
    ACCEPTED,
    FORWARD,
    REFUSED,
    RESULTS,
    FrameError,
    FrameWriter,
    read_frames,
    shut_quietly,
    socket_name,
)
from stage_server.downstream import DownstreamLink, KeptSends

log = logging.getLogger(__name__)
SUPPORTED = local_socket.SUPPORTED


class StreamAborted(Exception):
    """A handler refused the connection (what `context.abort` does to a gRPC call)."""


class _ConnectionContext:
    """The part of a gRPC servicer context the handlers use: callbacks run once when the connection
    ends, and `abort` refuses it."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ended = False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the connection ends; if it has already, run it now (and say so with
        False, as gRPC's context does)."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        callback()
        return False

    def abort(self, code, details: str):
        raise StreamAborted(f"{code.name}: {details}")

    def ended(self) -> None:
        with self._lock:
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class LocalHopListener:
    """Accepts processes of this machine on `socket_name(port)`. A FORWARD connection is served by
    `forward_stream(requests, context)`, a RESULTS one by `results_stream(request, context, send=...)` (the
    handlers gRPC's Forward and Results calls get); what they yield goes back as frames.
    `take_slot()` -> bool reserves one of the stage's stream slots (False: full, the connection is
    closed) and `free_slot()` returns it."""

    def __init__(self, port: int, forward_stream, results_stream, take_slot: Callable[[], bool],
                 free_slot: Callable[[], None]) -> None:
        self._forward_stream, self._results_stream = forward_stream, results_stream
        self._take_slot, self._free_slot = take_slot, free_slot
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(socket_name(port))
        except OSError:
            self._sock.close()
            raise
        self._sock.listen(64)
        self._connections: dict[socket.socket, threading.Thread] = {}  # each with the thread serving it
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="local-hops-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._sock.accept()
            except OSError as err:
                if self._closed:
                    return
                log.warning("same-machine socket: accept failed (%s); retrying", err)  # e.g. out of descriptors
                time.sleep(0.1)
                continue
            if not self._take_slot():
                log.warning("refused a same-machine connection: every stream slot is taken (--max-streams)")
                _answer_and_close(connection, REFUSED)
                continue
            with self._lock:
                if self._closed:
                    self._free_slot()
                    _answer_and_close(connection, REFUSED)
                    return
                serving = threading.Thread(target=self._serve, args=(connection,), name="local-hops-stream",
                                           daemon=True)
                self._connections[connection] = serving
            serving.start()

    def _serve(self, connection: socket.socket) -> None:
        writer = FrameWriter(connection, "local-hops-answers")
        context = _ConnectionContext()
        try:
            connection.sendall(ACCEPTED)
            for answer in self._answers(connection, context, writer):
                if not writer.write(answer):
                    break
        except (StreamAborted, FrameError, OSError) as err:
            log.warning("dropped a same-machine connection: %s", err)
        finally:
            context.ended()
            writer.close(release=True)
            with self._lock:
                self._connections.pop(connection, None)
            self._free_slot()

    def close(self, grace_s: float = 1.0) -> None:
        """Stop accepting, then end every open connection: first only their reading side, so that
        each stream finishes what it has (its answers still go back), and after `grace_s` at once
        (their upstreams see the link fail)."""
        with self._lock:
            self._closed = True
        shut_quietly(self._sock)  # wakes the accepting thread: a bare close would leave the name bound
        self._sock.close()
        self._acceptor.join(5.0)  # the name is free once its accept has returned
        with self._lock:
            connections = dict(self._connections)
        for connection in connections:
            shut_quietly(connection, socket.SHUT_RD)
        deadline = time.monotonic() + grace_s
        for serving in connections.values():
            serving.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._connections)
        for connection in left:
            shut_quietly(connection)

    def _answers(self, connection: socket.socket, context: _ConnectionContext, writer: FrameWriter) -> Iterator:
        """What goes back on a connection, by the kind it declared in its first byte (a Results
        subscription sends its answers through `writer` itself, as they are made)."""
        kind = connection.recv(1)
        if kind == FORWARD:
            return self._forward_stream(_logged(read_frames(connection, stage_pb2.ForwardRequest.FromString)), context)
        if kind == RESULTS:
            frames = read_frames(connection, stage_pb2.ResultsRequest.FromString)
            request = next(frames, None)
            if request is None:
                raise FrameError("a results connection closed before its request")
            # nothing more comes up a results connection: its end (or anything else) ends the subscription
            threading.Thread(target=_ended_when_read, args=(frames, context), name="local-results-watch",
                             daemon=True).start()
            return self._results_stream(request, context, send=writer.write)
        raise FrameError(f"unknown connection kind {kind!r}" if kind else "closed before saying its kind")


def _answer_and_close(connection: socket.socket, answer: bytes) -> None:
    try:
        connection.sendall(answer)
    except OSError:
        pass
    connection.close()


def _ended_when_read(frames: Iterator, context: _ConnectionContext) -> None:
    try:
        next(frames, None)
    except (FrameError, OSError):
        pass
    context.ended()


def _logged(frames: Iterator) -> Iterator:
    """The frames of one connection; a malformed one ends the stream with a warning."""
    try:
        yield from frames
    except FrameError as err:
        log.warning("dropped a same-machine upstream: %s", err)
    except OSError as err:
        log.debug("same-machine upstream ended: %s", err)


class LocalHopLink:
    """An upstream stage's link to a next hop on this machine, through its LocalHopListener."""

    def __init__(self, address: str, sock: socket.socket,
                 deliver: Callable[[stage_pb2.ForwardResponse], None], on_closed: Callable[[], None]) -> None:
        self.address = address
        self._sock = sock
        self._deliver = deliver
        self._on_closed = on_closed
        self._writer = FrameWriter(sock, f"local-hop-{address}")
        self._sends = KeptSends()
        self.alive = True
        threading.Thread(target=self._read, name=f"local-hop-{address}", daemon=True).start()

    def send(self, request: stage_pb2.ForwardRequest, sent_bytes: int) -> bool:
        """Send a request (the frame is written now or queued); False if the link has failed."""
        if not self.alive or not self._sends.record(request, sent_bytes):
            return False
        if self._writer.write(request):
            return True
        self._sends.take(request.session_id, request.micro_batch_id)
        return False

    def forget(self, session_id: str, micro_batch_id: int) -> None:
        self._sends.take(session_id, micro_batch_id)

    def close(self) -> None:
        """No more requests; answers still in flight are delivered before the link ends."""
        self._writer.close()

    def cancel(self) -> None:
        shut_quietly(self._sock)

    def _read(self) -> None:
        detail = "stream ended before answering"
        try:
            for response in read_frames(self._sock, stage_pb2.ForwardResponse.FromString):
                self._deliver(self._sends.answered(response))
        except (FrameError, OSError) as err:
            log.warning("next stage %s failed: %s", self.address, err)
            detail = str(err)
        finally:
            self.alive = False
            self._writer.close()  # ends its writer thread, if it has one
            self._sends.fail_all(self.address, detail, self._deliver)
            self._sock.close()
            self._on_closed()


def open_link(address: str, channels, deliver: Callable[[stage_pb2.ForwardResponse], None],
              on_closed: Callable[[], None], *, local: bool = True):
    """A link to the next hop at `address`: over its same-machine socket when `local` and it has
    one, else a gRPC stream on `channels`' channel to it."""
    sock = local_socket.connect(address, FORWARD) if local else None
    if sock is not None:
        return LocalHopLink(address, sock, deliver, on_closed)
    return DownstreamLink(address, channels.get(address), deliver, on_closed)
