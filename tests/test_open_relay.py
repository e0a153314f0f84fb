"""A stage sends only to its deployment (stage_server/deployment.py): a route, chain route or EndSession
route naming anything else is refused PERMISSION_DENIED before any connection (a listener on that
address sees nothing), over gRPC and the same-machine socket; SetDeployment is taken from this machine
and refused over plaintext from another host; --peers fills the allow-list too."""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import sys

import grpc
import pytest
import torch
from conftest import running_coordinator
from tiny_models import reference_greedy
from waiting import eventually

from protos import codec, stage_pb2, stage_pb2_grpc, unix_socket
from protos.unix_socket import FORWARD, FrameWriter, read_frames

PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@contextlib.contextmanager
def trap():
    """A plain TCP listener on a free loopback port and the same-machine socket a stage on that port
    would have; yields (address, connected), where connected(wait_s) says whether anything connected
    to either within wait_s."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    port = tcp.getsockname()[1]
    listeners = [tcp]
    if unix_socket.SUPPORTED:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(unix_socket.socket_name(port))
        unix.listen(8)
        listeners.append(unix)

    def connected(wait_s: float = 1.5) -> bool:
        readable, _, _ = select.select(listeners, [], [], wait_s)
        for listener in readable:  # take the connection and drop it: a stage dialling here gives up at once
            connection, _ = listener.accept()
            connection.close()
        return bool(readable)

    try:
        yield f"127.0.0.1:{port}", connected
    finally:
        for listener in listeners:
            listener.close()


def prefill_request(session_id: str, route=(), **fields) -> stage_pb2.ForwardRequest:
    ids = torch.tensor([[5, 6, 7]])
    return stage_pb2.ForwardRequest(session_id=session_id, micro_batch_id=1, route=list(route), start_session=True,
                                    activations=codec.encode(ids), position_ids=codec.encode(torch.arange(3)[None]),
                                    **fields)


def forward_grpc(address: str, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
    with grpc.insecure_channel(address) as channel:
        return next(iter(stage_pb2_grpc.StageStub(channel).Forward(iter([request]), timeout=30)))


def forward_unix(address: str, request: stage_pb2.ForwardRequest) -> stage_pb2.ForwardResponse:
    sock = unix_socket.connect(address, FORWARD)
    assert sock is not None, "the stage takes same-machine connections"
    sock.settimeout(30)  # a step answered to a collector sends nothing back this way
    writer = FrameWriter(sock, "test")
    try:
        writer.write(request)
        return next(read_frames(sock, stage_pb2.ForwardResponse.FromString))
    finally:
        writer.close()
        sock.close()


TRANSPORTS = [pytest.param(forward_grpc, id="grpc"),
              pytest.param(forward_unix, id="unix-socket",
                           marks=pytest.mark.skipif(not unix_socket.SUPPORTED, reason="Linux only"))]


@pytest.mark.parametrize("forward", TRANSPORTS)
def test_a_route_outside_the_deployment_is_refused_before_connecting(tiny_model, stages, forward):
    with stages(tiny_model("llama"), 2) as (addresses, _), trap() as (outside, connected):
        answer = forward(addresses[0], prefill_request("s", route=[outside]))
        assert answer.status_code == PERMISSION_DENIED.value[0]
        assert outside in answer.error_message and "not a stage of this deployment" in answer.error_message
        assert not connected(), "the stage connected to an address outside its deployment"
        # nothing was kept either: the refusal came before the session
        with grpc.insecure_channel(addresses[0]) as channel:
            assert stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10).active_sessions == 0


@pytest.mark.parametrize("forward", TRANSPORTS)
def test_a_chain_route_outside_the_deployment_is_refused_before_connecting(tiny_model, stages, forward):
    with stages(tiny_model("llama"), 2) as (addresses, servers), trap() as (outside, connected):
        with grpc.insecure_channel(addresses[1]) as channel:  # the last stage's collector: the chain would go on
            results = stage_pb2_grpc.StageStub(channel).Results(stage_pb2.ResultsRequest(collector_id="c"))
            assert eventually(lambda: "c" in servers[1].service.collectors, True)
            answer = forward(addresses[0], prefill_request(
                "s", route=addresses[1:], logits_top_k=1, reply_to="c", chain_steps=2,
                chain_route=[outside, addresses[1]]))
            results.cancel()
        assert answer.status_code == PERMISSION_DENIED.value[0] and "chain_route" in answer.error_message
        assert not connected(), "the last stage chained to an address outside its deployment"


def test_an_end_session_route_outside_the_deployment_is_refused_before_connecting(tiny_model, stages):
    with stages(tiny_model("llama"), 1) as (addresses, _), trap() as (outside, connected):
        with grpc.insecure_channel(addresses[0]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                stage_pb2_grpc.StageStub(channel).EndSession(
                    stage_pb2.EndSessionRequest(session_id="s", route=[outside]), timeout=10)
        assert refused.value.code() == PERMISSION_DENIED and outside in refused.value.details()
        assert not connected(), "EndSession connected to an address outside the deployment"


@pytest.mark.parametrize("how", ["SetDeployment", "--peers"])
def test_an_address_the_deployment_names_is_reached(tiny_model, stages, how):
    """The other side of the refusals above: once named, the same trap sees the stage connect (so the
    trap would have seen a connection there). SetDeployment comes over loopback without TLS."""
    with trap() as (outside, connected):
        peers = (outside,) if how == "--peers" else ()
        with stages(tiny_model("llama"), 2, peers=peers) as (addresses, _):
            if how == "SetDeployment":
                with grpc.insecure_channel(addresses[0]) as channel:
                    reply = stage_pb2_grpc.StageStub(channel).SetDeployment(
                        stage_pb2.SetDeploymentRequest(stages=[*addresses, outside]), timeout=10)
                assert reply.peers == 3
            with grpc.insecure_channel(addresses[0]) as channel:
                stream = stage_pb2_grpc.StageStub(channel).Forward(iter([prefill_request("s", route=[outside])]))
                assert connected(wait_s=20), "the stage did not go on to an address its deployment names"
                stream.cancel()


@pytest.mark.parametrize("chain", ["on", "off"])
def test_the_coordinator_tells_its_stages_their_deployment(tiny_model, stages, chain):
    """Stages nobody has told anything serve a coordinator's pipeline, token for token: the coordinator
    names the deployment once its stages check out."""
    from coordinator.client import CoordinatorClient

    model_dir = tiny_model("llama")
    prompt = [5, 6, 7, 8]
    with stages(model_dir, 3, tell_deployment=False) as (addresses, servers):
        assert not servers[0].service.deployment.allows(addresses[1])
        with running_coordinator(model_dir, addresses, chain=chain) as (address, _):
            with CoordinatorClient(address, timeout_s=60) as client:
                reply = client.generate(token_ids=prompt, max_new_tokens=8)
        assert all(server.service.deployment.allows(a) for server in servers for a in addresses)
    assert list(reply.token_ids) == reference_greedy(model_dir, [prompt], 8)[0]


def test_bad_set_deployment_and_peers_are_refused(tiny_model, stages):
    with stages(tiny_model("llama"), 1) as (addresses, _):
        with grpc.insecure_channel(addresses[0]) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            for stages_named in (["no-port"], ["a:1"] * 300, ["x:1 y:2"]):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.SetDeployment(stage_pb2.SetDeploymentRequest(stages=stages_named), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, stages_named
    run = subprocess.run([sys.executable, "-m", "stage_server.cli", "--model", "m", "--layers", "0:1",
                          "--peers", "10.0.0.2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--peers" in run.stderr and "host:port" in run.stderr


def test_a_session_id_longer_than_the_bound_is_refused(tiny_model, stages):
    long_id = "x" * 65
    with stages(tiny_model("llama"), 1) as (addresses, _):
        answer = forward_grpc(addresses[0], prefill_request(long_id))
        assert answer.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "64" in answer.error_message
        with grpc.insecure_channel(addresses[0]) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            for call, request in ((stub.EndSession, stage_pb2.EndSessionRequest(session_id=long_id)),
                                  (stub.StopChain, stage_pb2.StopChainRequest(session_id=long_id))):
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert forward_grpc(addresses[0], prefill_request("x" * 64)).status_code == 0  # the bound itself is fine


def test_session_ids_carry_128_random_bits():
    from concurrent.futures import Future

    from coordinator.engine import SequenceRequest
    from coordinator.running_batch import Group, Prefill
    from coordinator.sequence import LiveSequence

    ids = [Prefill([LiveSequence.from_request(SequenceRequest([5, 6], 1), lambda: True, Future())], 0, 64,
                   Group()).session_id for _ in range(64)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # every one of the 32 hex digits varies (a uuid4 fixes one digit and two bits of another)
    assert all(len({i[position] for i in ids}) > 1 for position in range(32))
