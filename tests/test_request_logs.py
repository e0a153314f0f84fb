"""JSON logs tie one request together: its id is in the coordinator's request line and in every
stage's line about the request's session; the log flags also work after the subcommand.

Real processes: two stage servers and `coordinator serve`, all with `--log-format json`, the
coordinator's flags given after `serve`. The client sends its own `x-request-id`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from waiting import wait_for_line

from coordinator.client import CoordinatorClient, build_request

ROOT = Path(__file__).resolve().parent.parent
REQUEST_ID = "test-request-42"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def json_lines(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def collect(process: subprocess.Popen, into: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(iter(process.stderr.readline, "")), daemon=True)
    thread.start()
    return thread


def test_a_request_id_is_in_the_coordinators_and_every_stages_json_lines(tiny_model):
    model_dir = str(tiny_model("llama"))
    ports = [free_port(), free_port()]
    processes = [start("stage_server", "--model", model_dir, "--layers", layers, "--port", str(port), "--quiet",
                       "--log-format", "json") for layers, port in zip(("0:2", "2:4"), ports)]
    try:
        stage_lines = [wait_for_line(p, "ready on", 120) for p in processes]
        api_port = free_port()
        coordinator = start("coordinator", "serve", "--stages", ",".join(f"127.0.0.1:{p}" for p in ports),
                            "--model", model_dir, "--port", str(api_port), "--log-format", "json",
                            "--log-level", "INFO")
        processes.append(coordinator)
        coordinator_lines = wait_for_line(coordinator, "coordinator serving", 120)
        readers = [collect(p, lines) for p, lines in zip(processes, [*stage_lines, coordinator_lines])]
        with CoordinatorClient(f"127.0.0.1:{api_port}", timeout_s=30) as client:
            reply, call = client.stub.Generate.with_call(build_request(prompt="hello", max_new_tokens=3),
                                                         timeout=30, metadata=(("x-request-id", REQUEST_ID),))
        assert len(reply.token_ids) == 3 and ("x-request-id", REQUEST_ID) in call.initial_metadata()
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)
    for reader in readers:
        reader.join(timeout=10)
    finished = [e for e in json_lines(coordinator_lines) if e.get("request_id") == REQUEST_ID]
    assert finished and finished[0]["status"] == "OK" and finished[0]["completion_tokens"] == 3, coordinator_lines
    assert finished[0]["logger"] == "coordinator.requests" and finished[0]["route"] == [f"127.0.0.1:{p}" for p in ports]
    for lines in stage_lines:
        assert any(REQUEST_ID in e.get("request_ids", []) for e in json_lines(lines)), lines[-5:]
