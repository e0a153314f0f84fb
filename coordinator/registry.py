"""The coordinator's side of joining: the Registry service stages announce themselves to.

Owns: `Registry`, the servicer of `layerline.v1.Registry.Join` (checks the announcement: the
address, layer range and string sizes, then that the caller owns the announced host
(caller_host), then that it serves this coordinator's model, weights and protocol, then the bound
on joined servers; then `StagePool.join`); `JoinServer`, the gRPC server that serves it on its own
port (`coordinator serve --join-port`: the stages' mutual TLS, not the public API's keys or CA);
the `--join-port` flag; and waiting until joined servers form a route (`joined_route`) when no
`--stages` are given.

Does not own: the servers' states, probes and forgetting a silent one (stage_pool), whether the
caller owns a host (caller_host), or the stage's side of joining (stage-server --join).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator import stage_pool
from coordinator.caller_host import Resolver, as_ip, host_refusal, resolve
from coordinator.stage_agreement import NUMERIC_LIBRARIES
from coordinator.stage_pool import NoRoute, StagePool
from protos import coordinator_pb2, stage_pb2
from protos.addresses import host_and_port
from protos.channel_options import api_server_options, bind
from protos.protocol import PROTOCOL_VERSION
from protos.raw_parsing import add_servicer
from protos.shutdown import stop_server
from protos.tls import TlsFiles, check_listen, server_credentials
from protos.unknown_fields import first_unknown_field

log = logging.getLogger(__name__)

REGISTRY = coordinator_pb2.DESCRIPTOR.services_by_name["Registry"]
RENEW_AFTER_MS = 2000  # how often a joined stage announces itself again
MAX_JOINED = 256  # servers known through the Registry at once (beyond: RESOURCE_EXHAUSTED)
MAX_ADDRESS_CHARS = 256  # host:port, as a stage bounds the addresses it is told
MAX_ID_CHARS = 128  # model fingerprint, weights manifest id (hex digests)
MAX_VERSIONS, MAX_VERSION_CHARS = 32, 128  # entries of the versions map; characters of a name or version
MAX_LAYERS = 1 << 16
MAX_JOIN_REQUEST_BYTES = 64 << 10  # larger requests: RESOURCE_EXHAUSTED from gRPC before they are read
JOIN_THREADS, MAX_JOIN_CALLS = 8, 64  # handler threads; calls at once (beyond: RESOURCE_EXHAUSTED)
MAX_REFUSALS_REMEMBERED = 256  # (address, reason) pairs already logged, so a retrying stage logs once
_DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class JoinRefused(Exception):
    """A Join the Registry does not take: the status code and a one-line message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> JoinRefused:
    return JoinRefused(grpc.StatusCode.INVALID_ARGUMENT, message)


def announced_host(address: str) -> str:
    """The host of an announced "host:port" / "[v6]:port" (JoinRefused INVALID_ARGUMENT otherwise)."""
    if not address:
        raise _invalid("address is empty: announce the HOST:PORT this stage serves on")
    if len(address) > MAX_ADDRESS_CHARS:
        raise _invalid(f"address has {len(address)} characters; at most {MAX_ADDRESS_CHARS}")
    host, port = host_and_port(address)
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise _invalid(f"address {address!r} is not HOST:PORT with a port from 1 to 65535 (IPv6: [ADDRESS]:PORT)")
    ip = as_ip(host)
    if ip is None and (address.startswith("[") or host.replace(".", "").isdigit() or not _DNS_NAME.fullmatch(host)):
        raise _invalid(f"address {address!r}: {host!r} is neither an IP address nor a host name")
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        raise _invalid(f"address {address!r} is not one a stage can be dialled at: announce its own address")
    return host


