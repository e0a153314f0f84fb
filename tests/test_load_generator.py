"""The bounded load generator against a real tiny pipeline: zero errors, sane summary, bounds respected."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from waiting import eventually

from coordinator.pipeline_client import PipelineClient

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_load_without_errors(stream, tiny_api):
    load = load_module("load_generator")
    address, stage_addresses, _ = tiny_api
    result = asyncio.run(load.run_load(address, requests=48, concurrency=16, max_new_tokens=6, stream=stream,
                                       time_limit_s=120))
    summary = result.summary()
    assert summary["errors"] == {} and summary["ok"] == 48 and result.sent == 48
    assert result.tokens == 48 * 6
    assert summary["requests_per_s"] > 0 and summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    if stream:
        assert len(result.first_token_s) == 48
    client = PipelineClient(stage_addresses)
    assert eventually(lambda: [i.active_sessions for i in client.stage_infos()], [0, 0]) == [0, 0]
    client.close()


def test_time_bound_stops_sending(tiny_api):
    load = load_module("load_generator")
    result = asyncio.run(load.run_load(tiny_api[0], requests=10_000, concurrency=4, max_new_tokens=4, stream=False,
                                       time_limit_s=1.0))
    assert result.sent < 10_000 and result.elapsed_s < 30


def test_errors_are_counted_by_code(tiny_api):
    load = load_module("load_generator")
    result = asyncio.run(load.run_load(tiny_api[0], requests=4, concurrency=2, max_new_tokens=10**6, stream=False,
                                       time_limit_s=30))
    assert result.errors == {"OUT_OF_RANGE": 4}


@pytest.mark.parametrize("config", sorted((BENCH / "ghz").glob("*.json")), ids=lambda p: p.name)
def test_ghz_configs_are_valid_requests(config, tiny_api):
    """Each ghz config names a real method and carries a request our server accepts."""
    from google.protobuf import json_format

    from coordinator.client import CoordinatorClient
    from protos import coordinator_pb2

    settings = json.loads(config.read_text())
    service, _, method = settings["call"].rpartition(".")
    assert service == "layerline.v1.Coordinator" and method in ("Generate", "GenerateStream")
    request = json_format.ParseDict(settings["data"], coordinator_pb2.GenerateRequest())
    with CoordinatorClient(tiny_api[0], timeout_s=60) as client:
        call = client.stub.Generate if method == "Generate" else client.stub.GenerateStream
        reply = call(request, timeout=60)
        if method == "GenerateStream":
            reply = list(reply)
        assert reply
    if "proto" in settings:
        assert (BENCH.parent / settings["proto"]).exists()
