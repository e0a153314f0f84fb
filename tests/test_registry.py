"""The coordinator's Registry (coordinator/registry.py, coordinator/caller_host.py): stages that
announce themselves with Join are probed, listed and routed through; a Join that names another
host than the caller's, that is malformed, or that serves another model is refused with its own
status; a joined server that falls silent is forgotten; and a coordinator given no --stages serves
once joined stages form a route, with the tokens of one given them."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import running_coordinator, running_stages
from netns_hosts import namespace_hosts, netns_available
from tiny_models import reference_greedy
from waiting import eventually, wait_for_line

from coordinator import cli, stage_pool
from coordinator.app import CoordinatorConfig, CoordinatorServer, PipelineSetupError
from coordinator.caller_host import host_refusal
from coordinator.certs import make_certificates
from coordinator.client import CoordinatorClient
from coordinator.registry import JoinRefused, JoinServer, Registry, check_request, joined_route
from coordinator.stage_pool import NoRoute, StagePool
from protos import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc
from protos.protocol import PROTOCOL_VERSION
from protos.tls import TlsFiles, open_channel
from stage_server.server import StageServer, StageServerConfig

PROMPT = [5, 17, 33, 60, 12, 8]
SSL = {"transport_security_type": [b"ssl"]}


# ---- whose host an announcement names (no network) ------------------------------------------------

@pytest.mark.parametrize("peer, host, allowed", [
    ("ipv4:10.62.0.2:4444", "10.62.0.2", True),
    ("ipv4:10.62.0.2:4444", "10.62.0.3", False),
    ("ipv6:[::ffff:10.62.0.2]:4444", "10.62.0.2", True),
    ("ipv6:[2001:db8::2]:4444", "[2001:db8::2]", True),
    ("ipv6:[2001:db8::2]:4444", "[2001:db8::3]", False),
    ("ipv4:127.0.0.1:4444", "localhost", True),
    ("ipv4:127.0.0.1:4444", "[::1]", True),
    ("ipv4:10.62.0.2:4444", "localhost", False),
    ("ipv4:10.62.0.2:4444", "127.0.0.1", False),
    ("ipv4:10.62.0.2:4444", "own.example", True),
    ("ipv4:10.62.0.2:4444", "split.example", False),
    ("ipv4:10.62.0.2:4444", "other.example", False),
    ("ipv4:10.62.0.2:4444", "missing.example", False),
    ("unix:/tmp/socket", "localhost", False),
])
def test_an_announced_host_must_be_the_callers_own(peer, host, allowed):
    names = {"own.example": ["10.62.0.2"], "split.example": ["10.62.0.2", "10.62.0.9"], "other.example": ["10.62.0.9"]}

    def resolver(name):
        if name not in names:
            raise socket.gaierror(-2, "Name or service not known")
        return names[name]

    refusal = host_refusal(peer, {}, host, resolver)
    assert (refusal is None) == allowed, refusal


def test_over_tls_the_callers_certificate_must_name_the_host_too():
    node = {**SSL, "x509_common_name": [b"node1.example"],
            "x509_subject_alternative_name": [b"node1.example", b"10.62.0.2", b"localhost"]}
    assert host_refusal("ipv4:10.62.0.2:1", node, "10.62.0.2") is None
    assert host_refusal("ipv4:10.62.0.2:1", node, "NODE1.example", lambda name: ["10.62.0.2"]) is None
    refusal = host_refusal("ipv4:10.62.0.3:1", node, "10.62.0.3")
    assert refusal.startswith("the caller's certificate names node1.example, 10.62.0.2, localhost, node1.example")
    client = {**SSL, "x509_common_name": [b"layerline client"]}
    assert "names layerline client, not 127.0.0.1" in host_refusal("ipv4:127.0.0.1:1", client, "127.0.0.1")


# ---- the checks of a request (no network) ---------------------------------------------------------

def request(**fields) -> coordinator_pb2.JoinRequest:
    defaults = dict(address="127.0.0.1:50051", layer_start=0, layer_end=2, model_fingerprint="f" * 64,
                    weights_manifest_id="m" * 64, protocol_version=PROTOCOL_VERSION,
                    versions={"torch": "2", "transformers": "5"}, max_sessions=64)
    return coordinator_pb2.JoinRequest(**{**defaults, **fields})


@pytest.mark.parametrize("fields, message", [
    (dict(address=""), "address is empty"),
    (dict(address="127.0.0.1"), "is not HOST:PORT"),
    (dict(address="127.0.0.1:0"), "port from 1 to 65535"),
    (dict(address="127.0.0.1:70000"), "port from 1 to 65535"),
    (dict(address="::1:50051"), "is not HOST:PORT"),
    (dict(address="unix:/tmp/stage.sock"), "is not HOST:PORT"),
    (dict(address="host name:1"), "neither an IP address nor a host name"),
    (dict(address="999.1.1.1:1"), "neither an IP address nor a host name"),
    (dict(address="[nonsense]:1"), "neither an IP address nor a host name"),
    (dict(address="0.0.0.0:50051"), "not one a stage can be dialled at"),
    (dict(address="a" * 300 + ":1"), "address has 302 characters"),
    (dict(layer_start=2, layer_end=2), "layers 2:2 are not a range"),
    (dict(layer_end=1 << 20), "are not a range"),
    (dict(model_fingerprint="x" * 10_000), "model_fingerprint has 10000 characters"),
    (dict(weights_manifest_id=""), "weights_manifest_id has 0 characters"),
    (dict(versions={f"library{i}": "1" for i in range(100)}), "versions has 100 entries"),
    (dict(versions={"torch": "v" * 1000}), "longer than 128 characters"),
])
def test_a_malformed_join_is_invalid_argument(fields, message):
    with pytest.raises(JoinRefused, match=message) as refused:
        check_request(request(**fields))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_well_formed_join_names_its_host():
    assert check_request(request()) == "127.0.0.1"
    assert check_request(request(address="[::1]:50051")) == "::1"
    assert check_request(request(address="node-1.example:50051")) == "node-1.example"


class Call:
    """A stand-in for grpc.ServicerContext: a peer, an auth context, and abort."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:4000", auth=None) -> None:
        self._peer, self._auth = peer, auth or {}

    def peer(self):
        return self._peer

    def auth_context(self):
        return self._auth

    def abort(self, code, details):
        raise JoinRefused(code, details)


