"""A stage's stream slots: streams that stay silent longer than --stream-idle-timeout give their slot up
to a new stream, only when one is needed; a stream refused for want of a slot is told so."""

from __future__ import annotations

import queue
import time

import grpc
import pytest
from test_bad_input import valid_prefill

from coordinator.client import CoordinatorClient
from protos import stage_pb2_grpc
from stage_server.stream_slots import StreamSlots


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_slot_is_reclaimed_only_when_needed_and_only_from_a_stream_idle_past_the_timeout():
    clock = FakeClock()
    slots = StreamSlots(2, idle_timeout_s=10, clock=clock)
    ended = []
    first = slots.acquire(lambda: ended.append("first"))
    second = slots.acquire(lambda: ended.append("second"))
    clock.now = 5
    assert slots.acquire(lambda: ended.append("third")) is None, "every stream spoke within the timeout"
    clock.now = 11
    list(second.watch([1]))  # the second stream is active
    third = slots.acquire(lambda: ended.append("third"))
    assert third is not None and ended == ["first"] and len(slots) == 2
    slots.release(first)  # the reclaimed stream ends later: its release frees nothing twice
    assert len(slots) == 2
    slots.release(third)
    assert len(slots) == 1


def _silent_streams(address: str, count: int):
    """`count` Forward streams that open and then send nothing: (channel, calls, outboxes)."""
    channel = grpc.insecure_channel(address)
    stub = stage_pb2_grpc.StageStub(channel)
    outboxes = [queue.Queue() for _ in range(count)]
    calls = [stub.Forward(iter(outbox.get, None), timeout=120) for outbox in outboxes]
    return channel, calls, outboxes


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _end(channel, calls, outboxes) -> None:
    for outbox in outboxes:
        outbox.put(None)
    for call in calls:
        call.cancel()
    channel.close()


def test_silent_streams_give_their_slots_to_a_new_coordinator(tiny_model, stages):
    """Two streams that hold both slots of a stage and stay silent past the idle timeout (1 s) are
    ended when a coordinator needs a slot; the coordinator generates."""
    from conftest import running_coordinator

    model_dir = tiny_model("llama")
    with stages(model_dir, 1, max_streams=2, stream_idle_timeout_s=1.0) as (addresses, servers):
        silent = _silent_streams(addresses[0], 2)
        try:
            assert _wait_for(lambda: len(servers[0].service.stream_slots) == 2)
            time.sleep(1.5)
            with running_coordinator(model_dir, addresses) as (address, _), \
                    CoordinatorClient(address, timeout_s=30) as client:
                assert len(client.generate(prompt="hello", max_new_tokens=2).token_ids) == 2
            assert _wait_for(lambda: any(call.done() for call in silent[1]))
            assert [call.code() for call in silent[1] if call.done()] == [grpc.StatusCode.CANCELLED]
        finally:
            _end(*silent)


def test_a_coordinator_refused_a_slot_is_told_why(tiny_model, stages):
    """With every slot held by a stream active within the timeout, a new coordinator's request fails
    RESOURCE_EXHAUSTED naming --max-streams, not with a closed stream."""
    from conftest import running_coordinator

    model_dir = tiny_model("llama")
    with stages(model_dir, 1, max_streams=1) as (addresses, servers):
        silent = _silent_streams(addresses[0], 1)
        try:
            silent[2][0].put(valid_prefill("holder", []))
            next(silent[1][0])
            with running_coordinator(model_dir, addresses) as (address, _), \
                    CoordinatorClient(address, timeout_s=30) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.generate(prompt="hello", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "--max-streams" in err.value.details()
        finally:
            _end(*silent)


def test_an_idle_coordinator_keeps_its_streams_while_there_is_room_and_reopens_one_it_lost(tiny_model, stages):
    from conftest import running_coordinator

    model_dir = tiny_model("llama")
    with stages(model_dir, 2, max_streams=2, stream_idle_timeout_s=1.0) as (addresses, servers), \
            running_coordinator(model_dir, addresses) as (address, coordinator), \
            CoordinatorClient(address, timeout_s=30) as client:
        assert len(client.generate(prompt="hello", max_new_tokens=3).token_ids) == 3
        pipeline = coordinator.routes.new_route(lambda address: 0)  # the one route of a single chain
        streams = (pipeline._stream, pipeline._results)
        time.sleep(1.5)  # idle past the timeout, with room on every stage: nothing is cut
        assert all(stream.alive for stream in streams)
        assert len(client.generate(prompt="hello", max_new_tokens=3).token_ids) == 3
        assert (pipeline._stream, pipeline._results) == streams
        time.sleep(1.5)
        silent = _silent_streams(addresses[0], 2)  # the first stage's slots: one free, one the coordinator's
        try:
            assert _wait_for(lambda: not streams[0].alive), "the idle coordinator's stream gave its slot up"
            time.sleep(1.5)  # now the newcomers are idle past the timeout in turn
            assert len(client.generate(prompt="hello", max_new_tokens=3).token_ids) == 3
            assert pipeline._stream is not streams[0] and pipeline._stream.alive
        finally:
            _end(*silent)
