"""Bad input to both services gets the right status code and a useful message, and the servers keep serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from waiting import eventually

from coordinator.client import CoordinatorClient
from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos import codec, coordinator_pb2, stage_pb2, stage_pb2_grpc
from stage_server.stage_model import value_range

OK = grpc.StatusCode.OK


def forward_once(address: str, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
    with grpc.insecure_channel(address) as channel:
        return next(iter(stage_pb2_grpc.StageStub(channel).Forward(iter([request]), timeout=30)))


def valid_prefill(session_id: str, route, tokens=(5, 6, 7)) -> stage_pb2.ForwardRequest:
    ids = torch.tensor([list(tokens)])
    return stage_pb2.ForwardRequest(
        session_id=session_id, micro_batch_id=1, route=route, start_session=True,
        activations=codec.encode(ids), position_ids=codec.encode(torch.arange(len(tokens)).view(1, -1)),
        attention_mask=codec.encode(torch.ones_like(ids)))


def code_of(response) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == response.status_code)


def assert_still_serving(tiny_api):
    _, stage_addresses, _ = tiny_api
    pipeline = PipelineClient(stage_addresses)
    try:
        result = Engine(pipeline).generate([SequenceRequest([5, 6, 7], 3)])[0]
        assert len(result.token_ids) == 3
        sessions = eventually(lambda: [i.active_sessions for i in pipeline.stage_infos()], [0, 0])
        assert sessions == [0, 0], "no session may leak"
    finally:
        pipeline.close()


# ---- the Stage service ------------------------------------------------------------------------------

def _stage_cases(route):
    good = valid_prefill("s-bad", route)

    def variant(**changes):
        request = stage_pb2.ForwardRequest()
        request.CopyFrom(good)
        for field, value in changes.items():
            if isinstance(value, stage_pb2.Tensor):
                getattr(request, field).CopyFrom(value)
            elif isinstance(value, list):
                del getattr(request, field)[:]
                getattr(request, field).extend(value)
            else:
                setattr(request, field, value)
        return request

    truncated = codec.encode(torch.tensor([[5, 6, 7]]))
    truncated.data = truncated.data[:-3]
    float_ids = codec.encode(torch.randn(1, 3))
    wrong_positions = codec.encode(torch.arange(5).view(1, 5))
    wrong_mask = codec.encode(torch.ones(1, 9, dtype=torch.long))
    bad_dtype = codec.encode(torch.tensor([[5, 6, 7]]))
    bad_dtype.dtype = 99
    bad_codec = codec.encode(torch.tensor([[5, 6, 7]]))
    bad_codec.codec = 42
    huge_id = codec.encode(torch.tensor([[5, 6, 10_000]]))
    far_position = codec.encode(torch.tensor([[0, 1, 100_000]]))
    negative_position = codec.encode(torch.tensor([[0, -1, 2]]))
    long_huge_id = codec.encode(torch.tensor([[5] * 4999 + [10_000]]))  # past value_range's Python path
    unknown = variant(start_session=False)
    unknown.session_id = "never-started"
    return {
        "byte length mismatch": (variant(activations=truncated), grpc.StatusCode.INVALID_ARGUMENT, "byte"),
        "float token ids": (variant(activations=float_ids), grpc.StatusCode.INVALID_ARGUMENT, "token ids"),
        "positions shape": (variant(position_ids=wrong_positions), grpc.StatusCode.INVALID_ARGUMENT, "position_ids"),
        "mask shape": (variant(attention_mask=wrong_mask), grpc.StatusCode.INVALID_ARGUMENT, "attention_mask"),
        "unknown dtype": (variant(activations=bad_dtype), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        "token outside vocab": (variant(activations=huge_id), grpc.StatusCode.INVALID_ARGUMENT, "vocab"),
        "position past the model": (variant(position_ids=far_position), grpc.StatusCode.OUT_OF_RANGE, "positions"),
        "negative position": (variant(position_ids=negative_position), grpc.StatusCode.OUT_OF_RANGE, "positions"),
        "long prompt, token outside vocab": (variant(activations=long_huge_id), grpc.StatusCode.INVALID_ARGUMENT,
                                             "vocab"),
        "unknown wire codec": (variant(wire_codec=42), grpc.StatusCode.INVALID_ARGUMENT, "codec"),
        "unknown tensor codec": (variant(activations=bad_codec), grpc.StatusCode.INVALID_ARGUMENT, "codec"),
        "unknown session": (unknown, grpc.StatusCode.NOT_FOUND, "never-started"),
        "wrong fingerprint": (variant(model_fingerprint="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION,
                              "fingerprint"),
        "route too short": (variant(route=[]), grpc.StatusCode.FAILED_PRECONDITION, "route"),
    }


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 4096), (1, 0), (2, 3, 4)])
def test_value_range_matches_torch(shape):
    """Both of value_range's paths (Python ints for small 2-D tensors, a torch reduction otherwise)."""
    values = torch.randint(-50, 50_000, shape)
    expected = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    assert value_range(values) == expected


