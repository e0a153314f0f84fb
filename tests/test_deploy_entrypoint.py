"""deploy/docker/entrypoint.sh outside a container, as a test host runs it: each role becomes the
command it stands for (LAYERLINE_MODEL put before the caller's arguments), a bad role is exit
status 2, `certs` writes certificates, and `health` (python -m coordinator.health_check) answers a
real gRPC server's grpc.health.v1 state over plaintext and mutual TLS."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.certs import make_certificates
from protos.tls import TlsFiles, server_credentials

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"


def _entrypoint(*args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "LAYERLINE_MODEL"}
    environment.update(LAYERLINE_PYTHON=python, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=60,
                          env=environment, cwd=ROOT)


@pytest.fixture
def echo_python(tmp_path) -> str:
    """A stand-in interpreter that prints the arguments it was given, one a line."""
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("args, env, expected", [
    (["stage", "--layers", "0:2"], {"LAYERLINE_MODEL": "tiny"},
     ["-m", "stage_server.cli", "--model", "tiny", "--layers", "0:2"]),
    (["stage", "--model", "/m", "--layers", "0:2"], {}, ["-m", "stage_server.cli", "--model", "/m", "--layers", "0:2"]),
    (["coordinator", "serve", "--port", "1"], {"LAYERLINE_MODEL": "tiny"},
     ["-m", "coordinator.cli", "serve", "--model", "tiny", "--port", "1"]),
    (["coordinator", "info", "--address", "h:1"], {"LAYERLINE_MODEL": "tiny"},
     ["-m", "coordinator.cli", "info", "--address", "h:1"]),
    (["fetch-model"], {"LAYERLINE_MODEL": "tiny"}, ["-m", "coordinator.cli", "fetch-model", "tiny"]),
    (["fetch-model", "smollm2-135m", "--force"], {},
     ["-m", "coordinator.cli", "fetch-model", "smollm2-135m", "--force"]),
    (["certs", "--out", "d", "--hosts", "a"], {}, ["-m", "coordinator.cli", "certs", "--out", "d", "--hosts", "a"]),
    (["health", "h:1", "--tls-ca", "ca.pem"], {}, ["-m", "coordinator.health_check", "h:1", "--tls-ca", "ca.pem"]),
])
def test_each_role_runs_its_command(echo_python, args, env, expected):
    result = _entrypoint(*args, python=echo_python, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize("args", [[], ["serve"], ["fetch-model"]])
def test_a_missing_or_unknown_role_is_exit_status_2(echo_python, args):
    result = _entrypoint(*args, python=echo_python)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip(), "a line saying what to do"


def test_certs_role_writes_certificates(tmp_path):
    result = _entrypoint("certs", "--out", str(tmp_path / "certs"), "--hosts", "stage-a,coordinator")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert names == ["ca-key.pem", "ca.pem", "client-key.pem", "client.pem", "coordinator-key.pem",
                     "coordinator.pem", "stage-a-key.pem", "stage-a.pem"]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certificates(out, ["stage-a"])
    return out


def _health_server(status, tls: TlsFiles | None = None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", server_credentials(tls)) if tls
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("status, code", [(health_pb2.HealthCheckResponse.SERVING, 0),
                                          (health_pb2.HealthCheckResponse.NOT_SERVING, 1)])
def test_health_role_answers_the_servers_state(status, code):
    server, address = _health_server(status)
    try:
        result = _entrypoint("health", address)
    finally:
        server.stop(None).wait(5)
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout.strip() == f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"


def test_health_role_speaks_mutual_tls(certificates):
    tls = TlsFiles.read(ca=str(certificates / "ca.pem"), cert=str(certificates / "stage-a.pem"),
                        key=str(certificates / "stage-a-key.pem"))
    server, address = _health_server(health_pb2.HealthCheckResponse.SERVING, tls)
    ca = ["--tls-ca", str(certificates / "ca.pem")]
    client = ["--tls-cert", str(certificates / "client.pem"), "--tls-key", str(certificates / "client-key.pem")]
    try:
        with_certificate = _entrypoint("health", address, *ca, *client)
        without_certificate = _entrypoint("health", address, *ca, "--timeout", "2")
        plaintext = _entrypoint("health", address, "--timeout", "2")
    finally:
        server.stop(None).wait(5)
    assert with_certificate.returncode == 0, with_certificate.stdout + with_certificate.stderr
    assert without_certificate.returncode == 1 and "no health answer" in without_certificate.stdout
    assert plaintext.returncode == 1 and "no health answer" in plaintext.stdout


def test_health_role_refuses_a_bad_timeout_or_missing_file(tmp_path):
    assert _entrypoint("health", "127.0.0.1:1", "--timeout", "0").returncode == 2
    missing = _entrypoint("health", "127.0.0.1:1", "--tls-ca", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and missing.stderr.count("\n") == 1
