"""Shared fixtures: tiny checkpoints on disk and real stage servers on loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

# Some tests start servers with a preexec_fn, which forks this process while its gRPC threads run.
# grpcio's fork handlers then restart its poller in the child, which aborts there (epoll_wait: bad
# file descriptor, once the child closes its descriptors) before it runs the server, a few forks
# in a hundred (tests/test_fork_safety.py). Nothing here needs gRPC in a forked child; set before
# grpc loads, and inherited by every process the tests start.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import exit_watchdog  # noqa: E402
from tiny_models import save_tiny_model, save_tiny_tokenizer  # noqa: E402

from coordinator.planner import plan_partition  # noqa: E402
from stage_server.server import StageServer, StageServerConfig  # noqa: E402

torch.set_num_threads(2)
logging.getLogger("stage_server").setLevel(logging.WARNING)
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def pytest_terminal_summary(terminalreporter):
    report = exit_watchdog.busy_threads_report()
    if report:
        terminalreporter.write_sep("!", "threads left busy")
        terminalreporter.write_line(report)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A run that finished must exit: see exit_watchdog."""
    if _EXIT_STATUS in config.stash:
        exit_watchdog.arm(config.stash[_EXIT_STATUS])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, tied=False, sharded=False) → a saved checkpoint dir (built once per variant)."""
    cache: dict[tuple, Path] = {}

    def make(family: str, *, tied: bool = False, sharded: bool = False) -> Path:
        key = (family, tied, sharded)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}-{int(sharded)}")
            save_tiny_model(directory, family, tied=tied, sharded=sharded)
            save_tiny_tokenizer(directory)
            cache[key] = directory
        return cache[key]

    return make


@contextlib.contextmanager
def running_stages(model_dir: Path, num_stages: int, *, tell_deployment: bool = True, **config):
    """Start in-process stage servers on free loopback ports; yields their addresses. With
    `tell_deployment`, each is told the others (SetDeployment), as a coordinator does."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    servers = []
    try:
        for start, end in plan_partition(layers, num_stages):
            server = StageServer(StageServerConfig(model_dir=str(model_dir), layer_start=start, layer_end=end,
                                                   port=0, progress=False, drain_timeout_s=2.0, **config))
            server.start()
            servers.append(server)
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        if tell_deployment:
            set_deployment(addresses, config.get("tls"))
        yield addresses, servers
    finally:
        for server in servers:
            server.stop()


REPLICA_SPANS = [(0, 2), (0, 2), (2, 4), (2, 4)]


@contextlib.contextmanager
def running_replicas(model_dir: Path, spans=REPLICA_SPANS):
    """In-process stage servers, one per span given (by default two spans, two replicas each), gRPC
    hops only; yields them by address. Each is stopped at once at the end, as a crash would."""
    servers = {}
    try:
        for start, end in spans:
            server = StageServer(StageServerConfig(model_dir=str(model_dir), layer_start=start, layer_end=end, port=0,
                                                   progress=False, drain_timeout_s=1.0, local_hops=False))
            server.start()
            servers[f"127.0.0.1:{server.port}"] = server
        yield servers
    finally:
        for server in servers.values():
            server.grpc_server.stop(0)
            server.stop()


def set_deployment(addresses: list[str], tls=None) -> None:
    """Tell each stage its deployment, as a coordinator does (over loopback, accepted without TLS;
    with `tls`, protos.tls.TlsFiles, as a peer with a certificate of the stages' CA)."""
    from protos import stage_pb2, stage_pb2_grpc
    from protos.tls import open_channel

    for address in addresses:
        with open_channel(address, tls) as channel:
            stage_pb2_grpc.StageStub(channel).SetDeployment(stage_pb2.SetDeploymentRequest(stages=addresses),
                                                            timeout=10)


@pytest.fixture
def stages():
    """stages(model_dir, n, **config) as a context manager yielding (addresses, servers)."""
    return running_stages


@contextlib.contextmanager
def running_coordinator(model_dir: Path, addresses: list[str], api_keys=None, **config):
    """An in-process coordinator over running stages (api_keys: a coordinator.api_keys.ApiKeys);
    yields (address, server)."""
    from coordinator.app import CoordinatorConfig, CoordinatorServer

    server = CoordinatorServer(CoordinatorConfig(stages=tuple(addresses), model_dir=str(model_dir), port=0,
                                                 stage_wait_s=30, **config), api_keys=api_keys)
    port = server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def tiny_api(tmp_path_factory):
    """A 2-stage tiny Llama pipeline behind a coordinator: (coordinator address, stage addresses, model dir)."""
    directory = tmp_path_factory.mktemp("api-llama")
    save_tiny_model(directory, "llama")
    save_tiny_tokenizer(directory)
    with running_stages(directory, 2) as (addresses, _):
        with running_coordinator(directory, addresses) as (address, _):
            yield address, addresses, directory