def test_joined_servers_are_bounded_and_the_given_ones_do_not_count():
    pool = StagePool(["127.0.0.1:1"])
    registry = Registry(pool, static=["127.0.0.1:1"], max_joined=2)
    for port in (2, 3, 2, 1):  # a renewal and a given server pass the bound
        assert registry.Join(request(address=f"127.0.0.1:{port}"), Call()).state == "joining"
    with pytest.raises(JoinRefused, match="2 stage servers have joined already") as refused:
        registry.Join(request(address="127.0.0.1:4"), Call())
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pool.addresses() == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    pool.close()


# ---- a coordinator with a join port, over real stage servers --------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage_info(address: str) -> stage_pb2.InfoResponse:
    with open_channel(address) as channel:
        return stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)


def announcement(stage: str, **fields) -> coordinator_pb2.JoinRequest:
    """The Join the stage at `stage` sends (read from its Info), with `fields` changed."""
    info = stage_info(stage)
    return coordinator_pb2.JoinRequest(**{
        **dict(address=stage, layer_start=info.layer_start, layer_end=info.layer_end,
               model_fingerprint=info.model_fingerprint, weights_manifest_id=info.weights_manifest_id,
               protocol_version=info.protocol_version, versions=dict(info.versions), max_sessions=64), **fields})


def join(port: int, message, timeout: float = 10) -> coordinator_pb2.JoinResponse:
    with open_channel(f"127.0.0.1:{port}") as channel:
        return coordinator_pb2_grpc.RegistryStub(channel).Join(message, timeout=timeout)


def listed(coordinator: str) -> dict[str, str]:
    with CoordinatorClient(coordinator, timeout_s=10) as client:
        return {stage.address: stage.state for stage in client.model_info().stages}


