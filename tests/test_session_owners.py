"""Sessions belong to the peer that opened them (stage_server/sessions.py, deployment.Caller,
peer_identity): a peer from another host cannot step, replace, merge, end or stop a session this
machine opened, nor set the deployment over plaintext; its own sessions work from any of its
connections; a stage of the deployment (a chained step's sender) may. The other host is an address
of a veth pair in this machine's subnet for tests, so its calls arrive from a non-loopback address."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import grpc
import pytest
import torch
from test_open_relay import forward_grpc, prefill_request
from waiting import eventually

from protos import codec, stage_pb2, stage_pb2_grpc
from stage_server import deployment as deployment_module
from stage_server.deployment import Caller, Deployment
from stage_server.errors import PermissionDenied, SessionNotFound
from stage_server.peer_identity import THIS_MACHINE, peer_of
from stage_server.sessions import SessionStore

OTHER_HOST = "10.243.0.1"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@contextlib.contextmanager
def other_host_address():
    """OTHER_HOST as an address of this machine (one end of a veth pair whose other end is in a network
    namespace of its own), removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a veth pair")
    suffix = os.getpid() % 100000
    namespace, link = f"relay-t{suffix}", f"relay-h{suffix}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    try:
        ip("netns", "add", namespace)
        ip("link", "add", link, "type", "veth", "peer", "name", "relay-n", "netns", namespace)
        ip("addr", "add", f"{OTHER_HOST}/24", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", namespace, "link", "set", "relay-n", "up")
        yield OTHER_HOST
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def decode_request(session_id: str, **fields) -> stage_pb2.ForwardRequest:
    tokens, positions = codec.encode(torch.tensor([[9]])), codec.encode(torch.tensor([[3]]))
    return stage_pb2.ForwardRequest(session_id=session_id, micro_batch_id=2, activations=tokens, position_ids=positions,
                                    **fields)


def code_of(answer: stage_pb2.ForwardResponse) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == answer.status_code)


