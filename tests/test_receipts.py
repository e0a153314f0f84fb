"""Micro-batches answered to a collector, the hop sizes answers carry, and failures after them.

A micro-batch answered straight to the coordinator (reply_to) sends nothing back upstream on
success: each stage is done with it once it has sent it on, so a token costs the stages no
bookkeeping messages. The answer itself carries the size of every hop it took, so the
coordinator's byte count stays exact, and nothing is left waiting on any stage afterwards. A
next hop that goes away while such a micro-batch is in flight still turns into UNAVAILABLE for
it, and the coordinator drops such reports for micro-batches it has resolved already.
"""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
import torch
from stalling import stalled_forward
from waiting import eventually

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient, StepFuture, _Pending
from protos import codec, stage_pb2, stage_pb2_grpc
from stage_server.next_hop import NextHop

HIDDEN = 64  # the tiny models' hidden size (tests/tiny_models.py)
FLOAT32 = 4


def _collect(stream, into: queue.Queue) -> threading.Thread:
    def read() -> None:
        try:
            for message in stream:
                into.put(message)
        except grpc.RpcError:
            pass
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _count_link_deliveries(monkeypatch) -> list:
    """Every response a stage's link to its next stage hands back, over gRPC or a same-machine socket
    (in-process stages share the classes)."""
    delivered = []

    def counting_init(self, link, address, deliver, on_closed, _original=NextHop.__init__):
        def counted(response):
            delivered.append(response)
            deliver(response)
        _original(self, link, address, counted, on_closed)

    monkeypatch.setattr(NextHop, "__init__", counting_init)
    return delivered


def test_no_receipts_come_back_and_the_answer_carries_its_hop_sizes(tiny_model, stages, monkeypatch):
    model_dir = tiny_model("llama")
    prompt = [5, 6, 7, 8]
    delivered = _count_link_deliveries(monkeypatch)
    with stages(model_dir, 3) as (addresses, servers):
        with grpc.insecure_channel(addresses[0]) as first, grpc.insecure_channel(addresses[-1]) as last:
            results: queue.Queue = queue.Queue()
            subscription = stage_pb2_grpc.StageStub(last).Results(stage_pb2.ResultsRequest(collector_id="c1"))
            _collect(subscription, results)
            assert eventually(lambda: "c1" in servers[-1].service.collectors, True)
            outbox: queue.Queue = queue.Queue()
            back: queue.Queue = queue.Queue()
            stream = stage_pb2_grpc.StageStub(first).Forward(iter(outbox.get, None))
            _collect(stream, back)
            outbox.put(stage_pb2.ForwardRequest(
                session_id="s", micro_batch_id=1, route=addresses[1:], start_session=True,
                activations=codec.encode(torch.tensor([prompt])),
                position_ids=codec.encode(torch.arange(len(prompt)).view(1, -1)), logits_top_k=1, reply_to="c1"))
            answer = results.get(timeout=30)
            assert answer.status_code == 0
            assert list(answer.hop_bytes) == [len(prompt) * HIDDEN * FLOAT32] * 2
            assert eventually(lambda: [s.service._inflight for s in servers], [0, 0, 0]) == [0, 0, 0]
            assert delivered == [], "a stage sent something back for a micro-batch answered to its collector"
            assert back.empty()
            # errors still come back the way the step went, from the middle stage and the last
            outbox.put(stage_pb2.ForwardRequest(
                session_id="nobody", micro_batch_id=2, route=addresses[1:],
                activations=codec.encode(torch.tensor([[5]])), position_ids=codec.encode(torch.tensor([[4]])),
                logits_top_k=1, reply_to="c1"))
            error = back.get(timeout=30)
            assert error.micro_batch_id == 2 and error.status_code == grpc.StatusCode.NOT_FOUND.value[0]
            outbox.put(None)
            subscription.cancel()
            assert eventually(lambda: [s.service._inflight for s in servers], [0, 0, 0]) == [0, 0, 0]


