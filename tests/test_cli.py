"""The command-line tools as a user runs them, as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from tiny_models import reference_greedy
from transformers import AutoTokenizer, LlamaConfig
from waiting import wait_for_line

from protos.model_files.catalog import ModelNotFoundError
from protos.model_files.resolve import resolve_model

TIMEOUT = 240


def run(*args, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_launch_local_one_shot_json(tiny_model):
    """(With every hop on gRPC: the serving test below takes the default, same-machine sockets.)"""
    model_dir = tiny_model("llama")
    result = run("coordinator.cli", "launch-local", "--model", str(model_dir), "--num-stages", "3",
                 "--prompt", "Hello there", "--max-new-tokens", "8", "--json", "--threads", "1",
                 "--attention", "per-sequence", "--local-hops", "off")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)("Hello there")["input_ids"]
    assert reply["token_ids"] == reference_greedy(model_dir, [prompt_ids], 8)[0]
    assert reply["finish_reason"] == "length" and reply["prompt_tokens"] == len(prompt_ids)
    assert "stage 2: layers 3:4 ready" in result.stderr


def test_stage_server_rejects_layer_range_outside_model(tiny_model):
    result = run("stage_server.cli", "--model", str(tiny_model("llama")), "--layers", "2:9", "--port", "0")
    assert result.returncode == 2
    assert "outside the model, which has layers 0:4" in result.stderr


def test_a_host_that_cannot_be_bound_is_one_line_and_status_2(tiny_model):
    """A --host that is not an address of this machine (here not an address at all) ends the
    process with one line saying what to change, not grpcio's traceback (--insecure: not being a
    loopback address, it would be refused without TLS before any bind)."""
    result = run("stage_server.cli", "--layers", "0:2", "--model", str(tiny_model("llama")), "--host", "256.0.0.1",
                 "--port", "0", "--insecure")
    assert result.returncode == 2, result.stderr
    assert "cannot listen on 256.0.0.1:0" in result.stderr and "Traceback" not in result.stderr


def test_every_server_binds_through_one_check():
    """The coordinator binds like the stage (protos.channel_options.bind): a port grpcio cannot
    take is an OSError naming it, which both command lines turn into their one-line error."""
    from concurrent import futures

    from protos.channel_options import bind

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(OSError, match="cannot listen on 256.0.0.1:0"):
            bind(server, "256.0.0.1", 0)
        assert bind(server, "127.0.0.1", 0) > 0
    finally:
        server.stop(None)


def test_a_second_server_on_a_held_port_is_refused():
    """gRPC's default SO_REUSEPORT would let a second server share the port and split connections
    with the first; every layerline server turns it off, so the second bind fails naming the port."""
    from concurrent import futures

    from protos.channel_options import bind, server_options

    first = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=server_options())
    second = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=server_options())
    try:
        port = bind(first, "127.0.0.1", 0)
        first.start()
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            bind(second, "127.0.0.1", port)
    finally:
        first.stop(None)
        second.stop(None)


def test_stage_server_rejects_unsupported_architecture(tmp_path):
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "bert"')
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes(b"")
    result = run("stage_server.cli", "--model", str(tmp_path), "--layers", "0:1", "--port", "0")
    assert result.returncode == 2
    assert "supported" in result.stderr and "llama" in result.stderr


def test_unknown_model_name_says_what_to_do():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model("no-such-model")


def test_launch_local_serves_until_sigterm_and_cleans_up(tiny_model):
    """Serve mode: the API answers, and SIGTERM stops the coordinator and every stage process."""
    from coordinator.client import CoordinatorClient

    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "launch-local", "--model", str(tiny_model("llama")),
         "--num-stages", "2", "--port", str(port), "--threads", "1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_line(process, "Ctrl-C to stop", TIMEOUT)
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) == 2, "two stage processes"
        with CoordinatorClient(f"127.0.0.1:{port}", timeout_s=60) as client:
            assert len(client.generate(prompt="hi", max_new_tokens=3).token_ids) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "stage servers must stop with the launcher"
    finally:
        if process.poll() is None:
            process.kill()


def test_stage_server_health_and_sigterm(tiny_model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "stage_server.cli", "--model", str(tiny_model("gpt2")),
                                "--layers", "0:2", "--port", str(port), "--quiet"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_line(process, "stage-server ready", TIMEOUT)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="layerline.v1.Stage"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




def test_launch_local_checks_its_port_before_starting_any_stage(tiny_model):
    """A coordinator port another process holds fails launch-local at once, with one line naming the
    port, and no stage is started."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run("coordinator.cli", "launch-local", "--model", str(tiny_model("llama")), "--num-stages", "2",
                     "--port", str(port), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], result.stderr
    assert "stage servers" not in result.stderr
