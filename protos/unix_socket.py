"""The same-machine (Unix) socket between layerline processes: its name, handshake and framing.

Owns: what a stage's Unix socket is called (an abstract name made from the stage's TCP port, so it
is scoped to the network namespace exactly as a loopback port is), how a connection says what it
is (one byte: FORWARD, a stream of micro-batches like a gRPC Forward stream; RESULTS, a Results
subscription whose first frame is the ResultsRequest), the stage's one-byte answer (ACCEPTED, or
REFUSED when its stream slots are all taken or the peer is another user), the frames that follow (a 4-byte little-endian
length, then the protobuf bytes of the same messages the gRPC calls carry), `FrameWriter` (sends
frames without blocking its caller), `connect` and who may connect (`same_user`: an abstract
socket has no file and so no permissions; the stage takes processes of its own user, and root,
which could read its TLS key anyway). Used by both sides: the stage's listener
(stage_server/unix_listener.py) and the link either side sends through (protos/unix_link.py).

Does not own: what is done with the messages, or deciding when to use the socket (the callers of
`connect`). Linux only (abstract sockets); elsewhere `connect` finds nothing and every hop stays
on gRPC.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator

from protos.addresses import loopback_port
from protos.channel_options import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

SUPPORTED = sys.platform.startswith("linux")
FORWARD = b"F"  # the connection is a stream of ForwardRequests; ForwardResponses come back
RESULTS = b"R"  # the connection is a Results subscription: one ResultsRequest, then answers come back
ACCEPTED = b"+"  # the stage's first byte back: it took a stream slot for the connection
REFUSED = b"-"  # ... or it had none free (--max-streams); it closes the connection
ANSWER_WAIT_S = 10.0  # how long `connect` waits for that byte


def socket_name(port: int) -> str:
    """The abstract socket a stage listening on TCP `port` also listens on (leading NUL: abstract)."""
    return f"\0layerline-stage-{port}"


_LENGTH = struct.Struct("<I")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(connection: socket.socket) -> int:
    """The user id of the process at the other end of a Unix connection (SO_PEERCRED)."""
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    return _PEER_CREDENTIALS.unpack(raw)[1]


def same_user(connection: socket.socket) -> bool:
    """Whether the peer runs as this process's user or as root."""
    return peer_uid(connection) in (os.getuid(), 0)


def shut_quietly(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """`sock.shutdown(how)`, where a socket already shut or closed is no error. Shutting (not only
    closing) is what wakes another thread blocked in recv or accept on it."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol; the connection is dropped."""


# A frame's buffer starts at most this large and doubles only once full: a length header alone (up
# to the message limit) costs the reader this much until the body arrives, and a body twice its size.
FIRST_READ_BYTES = 1 << 20


class UndecodableFrame(FrameError):
    """A whole frame arrived but its bytes are not the message expected (a gRPC call would end with
    INVALID_ARGUMENT)."""


def _read_exactly(sock: socket.socket, count: int) -> bytearray | None:
    """`count` bytes, or None if the peer closed the connection before the first of them. The buffer
    grows with the bytes that arrive, never from the untrusted `count` alone."""
    buffer = bytearray(min(count, FIRST_READ_BYTES))
    got = 0
    while got < count:
        if got == len(buffer):
            buffer.extend(bytes(min(count - got, len(buffer))))
        with memoryview(buffer) as view:
            received = sock.recv_into(view[got:])
        if received == 0:
            if got == 0:
                return None
            raise FrameError(f"connection closed {got} bytes into a {count}-byte read")
        got += received
    return buffer


def read_frames(sock: socket.socket, parse: Callable[[bytes], object],
                max_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[object]:
    """Messages from `sock` until the peer closes it. Raises FrameError on a frame over `max_bytes`,
    a frame cut short, or bytes that do not parse; OSError when the socket fails."""
    while True:
        header = _read_exactly(sock, _LENGTH.size)
        if header is None:
            return
        (length,) = _LENGTH.unpack(header)
        if length > max_bytes:
            raise FrameError(f"a frame of {length} bytes exceeds the {max_bytes}-byte limit")
        body = _read_exactly(sock, length) if length else bytearray()
        if body is None:
            raise FrameError(f"connection closed before a {length}-byte frame")
        try:
            yield parse(bytes(body))
        except Exception as err:  # protobuf's DecodeError, whatever the runtime names it
            raise UndecodableFrame(f"a {length}-byte frame is not a valid message ({err})") from err


class FrameWriter:
    """Writes frames to a socket in order without blocking the caller: what the socket does not
    take at once waits in a backlog that a writer thread sends (started on first need)."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._name = name
        self._lock = threading.Lock()
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._wake = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self.failed = False
        self._closed = self._release = False

    def write(self, message) -> bool:
        """Queue one message; False once the socket has failed."""
        data = message.SerializeToString()
        frame = memoryview(_LENGTH.pack(len(data)) + data)
        with self._lock:
            if self.failed:
                return False
            if not self._backlog:
                try:
                    sent = self._sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as err:
                    self._fail(err)
                    return False
                frame = frame[sent:]
                if not frame:
                    return True
            self._backlog.append(frame)
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name=f"{self._name}-writer", daemon=True)
                self._writer.start()
            self._wake.notify()
        return True

    def close(self, *, release: bool = False) -> None:
        """No more frames: the backlog is sent, then the sending side of the socket is shut (and
        with `release`, the socket closed: its reading side is done too)."""
        with self._lock:
            self._closed, self._release = True, release
            if self._writer is not None and self._writer.is_alive():
                self._wake.notify()  # the writer thread sends what is left, then shuts the socket
                return
        self._shut_sending()

    def _shut_sending(self) -> None:
        # with release, reading is over too: SHUT_RDWR also wakes a thread still waiting in recv
        shut_quietly(self._sock, socket.SHUT_RDWR if self._release else socket.SHUT_WR)
        if self._release:
            self._sock.close()

    def _fail(self, err: OSError) -> None:
        log.debug("%s: send failed: %s", self._name, err)
        self.failed = True
        self._backlog.clear()

    def _drain(self) -> None:
        while True:
            with self._lock:
                while not self._backlog and not self._closed:
                    self._wake.wait()
                if not self._backlog:  # closed and all sent
                    break
                frame = self._backlog[0]
            try:
                sent = self._sock.send(frame)  # blocking: this thread may wait for the reader
            except OSError as err:
                with self._lock:
                    self._fail(err)
                break
            with self._lock:
                if sent == len(frame):
                    self._backlog.popleft()
                else:
                    self._backlog[0] = frame[sent:]
        self._shut_sending()


def connect(address: str, kind: bytes) -> socket.socket | None:
    """A socket connected to the stage at loopback `address` as a `kind` connection, if that stage
    listens for same-machine connections and takes this one; None otherwise (not loopback, not
    Linux, a stage without the socket or started with --local-hops off, or one with no stream slot
    free: over gRPC the caller then gets RESOURCE_EXHAUSTED saying so)."""
    port = loopback_port(address)
    if port is None or not SUPPORTED:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_name(port))
        sock.sendall(kind)
        sock.settimeout(ANSWER_WAIT_S)
        answer = sock.recv(1)
        sock.settimeout(None)
    except OSError:
        sock.close()
        return None
    if answer != ACCEPTED:  # refused (every stream slot taken) or gone: gRPC says why, or fails too
        sock.close()
        return None
    return sock
