"""A link to a stage on this machine over its Unix socket (protos/unix_socket.py) instead of gRPC.

Owns: `UnixLink`, the same-machine implementation of protos/link.py's `Link`, used by a stage for
its next hop and by the coordinator for its first stage and its Results subscription; and
`UnixLink.connect`, which opens one where the stage listens on its socket and takes the
connection. The sending thread writes each frame itself (unix_socket.FrameWriter: a frame the
socket does not take at once waits for a writer thread, so sending never blocks), and the
reader wakes straight from `recv`: a gRPC hop wakes about four threads in two processes.

Does not own: the framing and handshake (unix_socket.py), reading the answers
(link.LinkReader), or the stage's listening side (stage_server/unix_listener.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc

from protos import stage_pb2, unix_socket
from protos.unix_socket import FrameError, FrameWriter, read_frames, shut_quietly


class UnixLink:
    """One connection to a stage's Unix socket."""

    kind = "same-machine"
    read_errors = (FrameError, OSError)

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._writer = FrameWriter(sock, name)
        # frames go straight to the writer: no call in between, per message
        self.send = self._writer.write

    @classmethod
    def connect(cls, address: str, kind: bytes, name: str) -> UnixLink | None:
        """A `kind` (unix_socket.FORWARD or RESULTS) link to the stage at `address`, or None where it
        has no socket this process can use (see unix_socket.connect); `name` names its writer thread."""
        sock = unix_socket.connect(address, kind)
        return cls(sock, name) if sock is not None else None

    def answers(self) -> Iterator[stage_pb2.ForwardResponse]:
        return read_frames(self._sock, stage_pb2.ForwardResponse.FromString)

    def close(self) -> None:
        self._writer.close()

    def cancel(self) -> None:
        shut_quietly(self._sock)

    def release(self) -> None:
        self._writer.close()  # ends its writer thread, if it has one
        self._sock.close()

    def status(self, failure: Exception) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def describe(self, failure: Exception) -> str:
        return str(failure)
