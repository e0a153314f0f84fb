"""A stage's listener on its Unix socket: hops into the stage from processes on its machine.

Owns: `UnixListener`, which accepts connections on the stage's same-machine socket
(protos/unix_socket.py: named after its TCP port, framed protobuf messages) and hands a FORWARD
connection to the same stream handler a gRPC `Forward` stream gets and a RESULTS connection to
the same handler a `Results` call gets (with its frame writer, which the handler sends answers
through as they are made), so validation, errors, sessions, draining and stream slots do not know
which way a message came; and the servicer context such a connection stands in for
(`_ConnectionContext`). Closing drains: the connections' reading side is shut first, and their
answers still go back for a grace of 1 s.

Why: a gRPC hop wakes about four threads in two processes and costs each stage CPU time on those
threads that, on shared cores, stalls whichever stage computes meanwhile; here the sending
thread writes the frame itself and the receiver's stream reader wakes straight from `recv`
(4 local float32 stages: the stages' other threads ~0.8 -> ~0.25 ms CPU a decode token).

Does not own: the framing (protos/unix_socket.py), the handlers (servicer), or the sending side
of a link, the stage's to its next hop (next_hop.py) or the coordinator's
(coordinator/stage_streams.py), both over protos/unix_link.py.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

from protos import stage_pb2
from protos.unix_socket import (
    ACCEPTED,
    FORWARD,
    REFUSED,
    RESULTS,
    FrameError,
    FrameWriter,
    UndecodableFrame,
    peer_uid,
    read_frames,
    same_user,
    shut_quietly,
    socket_name,
)
from stage_server.answers import error_response
from stage_server.stream_slots import StreamSlot

log = logging.getLogger(__name__)


class StreamAborted(Exception):
    """A handler refused the connection (what `context.abort` does to a gRPC call)."""


class _ConnectionContext:
    """The part of a gRPC servicer context the handlers use: callbacks run once when the connection
    ends, `abort` refuses it, and the peer (a process of this machine, with no certificate)."""

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

    def peer(self) -> str:
        return "unix:"

    def auth_context(self) -> dict:
        return {}

    def ended(self) -> None:
        with self._lock:
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class UnixListener:
    """Accepts processes of this machine on `socket_name(port)`. A FORWARD connection is served by
    `forward_stream(requests, context)`, a RESULTS one by `results_stream(request, context, send=...)` (the
    handlers gRPC's Forward and Results calls get); what they yield goes back as frames.
    `reserve_slot(end)` reserves one of the stage's stream slots for a connection that `end()` ends
    (stream_slots.py; None: full, the connection is refused) and `release_slot(slot)` returns it."""

    def __init__(self, port: int, forward_stream, results_stream,
                 reserve_slot: Callable[[Callable[[], None]], StreamSlot | None],
                 release_slot: Callable[[StreamSlot], None]) -> None:
        self._forward_stream, self._results_stream = forward_stream, results_stream
        self._reserve_slot, self._release_slot = reserve_slot, release_slot
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
        self._acceptor = threading.Thread(target=self._accept, name="unix-listener-accept", daemon=True)
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
            if not same_user(connection):  # the socket has no permissions of its own (unix_socket.same_user)
                log.warning("refused a same-machine connection from user id %d: only this stage's user (or root) "
                            "may connect", peer_uid(connection))
                _answer_and_close(connection, REFUSED)
                continue
            slot = self._reserve_slot(functools.partial(shut_quietly, connection))
            if slot is None:
                log.warning("refused a same-machine connection: every stream slot is taken (--max-streams)")
                _answer_and_close(connection, REFUSED)
                continue
            with self._lock:
                if self._closed:
                    self._release_slot(slot)
                    _answer_and_close(connection, REFUSED)
                    return
                serving = threading.Thread(target=self._serve, args=(connection, slot), name="unix-listener-stream",
                                           daemon=True)
                self._connections[connection] = serving
            serving.start()

    def _serve(self, connection: socket.socket, slot: StreamSlot) -> None:
        writer = FrameWriter(connection, "unix-listener-answers")
        context = _ConnectionContext()
        try:
            connection.sendall(ACCEPTED)
            for answer in slot.watch(self._answers(connection, context, writer, slot)):
                if not writer.write(answer):
                    break
        except (StreamAborted, FrameError, OSError) as err:
            if isinstance(err, UndecodableFrame):
                writer.write(_malformed_answer(err))
            log.warning("dropped a same-machine connection: %s", err)
        finally:
            context.ended()
            writer.close(release=True)
            with self._lock:
                self._connections.pop(connection, None)
            self._release_slot(slot)

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

    def _answers(self, connection: socket.socket, context: _ConnectionContext, writer: FrameWriter,
                 slot: StreamSlot) -> Iterator:
        """What goes back on a connection, by the kind it declared in its first byte (a Results
        subscription sends its answers through `writer` itself, as they are made); every message
        either way touches the connection's stream slot."""
        kind = connection.recv(1)
        if kind == FORWARD:
            requests = read_frames(connection, stage_pb2.ForwardRequest.FromString)
            return self._forward_stream(slot.watch(_logged(requests, writer)), context)
        if kind == RESULTS:
            frames = read_frames(connection, stage_pb2.ResultsRequest.FromString)
            request = next(frames, None)
            if request is None:
                raise FrameError("a results connection closed before its request")
            # nothing more comes up a results connection: its end (or anything else) ends the subscription
            threading.Thread(target=_ended_when_read, args=(frames, context), name="unix-listener-results",
                             daemon=True).start()
            return self._results_stream(request, context, send=slot.watching(writer.write))
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


def _malformed_answer(err: UndecodableFrame) -> stage_pb2.ForwardResponse:
    """The in-band answer to a frame that does not parse: INVALID_ARGUMENT, as a gRPC call gets."""
    return error_response(stage_pb2.ForwardRequest(), "INVALID_ARGUMENT", str(err), "")


def _logged(frames: Iterator, writer: FrameWriter) -> Iterator:
    """The frames of one connection; a malformed one ends the stream with a warning (and one that
    does not parse is answered INVALID_ARGUMENT through `writer`)."""
    try:
        yield from frames
    except FrameError as err:
        if isinstance(err, UndecodableFrame):
            writer.write(_malformed_answer(err))
        log.warning("dropped a same-machine upstream: %s", err)
    except OSError as err:
        log.debug("same-machine upstream ended: %s", err)
