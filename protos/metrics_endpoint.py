"""The Prometheus metrics port both command lines offer (`--metrics-port`), and serving a registry on it.

Owns: what the pages leave out (the `_created` series), `MetricsEndpoint` (the port and, when the
process has TLS, the files its metrics are served with), the flag, and `serve_metrics`:
prometheus_client's own HTTP server for one registry on the process's --host. The port is exactly
as secure as the process's gRPC port: plaintext only where the gRPC port may be plaintext
(loopback, or --insecure: the command line has checked that already); with TLS, HTTPS with the
same certificate and key, and client certificates required when the gRPC port requires them (a
stage's hops: always; the coordinator's API: with --api-tls-ca). A scraper then needs what a
client of that port needs, and no second rule of secure listening exists to get wrong.

Does not own: the families (coordinator/metrics.py, stage_server/metrics.py), the TLS files'
checks (protos/tls.py, done at start by the command line), or the coordinator's HTTP face.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from prometheus_client import disable_created_metrics

log = logging.getLogger(__name__)

# No `_created` series beside every counter and histogram: the text format has no place for them, so
# prometheus_client sends each as a gauge of its own, doubling the series of every family.
disable_created_metrics()

SHUTDOWN_TIMEOUT_S = 2.0  # bound on waiting for the server thread at stop


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where a process serves /metrics: `port` (0 picks a free one) on its --host; with `certfile`
    and `keyfile`, HTTPS; with `client_cafile` too, only for clients whose certificate chains to it."""

    port: int
    certfile: str | None = None
    keyfile: str | None = None
    client_cafile: str | None = None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def add_metrics_port_argument(parser: argparse.ArgumentParser, tls_note: str) -> None:
    parser.add_argument("--metrics-port", type=_port, metavar="PORT",
                        help="serve Prometheus metrics at http(s)://HOST:PORT/metrics on --host (default: off; "
                             f"0 picks a free port); {tls_note}")


class MetricsServer:
    """A running metrics port; `close()` stops it (bounded)."""

    def __init__(self, endpoint: MetricsEndpoint, host: str, registry) -> None:
        from prometheus_client import start_http_server

        try:
            self._httpd, self._thread = start_http_server(
                endpoint.port, addr=host, registry=registry, certfile=endpoint.certfile, keyfile=endpoint.keyfile,
                client_cafile=endpoint.client_cafile, client_auth_required=endpoint.client_cafile is not None)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{endpoint.port}: {err.strerror or err}; pick another "
                          "--metrics-port") from None
        self.port = self._httpd.server_address[1]
        self.scheme = "https" if endpoint.certfile else "http"
        log.info("metrics at %s://%s:%d/metrics", self.scheme, host, self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(SHUTDOWN_TIMEOUT_S)


def serve_metrics(endpoint: MetricsEndpoint | None, host: str, registry) -> MetricsServer | None:
    """Serve `registry` as `endpoint` says; None when metrics are off."""
    if endpoint is None:
        return None
    return MetricsServer(endpoint, host, registry)


class MetricsPort:
    """A process's metrics port, as its owner holds it: started on a host, its port, closed."""

    def __init__(self, endpoint: MetricsEndpoint | None, registry) -> None:
        self.endpoint, self.registry = endpoint, registry
        self.server: MetricsServer | None = None

    def start(self, host: str) -> None:
        self.server = serve_metrics(self.endpoint, host, self.registry)

    @property
    def port(self) -> int:
        """The metrics port once started (0: off, or not started)."""
        return self.server.port if self.server is not None else 0

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