def check_request(request: coordinator_pb2.JoinRequest) -> str:
    """Sizes and ranges of a Join (JoinRefused INVALID_ARGUMENT); returns the announced host."""
    unknown = first_unknown_field(request)
    if unknown is not None:
        raise _invalid(f"the request carries {unknown}; the stage's coordinator.proto differs from this coordinator's")
    host = announced_host(request.address)
    if not request.layer_start < request.layer_end <= MAX_LAYERS:
        raise _invalid(f"layers {request.layer_start}:{request.layer_end} are not a range start < end <= {MAX_LAYERS}")
    for name in ("model_fingerprint", "weights_manifest_id"):
        value = getattr(request, name)
        if not value or len(value) > MAX_ID_CHARS:
            raise _invalid(f"{name} has {len(value)} characters; give the stage's own (1 to {MAX_ID_CHARS})")
    if len(request.versions) > MAX_VERSIONS:
        raise _invalid(f"versions has {len(request.versions)} entries; at most {MAX_VERSIONS}")
    if any(len(key) > MAX_VERSION_CHARS or len(value) > MAX_VERSION_CHARS for key, value in request.versions.items()):
        raise _invalid(f"a name or value in versions is longer than {MAX_VERSION_CHARS} characters")
    return host


def agreement_refusal(request: coordinator_pb2.JoinRequest, reference: tuple[str, stage_pb2.InfoResponse] | None,
                      allow_mixed_versions: bool) -> str | None:
    """Why the announced stage cannot serve beside the pool's serving servers (one line), or None."""
    if request.protocol_version != PROTOCOL_VERSION:
        return (f"the stage speaks stage protocol {request.protocol_version}, this coordinator "
                f"{PROTOCOL_VERSION}: run the same layerline version on every machine")
    if reference is None:
        return None  # nothing serves yet: the first server to pass its probe sets the model
    address, info = reference
    for name, what in (("model_fingerprint", "model"), ("weights_manifest_id", "weights")):
        if getattr(request, name) != getattr(info, name):
            return (f"the stage serves other {what} ({name} {getattr(request, name)}) than {address} "
                    f"({getattr(info, name)}): load the same checkpoint on every stage")
    if request.layer_end > info.num_layers:
        return f"layers {request.layer_start}:{request.layer_end} go past the model's {info.num_layers}"
    if not allow_mixed_versions:
        for library in NUMERIC_LIBRARIES:
            theirs, ours = request.versions.get(library, "unknown"), info.versions.get(library, "unknown")
            if theirs != ours:
                return (f"the stage runs {library} {theirs}, {address} runs {ours}; install the same versions "
                        "or serve with --allow-mixed-versions")
    return None


class Registry:
    """The Registry servicer over a StagePool."""

    def __init__(self, pool: StagePool, *, static: Sequence[str] = (), allow_mixed_versions: bool = False,
                 resolver: Resolver = resolve, max_joined: int = MAX_JOINED) -> None:
        """`static`: the servers given with --stages (not counted against `max_joined`)."""
        self.pool = pool
        self.static = frozenset(static)
        self.allow_mixed_versions = allow_mixed_versions
        self.resolver = resolver
        self.max_joined = max_joined
        self._lock = threading.Lock()  # counting and joining together, so the bound holds
        self._logged: set[tuple[str, str]] = set()

    def Join(self, request: coordinator_pb2.JoinRequest, context) -> coordinator_pb2.JoinResponse:
        try:
            state = self._join(request, context.peer(), context.auth_context())
        except JoinRefused as refused:
            self._log_refusal(request.address[:MAX_ADDRESS_CHARS], refused)
            context.abort(refused.code, str(refused))  # raises
        return coordinator_pb2.JoinResponse(renew_after_ms=RENEW_AFTER_MS,
                                            forget_after_ms=int(stage_pool.FORGET_JOINED_AFTER_S * 1000), state=state)

    def _join(self, request: coordinator_pb2.JoinRequest, peer: str, auth) -> str:
        host = check_request(request)
        refusal = host_refusal(peer, auth, host, self.resolver)
        if refusal:
            raise JoinRefused(grpc.StatusCode.PERMISSION_DENIED, refusal)
        serving = self.pool.serving_infos()
        refusal = agreement_refusal(request, serving[0] if serving else None, self.allow_mixed_versions)
        if refusal:
            raise JoinRefused(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        with self._lock:
            known = self.pool.addresses()
            if request.address not in known and sum(a not in self.static for a in known) >= self.max_joined:
                raise JoinRefused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"{self.max_joined} stage servers have joined already; a silent one is forgotten "
                                  f"after {stage_pool.FORGET_JOINED_AFTER_S:.0f}s")
            return self.pool.join(request.address, draining=request.draining)

    def _log_refusal(self, address: str, refused: JoinRefused) -> None:
        key = (address, str(refused))
        if key in self._logged:
            return
        if len(self._logged) >= MAX_REFUSALS_REMEMBERED:
            self._logged.clear()
        self._logged.add(key)
        log.warning("refused the join of %r (%s): %s", address, refused.code.name, refused)