@pytest.mark.parametrize("local_hops", [True, False], ids=["same-machine socket", "gRPC"])
def test_a_next_hop_that_goes_away_fails_what_was_sent_on_to_a_collector(tiny_model, stages, local_hops):
    """The first stage does not wait for a micro-batch it sent on towards a collector, yet when the
    last stage dies computing it, the first stage answers it UNAVAILABLE naming that stage,
    whichever way the hop went."""
    model_dir = tiny_model("llama")
    with stages(model_dir, 2, local_hops=local_hops) as (addresses, servers):
        assert (servers[1].local_hops is not None) == local_hops
        last = servers[1].service
        with stalled_forward(last) as (computing, _):
            with grpc.insecure_channel(addresses[0]) as first, grpc.insecure_channel(addresses[1]) as channel:
                results: queue.Queue = queue.Queue()
                _collect(stage_pb2_grpc.StageStub(channel).Results(stage_pb2.ResultsRequest(collector_id="c1")),
                         results)
                assert eventually(lambda: "c1" in last.collectors, True)
                outbox: queue.Queue = queue.Queue()
                back: queue.Queue = queue.Queue()
                _collect(stage_pb2_grpc.StageStub(first).Forward(iter(outbox.get, None)), back)
                outbox.put(stage_pb2.ForwardRequest(
                    session_id="s", micro_batch_id=7, route=[addresses[1]], start_session=True,
                    activations=codec.encode(torch.tensor([[5, 6, 7]])),
                    position_ids=codec.encode(torch.arange(3).view(1, -1)), logits_top_k=1, reply_to="c1"))
                assert computing.wait(30)
                assert eventually(lambda: servers[0].service._inflight, 0) == 0  # done once sent on
                if servers[1].local_hops is not None:  # gone at once, mid-step: both ways in are shut
                    servers[1].local_hops.close()
                servers[1].grpc_server.stop(None)
                failure = back.get(timeout=30)
                outbox.put(None)
    assert failure.micro_batch_id == 7 and failure.status_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert addresses[1] in failure.error_message


def test_a_late_failure_report_of_a_resolved_micro_batch_is_dropped():
    """A failing link reports recent micro-batches answered or not: one the coordinator has its
    answer for must not wait in the early answers (where it could push out a real one)."""
    pending = _Pending()
    future = StepFuture()
    pending.add(("s", 1), future, None, True)
    pending.resolve(stage_pb2.ForwardResponse(session_id="s", micro_batch_id=1))
    assert future.result().status_code == 0
    pending.resolve(stage_pb2.ForwardResponse(session_id="s", micro_batch_id=1, status_code=14))
    assert pending._early == {}
    # a report of a micro-batch never seen still waits there (a chained step's answer may come first)
    pending.resolve(stage_pb2.ForwardResponse(session_id="s", micro_batch_id=5, status_code=14))
    assert list(pending._early) == [("s", 5)]


def test_a_chained_decode_counts_every_hop_once_and_leaves_nothing_waiting(tiny_model, stages):
    model_dir = tiny_model("llama")
    prompt, new_tokens = [5, 6, 7, 8, 9], 9
    with stages(model_dir, 3) as (addresses, servers):
        client = PipelineClient(addresses)
        try:
            engine = Engine(client, chain=True)
            result = engine.generate([SequenceRequest(prompt, new_tokens)])[0]
            counted = engine.hop_bytes
        finally:
            client.close()
        chain = servers[-1].service._chain
        waiting = eventually(lambda: (len(chain._reply_to), [len(link._sends) for link in chain._links.values()],
                                      [s.service._inflight for s in servers]), (0, [0], [0, 0, 0]))
    assert len(result.token_ids) == new_tokens
    # two hops per step: the prompt's positions once, then one position per decode step
    assert counted == 2 * (len(prompt) + new_tokens - 1) * HIDDEN * FLOAT32
    assert waiting == (0, [0], [0, 0, 0]), "a chained step is still awaited somewhere"