def start_stage(model_dir: Path, start: int, end: int) -> StageServer:
    server = StageServer(StageServerConfig(model_dir=str(model_dir), layer_start=start, layer_end=end, port=0,
                                           progress=False, drain_timeout_s=1.0))
    server.start()
    return server


@pytest.fixture(scope="module")
def joinable(tiny_model):
    """Two stages given with --stages, a coordinator with a join port, and a spare replica of span 0."""
    model_dir = tiny_model("llama")
    with running_stages(model_dir, 2) as (addresses, _):
        first = stage_info(addresses[0])
        replica = start_stage(model_dir, first.layer_start, first.layer_end)
        try:
            with running_coordinator(model_dir, addresses, join_port=0) as (coordinator, server):
                yield model_dir, addresses, f"127.0.0.1:{replica.port}", coordinator, server
        finally:
            replica.stop()


def test_a_joined_replica_is_probed_listed_and_routed_through(joinable):
    model_dir, addresses, replica, coordinator, server = joinable
    reply = join(server.registry.port, announcement(replica))
    assert (reply.state, reply.renew_after_ms) == ("joining", 2000)
    assert reply.forget_after_ms == int(stage_pool.FORGET_JOINED_AFTER_S * 1000)
    assert eventually(lambda: listed(coordinator).get(replica), "serving") == "serving"
    assert join(server.registry.port, announcement(replica)).state == "serving"
    # With the given server of span 0 out of routes, every route goes through the joined replica.
    server.pool.failed(addresses[0], "out of routes for this test")
    assert server.pool.choose()[0] == replica
    with CoordinatorClient(coordinator, timeout_s=60) as client:
        reply = client.generate(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True)
    assert list(reply.token_ids) == reference_greedy(model_dir, [PROMPT], 6)[0]


def test_a_join_naming_another_host_is_permission_denied_and_never_dialled(joinable):
    _, addresses, _, _, server = joinable
    for address in ("192.0.2.7:50051", "10.62.0.9:50051"):
        with pytest.raises(grpc.RpcError) as refused:
            join(server.registry.port, announcement(addresses[0], address=address))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"the call comes from 127.0.0.1, but {address.partition(':')[0]}" in refused.value.details()
        assert address not in server.pool.addresses()