@pytest.mark.parametrize("case", list(_stage_cases(["x"]).keys()))
def test_stage_rejects(case, tiny_api):
    _, stage_addresses, _ = tiny_api
    request, code, words = _stage_cases(stage_addresses[1:])[case]
    response = forward_once(stage_addresses[0], request)
    assert code_of(response) == code, response.error_message
    assert words in response.error_message.lower() or words in response.error_message
    assert_still_serving(tiny_api)


def test_stage_errors_deeper_in_the_chain_come_back(tiny_api):
    """A bad hidden-state tensor sent straight to stage 1 is refused there with its name."""
    _, stage_addresses, _ = tiny_api
    request = valid_prefill("s-deep", [])
    request.activations.CopyFrom(codec.encode(torch.randn(1, 3, 7)))  # hidden size is 64
    response = forward_once(stage_addresses[1], request)
    assert code_of(response) == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden states" in response.error_message and "layers 2:4" in response.failed_stage
    assert_still_serving(tiny_api)


def test_stage_session_limit(tiny_model, stages):
    with stages(tiny_model("llama"), 1, max_sessions=1) as (addresses, _):
        first = forward_once(addresses[0], valid_prefill("a", []))
        assert first.status_code == 0
        second = forward_once(addresses[0], valid_prefill("b", []))
        assert code_of(second) == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions" in second.error_message


def test_stage_cache_budget(tiny_model, stages):
    with stages(tiny_model("llama"), 1, max_cache_bytes=10_000) as (addresses, _):
        response = forward_once(addresses[0], valid_prefill("big", [], tokens=list(range(5, 60))))
        assert code_of(response) == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget" in response.error_message
        client = PipelineClient(addresses)
        assert client.stage_infos()[0].active_sessions == 0, "a refused prefill leaves no session"
        client.close()


