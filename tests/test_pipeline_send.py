"""A step sent to the first stage is handed to gRPC's sending thread before the coordinator goes on
(coordinator/stage_streams.py, protos/grpc_link.py): the coordinator's next Python work would
otherwise hold the GIL while the step waits in the queue."""

from __future__ import annotations

import threading
import time

from coordinator import stage_streams
from coordinator.pipeline_client import _Pending
from protos import stage_pb2


class SlowSendingStub:
    """Stands in for the first stage's stub: its sending thread asks for each next request 2 ms late."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def Forward(self, requests):  # noqa: N802 (gRPC's name)
        def sending() -> None:
            for _ in range(3):
                time.sleep(0.002)
                next(requests)
        threading.Thread(target=sending, daemon=True).start()
        return self

    def __iter__(self):  # the stream's answers: none, until the test ends
        self.closed.wait(10)
        return iter(())


def test_send_returns_once_the_sending_thread_has_taken_the_request(monkeypatch):
    monkeypatch.setattr(stage_streams, "HANDOVER_WAIT_S", 5.0)  # the bound, out of the way of a busy machine
    stub = SlowSendingStub()
    stream = stage_streams.open_first_stage_stream("stage-0", stub, _Pending(), lambda response: None, unix=False)
    try:
        for step in range(3):
            stream.send(stage_pb2.ForwardRequest(session_id="s", micro_batch_id=step))
            assert stream.link._outbox.empty(), f"step {step} still waits in the queue"
    finally:
        stream.close()
        stub.closed.set()


def test_a_greedy_answer_is_read_from_its_ids_alone_and_decoded_only_when_asked():
    import pytest
    import torch

    from coordinator.pipeline_client import logits_of
    from protos import codec
    from protos.codec import WireFormatError

    response = stage_pb2.ForwardResponse(session_id="s", micro_batch_id=1)
    response.top_token_ids.CopyFrom(codec.encode(torch.tensor([[11], [4]])))
    response.logits.CopyFrom(stage_pb2.Tensor(shape=[2, 1], dtype=stage_pb2.DTYPE_FLOAT32, data=b"bad"))
    logits = logits_of(response)
    assert [logits.best(0), logits.best(1)] == [11, 4]  # the values were never needed
    with pytest.raises(WireFormatError):
        logits.values  # noqa: B018 - reading them decodes (and validates) them
    top2 = stage_pb2.ForwardResponse()
    top2.top_token_ids.CopyFrom(codec.encode(torch.tensor([[5, 9]])))
    top2.logits.CopyFrom(codec.encode(torch.tensor([[0.5, 2.0]])))
    assert logits_of(top2).best(0) == 9
    everything = stage_pb2.ForwardResponse()
    everything.logits.CopyFrom(codec.encode(torch.tensor([[0.1, 3.0, 0.2]])))
    assert logits_of(everything).best(0) == 1 and logits_of(everything).row(0).tolist()[1] == 3.0
