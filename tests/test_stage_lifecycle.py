"""A stage's life: NOT_SERVING while loading, SERVING once loaded, refusing new work while draining."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_bad_input import code_of, forward_once, valid_prefill

import stage_server.server as server_module
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
        assert code_of(response) == grpc.StatusCode.UNAVAILABLE and "shutting down" in response.error_message
        servers[0].service.draining = False
        assert forward_once(addresses[0], valid_prefill("again", [])).status_code == 0