@pytest.mark.parametrize("fields, message", [
    (dict(address="not an address"), "is not HOST:PORT"),
    (dict(model_fingerprint="f" * 10_000), "model_fingerprint has 10000 characters"),
    (dict(versions={f"k{i}": "v" * 100 for i in range(500)}), "versions has 500 entries"),
])
def test_a_malformed_join_over_grpc_is_invalid_argument(joinable, fields, message):
    _, addresses, _, _, server = joinable
    with pytest.raises(grpc.RpcError) as refused:
        join(server.registry.port, announcement(addresses[0], **fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()


def test_a_join_request_over_64_kib_is_refused_before_it_is_read(joinable):
    _, addresses, _, _, server = joinable
    with pytest.raises(grpc.RpcError) as refused:
        join(server.registry.port, announcement(addresses[0], model_fingerprint="f" * (65 << 10)))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bytes_that_are_no_join_request_and_unknown_fields_are_invalid_argument(joinable):
    _, addresses, _, _, server = joinable
    extra_field = announcement(addresses[0]).SerializeToString() + b"\xf8\x06\x01"  # field 111, varint
    with open_channel(f"127.0.0.1:{server.registry.port}") as channel:
        for raw, message in ((b"\xff\xff\xff", "is not a valid layerline.v1.JoinRequest"),
                             (extra_field, "field 111")):
            call = channel.unary_unary("/layerline.v1.Registry/Join")
            with pytest.raises(grpc.RpcError) as refused:
                call(raw, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()


@pytest.mark.parametrize("fields, message", [
    (dict(model_fingerprint="0" * 64), "serves other model (model_fingerprint 000"),
    (dict(weights_manifest_id="0" * 64), "serves other weights"),
    (dict(protocol_version=PROTOCOL_VERSION + 1), f"speaks stage protocol {PROTOCOL_VERSION + 1}"),
    (dict(versions={"torch": "0.0.1", "transformers": "0.0.1"}), "runs torch 0.0.1"),
    (dict(layer_start=0, layer_end=64), "go past the model's"),
])
def test_a_stage_of_another_model_or_protocol_is_failed_precondition(joinable, fields, message):
    _, addresses, _, _, server = joinable
    with pytest.raises(grpc.RpcError) as refused:
        join(server.registry.port, announcement(addresses[0], address="127.0.0.1:1", **fields))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and message in refused.value.details()
    assert "127.0.0.1:1" not in server.pool.addresses()


def test_a_joined_server_that_stops_renewing_and_answering_is_forgotten(tiny_model, monkeypatch):
    monkeypatch.setattr(stage_pool, "FORGET_JOINED_AFTER_S", 1.5)
    model_dir = tiny_model("llama")
    with running_stages(model_dir, 2) as (addresses, _):
        first = stage_info(addresses[0])
        replica = start_stage(model_dir, first.layer_start, first.layer_end)
        address = f"127.0.0.1:{replica.port}"
        try:
            with running_coordinator(model_dir, addresses, join_port=0) as (coordinator, server):
                assert join(server.registry.port, announcement(address)).forget_after_ms == 1500
                assert eventually(lambda: listed(coordinator).get(address), "serving") == "serving"
                replica.stop()
                assert eventually(lambda: address in listed(coordinator), False, timeout_s=15) is False
                assert set(listed(coordinator)) == set(addresses)  # given servers are never forgotten
        finally:
            replica.stop()


def test_the_registry_over_mutual_tls_takes_hosts_the_callers_certificate_names(tmp_path):
    make_certificates(tmp_path, ["node1.example"])

    def files(name: str) -> TlsFiles:
        return TlsFiles.read(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / f"{name}.pem"),
                             key=str(tmp_path / f"{name}-key.pem"))

    pool = StagePool([])  # not started: nothing is dialled
    registry = JoinServer(Registry(pool), "127.0.0.1", 0, files("node1.example"))
    port = registry.start()
    try:
        for who, code in (("node1.example", None), ("client", grpc.StatusCode.PERMISSION_DENIED)):
            with open_channel(f"localhost:{port}", files(who)) as channel:
                call = lambda: coordinator_pb2_grpc.RegistryStub(channel).Join(request(), timeout=10)  # noqa: E731
                if code is None:
                    assert call().state == "joining"
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() == code
                    assert "certificate names layerline client, not 127.0.0.1" in refused.value.details()
        with open_channel(f"localhost:{port}") as plaintext, pytest.raises(grpc.RpcError):
            coordinator_pb2_grpc.RegistryStub(plaintext).Join(request(), timeout=5)
    finally:
        registry.stop()
        pool.close()


def test_a_tls_coordinator_takes_a_joined_stage_over_mutual_tls(tiny_model, tmp_path):
    """Stages and coordinator with certificates of one CA: a stage joins with its own certificate,
    is probed over TLS (its certificate names 127.0.0.1) and routed through."""
    make_certificates(tmp_path, ["node1.example"])

    def files(name: str) -> TlsFiles:
        return TlsFiles.read(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / f"{name}.pem"),
                             key=str(tmp_path / f"{name}-key.pem"))

    model_dir, node = tiny_model("llama"), files("node1.example")
    with running_stages(model_dir, 2, tls=node, local_hops=False) as (addresses, _):
        first = stage_info_over(addresses[0], node)
        replica = StageServer(StageServerConfig(model_dir=str(model_dir), layer_start=first.layer_start,
                                                layer_end=first.layer_end, port=0, progress=False,
                                                drain_timeout_s=1.0, tls=node, local_hops=False))
        replica.start()
        address = f"127.0.0.1:{replica.port}"
        try:
            # The coordinator serves the Registry with its own certificate: a host's, not client.pem.
            with running_coordinator(model_dir, addresses, join_port=0, stage_tls=node,
                                     local_hops=False) as (coordinator, server):
                join_request = coordinator_pb2.JoinRequest(
                    address=address, layer_start=first.layer_start, layer_end=first.layer_end,
                    model_fingerprint=first.model_fingerprint, weights_manifest_id=first.weights_manifest_id,
                    protocol_version=first.protocol_version, versions=dict(first.versions))
                with open_channel(f"localhost:{server.registry.port}", node) as channel:
                    assert coordinator_pb2_grpc.RegistryStub(channel).Join(join_request, timeout=10).state == "joining"
                assert eventually(lambda: listed(coordinator).get(address), "serving") == "serving"
                server.pool.failed(addresses[0], "out of routes for this test")
                with CoordinatorClient(coordinator, timeout_s=60) as client:
                    reply = client.generate(token_ids=PROMPT, max_new_tokens=6, ignore_eos=True)
                assert list(reply.token_ids) == reference_greedy(model_dir, [PROMPT], 6)[0]
        finally:
            replica.stop()


def stage_info_over(address: str, tls: TlsFiles) -> stage_pb2.InfoResponse:
    with open_channel(address, tls) as channel:
        return stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)