def refused_code(call, request) -> grpc.StatusCode | None:
    try:
        call(request, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return None


def test_a_session_of_this_machine_is_out_of_reach_of_another_host(tiny_model, stages):
    with other_host_address() as host, stages(tiny_model("llama"), 1, host="0.0.0.0") as (addresses, servers):
        port = servers[0].port
        local, remote = addresses[0], f"{host}:{port}"
        assert forward_grpc(local, prefill_request("victim")).status_code == 0
        # the stranger: steps, replaces, merges into its own, ends and stops the victim's session
        assert code_of(forward_grpc(remote, decode_request("victim"))) == PERMISSION_DENIED
        assert code_of(forward_grpc(remote, prefill_request("victim"))) == PERMISSION_DENIED
        assert forward_grpc(remote, prefill_request("mine")).status_code == 0
        merge = decode_request("mine", cache_edit=stage_pb2.CacheEdit(append_sessions=["victim"]))
        assert code_of(forward_grpc(remote, merge)) == PERMISSION_DENIED
        with grpc.insecure_channel(remote) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            assert refused_code(stub.EndSession, stage_pb2.EndSessionRequest(session_id="victim")) == PERMISSION_DENIED
            assert refused_code(stub.StopChain, stage_pb2.StopChainRequest(session_id="victim")) == PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as refused:
                stub.SetDeployment(stage_pb2.SetDeploymentRequest(stages=[remote]), timeout=10)
            assert refused.value.code() == PERMISSION_DENIED and "--peers" in refused.value.details()
        # the victim's session is intact; the stranger's own works from a new connection of its host
        victim_step = forward_grpc(local, decode_request("victim"))
        assert victim_step.status_code == 0, victim_step.error_message
        assert forward_grpc(remote, decode_request("mine")).status_code == 0
        with grpc.insecure_channel(local) as channel:  # this machine may end any session here
            stub = stage_pb2_grpc.StageStub(channel)
            assert stub.EndSession(stage_pb2.EndSessionRequest(session_id="mine"), timeout=10).stages_freed == 1
            assert stub.EndSession(stage_pb2.EndSessionRequest(session_id="victim"), timeout=10).stages_freed == 1


def test_the_subscriber_of_a_sessions_collector_may_stop_its_chain(tiny_model, stages):
    """On the last stage the session was opened by the stage before; the coordinator stops its chain,
    known as the subscriber of the collector the session's answers go to."""
    with other_host_address() as host, stages(tiny_model("llama"), 1, host="0.0.0.0") as (addresses, servers):
        local, remote = addresses[0], f"{host}:{servers[0].port}"
        with grpc.insecure_channel(remote) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            results = stub.Results(stage_pb2.ResultsRequest(collector_id="theirs"))
            assert eventually(lambda: "theirs" in servers[0].service.collectors, True)
            with grpc.insecure_channel(local) as mine:  # answered to the collector, not back up the stream
                assert list(stage_pb2_grpc.StageStub(mine).Forward(
                    iter([prefill_request("answered", reply_to="theirs")]), timeout=30)) == []
            assert next(results).status_code == 0
            assert forward_grpc(local, prefill_request("other")).status_code == 0
            assert refused_code(stub.StopChain, stage_pb2.StopChainRequest(session_id="answered")) is None
            assert refused_code(stub.StopChain, stage_pb2.StopChainRequest(session_id="other")) == PERMISSION_DENIED
            results.cancel()


def test_a_stage_of_the_deployment_may_use_any_session(tiny_model, stages):
    """A chained step comes from the last stage, not from the session's owner: a host the deployment
    names is trusted with the sessions here."""
    with other_host_address() as host, stages(tiny_model("llama"), 1, host="0.0.0.0") as (addresses, servers):
        local, remote = addresses[0], f"{host}:{servers[0].port}"
        with grpc.insecure_channel(local) as channel:
            stage_pb2_grpc.StageStub(channel).SetDeployment(
                stage_pb2.SetDeploymentRequest(stages=[local, f"{host}:1"]), timeout=10)
        assert forward_grpc(local, prefill_request("s")).status_code == 0
        step = forward_grpc(remote, decode_request("s"))
        assert step.status_code == 0, step.error_message


# ---- the parts, with stand-ins for a servicer context ------------------------------------------------

class FakeContext:
    def __init__(self, peer: str, auth: dict | None = None) -> None:
        self._peer, self._auth = peer, auth or {"transport_security_type": [b"insecure"]}

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth


def tls(subject: bytes, *names: bytes) -> dict:
    return {"transport_security_type": [b"ssl"], "x509_subject": [subject], "x509_common_name": [subject[3:]],
            "x509_subject_alternative_name": list(names)}


def test_a_peer_is_its_host_its_certificate_or_this_machine():
    one, two = peer_of(FakeContext("ipv4:10.0.0.9:40000")), peer_of(FakeContext("ipv4:10.0.0.9:40001"))
    assert one == two and one.identity == "host:10.0.0.9" and not one.local and not one.verified
    for local in ("ipv4:127.0.0.1:5", "ipv6:[::1]:5", "ipv6:[::ffff:127.0.0.1]:5", "unix:"):
        assert peer_of(FakeContext(local)).identity == THIS_MACHINE, local
    certified = peer_of(FakeContext("ipv4:10.0.0.9:40000", tls(b"CN=stage-b", b"stage-b.lan", b"10.0.0.9")))
    assert certified.identity == "x509:CN=stage-b" and certified.verified
    assert certified.names == {"stage-b.lan", "10.0.0.9"}
    assert peer_of(FakeContext("ipv4:10.0.0.9:4", {"transport_security_type": [b"ssl"]})).verified is False


def test_set_deployment_takes_a_verified_certificate_or_this_machine_only(monkeypatch):
    def resolve(host, port):
        if host != "stage-b.lan":
            raise OSError("unknown name")
        return [(2, 1, 6, "", ("10.0.0.5", 0))]

    monkeypatch.setattr(deployment_module.socket, "getaddrinfo", resolve)
    deployment = Deployment(peers=["10.0.0.3:7000"])
    with pytest.raises(PermissionDenied, match="--peers"):
        deployment.set(["10.0.0.2:7000"], peer_of(FakeContext("ipv4:10.0.0.1:40000")))
    assert not deployment.allows("10.0.0.2:7000") and deployment.allows("10.0.0.3:7000")
    coordinator = peer_of(FakeContext("ipv4:10.0.0.1:40000", tls(b"CN=coordinator")))
    assert deployment.set(["10.0.0.2:7000", "stage-b.lan:7000"], coordinator) == 3
    assert deployment.allows("10.0.0.2:7000") and deployment.allows("Stage-B.lan:7000")
    assert not deployment.allows("10.0.0.4:7000") and not deployment.allows("10.0.0.2:7001")
    # trusted with any session: the coordinator that set it, a stage of it (by IP or certificate name)
    assert deployment.caller(coordinator).trusted
    assert deployment.caller(peer_of(FakeContext("ipv4:10.0.0.2:1"))).trusted
    assert deployment.caller(peer_of(FakeContext("ipv4:10.0.0.8:1", tls(b"CN=b", b"stage-b.lan")))).trusted
    assert deployment.caller(peer_of(FakeContext("ipv4:10.0.0.5:1"))).trusted  # stage-b.lan, resolved
    assert not deployment.caller(peer_of(FakeContext("ipv4:10.0.0.8:1"))).trusted
    assert deployment.set(["127.0.0.1:1"], peer_of(FakeContext("ipv4:127.0.0.1:9"))) == 2  # replaces; --peers stay
    assert not deployment.allows("10.0.0.2:7000")


def test_a_session_answers_only_to_its_owner_or_a_trusted_caller():
    store = SessionStore(make_cache=dict, bytes_per_token=1)
    owner, stranger, stage = Caller("host:10.0.0.1", False), Caller("host:10.0.0.9", False), Caller("x", True)
    store.start("s", 1, owner)
    for attempt in (lambda: store.get("s", stranger), lambda: store.start("s", 1, stranger),
                    lambda: store.end("s", stranger)):
        with pytest.raises(PermissionDenied) as refused:
            attempt()
        assert "host:10.0.0.1" not in str(refused.value)  # the owner is not told to a stranger
    assert store.get("s", owner) is store.get("s", stage)
    with pytest.raises(SessionNotFound):
        store.get("unknown", stranger)
    assert store.end("s", owner) and "s" not in store
