"""The coordinator's health and GetModelInfo tell the truth about its stages, at once.

With a stage gone, health turns NOT_SERVING (no route covers every layer), GetModelInfo answers
within a second from what the coordinator knows (the stage down, with why and how long ago it last
answered) instead of waiting on the stage, and a request fails UNAVAILABLE naming the layers.
"""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import running_coordinator
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waiting import eventually

from coordinator.client import CoordinatorClient


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_health_and_info_follow_a_lost_stage(tiny_model, stages):
    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (addresses, servers), \
            running_coordinator(model_dir, addresses, stall_timeout_s=2.0) as (address, _), \
            CoordinatorClient(address, timeout_s=30) as client:
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        assert len(client.generate(prompt="hello", max_new_tokens=3).token_ids) == 3
        servers[1].grpc_server.stop(0)  # the last stage is gone
        eventually(lambda: health(address), health_pb2.HealthCheckResponse.NOT_SERVING, 10.0)
        started = time.perf_counter()
        stages_seen = {s.address: s for s in client.model_info().stages}
        assert time.perf_counter() - started < 1.0
        lost = stages_seen[addresses[1]]
        assert lost.state == "down" and lost.down_reason and lost.seen_seconds_ago > 0
        assert stages_seen[addresses[0]].state == "serving"
        with pytest.raises(grpc.RpcError) as failed:
            client.generate(prompt="hello", max_new_tokens=3)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live stage server for layers" in failed.value.details()
