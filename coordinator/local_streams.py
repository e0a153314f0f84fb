"""The coordinator's streams to stages on its own machine, over their Unix sockets instead of gRPC.

Owns: `LocalForwardStream` (micro-batches to the first stage, its answers back) and `LocalResults`
(the last stage's answers sent to this coordinator's collector), with the interfaces of
pipeline_client's gRPC `_Stream` and `_Results`, over a stage's same-machine socket
(protos/local_socket.py; the stage side is stage_server/local_hops.py). `open_forward` and
`open_results` return None where the stage has no such socket (another machine, an older stage,
--local-hops off, not Linux): the caller then opens the gRPC call.

Why: on one machine, a decode token crosses the coordinator twice (the last stage's answer in,
the next step out); over gRPC each crossing wakes several threads in both processes. Here the
scheduler's thread writes the next step itself, and one reader thread per socket takes answers.

Does not own: matching answers to futures (pipeline_client._Pending), what is sent, or the side
calls (EndSession, Info, StopChain stay on gRPC).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable

import grpc

from coordinator.step_future import StageCallError, StepFuture
from protos import local_socket, stage_pb2
from protos.local_socket import FORWARD, RESULTS, FrameError, FrameWriter, read_frames, shut_quietly

log = logging.getLogger(__name__)


def _read_answers(sock: socket.socket, take_answer: Callable[[stage_pb2.ForwardResponse], None]) -> str:
    """Hand every answer on `sock` to `take_answer` until it ends; returns how it ended."""
    try:
        for response in read_frames(sock, stage_pb2.ForwardResponse.FromString):
            take_answer(response)
    except (FrameError, OSError) as err:
        return f"failed: {err}"
    return "ended"


class LocalForwardStream:
    """Micro-batches to the first stage on its socket; answers (errors, or all of them without a
    Results subscription) come back on it."""

    def __init__(self, sock: socket.socket, address: str, pending, take_answer) -> None:
        self.address = address
        self.pending = pending
        self.lock = threading.Lock()
        self.alive = True
        self._sock = sock
        self._writer = FrameWriter(sock, f"local-stream-{address}")
        self._take_answer = take_answer
        threading.Thread(target=self._read, name="pipeline-local-reader", daemon=True).start()

    def send(self, request: stage_pb2.ForwardRequest):
        future = StepFuture()
        with self.lock:
            if not self.alive:
                raise StageCallError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} is closed")
            self.pending.add((request.session_id, request.micro_batch_id), future, self, bool(request.reply_to))
        if not self._writer.write(request):  # the reader sees the socket fail and fails the future
            shut_quietly(self._sock)
        return future

    def close(self) -> None:
        """No more micro-batches; answers in flight still come back."""
        self._writer.close()

    def cancel(self) -> None:
        shut_quietly(self._sock)

    def _read(self) -> None:
        how = _read_answers(self._sock, self._take_answer)
        with self.lock:
            self.alive = False
        self._writer.close()  # ends its writer thread, if it has one
        self._sock.close()
        self.pending.fail(StageCallError(grpc.StatusCode.UNAVAILABLE,
                                         f"same-machine stream to the first stage {self.address} {how}",
                                         self.address), stream=self)


class LocalResults:
    """A Results subscription on the last stage's socket."""

    def __init__(self, sock: socket.socket, address: str, pending, take_answer) -> None:
        self.collector_id = uuid.uuid4().hex
        self.address = address
        self.pending = pending
        self.alive = True
        self._sock = sock
        FrameWriter(sock, f"local-results-{address}").write(stage_pb2.ResultsRequest(collector_id=self.collector_id))
        self._take_answer = take_answer
        threading.Thread(target=self._read, name="pipeline-local-results", daemon=True).start()

    def cancel(self) -> None:
        shut_quietly(self._sock)

    def _read(self) -> None:
        how = _read_answers(self._sock, self._take_answer)
        self.alive = False
        self._sock.close()
        self.pending.fail(StageCallError(grpc.StatusCode.UNAVAILABLE,
                                         f"same-machine results stream from the last stage {self.address} {how}",
                                         self.address), direct_only=True)


def open_forward(address: str, pending, take_answer) -> LocalForwardStream | None:
    sock = local_socket.connect(address, FORWARD)
    return LocalForwardStream(sock, address, pending, take_answer) if sock is not None else None


def open_results(address: str, pending, take_answer) -> LocalResults | None:
    sock = local_socket.connect(address, RESULTS)
    return LocalResults(sock, address, pending, take_answer) if sock is not None else None
