"""`stage-server --join`: the stage announces itself to a coordinator's Registry once it serves, renews
the announcement, says at once when it drains, and backs off while the registry is down. The registry
here is a small fake served by the test."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from waiting import eventually, wait_for_line

from coordinator.certs import make_certificates
from protos import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc
from protos.channel_options import bind
from protos.protocol import PROTOCOL_VERSION
from protos.software_versions import software_versions
from protos.tls import TlsFiles, server_credentials
from stage_server import registration
from stage_server.registration import Registration, check_join_arguments, renew_interval


class FakeRegistry(coordinator_pb2_grpc.RegistryServicer):
    """Records each Join (when, what); refuses the first `refuse` UNAVAILABLE; answers `renew_after_ms`."""

    def __init__(self, *, renew_after_ms: int = 500, refuse: int = 0, tls: TlsFiles | None = None,
                 port: int = 0) -> None:
        self.renew_after_ms, self.refuse = renew_after_ms, refuse
        self.calls: list[tuple[float, coordinator_pb2.JoinRequest]] = []
        self.refused: list[float] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        coordinator_pb2_grpc.add_RegistryServicer_to_server(self, self.server)
        self.port = bind(self.server, "127.0.0.1", port, server_credentials(tls) if tls else None)
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def Join(self, request, context):
        with self._lock:
            if len(self.refused) < self.refuse:
                self.refused.append(time.monotonic())
                context.abort(grpc.StatusCode.UNAVAILABLE, "the registry is not ready")
            self.calls.append((time.monotonic(), request))
        return coordinator_pb2.JoinResponse(renew_after_ms=self.renew_after_ms, forget_after_ms=10_000,
                                            state="draining" if request.draining else "serving")

    def requests(self) -> list[coordinator_pb2.JoinRequest]:
        with self._lock:
            return [request for _, request in self.calls]

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def _announced(address: str, draining: bool = False) -> coordinator_pb2.JoinRequest:
    return coordinator_pb2.JoinRequest(address=address, layer_start=0, layer_end=2, draining=draining)


def test_a_joined_stage_announces_what_it_serves_renews_and_says_when_it_drains(tiny_model, stages):
    fake = FakeRegistry(renew_after_ms=500)
    try:
        with stages(tiny_model("llama"), 1, join=fake.address) as (addresses, servers):
            assert eventually(lambda: len(fake.requests()) >= 2, True, 10.0), "an announcement, then a renewal"
            with grpc.insecure_channel(addresses[0]) as channel:
                info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
            first = fake.requests()[0]
            assert first.address == addresses[0]
            assert (first.layer_start, first.layer_end) == (info.layer_start, info.layer_end) == (0, 4)
            assert first.model_fingerprint == info.model_fingerprint != ""
            assert first.weights_manifest_id == info.weights_manifest_id
            assert first.protocol_version == PROTOCOL_VERSION
            assert dict(first.versions) == software_versions()
            assert first.max_sessions == info.max_sessions
            assert not first.draining
            times = [t for t, _ in fake.calls]
            assert 0.4 <= times[1] - times[0] <= 1.5, "renewed after the registry's renew_after_ms"
            before = len(fake.requests())
            servers[0].stop()  # no session held: the drain ends at once
            signalled = fake.requests()[before:]
            assert signalled and signalled[0].draining, "the drain is announced before the stage stops"
            stopped = len(fake.requests())
            time.sleep(1.0)
            assert len(fake.requests()) == stopped, "no announcement once stopped"
    finally:
        fake.stop()


def test_the_registration_backs_off_while_the_registry_refuses_and_recovers(caplog, monkeypatch):
    monkeypatch.setattr(registration, "FIRST_BACKOFF_S", 0.1)
    monkeypatch.setattr(registration, "MAX_BACKOFF_S", 0.4)
    fake = FakeRegistry(renew_after_ms=500, refuse=5)
    joined = Registration(fake.address, lambda: _announced("127.0.0.1:7"))
    try:
        with caplog.at_level(logging.INFO, logger="stage_server.registration"):
            joined.start()
            assert eventually(lambda: joined.last_reply is not None, True, 10.0), "joined once it answers"
        waits = [b - a for a, b in zip(fake.refused, fake.refused[1:] + [fake.calls[0][0]])]
        expected = [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling from FIRST_BACKOFF_S, capped at MAX_BACKOFF_S
        assert all(want - 0.02 <= wait <= want + 0.3 for wait, want in zip(waits, expected)), waits
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "could not join coordinator" in warnings[0].getMessage()
        assert "\n" not in warnings[0].getMessage() and warnings[0].exc_info is None
        assert any("joined coordinator" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    finally:
        started = time.monotonic()
        joined.stop()
        assert time.monotonic() - started < 3.0
        fake.stop()


def test_a_registry_not_listening_yet_is_joined_once_it_listens(monkeypatch, caplog):
    monkeypatch.setattr(registration, "FIRST_BACKOFF_S", 0.1)
    monkeypatch.setattr(registration, "MAX_BACKOFF_S", 0.4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there yet
    joined, fake = Registration(f"127.0.0.1:{port}", lambda: _announced("127.0.0.1:7")), None
    try:
        with caplog.at_level(logging.INFO, logger="stage_server.registration"):
            joined.start()
            time.sleep(1.5)
            assert joined.last_reply is None
            fake = FakeRegistry(port=port)
            assert eventually(lambda: len(fake.requests()) >= 1, True, 5.0), "joined within the backoff's cap"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "UNAVAILABLE" in warnings[0], warnings
    finally:
        joined.stop()
        if fake is not None:
            fake.stop()


def test_renewal_stays_within_bounds_whatever_the_coordinator_says():
    assert renew_interval(coordinator_pb2.JoinResponse()) == registration.FIRST_RENEW_S
    assert renew_interval(coordinator_pb2.JoinResponse(renew_after_ms=1)) == 0.5
    assert renew_interval(coordinator_pb2.JoinResponse(renew_after_ms=3000)) == 3.0
    assert renew_interval(coordinator_pb2.JoinResponse(renew_after_ms=4_000_000_000)) == 60.0


def test_the_registration_runs_over_mutual_tls_with_the_stage_certificate(tmp_path):
    make_certificates(tmp_path, ["node1.example"])
    tls = TlsFiles.read(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "node1.example.pem"),
                        key=str(tmp_path / "node1.example-key.pem"))
    fake = FakeRegistry(tls=tls)
    joined = Registration(fake.address, lambda: _announced("127.0.0.1:7"), tls)
    try:
        joined.start()
        assert eventually(lambda: len(fake.requests()) >= 1, True, 10.0)
        plain = Registration(fake.address, lambda: _announced("127.0.0.1:8"))  # no certificate: refused
        assert not plain.announce()
        plain.stop()
        assert {r.address for r in fake.requests()} == {"127.0.0.1:7"}
    finally:
        joined.stop()
        fake.stop()


@pytest.mark.parametrize("flags, problem", [
    (["--join", "c:5", "--host", "0.0.0.0"], "--advertise"),
    (["--join", "c:5", "--host", "::"], "--advertise"),
    (["--join", "c:5", "--advertise", "0.0.0.0:5"], "wildcard"),
    (["--join", "nope"], "--join takes HOST:PORT"),
    (["--join", "c:5", "--advertise", "h:99999"], "--advertise takes HOST:PORT"),
    (["--advertise", "h:5"], "give --join"),
])
def test_join_flags_are_checked_before_anything_loads(flags, problem):
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    registration.add_join_arguments(parser)
    with pytest.raises(ValueError, match=problem) as raised:
        check_join_arguments(parser.parse_args(flags))
    assert "\n" not in str(raised.value)
    check_join_arguments(parser.parse_args(["--join", "c:5", "--host", "0.0.0.0", "--advertise", "10.0.0.2:5"]))


def test_a_stage_process_started_with_join_announces_itself_and_its_drain(tiny_model):
    """The flags reach the stage: `--join` with `--advertise`, then SIGTERM announces the drain."""
    fake = FakeRegistry(renew_after_ms=60_000)
    process = subprocess.Popen(
        [sys.executable, "-m", "stage_server.cli", "--model", str(tiny_model("llama")), "--layers", "0:4",
         "--port", "0", "--quiet", "--threads", "1", "--join", fake.address, "--advertise", "127.0.0.1:50999"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_line(process, "stage-server ready", 240)
        assert eventually(lambda: len(fake.requests()) >= 1, True, 10.0)
        assert fake.requests()[0].address == "127.0.0.1:50999" and not fake.requests()[0].draining
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert [r.draining for r in fake.requests()] == [False, True]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        fake.stop()
