"""The checks of the coordinator's Registry that need no stage (coordinator/registry.py,
coordinator/caller_host.py): whose host an announcement may name (the caller's IP, names resolved,
the certificate's names over TLS, a caller in another network namespace), the sizes and ranges of a
Join, the bound on joined servers, the Registry's own mutual-TLS port, what waiting for joined
stages logs, and serve's join flags."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from netns_hosts import namespace_hosts, netns_available

from coordinator import cli
from coordinator.caller_host import host_refusal
from coordinator.certs import make_certificates
from coordinator.registry import JoinRefused, JoinServer, Registry, check_request, joined_route
from coordinator.stage_pool import NoRoute, StagePool
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.protocol import PROTOCOL_VERSION
from protos.tls import TlsFiles, open_channel

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
