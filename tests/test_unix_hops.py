"""Same-machine hops over a Unix socket (protos/unix_socket.py, protos/unix_link.py,
stage_server/unix_listener.py): framing, never blocking the sender, which way a real pipeline's hops
go (the same tokens either way), bad connections, and that turning it off leaves them on gRPC."""

from __future__ import annotations

import socket
import struct
import threading
import time

import grpc
import pytest
import torch
from conftest import running_coordinator
from stalling import stalled_forward
from tiny_models import reference_greedy

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos import codec, stage_pb2, stage_pb2_grpc, unix_socket
from protos.grpc_link import GrpcLink
from protos.unix_link import UnixLink
from protos.unix_socket import FORWARD, RESULTS, FrameError, FrameWriter, read_frames
from stage_server import unix_listener
from stage_server.next_hop import NextHop

pytestmark = pytest.mark.skipif(not unix_socket.SUPPORTED, reason="abstract Unix sockets are Linux only")


def _request(micro_batch_id: int, payload: bytes = b"") -> stage_pb2.ForwardRequest:
    request = stage_pb2.ForwardRequest(session_id="s", micro_batch_id=micro_batch_id)
    request.activations.data = payload
    return request


def test_frames_round_trip_in_order():
    sender, receiver = socket.socketpair()
    writer = FrameWriter(sender, "test")
    sent = [_request(i, bytes([i]) * i) for i in range(20)]
    for request in sent:
        assert writer.write(request)
    writer.close()
    assert list(read_frames(receiver, stage_pb2.ForwardRequest.FromString)) == sent


def test_a_frame_the_socket_cannot_take_at_once_does_not_block_the_sender():
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    writer = FrameWriter(sender, "test")
    big = [_request(i, bytes([i]) * (1 << 20)) for i in range(3)]  # far more than the socket buffers
    started = time.perf_counter()
    for request in [*big, _request(3)]:
        assert writer.write(request)
    assert time.perf_counter() - started < 2.0  # nothing read yet: the writer thread holds the rest
    writer.close()
    received = list(read_frames(receiver, stage_pb2.ForwardRequest.FromString))
    assert [r.micro_batch_id for r in received] == [0, 1, 2, 3]
    assert received[:3] == big


def test_closing_after_the_backlog_has_drained_ends_the_writer_thread():
    sender, receiver = socket.socketpair()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    writer = FrameWriter(sender, "test")
    assert writer.write(_request(1, b"x" * (1 << 20)))  # too big for the socket: the writer thread starts
    frames = read_frames(receiver, stage_pb2.ForwardRequest.FromString)
    assert next(frames).micro_batch_id == 1  # all of it arrived: the thread now waits for more
    writer.close()
    writer._writer.join(5)
    assert not writer._writer.is_alive()
    assert list(frames) == []  # and the peer sees the end


def test_writing_to_a_closed_peer_fails_instead_of_raising():
    sender, receiver = socket.socketpair()
    receiver.close()
    writer = FrameWriter(sender, "test")
    assert not writer.write(_request(1)) or not writer.write(_request(2))
    assert writer.failed


@pytest.mark.parametrize(("raw", "message"), [
    (struct.pack("<I", 1 << 30), "exceeds"),
    (struct.pack("<I", 100) + b"x" * 10, "closed 10 bytes into"),
    (struct.pack("<I", 3) + b"\xff\xff\xff", "not a valid message"),
    (b"\x01\x00", "closed 2 bytes into"),
])
def test_malformed_frames_are_refused(raw, message):
    sender, receiver = socket.socketpair()
    sender.sendall(raw)
    sender.close()
    with pytest.raises(FrameError, match=message):
        list(read_frames(receiver, stage_pb2.ForwardRequest.FromString, max_bytes=1 << 20))


