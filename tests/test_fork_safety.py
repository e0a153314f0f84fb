"""Forking a process whose gRPC threads are busy, as the tests that start servers with a preexec_fn
do, must not kill the child before it runs its program.

grpcio's fork handlers restart its poller in a forked child, where it can abort (epoll_wait: bad
file descriptor) once the child has closed its descriptors; with GRPC_ENABLE_FORK_SUPPORT=0 (set by
conftest for the test run and every process it starts) the handlers stay out of the child. The
probe runs in a fresh interpreter with this process's environment: 200 forks while a thread keeps
calling gRPC. Without the setting, a few in a hundred children die on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

FORKS = 200
PROBE = f"""
import subprocess, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

channel = grpc.insecure_channel("127.0.0.1:1")  # nobody listens: each call fails at once
done = threading.Event()

def calls():
    stub = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=0.01)
        except grpc.RpcError:
            pass

threading.Thread(target=calls, daemon=True).start()
time.sleep(0.3)
failed = sum(subprocess.run(["true"], preexec_fn=lambda: None).returncode != 0 for _ in range({FORKS}))
done.set()
print(failed)
"""


def test_forked_children_survive_busy_grpc_threads():
    assert os.environ.get("GRPC_ENABLE_FORK_SUPPORT") == "0"
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) == 0, f"children that died of {FORKS}: {done.stdout}"
