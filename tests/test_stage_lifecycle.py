"""A stage's life: NOT_SERVING while loading, SERVING once loaded, refusing new work while draining."""

from __future__ import annotations

import logging
import socket
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_bad_input import code_of, forward_once, valid_prefill

import stage_server.server as server_module
from coordinator.app import PipelineSetupError, wait_for_stages
from stage_server.server import StageServer, StageServerConfig


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="layerline.v1.Stage"), timeout=10)
    return reply.status


def test_not_serving_until_loaded(tiny_model, monkeypatch):
    release = threading.Event()
    real_load = server_module.load_slice

    def slow_load(*args, **kwargs):
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server_module, "load_slice", slow_load)
    server = StageServer(StageServerConfig(model_dir=str(tiny_model("llama")), layer_start=0, layer_end=4, port=0,
                                           progress=False, drain_timeout_s=2))
    starter = threading.Thread(target=server.start)
    starter.start()
    try:
        while not server.port:
            threading.Event().wait(0.05)
        address = f"127.0.0.1:{server.port}"
        assert health_of(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        early = forward_once(address, valid_prefill("early", []))
        assert code_of(early) == grpc.StatusCode.UNAVAILABLE and "loading" in early.error_message
        release.set()
        starter.join(30)
        assert health_of(address) == health_pb2.HealthCheckResponse.SERVING
        assert forward_once(address, valid_prefill("late", [])).status_code == 0
    finally:
        release.set()
        starter.join(30)
        server.stop()


def test_draining_refuses_new_work(tiny_model, stages):
    with stages(tiny_model("llama"), 1) as (addresses, servers):
        servers[0].service.draining = True
        response = forward_once(addresses[0], valid_prefill("late", []))
        assert code_of(response) == grpc.StatusCode.UNAVAILABLE and "draining" in response.error_message
        servers[0].service.draining = False
        assert forward_once(addresses[0], valid_prefill("again", [])).status_code == 0


def test_a_coordinator_names_the_stages_it_waits_for_while_it_waits(tiny_model, stages, caplog):
    """A stage address nobody answers on shows in a progress line within seconds, and the timeout's
    one-line error names it (and not the stage that answers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"  # closed again before the wait: nothing listens
    with stages(tiny_model("llama"), 1) as (addresses, _):
        with caplog.at_level(logging.WARNING, logger="coordinator.app"), pytest.raises(PipelineSetupError) as raised:
            wait_for_stages((addresses[0], nobody), timeout_s=3.0, progress_every_s=1.0)
    assert f"{nobody}: UNAVAILABLE" in str(raised.value) and addresses[0] not in str(raised.value)
    progress = [r.getMessage() for r in caplog.records if "waiting for stages" in r.getMessage()]
    assert progress and all(nobody in line and addresses[0] not in line for line in progress)
