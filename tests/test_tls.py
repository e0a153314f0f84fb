"""TLS on every hop (protos/tls.py, protos/tls_arguments.py) with certificates from `coordinator certs`
(coordinator/certs.py), on loopback: the files it writes, the checks made when they are read, a
pipeline whose every hop is mutual TLS generating the tokens of the unsplit model, peers refused at
the handshake, and the refusal to listen in the open without TLS."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import running_coordinator, running_stages
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tiny_models import reference_greedy
from transformers import AutoTokenizer

from coordinator.certs import CertificateError, make_certificates, parse_hosts
from coordinator.client import CoordinatorClient
from protos import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc
from protos.channel_options import bind, channel_options, server_options
from protos.tls import TlsError, TlsFiles, check_listen, open_channel, server_credentials

HOSTS = ["node1.example", "10.241.0.2"]
PROMPT = [5, 17, 33, 60, 12, 8]


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """Certificates from the command itself, as a user makes them."""
    out = tmp_path_factory.mktemp("certs") / "deployment"
    result = run("coordinator.cli", "certs", "--out", str(out), "--hosts", ",".join(HOSTS))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'client-key.pem'} (private key, mode 0600)" in result.stdout
    return out


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other-ca")
    make_certificates(out, ["node1.example"])
    return out


def files(directory: Path, name: str, *, with_ca: bool = True) -> TlsFiles:
    return TlsFiles.read(ca=str(directory / "ca.pem") if with_ca else None, cert=str(directory / f"{name}.pem"),
                         key=str(directory / f"{name}-key.pem"))


def test_certs_writes_a_ca_a_certificate_per_host_and_a_client_certificate(certs):
    names = sorted(p.name for p in certs.iterdir())
    assert names == sorted(["ca.pem", "ca-key.pem", "client.pem", "client-key.pem", "node1.example.pem",
                            "node1.example-key.pem", "10.241.0.2.pem", "10.241.0.2-key.pem"])
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for name in names:
        mode = stat.S_IMODE((certs / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), (name, oct(mode))
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for host in HOSTS:
        leaf = x509.load_pem_x509_certificate((certs / f"{host}.pem").read_bytes())
        leaf.verify_directly_issued_by(ca)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(names.get_values_for_type(x509.DNSName)) >= {"localhost"}
        assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
        assert host in {*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))}
        uses = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert uses == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    client = x509.load_pem_x509_certificate((certs / "client.pem").read_bytes())
    client.verify_directly_issued_by(ca)
    assert set(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH}


def test_certs_keeps_an_existing_ca_unless_forced(tmp_path):
    out = tmp_path / "certs"
    make_certificates(out, ["a"])
    ca = (out / "ca.pem").read_bytes()
    result = run("coordinator.cli", "certs", "--out", str(out), "--hosts", "b")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ca.pem exists: pass --force" in result.stderr and (out / "ca.pem").read_bytes() == ca
    (out / "a-key.pem").chmod(0o644)  # a forced run writes fresh files, never keeping a wider mode
    make_certificates(out, ["a"], force=True)
    assert (out / "ca.pem").read_bytes() != ca and stat.S_IMODE((out / "a-key.pem").stat().st_mode) == 0o600


@pytest.mark.parametrize("hosts", ["", "bad host", "a,a", "client", "x/y"])
def test_certs_refuses_hosts_it_cannot_name(hosts):
    with pytest.raises(CertificateError):
        parse_hosts(hosts)


def test_tls_files_say_in_one_line_what_is_wrong(certs, other_ca, tmp_path):
    with pytest.raises(TlsError, match="cannot read --tls-cert .*missing.pem: No such file"):
        TlsFiles.read(cert=str(tmp_path / "missing.pem"), key=str(certs / "client-key.pem"))
    with pytest.raises(TlsError, match="--tls-cert needs --tls-key"):
        TlsFiles.read(cert=str(certs / "client.pem"))
    with pytest.raises(TlsError, match="is not the private key of --tls-cert"):
        TlsFiles.read(cert=str(certs / "client.pem"), key=str(certs / "node1.example-key.pem"))
    with pytest.raises(TlsError, match="holds no PEM certificate"):
        TlsFiles.read(ca=str(certs / "ca-key.pem"))
    with pytest.raises(TlsError, match="is not signed by the CA in --tls-ca"):
        TlsFiles.read(ca=str(other_ca / "ca.pem"), cert=str(certs / "client.pem"), key=str(certs / "client-key.pem"),
                      cert_from_ca=True)
    assert files(certs, "client").has_identity


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_listens_without_tls(host):
    check_listen(host, tls=False, insecure=False, tls_flags="--tls-*")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.241.0.2", "node1.example", ""])
def test_the_open_network_needs_tls_or_insecure(host):
    with pytest.raises(TlsError, match="refusing to listen on .* without TLS"):
        check_listen(host, tls=False, insecure=False, tls_flags="--tls-*")
    check_listen(host, tls=True, insecure=False, tls_flags="--tls-*")
    check_listen(host, tls=False, insecure=True, tls_flags="--tls-*")


@pytest.mark.parametrize("command", [
    ("stage_server.cli", "--model", "unused", "--layers", "0:1"),
    ("coordinator.cli", "serve", "--stages", "127.0.0.1:1", "--model", "unused"),
    ("coordinator.cli", "launch-local", "--model", "unused", "--num-stages", "1"),
])
def test_servers_refuse_a_non_loopback_host_without_tls_in_one_line(command, certs):
    result = run(*command, "--host", "0.0.0.0")
    assert result.returncode == 2, result.stderr
    assert "refusing to listen on 0.0.0.0 without TLS" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_stage_on_a_non_loopback_host_starts_with_insecure(tiny_model):
    process = subprocess.Popen([sys.executable, "-m", "stage_server.cli", "--model", str(tiny_model("llama")),
                                "--layers", "0:2", "--host", "0.0.0.0", "--port", "0", "--insecure", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "stage-server ready on 0.0.0.0:" in line or len(lines) > 200:
                break
        assert "stage-server ready on 0.0.0.0:" in lines[-1], "".join(lines[-10:])
    finally:
        process.terminate()
        process.wait(20)


# ---- a pipeline whose every hop is mutual TLS ----------------------------------------------------

@pytest.fixture(scope="module")
def tls_pipeline(tiny_model, certs):
    """Two stages and a coordinator: stages with node1's certificate, the coordinator dialling them
    with the client certificate, the public API requiring client certificates. Every hop on gRPC
    (no same-machine sockets), greedy steps chained through the stages, answers on a Results stream."""
    model_dir = tiny_model("llama")
    stage = files(certs, "node1.example")
    with running_stages(model_dir, 2, tls=stage, local_hops=False) as (stages, _):
        with running_coordinator(model_dir, stages, stage_tls=files(certs, "client"), api_tls=stage,
                                 local_hops=False, chain="on") as (address, _):
            yield model_dir, stages, address


def test_a_mutual_tls_pipeline_generates_the_unsplit_models_tokens(tls_pipeline, certs):
    model_dir, _, address = tls_pipeline
    with CoordinatorClient(address, tls=files(certs, "client"), timeout_s=60) as client:
        reply = client.generate(token_ids=PROMPT, max_new_tokens=8, ignore_eos=True)
    assert list(reply.token_ids) == reference_greedy(model_dir, [PROMPT], 8)[0]


def test_a_stage_reached_by_name_checks_the_name(tls_pipeline, certs):
    """The channel checks the stage's certificate names the host dialled: a name the certificate
    does not carry is refused, one it carries is taken."""
    stage_port = tls_pipeline[1][0].rpartition(":")[2]
    client = files(certs, "client")
    for name, ok in (("node1.example", True), ("node2.example", False)):
        options = [*channel_options(), ("grpc.ssl_target_name_override", name)]
        with open_channel(f"127.0.0.1:{stage_port}", client, options=options) as channel:
            call = lambda: stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=5)  # noqa: E731
            if ok:
                assert call().layer_start == 0
            else:
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _refusals(certs: Path, other_ca: Path) -> dict[str, TlsFiles | None]:
    return {"plaintext": None,
            "a certificate from another CA": TlsFiles.read(ca=str(certs / "ca.pem"),
                                                           cert=str(other_ca / "client.pem"),
                                                           key=str(other_ca / "client-key.pem")),
            "no client certificate": TlsFiles.read(ca=str(certs / "ca.pem")),
            "a server from another CA": files(other_ca, "client")}


@pytest.mark.parametrize("who", ["plaintext", "a certificate from another CA", "no client certificate",
                                 "a server from another CA"])
@pytest.mark.parametrize("target", ["stage", "coordinator"])
def test_peers_without_a_certificate_of_the_ca_are_refused_at_the_handshake(tls_pipeline, certs, other_ca, who,
                                                                            target):
    _, stages, address = tls_pipeline
    tls = _refusals(certs, other_ca)[who]
    with open_channel(stages[0] if target == "stage" else address, tls) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            if target == "stage":
                stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=5)
            else:
                coordinator_pb2_grpc.CoordinatorStub(channel).GetModelInfo(coordinator_pb2.GetModelInfoRequest(),
                                                                           timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_public_api_without_a_ca_takes_clients_without_certificates(certs):
    """--api-tls-cert/--api-tls-key alone: server-side TLS; a client checks the server against the CA
    and presents nothing; a plaintext client is still refused."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options())
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = bind(server, "127.0.0.1", 0, server_credentials(files(certs, "node1.example", with_ca=False)))
    server.start()
    try:
        request = health_pb2.HealthCheckRequest()
        with open_channel(f"localhost:{port}", TlsFiles.read(ca=str(certs / "ca.pem"))) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with open_channel(f"localhost:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_generate_and_info_take_the_client_flags(tls_pipeline, certs):
    model_dir, stages, address = tls_pipeline
    flags = ("--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
             "--tls-key", str(certs / "client-key.pem"))
    for target in (("--address", address), ("--stages", ",".join(stages), "--model", str(model_dir))):
        reply = run("coordinator.cli", "generate", *target, *flags, "--prompt", "Hello there", "--max-new-tokens",
                    "4", "--json")
        assert reply.returncode == 0 and len(json.loads(reply.stdout)["token_ids"]) == 4, reply.stderr
    info = run("coordinator.cli", "info", "--address", address, "--json", *flags)
    assert info.returncode == 0 and '"numLayers": 4' in info.stdout, info.stderr
    refused = run("coordinator.cli", "info", "--address", address, "--tls-ca", str(certs / "ca.pem"))
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="needs root to connect as another user, and a system python3 that user may run")
def test_the_same_machine_socket_takes_only_the_stages_own_user():
    """The abstract socket has no file permissions: the stage checks who connects (SO_PEERCRED)."""
    from protos.unix_socket import ACCEPTED, FORWARD, REFUSED, socket_name
    from stage_server.stream_slots import StreamSlots
    from stage_server.unix_listener import UnixListener

    port = 60999
    slots = StreamSlots(4)
    listener = UnixListener(port, lambda requests, context: iter(()), lambda request, context, send: iter(()),
                            slots.acquire, slots.release)
    probe = (f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(5)\ns.connect({socket_name(port)!r})\n"
             f"try:\n    s.sendall({FORWARD!r})\nexcept OSError:\n    pass\nprint(s.recv(1))")  # refused: closed early
    try:
        other = subprocess.run(["/usr/bin/python3", "-c", probe], user=65534, capture_output=True, text=True,
                               timeout=30)
        own = subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True, text=True, timeout=30)
    finally:
        listener.close()
    assert other.stdout.strip() == repr(REFUSED), other.stderr
    assert own.stdout.strip() == repr(ACCEPTED), own.stderr


def test_launch_local_passes_its_tls_flags_to_every_stage(tiny_model, certs):
    """Stages on every interface over mutual TLS, dialled on loopback (a name their certificate
    carries); the one-shot API listens on loopback, so it needs no TLS of its own."""
    model_dir = tiny_model("llama")
    result = run("coordinator.cli", "launch-local", "--model", str(model_dir), "--num-stages", "2", "--host", "0.0.0.0",
                 "--tls-cert", str(certs / "node1.example.pem"), "--tls-key", str(certs / "node1.example-key.pem"),
                 "--tls-ca", str(certs / "ca.pem"), "--local-hops", "off", "--threads", "1", "--prompt", "Hello there",
                 "--max-new-tokens", "8", "--json", timeout=240)
    assert result.returncode == 0, result.stderr
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)("Hello there")["input_ids"]
    assert json.loads(result.stdout.strip().splitlines()[-1])["token_ids"] == \
        reference_greedy(model_dir, [prompt_ids], 8)[0]
    assert "ready on 127.0.0.1:" in result.stderr
