"""SIGTERM drains a stage: NOT_SERVING and Info.draining at once, no new session, the sessions it holds go
on stepping with the same answers, and the process exits once they end or its --drain-timeout passes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_bad_input import code_of, valid_prefill
from waiting import eventually, wait_for_line

from protos import codec, stage_pb2, stage_pb2_grpc

START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_stage(model_dir, drain_timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stage_server.cli", "--model", str(model_dir), "--layers", "0:4", "--port", str(port),
         "--quiet", "--threads", "1", "--drain-timeout", str(drain_timeout_s)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for_line(process, "stage-server ready", START_TIMEOUT_S)
    return process, f"127.0.0.1:{port}"


def _decode_step(session_id: str, token: int, position: int) -> stage_pb2.ForwardRequest:
    return stage_pb2.ForwardRequest(
        session_id=session_id, micro_batch_id=2, activations=codec.encode(torch.tensor([[token]])),
        position_ids=codec.encode(torch.tensor([[position]])),
        attention_mask=codec.encode(torch.ones(1, position + 1, dtype=torch.int64)))


def _forward(stub, request) -> stage_pb2.ForwardResponse:
    return next(iter(stub.Forward(iter([request]), timeout=30)))


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="layerline.v1.Stage"), timeout=10).status


def _exit_status_within(process: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def test_a_draining_stage_takes_no_new_session_and_exits_once_its_sessions_end(tiny_model):
    process, address = _start_stage(tiny_model("llama"), drain_timeout_s=60)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            for session in ("held", "reference"):
                assert _forward(stub, valid_prefill(session, [])).status_code == 0
            expected = codec.decode(_forward(stub, _decode_step("reference", 9, 3)).logits)
            stub.EndSession(stage_pb2.EndSessionRequest(session_id="reference"), timeout=10)

            process.send_signal(signal.SIGTERM)
            assert eventually(lambda: stub.Info(stage_pb2.InfoRequest(), timeout=10).draining, True, 10.0)
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

            refused = _forward(stub, valid_prefill("new", []))
            assert code_of(refused) == grpc.StatusCode.UNAVAILABLE
            assert "draining" in refused.error_message and "\n" not in refused.error_message
            assert address in refused.failed_stage

            answer = _forward(stub, _decode_step("held", 9, 3))
            assert answer.status_code == 0, answer.error_message
            assert torch.equal(codec.decode(answer.logits), expected), "a held session steps as before"
            assert process.poll() is None, "a stage holding a session keeps running"

            stub.EndSession(stage_pb2.EndSessionRequest(session_id="held"), timeout=10)
            ended = time.monotonic()
        assert _exit_status_within(process, 10) == 0
        assert time.monotonic() - ended < 3.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_stage_whose_session_never_ends_exits_after_its_drain_timeout(tiny_model):
    process, address = _start_stage(tiny_model("llama"), drain_timeout_s=2)
    try:
        with grpc.insecure_channel(address) as channel:
            assert _forward(stage_pb2_grpc.StageStub(channel), valid_prefill("forgotten", [])).status_code == 0
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert _exit_status_within(process, 15) == 0
        took = time.monotonic() - signalled
        assert 1.8 <= took < 8.0, took
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
