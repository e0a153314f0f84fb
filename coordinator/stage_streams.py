"""The coordinator's streams to the stages: micro-batches to the first stage, answers from the last.

Owns: `FirstStageStream` (micro-batches to the first stage; answers come back on it: errors, or
every answer without a Results subscription) and `ResultsSubscription` (the last stage's answers
sent to this coordinator's collector), each over either transport (protos/link.py's `Link`:
the stage's Unix socket where it has one, else gRPC), and the `open_*` functions that choose it.
On one machine a decode token crosses the coordinator twice (the last stage's answer in, the
next step out); over the Unix socket the scheduler's thread writes the next step itself and one
reader thread per socket takes answers.

Does not own: the transports (protos/grpc_link.py, protos/unix_link.py), the reader thread
(protos/link.py's LinkReader), matching answers to futures (pipeline_client._Pending), what is
sent, or the side calls (EndSession, Info and StopChain stay on gRPC, pipeline_client).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import grpc

from coordinator.stage_errors import StageCallError
from coordinator.step_future import StepFuture
from protos import stage_pb2, stage_pb2_grpc
from protos.grpc_link import GrpcLink
from protos.link import Link, LinkReader
from protos.unix_link import UnixLink
from protos.unix_socket import FORWARD, RESULTS

OnAnswer = Callable[[stage_pb2.ForwardResponse], None]

# How long `send` over gRPC waits for gRPC's sending thread to take the request (it never waits
# longer): the caller goes on with Python work (streaming the last token out) holding the GIL
# that thread needs (traced, 2 stages: the step left 0.76 ms after submit without the wait).
HANDOVER_WAIT_S = 0.005


class FirstStageStream(LinkReader):
    """One live Forward stream to the first stage. `pending` (pipeline_client._Pending) holds the
    futures of what was sent; `on_answer` gets every answer that comes back."""

    def __init__(self, link: Link, address: str, pending, on_answer: OnAnswer) -> None:
        super().__init__(link, address, on_answer)
        self.pending = pending
        self._send = link.send
        self._start_reading("pipeline-reader")

    def send(self, request: stage_pb2.ForwardRequest) -> StepFuture:
        future = StepFuture()
        with self.lock:
            if not self.alive:  # it ended before this send: say why (a stage refusing it says so)
                raise self._ended_error(self.failure)
            self.pending.add((request.session_id, request.micro_batch_id), future, self, bool(request.reply_to))
        if not self._send(request):  # the reader sees the link fail and fails the future
            self.link.cancel()
        return future

    def close(self) -> None:
        """No more micro-batches; answers in flight still come back."""
        self.link.close()

    def cancel(self) -> None:
        self.link.cancel()

    def _ended_error(self, failure: Exception | None) -> StageCallError:
        code = grpc.StatusCode.UNAVAILABLE if failure is None else self.link.status(failure)
        return StageCallError(
            code, f"{self.link.kind} stream to the first stage {self.address} {self.how_it_ended(failure)}",
            self.address)

    def _ended(self, failure: Exception | None) -> None:
        self.pending.fail(self._ended_error(failure), stream=self)


class ResultsSubscription(LinkReader):
    """A Results subscription on the last stage, as collector `collector_id`: the answers of
    micro-batches sent with that reply_to."""

    def __init__(self, link: Link, address: str, collector_id: str, pending, on_answer: OnAnswer) -> None:
        super().__init__(link, address, on_answer)
        self.collector_id = collector_id
        self.pending = pending
        self._start_reading("pipeline-results")

    def cancel(self) -> None:
        self.link.cancel()

    def _ended(self, failure: Exception | None) -> None:
        self.pending.fail(StageCallError(
            grpc.StatusCode.UNAVAILABLE,
            f"{self.link.kind} results stream from the last stage {self.address} {self.how_it_ended(failure)}",
            self.address), direct_only=True)


def open_first_stage_stream(address: str, stub: stage_pb2_grpc.StageStub, pending, on_answer: OnAnswer,
                            *, unix: bool) -> FirstStageStream:
    """A stream to the first stage at `address`: over its Unix socket when `unix` and it takes the
    connection, else a gRPC Forward call on `stub`."""
    link = UnixLink.connect(address, FORWARD, f"first-stage-{address}") if unix else None
    if link is None:
        link = GrpcLink(stub, handover_wait_s=HANDOVER_WAIT_S)
    return FirstStageStream(link, address, pending, on_answer)


def open_results_subscription(address: str, stub: stage_pb2_grpc.StageStub, pending, on_answer: OnAnswer,
                              *, unix: bool) -> ResultsSubscription:
    """A Results subscription on the last stage at `address` under a new collector id, over its Unix
    socket when `unix` and it takes the connection, else a gRPC Results call on `stub`."""
    request = stage_pb2.ResultsRequest(collector_id=secrets.token_hex(16))
    link = UnixLink.connect(address, RESULTS, f"results-{address}") if unix else None
    if link is not None:
        link.send(request)  # the connection's first frame
    else:
        link = GrpcLink(stub, results_request=request)
    return ResultsSubscription(link, address, request.collector_id, pending, on_answer)
