"""What a stage keeps for a bad request: nothing it did not keep before the request came. Steps are
checked in full before a session is started or kept alive, their sizes are bounded before anything is
decoded, ids are bounded before any table stores them, and a same-machine peer that announces a huge
frame costs the stage only what it actually sends."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import pytest
import torch
from test_bad_input import code_of, forward_once, valid_prefill
from waiting import eventually, stage_sessions

from protos import codec, stage_pb2, stage_pb2_grpc
from protos.unix_socket import FORWARD, socket_name

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _decode_step(session_id: str, cached: int, *, mask_columns: int | None = None) -> stage_pb2.ForwardRequest:
    """One decode step of a 1-row session holding `cached` positions (a wrong mask width makes it invalid)."""
    return stage_pb2.ForwardRequest(
        session_id=session_id, micro_batch_id=cached + 1, activations=codec.encode(torch.tensor([[8]])),
        position_ids=codec.encode(torch.tensor([[cached]])),
        attention_mask=codec.encode(torch.ones(1, mask_columns or cached + 1, dtype=torch.long)))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def one_stage(tiny_model):
    """One stage holding the whole tiny model: (address, server)."""
    from conftest import running_stages

    with running_stages(tiny_model("llama"), 1, max_step_tokens=1000, session_timeout_s=2.0) as (addresses, servers):
        yield addresses[0], servers[0]


def test_an_invalid_replay_leaves_the_live_session_as_it_was(one_stage):
    """start_session on a live id with a step that fails its checks changes nothing: the session
    keeps its cache and its next step runs."""
    address, _ = one_stage
    assert code_of(forward_once(address, valid_prefill("victim", []))) == grpc.StatusCode.OK
    bad_replay = valid_prefill("victim", [])
    bad_replay.attention_mask.CopyFrom(codec.encode(torch.ones(1, 9, dtype=torch.long)))
    answer = forward_once(address, bad_replay)
    assert code_of(answer) == INVALID and "attention_mask" in answer.error_message
    follow_up = forward_once(address, _decode_step("victim", 3))
    assert code_of(follow_up) == grpc.StatusCode.OK, follow_up.error_message
    with grpc.insecure_channel(address) as channel:
        stage_pb2_grpc.StageStub(channel).EndSession(stage_pb2.EndSessionRequest(session_id="victim"), timeout=10)


def test_invalid_steps_do_not_keep_a_session_alive(one_stage):
    """A session fed only steps that fail their checks expires after --session-timeout (2 s here)."""
    address, _ = one_stage
    assert code_of(forward_once(address, valid_prefill("idle", []))) == grpc.StatusCode.OK
    deadline = time.monotonic() + 4.0
    answers = []
    while time.monotonic() < deadline and len(answers) < 200:
        answers.append(code_of(forward_once(address, _decode_step("idle", 3, mask_columns=9))))
        time.sleep(0.1)
    assert INVALID in answers
    assert code_of(forward_once(address, _decode_step("idle", 3))) == grpc.StatusCode.NOT_FOUND
    assert eventually(lambda: stage_sessions([address]), [0]) == [0]


def test_a_step_above_the_step_bound_is_refused_before_it_runs(one_stage):
    """rows × tokens above --max-step-tokens (1000 here) is RESOURCE_EXHAUSTED naming the flag, from
    the declared shape alone, and leaves no session."""
    address, _ = one_stage
    rows = 2000
    big = stage_pb2.ForwardRequest(
        session_id="wide", micro_batch_id=1, start_session=True,
        activations=codec.encode(torch.full((rows, 1), 5)), position_ids=codec.encode(torch.zeros(rows, 1).long()))
    answer = forward_once(address, big)
    assert code_of(answer) == grpc.StatusCode.RESOURCE_EXHAUSTED, answer.error_message
    assert "--max-step-tokens" in answer.error_message and "2000 rows" in answer.error_message
    claimed = valid_prefill("claimed", [])
    claimed.activations.shape[:] = [1 << 20, 1 << 20]  # a few bytes that claim 2^40 token ids
    answer = forward_once(address, claimed)
    assert code_of(answer) == grpc.StatusCode.RESOURCE_EXHAUSTED, answer.error_message
    assert stage_sessions([address]) == [0]


def test_overlong_ids_are_refused_before_they_are_kept(one_stage):
    address, _ = one_stage
    long_id = "s" * 65
    answer = forward_once(address, valid_prefill(long_id, []))
    assert code_of(answer) == INVALID and "at most 64" in answer.error_message
    assert stage_sessions([address]) == [0]
    with grpc.insecure_channel(address) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        for call, request in ((stub.StopChain, stage_pb2.StopChainRequest(session_id="x" * 1_000_000)),
                              (stub.EndSession, stage_pb2.EndSessionRequest(session_id=long_id)),
                              (lambda r, timeout: list(stub.Results(r, timeout=timeout)),
                               stage_pb2.ResultsRequest(collector_id=long_id))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == INVALID and "at most 64" in err.value.details()
    server = one_stage[1]
    assert not server.service._chain._stops, "a refused StopChain is not remembered"


def test_unknown_fields_are_refused_by_the_stage(one_stage):
    """A ForwardRequest or EndSessionRequest with a field the stage's schema lacks, or a field sent
    with the wrong wire type, is INVALID_ARGUMENT naming it, and starts no session."""
    address, _ = one_stage
    undeclared = valid_prefill("extra", []).SerializeToString() + bytes([0xF0, 0x01, 1])  # field 30, varint 1
    wrong_type = valid_prefill("extra", []).SerializeToString() + bytes([(8 << 3) | 2, 1, 1])  # start_session
    with grpc.insecure_channel(address) as channel:
        forward = channel.stream_stream("/layerline.v1.Stage/Forward", request_serializer=None,
                                        response_deserializer=stage_pb2.ForwardResponse.FromString)
        for payload, words in ((undeclared, "field 30"), (wrong_type, "field 8 (start_session)")):
            answer = next(iter(forward(iter([payload]), timeout=30)))
            assert code_of(answer) == INVALID and words in answer.error_message, answer.error_message
        end = channel.unary_unary("/layerline.v1.Stage/EndSession", request_serializer=None,
                                  response_deserializer=stage_pb2.EndSessionResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            end(stage_pb2.EndSessionRequest(session_id="a").SerializeToString() + bytes([(9 << 3) | 0, 1]),
                timeout=10)
        assert err.value.code() == INVALID and "field 9" in err.value.details()
    assert stage_sessions([address]) == [0]


def test_the_cache_budget_error_names_the_flag(tiny_model, stages):
    with stages(tiny_model("llama"), 1, max_cache_bytes=10_000) as (addresses, _):
        answer = forward_once(addresses[0], valid_prefill("big", [], tokens=list(range(5, 60))))
    assert code_of(answer) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-cache-mb" in answer.error_message


def test_same_machine_peers_that_only_announce_huge_frames_cost_little(one_stage):
    """Four same-machine connections that send a 256 MiB frame's length and nothing more: the stage
    holds about a MiB for each, not the announced size, and still serves."""
    address, server = one_stage
    before = _rss_mb()
    peers = []
    try:
        for _ in range(4):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.settimeout(10)
            peer.connect(socket_name(server.port))
            peer.sendall(FORWARD)
            assert peer.recv(1) == b"+"
            peer.sendall((255 << 20).to_bytes(4, "little") + b"\x08")
            peers.append(peer)
        time.sleep(1.0)  # the stage's readers are waiting for the rest of each frame
        grown = _rss_mb() - before
        assert code_of(forward_once(address, valid_prefill("meanwhile", []))) == grpc.StatusCode.OK
    finally:
        for peer in peers:
            peer.close()
    assert grown < 100, f"the stage grew {grown:.0f} MB for frames that never came"


def test_stop_chain_requests_for_no_running_chain_are_remembered_up_to_a_bound():
    from stage_server.greedy_chain import MAX_REMEMBERED_STOPS, GreedyChain

    chain = GreedyChain(lambda *args: None, lambda collector_id: None)
    for index in range(MAX_REMEMBERED_STOPS + 500):
        chain.stop(f"junk-{index}")
    assert len(chain._stops) == MAX_REMEMBERED_STOPS
    assert f"junk-{MAX_REMEMBERED_STOPS + 499}" in chain._stops and "junk-0" not in chain._stops
