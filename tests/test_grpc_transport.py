"""The TCP path layerline's processes pick for gRPC (protos/grpc_transport.py): when it is set,
when it is left alone, and that both command lines set it before anything loads gRPC."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.certs import make_certificates
from protos.grpc_transport import (
    OLDER_TCP_PATH,
    TRANSPORT_MEASURED_ON,
    _grpcio_release,
    applies_to,
    choose_tcp_transport,
)

ROOT = Path(__file__).resolve().parent.parent


def test_set_for_a_measured_release_when_unset():
    environ: dict[str, str] = {}
    assert choose_tcp_transport(environ, release=TRANSPORT_MEASURED_ON[0]) == OLDER_TCP_PATH
    assert environ == {"GRPC_EXPERIMENTS": OLDER_TCP_PATH}


@pytest.mark.parametrize("users", ["", "-event_engine_client", "some_other_experiment"])
def test_a_value_the_user_set_is_kept(users):
    environ = {"GRPC_EXPERIMENTS": users}
    assert choose_tcp_transport(environ, release=TRANSPORT_MEASURED_ON[0]) == users
    assert environ == {"GRPC_EXPERIMENTS": users}


@pytest.mark.parametrize("release", [(1, 84), (1, TRANSPORT_MEASURED_ON[1][1] + 1), (2, 0)])
def test_left_unset_for_a_release_it_was_not_measured_on(release):
    environ: dict[str, str] = {}
    assert choose_tcp_transport(environ, release=release) is None
    assert environ == {}


def _skip_unless_the_installed_grpcio_gets_the_switch() -> None:
    if not applies_to(_grpcio_release()):
        pytest.skip("the installed grpcio is not a release the switch applies to")


# Records GRPC_EXPERIMENTS as it is when `grpc` is first imported, then imports a command line.
_PROBE = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS"))
        return None
sys.meta_path.insert(0, Watch())
import {module}
print(repr(seen[0] if seen else "grpc not imported"))
"""


@pytest.mark.parametrize(("imports", "expected"), [
    ("coordinator.cli", OLDER_TCP_PATH),
    ("stage_server.cli; import stage_server.server", OLDER_TCP_PATH),  # the order of the stage's main()
    ("grpc; import coordinator.cli", None),  # the probe sees a wrong order
])
def test_command_lines_choose_before_grpc_loads(imports, expected):
    _skip_unless_the_installed_grpcio_gets_the_switch()
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    result = subprocess.run([sys.executable, "-c", _PROBE.replace("{module}", imports)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(expected)


def test_hop_latency_bench_compares_both_paths(tmp_path):
    """bench/hop_latency.py runs, and its two kinds of pair really ran on different TCP paths."""
    _skip_unless_the_installed_grpcio_gets_the_switch()
    out = tmp_path / "hop.json"
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    subprocess.run([sys.executable, str(ROOT / "bench" / "hop_latency.py"), "--rounds", "2", "--trips", "20",
                    "--json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["grpc_experiments"] == {"gRPC default": "", "layerline": OLDER_TCP_PATH}
    assert len(result["payloads"]) == 2
    for figures in result["payloads"].values():
        for variant in ("gRPC default", "layerline"):
            assert len(figures["samples_us"][variant]) == 2 and all(us > 0 for us in figures["samples_us"][variant])
        assert figures["ratio"] == pytest.approx(figures["layerline_us"] / figures["grpc_default_us"])


# A TLS client in a process set up as layerline's are (the TCP path chosen before grpc loads): it
# calls a server that is not there yet, then is started, then killed and started again, calling
# all along as the coordinator's probes do; it prints how long the same channel took to get through
# each time. The server runs in its own process, set up the same way.
_TLS_SERVER = """
import sys, time
import protos.grpc_transport
import grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2_grpc
certs, port = sys.argv[1], sys.argv[2]
credentials = grpc.ssl_server_credentials(
    [(open(f"{certs}/127.0.0.1-key.pem", "rb").read(), open(f"{certs}/127.0.0.1.pem", "rb").read())],
    root_certificates=open(f"{certs}/ca.pem", "rb").read(), require_client_auth=True)
server = grpc.server(futures.ThreadPoolExecutor(2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
server.add_secure_port(f"127.0.0.1:{port}", credentials)
server.start()
print("up", flush=True)
time.sleep(60)
"""
_TLS_CLIENT = """
import subprocess, sys, time
import protos.grpc_transport
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos.tls import TlsFiles, open_channel
certs, port, server = sys.argv[1], sys.argv[2], sys.argv[3]
tls = TlsFiles.read(cert=f"{certs}/client.pem", key=f"{certs}/client-key.pem", ca=f"{certs}/ca.pem")
stub = health_pb2_grpc.HealthStub(open_channel(f"127.0.0.1:{port}", tls))

def calls(seconds):
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return time.monotonic() - started
        except grpc.RpcError:
            time.sleep(0.5)
    return None

def start():
    process = subprocess.Popen([sys.executable, "-c", server, certs, port], stdout=subprocess.PIPE)
    process.stdout.readline()
    return process

calls(2)  # nobody listens: the channel fails to connect, again and again
process = start()
first = calls(10)
process.kill(); process.wait()
calls(2)  # gone: failing calls
process = start()
again = calls(10)
process.kill()
print(first, again)
"""


def test_a_tls_channel_reaches_a_server_that_comes_up_after_it_failed(tmp_path):
    """In grpcio 1.85, gRPC's older TCP path for clients (the event_engine_client experiment off)
    never gets a TLS channel through once its connection attempts have failed: a coordinator
    started before its stages, or probing a stage that restarts, would wait for good."""
    make_certificates(tmp_path, ["127.0.0.1"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    result = subprocess.run([sys.executable, "-c", _TLS_CLIENT, str(tmp_path), str(port), _TLS_SERVER], cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    first, again = result.stdout.split()
    assert first != "None" and float(first) < 5, result.stdout  # came up after failed attempts
    assert again != "None" and float(again) < 5, result.stdout  # restarted while called
