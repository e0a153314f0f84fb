"""A cancelled stream or an expired deadline stops the work and frees the session on every stage."""

from __future__ import annotations

import contextlib
import time

import grpc
import pytest
from waiting import eventually, stage_sessions

from coordinator.client import CoordinatorClient
from coordinator.pipeline_client import PipelineClient


def served(stage_addresses) -> list[int]:
    client = PipelineClient(stage_addresses)
    try:
        return [info.micro_batches_served for info in client.stage_infos()]
    finally:
        client.close()


def assert_work_stopped(stage_addresses, before: list[int], budget: int) -> None:
    """Sessions are gone, and the stages stopped computing well short of the whole request."""
    assert wait_for_no_sessions(stage_addresses) == [0, 0]
    after = served(stage_addresses)
    time.sleep(0.5)
    assert served(stage_addresses) == after, "no more work after the session ended"
    assert all(a - b < budget for a, b in zip(after, before)), (before, after)


def wait_for_no_sessions(stage_addresses, timeout_s=10.0):
    return eventually(lambda: stage_sessions(stage_addresses), [0] * len(stage_addresses), timeout_s)


def test_cancelled_stream_frees_sessions(tiny_api):
    address, stage_addresses, _ = tiny_api
    before = served(stage_addresses)
    with CoordinatorClient(address) as client:
        stream = client.generate_stream(prompt="cancel me", max_new_tokens=200)
        received = [next(stream) for _ in range(3)]
        assert all(m.token_ids for m in received)
        live_during = PipelineClient(stage_addresses)
        try:
            assert [i.active_sessions for i in live_during.stage_infos()] == [1, 1], "the session lives on both"
        finally:
            live_during.close()
        stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    assert_work_stopped(stage_addresses, before, budget=100)


@contextlib.contextmanager
def slowed_forward(server, delay_s: float):
    """Each forward of `server`'s stage takes at least `delay_s` longer, so a request's length in
    time does not depend on how fast this machine runs the tiny model."""
    model = server.service.model
    forward = model.forward

    def slowed(*args, **kwargs):
        time.sleep(delay_s)
        return forward(*args, **kwargs)

    model.forward = slowed
    try:
        yield
    finally:
        model.forward = forward


def test_expired_deadline_frees_sessions(tiny_api, stages):
    """230 tokens at 5 ms or more a step on each of two stages take over 2 s: a 0.3 s deadline
    expires mid-generation."""
    from conftest import running_coordinator

    _, _, model_dir = tiny_api
    with stages(model_dir, 2) as (stage_addresses, servers), slowed_forward(servers[0], 0.005), \
            slowed_forward(servers[1], 0.005), running_coordinator(model_dir, stage_addresses) as (address, _):
        before = served(stage_addresses)
        with CoordinatorClient(address, timeout_s=0.3) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate(token_ids=[5] * 20, max_new_tokens=230)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_work_stopped(stage_addresses, before, budget=200)
        with CoordinatorClient(address, timeout_s=30) as client:
            assert len(client.generate(prompt="after", max_new_tokens=3).token_ids) == 3


class _Aborted(Exception):
    pass


class _StoppedContext:
    """What the servicer sees of a call whose deadline passed (or that the client cancelled)."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining, self.status = remaining, None

    def time_remaining(self):
        return self.remaining

    def code(self):  # as grpc.ServicerContext.code(): the status the handler ended the call with
        return self.status

    def invocation_metadata(self):
        return ()

    def send_initial_metadata(self, metadata):
        pass

    def abort(self, code, details):
        self.status = code
        raise _Aborted(details)


@pytest.mark.parametrize("remaining, code", [(-0.001, grpc.StatusCode.DEADLINE_EXCEEDED),
                                             (None, grpc.StatusCode.CANCELLED)])
def test_a_stopped_stream_ends_with_its_reason_not_ok(remaining, code, monkeypatch):
    """A stream whose work stopped must not end with OK: a client whose own timer has not fired yet
    takes that for a finished answer with no tokens (as a Go client with a 1 ms deadline does)."""
    from types import SimpleNamespace

    from coordinator import service as service_module
    from coordinator.engine import GenerationCancelled

    def stopped(*args, **kwargs):
        raise GenerationCancelled("stopped")

    servicer = service_module.CoordinatorService(engine=None, tokenization=None, limits=None, model_info=None)
    monkeypatch.setattr(servicer, "_prepare", lambda request, context: SimpleNamespace(prompt_ids=[1], stop=()))
    monkeypatch.setattr(servicer, "_run", stopped)
    monkeypatch.setattr(service_module, "TextStream", lambda tokenization, stop: None)
    for call in (servicer.GenerateStream, servicer.Generate):
        context = _StoppedContext(remaining)
        with pytest.raises(_Aborted):
            result = call(None, context)
            if call == servicer.GenerateStream:
                list(result)
        assert context.status == code, call.__name__
