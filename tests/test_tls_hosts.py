"""Mutual TLS across hosts: two stages on two network namespaces (a bridge and a veth each, the
10.241.0.0/24 range this file creates), certificates from `coordinator certs`, a coordinator
started by its command line on one of the hosts. The TLS pipeline generates the tokens of the
plaintext one (the same stages' layers, started with --insecure), peers without a certificate of
the CA are refused at the handshake, and a non-loopback --host without TLS starts only with
--insecure. Skips where namespaces cannot be made (not root, no `ip netns`)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from conftest import running_coordinator
from netns_hosts import ServerProcess, namespace_hosts, netns_available
from tiny_models import reference_greedy

from coordinator.certs import make_certificates
from coordinator.client import CoordinatorClient
from protos import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc
from protos.tls import TlsFiles, open_channel

pytestmark = pytest.mark.skipif(bool(netns_available()), reason=netns_available() or "available")

SUBNET = "10.241.0"
TLS_PORT, PLAIN_PORT, API_PORT = 50611, 50612, 50610
PROMPT = [5, 17, 33, 60, 12, 8]


def _tls_flags(certs, name: str, prefix: str = "--tls") -> list[str]:
    return [f"{prefix}-cert", str(certs / f"{name}.pem"), f"{prefix}-key", str(certs / f"{name}-key.pem"),
            f"{prefix}-ca", str(certs / "ca.pem")]


def _client(certs, name: str = "client") -> TlsFiles:
    return TlsFiles.read(ca=str(certs / "ca.pem"), cert=str(certs / f"{name}.pem"), key=str(certs / f"{name}-key.pem"))


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """Per host, a TLS stage and a plaintext (--insecure) stage of the same layers; a TLS
    coordinator (`coordinator serve`, API requiring client certificates) on the first host."""
    model_dir = tiny_model("llama")
    certs = tmp_path_factory.mktemp("certs") / "certs"
    made = subprocess.run([sys.executable, "-m", "coordinator.cli", "certs", "--out", str(certs), "--hosts",
                           f"{SUBNET}.2,{SUBNET}.3"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    processes = []
    with namespace_hosts("tls-", SUBNET, 2) as hosts:
        try:
            for host, layers in zip(hosts, ("0:2", "2:4")):
                common = ["--model", str(model_dir), "--layers", layers, "--host", host.address, "--quiet",
                          "--threads", "1"]
                processes.append(ServerProcess(host.namespace, "stage_server.cli", *common, "--port", str(TLS_PORT),
                                               *_tls_flags(certs, host.address), ready="stage-server ready").start())
                processes.append(ServerProcess(host.namespace, "stage_server.cli", *common, "--port",
                                               str(PLAIN_PORT), "--insecure", ready="stage-server ready").start())
            for process in processes:
                process.wait_ready()
            tls_stages = [f"{h.address}:{TLS_PORT}" for h in hosts]
            plain_stages = [f"{h.address}:{PLAIN_PORT}" for h in hosts]
            first = hosts[0]
            coordinator = ServerProcess(
                first.namespace, "coordinator.cli", "serve", "--stages", ",".join(tls_stages), "--model",
                str(model_dir), "--host", first.address, "--port", str(API_PORT), "--chain", "on",
                *_tls_flags(certs, first.address), *_tls_flags(certs, first.address, "--api-tls"),
                ready="coordinator serving").start()
            processes.append(coordinator)
            coordinator.wait_ready()
            yield {"model_dir": model_dir, "certs": certs, "hosts": hosts, "tls_stages": tls_stages,
                   "plain_stages": plain_stages, "api": f"{first.address}:{API_PORT}"}
        finally:
            for process in processes:
                process.stop()


def test_a_tls_pipeline_across_hosts_generates_the_plaintext_pipelines_tokens(deployment):
    with CoordinatorClient(deployment["api"], tls=_client(deployment["certs"]), timeout_s=60) as client:
        over_tls = list(client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True).token_ids)
        assert [s.address for s in client.model_info().stages] == deployment["tls_stages"]
    with running_coordinator(deployment["model_dir"], deployment["plain_stages"], chain="on") as (address, _):
        with CoordinatorClient(address, timeout_s=60) as client:
            plain = list(client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True).token_ids)
    assert over_tls == plain == reference_greedy(deployment["model_dir"], [PROMPT], 8)[0]


@pytest.mark.parametrize("who", ["plaintext", "another CA", "no client certificate"])
@pytest.mark.parametrize("target", ["stage", "coordinator"])
def test_peers_without_a_certificate_of_the_ca_are_refused_across_hosts(deployment, tmp_path_factory, who, target):
    certs = deployment["certs"]
    tls = None
    if who == "another CA":
        other = tmp_path_factory.mktemp("other")
        make_certificates(other, [f"{SUBNET}.9"])
        tls = TlsFiles.read(ca=str(certs / "ca.pem"), cert=str(other / "client.pem"), key=str(other / "client-key.pem"))
    elif who == "no client certificate":
        tls = TlsFiles.read(ca=str(certs / "ca.pem"))
    address = deployment["tls_stages"][1] if target == "stage" else deployment["api"]
    with open_channel(address, tls) as channel, pytest.raises(grpc.RpcError) as refused:
        if target == "stage":
            stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
        else:
            coordinator_pb2_grpc.CoordinatorStub(channel).GetModelInfo(coordinator_pb2.GetModelInfoRequest(),
                                                                       timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_stage_certificate_of_another_host_is_refused_by_name(deployment):
    """The second host's certificate, presented by the first host's address: the name check refuses it."""
    certs = deployment["certs"]
    with open_channel(deployment["tls_stages"][1], _client(certs)) as channel:
        assert stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10).layer_start == 2
    options = [("grpc.ssl_target_name_override", f"{SUBNET}.2")]
    with open_channel(deployment["tls_stages"][1], _client(certs), options=options) as channel, \
            pytest.raises(grpc.RpcError) as refused:
        stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_non_loopback_host_without_tls_needs_insecure(deployment):
    """Refused in one line without --insecure; the plaintext stages above started with it."""
    host = deployment["hosts"][0]
    refused = subprocess.run(["ip", "netns", "exec", host.namespace, sys.executable, "-m", "stage_server.cli",
                              "--model", str(deployment["model_dir"]), "--layers", "0:2", "--host", host.address,
                              "--port", "50619"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"refusing to listen on {host.address} without TLS" in refused.stderr
    with open_channel(deployment["plain_stages"][0]) as channel:
        assert stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10).layer_end == 2
