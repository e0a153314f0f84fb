"""The server under the OpenAI-compatible HTTP face: uvicorn in a thread of the coordinator process.

Owns: `--http-port`, the listening socket (bound on the coordinator's --host before anything
starts, so a taken port is one line at start), TLS on it from the public API's own files
(--api-tls-cert/--api-tls-key, client certificates required with --api-tls-ca), the thread with
its own event loop that runs uvicorn, and a stop that is graceful and bounded.

Does not own: the app (http_api), the secure-listening rule (protos/tls_arguments.py applies it to
--host for both APIs) or the TLS files' checks (protos/tls.py).
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protos.tls import TlsFiles

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0
BACKLOG = 1024


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535 (0: off), got {text!r}")
    return int(text)


def add_http_port_argument(parser: argparse.ArgumentParser) -> None:
    """`--http-port` for the commands that serve the public API (serve, launch-local)."""
    parser.add_argument("--http-port", type=_port, default=0, metavar="PORT",
                        help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                             "/v1/models, /health, /metrics) on this port of --host, with the same API keys and "
                             "--api-tls-* files (default 0: off)")


def http_port_from_args(args: argparse.Namespace) -> int | None:
    """CoordinatorConfig.http_port from the flag: None (off) for 0."""
    return getattr(args, "http_port", 0) or None


def http_note(server: HttpServer | None) -> str:
    """What the start-up line adds about the HTTP API ("" without one)."""
    return "" if server is None else f"; OpenAI-compatible HTTP API on port {server.port}"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); OSError naming both when it cannot."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {err.strerror or err}; choose another "
                      "--http-port") from None
    return sock


def _tls_options(tls: TlsFiles, directory: Path) -> dict:
    """uvicorn's ssl options for `tls`; it reads files, so the PEM bytes are written into
    `directory` (private, removed once uvicorn has loaded them)."""
    def write(name: str, data: bytes) -> str:
        path = directory / name
        path.touch(mode=0o600)
        path.write_bytes(data)
        return str(path)

    options = dict(ssl_certfile=write("cert.pem", tls.cert), ssl_keyfile=write("key.pem", tls.key))
    if tls.ca is not None:
        options.update(ssl_ca_certs=write("ca.pem", tls.ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpServer:
    """uvicorn serving `app` on an already bound socket, in its own thread and event loop."""

    def __init__(self, app, sock: socket.socket, tls: TlsFiles | None = None) -> None:
        import uvicorn  # here: the command line adds --http-port without loading the server

        self.sock = sock
        self.port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory(prefix="layerline-http-") as directory:
            options = _tls_options(tls, Path(directory)) if tls is not None else {}
            config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=1, **options)
            config.load()  # reads the TLS files now, while they exist
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http-server", daemon=True)
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self.sock])
        except BaseException as err:  # uvicorn ends a failed start with SystemExit
            self._failure = err
            log.error("the HTTP server stopped: %s", err)

    def start(self) -> int:
        """Serve; returns the port once uvicorn accepts connections (OSError when it cannot)."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(0.0)
                raise OSError(f"the HTTP server did not start on port {self.port}: {self._failure}")
            time.sleep(0.01)
        return self.port

    def stop(self, grace_s: float) -> None:
        """Stop accepting, give open responses up to `grace_s` to end, then cancel them; bounded."""
        self._server.config.timeout_graceful_shutdown = max(0, int(grace_s))
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(grace_s + 2.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1.0)
        if self._thread.is_alive():
            log.warning("the HTTP server's thread did not end within %.0f s", grace_s + 3.0)
        try:
            self.sock.close()
        except OSError:
            pass


def serving_from(health_servicer) -> bool:
    """Whether gRPC's health servicer reports the coordinator as a whole ("") SERVING."""
    from grpc_health.v1 import health_pb2

    class _Context:  # what Check asks of a context for a service it does not know
        def set_code(self, code) -> None:
            pass

    reply = health_servicer.Check(health_pb2.HealthCheckRequest(service=""), _Context())
    return reply.status == health_pb2.HealthCheckResponse.SERVING