def test_waiting_for_joined_stages_names_them_as_it_goes(caplog):
    pool = StagePool([])
    pool.join("127.0.0.1:1")  # nothing listens there
    pool.start()
    try:
        with caplog.at_level(logging.WARNING, logger="coordinator.registry"), \
                pytest.raises(NoRoute, match=r"after 2s: no stage server is serving yet \(joined: 127\.0\.0\.1:1: "
                                             r"UNAVAILABLE.*stage-server --join 127\.0\.0\.1:9"):
            joined_route(pool, 2.0, "127.0.0.1:9", progress_every_s=0.5)
    finally:
        pool.close()
    progress = [r.getMessage() for r in caplog.records if "waiting for stages to join" in r.getMessage()]
    assert len(progress) >= 2 and "at 127.0.0.1:9" in progress[0] and "127.0.0.1:1: UNAVAILABLE" in progress[-1]


JOIN_FROM_HOST = """
import sys
import grpc
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.protocol import PROTOCOL_VERSION
from protos.tls import open_channel
with open_channel(sys.argv[1]) as channel:
    for address in sys.argv[2:]:
        request = coordinator_pb2.JoinRequest(address=address, layer_start=0, layer_end=2, model_fingerprint="f",
                                              weights_manifest_id="m", protocol_version=PROTOCOL_VERSION)
        try:
            print(address, coordinator_pb2_grpc.RegistryStub(channel).Join(request, timeout=10).state)
        except grpc.RpcError as err:
            print(address, err.code().name)
"""


@pytest.mark.skipif(bool(netns_available()), reason=netns_available() or "available")
def test_a_caller_on_another_host_joins_only_its_own_address():
    """A real caller at 10.62.0.2 (a network namespace): its own address joins, its neighbour's and
    the coordinator's own loopback are PERMISSION_DENIED."""
    with namespace_hosts("reg", "10.62.0", 1) as hosts:
        pool = StagePool([])  # not started: nothing is dialled
        registry = JoinServer(Registry(pool), "10.62.0.1", 0)
        port = registry.start()
        try:
            result = subprocess.run(
                ["ip", "netns", "exec", hosts[0].namespace, sys.executable, "-c",
                 JOIN_FROM_HOST,
                 f"10.62.0.1:{port}", "10.62.0.2:5000", "10.62.0.3:5000", "127.0.0.1:5000"],
                capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
            assert result.stdout.split("\n")[:3] == ["10.62.0.2:5000 joining", "10.62.0.3:5000 PERMISSION_DENIED",
                                                     "127.0.0.1:5000 PERMISSION_DENIED"], result.stderr
            assert pool.addresses() == ["10.62.0.2:5000"]
        finally:
            registry.stop()
            pool.close()


# ---- a coordinator whose every stage joins ---------------------------------------------------------

def test_a_coordinator_without_stages_serves_once_joined_stages_form_a_route(tiny_model):
    model_dir = tiny_model("llama")
    with running_stages(model_dir, 2) as (addresses, _):
        with running_coordinator(model_dir, addresses) as (static, _), \
                CoordinatorClient(static, timeout_s=60) as client:
            expected = list(client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True).token_ids)
        port, started, failed = free_port(), [], []

        def serve():
            try:
                started.append(CoordinatorServer(CoordinatorConfig(stages=(), model_dir=str(model_dir), port=0,
                                                                   join_port=port, stage_wait_s=30)))
            except Exception as err:  # reported below
                failed.append(err)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:  # the stages renew until it serves
            for address in addresses:
                try:
                    join(port, announcement(address), timeout=2)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE  # not listening yet
            time.sleep(0.3)
        thread.join(5)
        assert not failed and started, failed
        server = started[0]
        try:
            api = server.start()
            with CoordinatorClient(f"127.0.0.1:{api}", timeout_s=60) as client:
                reply = client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
                assert set(stage.address for stage in client.model_info().stages) == set(addresses)
        finally:
            server.stop(grace_s=1.0)
    assert list(reply.token_ids) == expected == reference_greedy(model_dir, [PROMPT], 8)[0]