def test_end_session_requires_id(tiny_api):
    with grpc.insecure_channel(tiny_api[1][0]) as channel:
        with pytest.raises(grpc.RpcError) as err:
            stage_pb2_grpc.StageStub(channel).EndSession(stage_pb2.EndSessionRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_message_is_resource_exhausted(tiny_api, monkeypatch):
    """gRPC itself refuses a message above the configured limit, naming the limit."""
    with grpc.insecure_channel(tiny_api[0]) as channel:
        stub = channel.unary_unary("/layerline.v1.Coordinator/Generate",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda b: b)
        from protos import coordinator_pb2
        from protos.channel_options import DEFAULT_MAX_REQUEST_MB
        limit = DEFAULT_MAX_REQUEST_MB << 20
        big = coordinator_pb2.GenerateRequest(prompt="x" * (limit + 10))
        with pytest.raises(grpc.RpcError) as err:
            stub(big, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in err.value.details() or "larger than max" in err.value.details()


# ---- the Coordinator service --------------------------------------------------------------------------

COORDINATOR_CASES = {
    "empty request": (dict(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "two inputs": (dict(prompt="a", token_ids=[5]), grpc.StatusCode.INVALID_ARGUMENT, "only one"),
    "absurd max_new_tokens": (dict(prompt="a", max_new_tokens=10**9), grpc.StatusCode.OUT_OF_RANGE, "limit"),
    "negative max_new_tokens": (dict(prompt="a", max_new_tokens=-5), grpc.StatusCode.INVALID_ARGUMENT,
                                "max_new_tokens"),
    "context overflow": (dict(token_ids=[5] * 250, max_new_tokens=20), grpc.StatusCode.OUT_OF_RANGE, "context"),
    "token outside vocab": (dict(token_ids=[5, 999_999]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    "negative temperature": (dict(prompt="a", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    "top_p above one": (dict(prompt="a", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    "negative top_k": (dict(prompt="a", top_k=-3), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "bad chat role": (dict(messages=[{"role": "wizard", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT,
                      "role"),
    "empty stop string": (dict(prompt="a", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
}


@pytest.mark.parametrize("case", list(COORDINATOR_CASES))
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_coordinator_rejects(case, streaming, tiny_api):
    kwargs, code, words = COORDINATOR_CASES[case]
    with CoordinatorClient(tiny_api[0], timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            if streaming:
                list(client.generate_stream(**kwargs))
            else:
                client.generate(**kwargs)
        assert err.value.code() == code
        assert words in err.value.details()
        assert len(client.generate(prompt="still fine", max_new_tokens=2).token_ids) == 2
    assert_still_serving(tiny_api)


def test_coordinator_reports_stage_failure(tiny_model, stages):
    """A stage that goes away turns into UNAVAILABLE naming it, and the coordinator keeps serving others."""
    from conftest import running_coordinator

    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (addresses, servers):
        with running_coordinator(model_dir, addresses) as (address, _):
            with CoordinatorClient(address, timeout_s=30) as client:
                assert len(client.generate(prompt="ok", max_new_tokens=2).token_ids) == 2
                servers[1].stop()
                with pytest.raises(grpc.RpcError) as err:
                    client.generate(prompt="ok", max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert addresses[1] in err.value.details()
                assert client.model_info().num_layers == 4


def _edit_after_prefill(address, route, edit: stage_pb2.CacheEdit) -> stage_pb2.ForwardResponse:
    """Prefill a 1-row session, then send a decode step carrying `edit`; returns the step's answer."""
    step = stage_pb2.ForwardRequest(
        session_id="s-edit", micro_batch_id=2, route=route, activations=codec.encode(torch.tensor([[8]])),
        position_ids=codec.encode(torch.tensor([[3]])), attention_mask=codec.encode(torch.ones(1, 4, dtype=torch.long)))
    step.cache_edit.CopyFrom(edit)
    with grpc.insecure_channel(address) as channel:
        answers = sorted(stage_pb2_grpc.StageStub(channel).Forward(iter([valid_prefill("s-edit", route), step]),
                                                                    timeout=30), key=lambda a: a.micro_batch_id)
        stage_pb2_grpc.StageStub(channel).EndSession(stage_pb2.EndSessionRequest(session_id="s-edit", route=route))
    assert answers[0].status_code == 0, answers[0].error_message
    return answers[1]


@pytest.mark.parametrize("edit,code,words", [
    (stage_pb2.CacheEdit(keep_rows=[3]), grpc.StatusCode.INVALID_ARGUMENT, "keep_rows"),
    (stage_pb2.CacheEdit(keep_rows=[0, 0]), grpc.StatusCode.INVALID_ARGUMENT, "twice"),
    (stage_pb2.CacheEdit(keep_positions=99), grpc.StatusCode.INVALID_ARGUMENT, "keep_positions"),
    (stage_pb2.CacheEdit(append_sessions=["no-such-session"]), grpc.StatusCode.NOT_FOUND, "no-such-session"),
    (stage_pb2.CacheEdit(append_sessions=["s-edit"]), grpc.StatusCode.INVALID_ARGUMENT, "itself"),
], ids=["row out of range", "row twice", "too many positions", "unknown session", "merge with itself"])
def test_stage_rejects_bad_cache_edits(edit, code, words, tiny_api):
    _, stage_addresses, _ = tiny_api
    answer = _edit_after_prefill(stage_addresses[0], stage_addresses[1:], edit)
    assert code_of(answer) == code, answer.error_message
    assert words in answer.error_message
    assert_still_serving(tiny_api)


def test_coordinator_bounds_queue_and_cache(tiny_model, stages):
    """Beyond the batch bound requests queue (visible in GetModelInfo); beyond the queue, or a
    request that alone needs more cache than allowed, gets RESOURCE_EXHAUSTED."""
    import time

    from conftest import running_coordinator

    from coordinator.engine import BatchLimits

    model_dir = tiny_model("llama")
    limits = BatchLimits(max_batch_rows=1, max_queue=1, max_cache_positions=200)
    with stages(model_dir, 2) as (addresses, _), \
            running_coordinator(model_dir, addresses, batch_limits=limits) as (address, _):
        with CoordinatorClient(address) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate(token_ids=[5, 6, 7], max_new_tokens=199)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "cache positions" in err.value.details()

            running = client.generate_stream(token_ids=[5, 6, 7], max_new_tokens=150)
            next(running)  # admitted and generating: the only row the bound allows
            waiting = client.stub.Generate.future(coordinator_pb2.GenerateRequest(token_ids=[8, 9], max_new_tokens=4))
            deadline = time.monotonic() + 10
            while client.model_info().batching.queued != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            info = client.model_info().batching
            assert (info.queued, info.running, info.max_batch_rows, info.max_queue) == (1, 1, 1, 1)
            with pytest.raises(grpc.RpcError) as err:
                client.generate(token_ids=[10, 11], max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in err.value.details()
            running.cancel()
            assert len(waiting.result(timeout=30).token_ids) == 4, "the queued request runs once there is room"


def test_stage_refuses_appending_onto_an_empty_session(tiny_api):
    """Appending prefilled rows needs positions to align to; a brand-new session has none."""
    _, stage_addresses, _ = tiny_api
    address, route = stage_addresses[0], stage_addresses[1:]
    fresh = valid_prefill("s-fresh", route)
    fresh.micro_batch_id = 2
    fresh.cache_edit.CopyFrom(stage_pb2.CacheEdit(append_sessions=["s-full"]))
    with grpc.insecure_channel(address) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        answers = sorted(stub.Forward(iter([valid_prefill("s-full", route), fresh]), timeout=30),
                         key=lambda a: a.micro_batch_id)
        for name in ("s-full", "s-fresh"):
            stub.EndSession(stage_pb2.EndSessionRequest(session_id=name, route=route))
    assert answers[0].status_code == 0, answers[0].error_message
    assert code_of(answers[1]) == grpc.StatusCode.INVALID_ARGUMENT, answers[1].error_message
    assert "cached positions first" in answers[1].error_message
    assert_still_serving(tiny_api)


def test_more_waiting_generations_than_a_fixed_thread_pool_still_queue_visibly(tiny_model, stages):
    """Every waiting generation holds a coordinator thread: with room for 1 row and 100 queued,
    70 waiting requests (more than a 64-thread pool) all show in the queue, GetModelInfo still
    answers at once, and all of them run."""
    import time

    from conftest import running_coordinator

    from coordinator.engine import BatchLimits

    model_dir = tiny_model("llama")
    limits = BatchLimits(max_batch_rows=1, max_queue=100)
    with stages(model_dir, 2) as (addresses, _), \
            running_coordinator(model_dir, addresses, batch_limits=limits) as (address, _):
        with CoordinatorClient(address) as client:
            running = client.generate_stream(token_ids=[5, 6, 7], max_new_tokens=150)
            next(running)  # holds the only row
            waiting = [client.stub.Generate.future(coordinator_pb2.GenerateRequest(token_ids=[8, 9 + i % 20],
                                                                                   max_new_tokens=2))
                       for i in range(70)]
            deadline = time.monotonic() + 20
            queued = -1
            while queued != 70 and time.monotonic() < deadline:
                queued = client.stub.GetModelInfo(coordinator_pb2.GetModelInfoRequest(), timeout=5).batching.queued
                time.sleep(0.05)
            running.cancel()
            done = [len(w.result(timeout=60).token_ids) for w in waiting]
    assert queued == 70
    assert done == [2] * 70


def test_streams_past_the_bound_are_refused_and_their_slots_come_back(tiny_model, stages):
    """A stage serves at most max_streams Forward/Results streams: one more is refused with
    RESOURCE_EXHAUSTED naming --max-streams (not queued unseen in gRPC), Info still answers,
    and a closed stream frees its slot."""
    import queue

    with stages(tiny_model("llama"), 1, max_streams=2) as (addresses, _), \
            grpc.insecure_channel(addresses[0]) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        outboxes = [queue.Queue(), queue.Queue()]
        calls = [stub.Forward(iter(outbox.get, None), timeout=60) for outbox in outboxes]
        for index, (outbox, call) in enumerate(zip(outboxes, calls)):
            outbox.put(valid_prefill(f"held-{index}", []))
            assert code_of(next(call)) == OK  # both streams are open on the stage now
        with pytest.raises(grpc.RpcError) as refused:
            forward_once(addresses[0], valid_prefill("third", []))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in refused.value.details()
        assert stub.Info(stage_pb2.InfoRequest(), timeout=10).active_sessions == 2
        outboxes[0].put(None)
        assert list(calls[0]) == []  # the first stream ends

        def forward_code(session_id: str) -> grpc.StatusCode:
            try:
                return code_of(forward_once(addresses[0], valid_prefill(session_id, [])))
            except grpc.RpcError as err:
                return err.code()
        attempts = iter(range(1000))
        reopened = eventually(lambda: forward_code(f"after-{next(attempts)}"), OK)
        outboxes[1].put(None)
        list(calls[1])
    assert reopened == OK