def _links_opened(monkeypatch) -> dict[str, list[str]]:
    """Addresses the stages' next-hop links were opened to, by the class of their transport."""
    opened: dict[str, list[str]] = {"GrpcLink": [], "UnixLink": []}

    def recording_init(self, link, address, deliver, on_closed, _original=NextHop.__init__):
        opened[type(link).__name__].append(address)
        _original(self, link, address, deliver, on_closed)

    monkeypatch.setattr(NextHop, "__init__", recording_init)
    return opened


def _generate(addresses: list[str], prompt: list[int], new_tokens: int, *, chain: bool = False,
              local_hops: bool = True) -> tuple[list[int], tuple[type, type]]:
    """The tokens, and the transports of the coordinator's stream to the first stage and from the last."""
    client = PipelineClient(addresses, local_hops=local_hops)
    try:
        tokens = Engine(client, chain=chain).generate([SequenceRequest(prompt, new_tokens)])[0].token_ids
        return tokens, (type(client._stream.link), type(client._results.link))
    finally:
        client.close()


@pytest.mark.parametrize("chain", [False, True], ids=["through the coordinator", "greedy chain"])
def test_a_local_pipeline_hops_over_the_sockets_with_the_same_tokens(tiny_model, stages, monkeypatch, chain):
    model_dir = tiny_model("llama")
    prompt = [5, 6, 7, 8, 9]
    with stages(model_dir, 3, local_hops=False) as (addresses, _):
        over_grpc, _ = _generate(addresses, prompt, 8, chain=chain, local_hops=False)
    opened = _links_opened(monkeypatch)
    with stages(model_dir, 3) as (addresses, servers):
        over_sockets, coordinator_streams = _generate(addresses, prompt, 8, chain=chain)
        assert _wait_for(lambda: [s.service._inflight for s in servers] == [0, 0, 0])
        # every stream ended with the client, but for the chain's: the last stage keeps its link to the
        # first, and the steps that come that way go on through links of that stream
        streams_left = [1, 1, 1] if chain else [0, 0, 0]
        assert _wait_for(lambda: [len(s.service.stream_slots) for s in servers] == streams_left)
    assert over_sockets == over_grpc and len(over_sockets) == 8
    assert coordinator_streams == (UnixLink, UnixLink)
    assert opened["GrpcLink"] == []
    assert set(opened["UnixLink"]) == set(addresses[1:] + (addresses[:1] if chain else []))


def test_off_keeps_every_hop_on_grpc(tiny_model, stages, monkeypatch):
    opened = _links_opened(monkeypatch)
    with stages(tiny_model("llama"), 2, local_hops=False) as (addresses, servers):
        assert all(server.local_hops is None for server in servers)
        _, coordinator_streams = _generate(addresses, [5, 6, 7], 3)  # the coordinator finds no socket either
    assert opened == {"GrpcLink": [addresses[1]], "UnixLink": []}
    assert coordinator_streams == (GrpcLink, GrpcLink)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_both_command_lines_take_the_setting(tiny_model, stages, setting):
    from coordinator.cli import build_parser as coordinator_parser
    from stage_server.cli import build_parser as stage_parser

    stage_args = stage_parser().parse_args(["--model", "m", "--layers", "0:1", "--local-hops", setting])
    serve_args = coordinator_parser().parse_args(["serve", "--stages", "a:1", "--model", "m", "--local-hops", setting])
    assert stage_args.local_hops == serve_args.local_hops == setting
    assert stage_parser().parse_args(["--model", "m", "--layers", "0:1"]).local_hops == "on"
    # a served coordinator reaches the stages as told
    with stages(tiny_model("llama"), 2) as (addresses, _), \
            running_coordinator(tiny_model("llama"), addresses, local_hops=setting == "on") as (_, server):
        pipeline = server.routes.new_route(lambda address: 0)  # the one route of a single chain
        pipeline._live_stream()
        pipeline._collector_id()
        kinds = type(pipeline._stream.link), type(pipeline._results.link)
    assert kinds == ((UnixLink, UnixLink) if setting == "on" else (GrpcLink, GrpcLink))