class JoinServer:
    """The Registry on its own gRPC server: `start()` binds host:port, `stop()` ends it (bounded)."""

    def __init__(self, registry: Registry, host: str, port: int, tls: TlsFiles | None = None) -> None:
        """`tls`: the stages' files (mutual TLS: a caller presents a certificate of their CA), or plaintext."""
        self.host, self.port, self.tls = host, port, tls
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=JOIN_THREADS, thread_name_prefix="join"),
                                       options=api_server_options(MAX_JOIN_REQUEST_BYTES),
                                       maximum_concurrent_rpcs=MAX_JOIN_CALLS)
        add_servicer(registry, self.grpc_server, REGISTRY)

    def start(self) -> int:
        self.port = bind(self.grpc_server, self.host, self.port, server_credentials(self.tls) if self.tls else None)
        self.grpc_server.start()
        log.info("Registry (stage-server --join) on %s:%d", self.host, self.port)
        return self.port

    def stop(self, grace_s: float = 1.0) -> None:
        stop_server(self.grpc_server, grace_s)


def joined_route(pool: StagePool, timeout_s: float, where: str, progress_every_s: float = 10.0
                 ) -> tuple[tuple[str, ...], list[stage_pb2.InfoResponse]]:
    """Wait until joined servers form a route; its addresses and their Info. Logs (WARNING) every
    `progress_every_s` what it waits for; NoRoute after `timeout_s`. `where`: the join address."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        try:
            route = pool.wait_for_route(max(0.0, min(progress_every_s, timeout_s - elapsed)), progress_every_s=math.inf)
        except NoRoute:
            elapsed = time.monotonic() - started
            try:
                pool.choose()
                continue  # a route formed just now
            except NoRoute as missing:
                known = "; ".join(f"{v.address}: {v.down_reason or v.state}" for v in pool.views())
                waiting = f"{missing} (joined: {known or 'none yet'})"
            if elapsed >= timeout_s:
                raise NoRoute(f"no complete route of joined stages after {timeout_s:.0f}s: {waiting}; start stages "
                              f"with stage-server --join {where}") from None
            log.warning("waiting for stages to join at %s (%.0f s of %.0f): %s", where, elapsed, timeout_s, waiting)
            continue
        infos = dict(pool.serving_infos())
        if all(address in infos for address in route):
            return route, [infos[address] for address in route]


def add_join_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--join-port", type=int, metavar="PORT",
                        help="serve the Registry on --host:PORT, where stages announce themselves (stage-server "
                             "--join); with --tls-*, callers need a certificate of the stages' CA. --stages is then "
                             "optional: serving starts once joined stages form a complete route")


def join_settings(args: argparse.Namespace, tls: dict) -> dict:
    """`--join-port` as CoordinatorConfig fields, after checking it (ValueError, one line) and the
    secure-listening rule of --host for it; `tls`: serving_tls's answer."""
    if args.join_port is None:
        if not args.stages:
            raise ValueError("give --stages HOST:PORT,... or --join-port PORT for stages that join "
                             "(stage-server --join)")
        return {}
    if not 0 < args.join_port < 65536 or args.join_port == args.port:
        raise ValueError(f"--join-port {args.join_port}: give a free port from 1 to 65535 other than --port")
    check_listen(args.host, tls=tls["stage_tls"] is not None, insecure=args.insecure,
                 tls_flags="--tls-ca, --tls-cert, --tls-key")
    if tls["stage_tls"] is not None and not serves_tls(tls["stage_tls"].cert):
        raise ValueError(f"--tls-cert {args.tls_cert} is a client-only certificate, and with --join-port the "
                         "coordinator serves the Registry with it: give its host's certificate (coordinator certs "
                         "--hosts NAME makes NAME.pem, usable by both sides)")
    return {"join_port": args.join_port}


def serves_tls(cert_pem: bytes) -> bool:
    """Whether a certificate may serve TLS (no extended key usage, or one that includes serverAuth)."""
    certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in usages
