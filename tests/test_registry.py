"""The coordinator's Registry over real stage servers (coordinator/registry.py): stages that
announce themselves with Join are probed, listed and routed through (over mutual TLS too); a Join
that names another host than the caller's, that is malformed, or that serves another model is
refused with its own status over gRPC; a joined server that falls silent is forgotten; and a
coordinator given no --stages serves once joined stages form a route, with the tokens of one given
them, in process and as `coordinator serve` with `stage-server --join` processes. The checks that
need no stage are in test_join_checks.py."""

from __future__ import annotations

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
from tiny_models import reference_greedy
from waiting import eventually, wait_for_line

from coordinator import stage_pool
from coordinator.app import CoordinatorConfig, CoordinatorServer, PipelineSetupError
from coordinator.certs import make_certificates
from coordinator.client import CoordinatorClient
from protos import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc
from protos.protocol import PROTOCOL_VERSION
from protos.tls import TlsFiles, open_channel
from stage_server.server import StageServer, StageServerConfig

PROMPT = [5, 17, 33, 60, 12, 8]


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