def test_errors_come_back_over_the_socket_and_a_bad_upstream_is_dropped(tiny_model, stages):
    with stages(tiny_model("llama"), 2) as (addresses, servers):
        port = servers[1].port
        # an error for a micro-batch is answered on the same connection, in-band
        sock = unix_socket.connect(addresses[1], FORWARD)
        writer = FrameWriter(sock, "test")
        writer.write(stage_pb2.ForwardRequest(session_id="nobody", micro_batch_id=4,
                                              activations=codec.encode(torch.zeros(1, 1, 64)),
                                              position_ids=codec.encode(torch.tensor([[3]]))))
        answers = read_frames(sock, stage_pb2.ForwardResponse.FromString)
        answer = next(answers)
        assert answer.micro_batch_id == 4 and answer.status_code == grpc.StatusCode.NOT_FOUND.value[0]
        writer.close()
        assert list(answers) == []  # the stage ends the stream once the upstream has
        sock.close()
        # garbage on the socket drops that connection only; the stage still serves
        for raw in (FORWARD + struct.pack("<I", 1 << 31), b"X", RESULTS + struct.pack("<I", 0)):
            garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            garbage.connect(unix_socket.socket_name(port))
            garbage.sendall(raw)
            assert _closed_by_stage(garbage), raw
            garbage.close()
        with grpc.insecure_channel(addresses[1]) as channel:
            info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
        assert info.layer_end > 0
        assert _wait_for(lambda: len(servers[1].service.stream_slots) == 0)


def test_a_connection_beyond_max_streams_is_refused(tiny_model, stages):
    with stages(tiny_model("llama"), 2, max_streams=1) as (addresses, servers):
        first = unix_socket.connect(addresses[1], FORWARD)
        assert _wait_for(lambda: len(servers[1].service.stream_slots) == 1)
        # refused: no socket, so a coordinator falls back to gRPC, which refuses with RESOURCE_EXHAUSTED
        # and says why
        assert unix_socket.connect(addresses[1], RESULTS) is None
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(unix_socket.socket_name(servers[1].port))
        raw.settimeout(10)
        assert raw.recv(1) == unix_socket.REFUSED
        raw.close()
        with grpc.insecure_channel(addresses[1]) as channel:
            results = stage_pb2_grpc.StageStub(channel).Results(stage_pb2.ResultsRequest(collector_id="c"))
            with pytest.raises(grpc.RpcError) as refused:
                next(results)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in refused.value.details()
        first.close()
        assert _wait_for(lambda: len(servers[1].service.stream_slots) == 0)


def test_stopping_lets_a_stream_finish_what_it_has(tiny_model, stages):
    """On stop, an answer still on its way goes back before the connection ends (a grace, like gRPC's)."""
    with stages(tiny_model("llama"), 1) as (addresses, servers):
        service = servers[0].service
        with stalled_forward(service) as (computing, release):
            sock = unix_socket.connect(addresses[0], FORWARD)
            FrameWriter(sock, "test").write(stage_pb2.ForwardRequest(
                session_id="s", micro_batch_id=1, start_session=True, logits_top_k=1,
                activations=codec.encode(torch.tensor([[5, 6, 7]])), position_ids=codec.encode(torch.arange(3)[None])))
            assert computing.wait(30)
            threading.Timer(0.3, release.set).start()  # finishes during the grace
            servers[0].local_hops.close(grace_s=10)
        answers = list(read_frames(sock, stage_pb2.ForwardResponse.FromString))
        sock.close()
    assert [(a.micro_batch_id, a.status_code, len(a.top_token_ids.data) > 0) for a in answers] == [(1, 0, True)]


def test_a_context_that_has_ended_runs_a_late_callback_at_once():
    context = unix_listener._ConnectionContext()
    ran = []
    assert context.add_callback(lambda: ran.append("early"))
    context.ended()
    assert not context.add_callback(lambda: ran.append("late"))
    context.ended()
    assert ran == ["early", "late"]


