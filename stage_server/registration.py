"""A stage's registration with a coordinator (`stage-server --join COORDINATOR:PORT`).

Owns: the --join and --advertise flags and their checks, the announcement (a Registry.Join request:
the advertised address, layer range, model fingerprint, weights manifest id, protocol and software
versions, max_sessions and whether the stage drains), and the daemon thread that sends it once the
stage serves, renews it every renew_after_ms the coordinator answers (bounded), retries a failed
call with backoff, and announces a drain at once.

Does not own: the coordinator's side of the Registry (coordinator/), what draining does on the
stage (server and step_runner), nor the channel's credentials (protos/tls.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import threading
from collections.abc import Callable

import grpc

from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.addresses import host_and_port
from protos.channel_options import channel_options
from protos.protocol import PROTOCOL_VERSION
from protos.software_versions import software_versions
from protos.tls import TlsFiles, open_channel

log = logging.getLogger(__name__)

FIRST_RENEW_S = 2.0  # until the coordinator has said how often
MIN_RENEW_S, MAX_RENEW_S = 0.5, 60.0  # whatever the coordinator says
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0  # between failed calls, doubling
CALL_TIMEOUT_S = 5.0
ANNOUNCE_TIMEOUT_S = 1.0  # a drain's announcement holds the drain up at most this long
STOP_WAIT_S = 2.0  # how long stop() waits for the thread (its call is cancelled first)


def add_join_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--join", metavar="COORDINATOR:PORT", default="",
                        help="announce this stage to the coordinator's registry (coordinator serve --join-port) "
                             "once it serves, and keep the announcement alive; over TLS with --tls-*")
    parser.add_argument("--advertise", metavar="HOST:PORT", default="",
                        help="with --join: the address the coordinator and other stages reach this stage at "
                             "(default --host:--port as bound; needed when --host is a wildcard such as 0.0.0.0)")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _check_address(flag: str, address: str) -> None:
    host, port = host_and_port(address)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} takes HOST:PORT (a port from 1 to 65535), got {address!r}")


def check_join_arguments(args: argparse.Namespace) -> None:
    """Refuse (ValueError, one line) unusable --join / --advertise values before anything loads."""
    if args.advertise and not args.join:
        raise ValueError("--advertise is the address announced with --join: give --join COORDINATOR:PORT too")
    if not args.join:
        return
    _check_address("--join", args.join)
    if args.advertise:
        _check_address("--advertise", args.advertise)
        if _is_wildcard(host_and_port(args.advertise)[0]):
            raise ValueError(f"--advertise {args.advertise} is a wildcard address: give one that others can dial")
    elif _is_wildcard(args.host):
        raise ValueError(f"--host {args.host} listens on every address, so --join cannot tell the coordinator "
                         "which one reaches this stage: give --advertise HOST:PORT")


def announcement(service, address: str) -> coordinator_pb2.JoinRequest:
    """The Join request for `service` (a StageService whose weights are in) served at `address`."""
    loaded = service.model.loaded
    return coordinator_pb2.JoinRequest(
        address=address, layer_start=loaded.layer_start, layer_end=loaded.layer_end,
        model_fingerprint=loaded.fingerprint, weights_manifest_id=loaded.weights_manifest_id,
        protocol_version=PROTOCOL_VERSION, versions=software_versions(),
        max_sessions=service.steps.served.sessions.max_sessions, draining=service.draining)


def renew_interval(reply: coordinator_pb2.JoinResponse) -> float:
    """Seconds until the next announcement: the coordinator's renew_after_ms within [0.5 s, 60 s]
    (FIRST_RENEW_S when it gives none)."""
    if not reply.renew_after_ms:
        return FIRST_RENEW_S
    return min(MAX_RENEW_S, max(MIN_RENEW_S, reply.renew_after_ms / 1000))


class Registration:
    """Keeps this stage announced to one coordinator: `start()`, `announce()`, `stop()`."""

    def __init__(self, coordinator: str, request: Callable[[], coordinator_pb2.JoinRequest],
                 tls: TlsFiles | None = None) -> None:
        """`request()` builds the announcement anew each time (its draining flag changes)."""
        self.coordinator = coordinator
        self._request = request
        self._channel = open_channel(coordinator, tls, options=[
            *channel_options(),
            # gRPC's own reconnect backoff grows to 120 s: a coordinator back after a while would wait that long
            ("grpc.initial_reconnect_backoff_ms", int(FIRST_BACKOFF_S * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(FIRST_BACKOFF_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000))])
        self._stub = coordinator_pb2_grpc.RegistryStub(self._channel)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)
        self.last_reply: coordinator_pb2.JoinResponse | None = None

    def start(self) -> None:
        self._thread.start()

    def announce(self) -> bool:
        """Send the announcement now, on the caller's thread (a drain began: the coordinator hears it
        at once, not at the next renewal); False, with a warning, when the call fails."""
        request = self._request()
        try:
            self._stub.Join(request, timeout=ANNOUNCE_TIMEOUT_S)
            return True
        except grpc.RpcError as err:
            log.warning("could not tell coordinator %s that this stage %s (%s: %s)", self.coordinator,
                        "drains" if request.draining else "serves", err.code().name, err.details())
            return False

    def stop(self) -> None:
        """End the thread (its call in flight is cancelled) and close the channel; bounded."""
        self._stopping.set()
        self._wake.set()
        self._channel.close()
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        delay, failures = 0.0, 0
        while not self._stopping.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopping.is_set():
                return
            request = self._request()
            try:
                reply = self._stub.Join(request, timeout=CALL_TIMEOUT_S)
            except (grpc.RpcError, ValueError) as err:  # ValueError: the channel closed under the call
                if self._stopping.is_set():
                    return
                if failures == 0:
                    detail = err.details() if isinstance(err, grpc.RpcError) else str(err)
                    log.warning("could not join coordinator %s (%s: %s); retrying with backoff up to %.0f s",
                                self.coordinator, err.code().name if isinstance(err, grpc.RpcError) else "closed",
                                detail, MAX_BACKOFF_S)
                delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(failures, 8))
                failures += 1
                continue
            delay = renew_interval(reply)
            if failures or self.last_reply is None:
                log.info("joined coordinator %s as %s (%s%s), renewing every %.1f s", self.coordinator,
                         request.address, reply.state or "accepted", ", draining" if request.draining else "",
                         delay)
            failures = 0
            self.last_reply = reply
