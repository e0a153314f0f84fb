"""Receipts of direct answers, and the hop sizes answers carry.

A micro-batch answered straight to the coordinator (reply_to) leaves only a receipt for the
previous stage's link; the first stage keeps the receipts it gets (nobody before it needs one),
so a chained token costs the stages no bookkeeping messages beyond one receipt. The answer itself
carries the size of every hop it took, so the coordinator's byte count stays exact, and nothing
is left waiting on any stage afterwards.
"""

from __future__ import annotations

import queue
import threading

import grpc
import torch
from waiting import eventually

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos import codec, stage_pb2, stage_pb2_grpc

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


def test_the_first_stage_keeps_receipts_and_the_answer_carries_its_hop_sizes(tiny_model, stages):
    model_dir = tiny_model("llama")
    prompt = [5, 6, 7, 8]
    with stages(model_dir, 2) as (addresses, servers):
        with grpc.insecure_channel(addresses[0]) as first, grpc.insecure_channel(addresses[1]) as last:
            results: queue.Queue = queue.Queue()
            subscription = stage_pb2_grpc.StageStub(last).Results(stage_pb2.ResultsRequest(collector_id="c1"))
            _collect(subscription, results)
            assert eventually(lambda: "c1" in servers[1].service._collectors, True)
            outbox: queue.Queue = queue.Queue()
            back: queue.Queue = queue.Queue()
            stream = stage_pb2_grpc.StageStub(first).Forward(iter(outbox.get, None))
            _collect(stream, back)
            outbox.put(stage_pb2.ForwardRequest(
                session_id="s", micro_batch_id=1, route=[addresses[1]], start_session=True,
                activations=codec.encode(torch.tensor([prompt])),
                position_ids=codec.encode(torch.arange(len(prompt)).view(1, -1)), logits_top_k=1, reply_to="c1"))
            answer = results.get(timeout=30)
            assert answer.status_code == 0 and not answer.answered_directly
            assert list(answer.hop_bytes) == [len(prompt) * HIDDEN * FLOAT32]
            assert eventually(lambda: servers[0].service._inflight, 0) == 0
            assert back.empty(), "the first stage relayed a receipt nobody needs"
            # errors still come back the way the step went
            outbox.put(stage_pb2.ForwardRequest(
                session_id="nobody", micro_batch_id=2, route=[addresses[1]],
                activations=codec.encode(torch.tensor([[5]])), position_ids=codec.encode(torch.tensor([[4]])),
                logits_top_k=1, reply_to="c1"))
            error = back.get(timeout=30)
            assert error.micro_batch_id == 2 and error.status_code == grpc.StatusCode.NOT_FOUND.value[0]
            outbox.put(None)
            subscription.cancel()
            assert eventually(lambda: [s.service._inflight for s in servers], [0, 0]) == [0, 0]


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
        waiting = eventually(lambda: (len(chain._reply_to), [len(link._pending) for link in chain._links.values()],
                                      [s.service._inflight for s in servers]), (0, [0], [0, 0, 0]))
    assert len(result.token_ids) == new_tokens
    # two hops per step: the prompt's positions once, then one position per decode step
    assert counted == 2 * (len(prompt) + new_tokens - 1) * HIDDEN * FLOAT32
    assert waiting == (0, [0], [0, 0, 0]), "a chained step is still awaited somewhere"