def test_a_stopped_stage_closes_its_socket(tiny_model, stages):
    with stages(tiny_model("llama"), 1) as (addresses, servers):
        assert unix_socket.connect(addresses[0], FORWARD) is not None
        servers[0].stop()
        assert unix_socket.connect(addresses[0], FORWARD) is None


def _closed_by_stage(sock: socket.socket) -> bool:
    """Whether the stage closed the connection, after at most its ACCEPTED byte (an end of stream, or
    a reset if it left bytes unread)."""
    sock.settimeout(10)
    received = b""
    try:
        while chunk := sock.recv(16):
            received += chunk
    except ConnectionResetError:
        pass
    return received in (b"", unix_socket.ACCEPTED)


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _no_answers(request_or_requests, context):
    return iter(())


def test_a_results_subscription_over_the_socket_gets_answers_sent_to_its_collector(tiny_model, stages):
    with stages(tiny_model("llama"), 2) as (addresses, servers):
        last = servers[1].service
        sock = unix_socket.connect(addresses[1], RESULTS)
        FrameWriter(sock, "test").write(stage_pb2.ResultsRequest(collector_id="c9"))
        assert _wait_for(lambda: "c9" in last.collectors)
        last.collectors.get("c9").put(stage_pb2.ForwardResponse(session_id="s", micro_batch_id=3))
        answers = read_frames(sock, stage_pb2.ForwardResponse.FromString)
        assert next(answers).micro_batch_id == 3
        sock.shutdown(socket.SHUT_WR)  # the coordinator goes away: the subscription ends, its slot is free
        assert _wait_for(lambda: "c9" not in last.collectors and len(last.stream_slots) == 0)
        sock.close()
        # an empty collector id is refused, as over gRPC
        refused = unix_socket.connect(addresses[1], RESULTS)
        FrameWriter(refused, "test").write(stage_pb2.ResultsRequest())
        assert _closed_by_stage(refused)
        refused.close()
        assert _wait_for(lambda: len(last.stream_slots) == 0)


def test_the_last_stage_writes_answers_to_a_local_subscription_from_its_compute_thread(tiny_model, stages,
                                                                                       monkeypatch):
    """Answers for a coordinator subscribed over the socket leave from the thread that made them (no
    hand-off to the connection's thread); a subscription whose socket fails ends and frees its slot."""
    from stage_server import collectors

    sent_from: list[str] = []
    put = collectors.SendingCollector.put

    def recording_put(self, answer):
        sent_from.append(threading.current_thread().name)
        return put(self, answer)

    monkeypatch.setattr(collectors.SendingCollector, "put", recording_put)
    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (addresses, servers):
        tokens, kinds = _generate(addresses, [5, 6, 7], 6)
        assert kinds[1] is UnixLink
        last = servers[1].service
        sock = unix_socket.connect(addresses[1], RESULTS)
        FrameWriter(sock, "test").write(stage_pb2.ResultsRequest(collector_id="gone"))
        assert _wait_for(lambda: "gone" in last.collectors)
        collector = last.collectors.get("gone")
        sock.close()  # the coordinator vanishes; the next answer's send fails and ends the subscription
        collector.put(stage_pb2.ForwardResponse(session_id="s", micro_batch_id=1))
        assert _wait_for(lambda: "gone" not in last.collectors and len(last.stream_slots) == 0)
    assert tokens == reference_greedy(model_dir, [[5, 6, 7]], 6)[0]
    decode_answers = sent_from[:-1]  # the last put was the test's own
    assert len(decode_answers) >= 6 and all(name.startswith("compute") for name in decode_answers), sent_from


def test_two_stages_cannot_share_a_socket_name():
    name = unix_socket.socket_name(1)  # port 1: no stage of these tests listens there
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(name)
    try:
        with pytest.raises(OSError):
            unix_listener.UnixListener(1, _no_answers, _no_answers, lambda: True, lambda: None)
    finally:
        holder.close()
    listener = unix_listener.UnixListener(1, _no_answers, _no_answers, lambda: True, lambda: None)
    listener.close()
    again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    again.bind(name)  # a closed listener leaves the name free
    again.close()