def test_a_coordinator_without_stages_names_what_it_waited_for(tiny_model):
    config = CoordinatorConfig(stages=(), model_dir=str(tiny_model("llama")), port=0, join_port=0, stage_wait_s=1)
    with pytest.raises(PipelineSetupError, match=r"no complete route of joined stages after 1s: no stage server is "
                       r"serving yet \(joined: none yet\); start stages with stage-server --join 127\.0\.0\.1:"):
        CoordinatorServer(config)


@pytest.mark.parametrize("flags, message", [
    ([], "give --stages HOST:PORT,... or --join-port PORT"),
    (["--join-port", "0"], "--join-port 0: give a free port"),
    (["--join-port", "50050"], "--join-port 50050: give a free port from 1 to 65535 other than --port"),
    (["--join-port", "50060", "--host", "10.62.0.1"], "refusing to listen on 10.62.0.1 without TLS: anyone who reaches "
                                                      "the port could use it; give --tls-ca, --tls-cert, --tls-key"),
    (["--join-port", "50060", "--tls-cert", "{dir}/client.pem", "--tls-key", "{dir}/client-key.pem",
      "--tls-ca", "{dir}/ca.pem"], "client.pem is a client-only certificate, and with --join-port"),
])
def test_serve_checks_its_join_flags_in_one_line(tiny_model, tmp_path, capsys, flags, message):
    make_certificates(tmp_path, ["node1.example"])  # the public API's TLS: only the join port lacks it
    api = ["--api-tls-cert", str(tmp_path / "node1.example.pem"),
           "--api-tls-key", str(tmp_path / "node1.example-key.pem")]
    flags, model_dir = [flag.format(dir=tmp_path) for flag in flags], tiny_model("llama")
    capsys.readouterr()  # what building the model printed
    status = cli.main(["serve", "--model", str(model_dir), *flags, *api])
    error = capsys.readouterr().err
    assert status == 2 and message in error and len(error.strip().splitlines()) == 1, error


# ---- real processes: coordinator serve --join-port and stage-server --join --------------------------

@pytest.mark.skipif(not (Path(__file__).parent.parent / "stage_server" / "registration.py").exists(),
                    reason="stage-server --join is not in this tree")
def test_stage_processes_that_join_a_serve_without_stages_answer_generate(tiny_model):
    model_dir = tiny_model("llama")
    port, join_port = free_port(), free_port()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--join-port", str(join_port)], stderr=subprocess.PIPE, text=True, env=environment)
    stages = [subprocess.Popen(
        [sys.executable, "-m", "stage_server.cli", "--model", str(model_dir), "--layers", layers, "--port", "0",
         "--quiet", "--threads", "1", "--join", f"127.0.0.1:{join_port}"],
        stderr=subprocess.DEVNULL, env=environment) for layers in ("0:2", "2:4")]
    try:
        wait_for_line(coordinator, f"stages join at 127.0.0.1:{join_port}", 240)
        with CoordinatorClient(f"127.0.0.1:{port}", timeout_s=60) as client:
            reply = client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
            states = [(stage.layer_start, stage.state) for stage in client.model_info().stages]
        assert list(reply.token_ids) == reference_greedy(model_dir, [PROMPT], 8)[0]
        assert states == [(0, "serving"), (2, "serving")]
    finally:
        for process in (coordinator, *stages):
            process.send_signal(signal.SIGTERM)
        for process in (coordinator, *stages):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
