"""gRPC message-size limits and keepalive settings shared by every server and channel.

Owns: the one place where layerline's gRPC limits are set. Activations of a large
micro-batch exceed gRPC's 4 MiB default (8×2048×4096 fp16 is 128 MiB), so the limit is
raised deliberately; requests above it are refused with RESOURCE_EXHAUSTED by gRPC.

Keepalive: channels ping every KEEPALIVE_TIME_MS, with or without calls, so that a dead peer is
noticed. A gRPC server by default takes a ping less than 5 minutes after the last one, while it
has sent no data, as abuse, and after three such pings closes the connection (GOAWAY
"too_many_pings"): a stream idle for three pings' time (a coordinator's Results stream while its
stages have no work) would lose its connection, and the next request fail with UNAVAILABLE. So
servers accept pings every SERVER_MIN_PING_INTERVAL_MS, below the channels' rate.

Also owns `bind`, the one way a layerline server takes its port (with TLS credentials or without):
a port it cannot have is an OSError with one line saying so, whichever way the installed grpcio
reports it (some releases return 0, others raise RuntimeError).

Does not own: which TCP path gRPC takes (grpc_transport) or any connection.
"""

from __future__ import annotations

import os

#: Largest message a stage or coordinator sends or receives (LAYERLINE_MAX_MESSAGE_MB overrides).
MAX_MESSAGE_BYTES = int(os.environ.get("LAYERLINE_MAX_MESSAGE_MB", "256")) * (1 << 20)


#: Largest public request (a GenerateRequest) the coordinator takes by default (--max-request-mb):
#: a prompt that fits any context is far smaller, and gRPC refuses a larger message before it is read.
DEFAULT_MAX_REQUEST_MB = 4

KEEPALIVE_TIME_MS = 30_000
SERVER_MIN_PING_INTERVAL_MS = 10_000


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for grpc.*_channel(...) (servers take server_options)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # A peer that went away is dialled again within 2 s once it is back (gRPC's own backoff grows to
        # 120 s): a restarted stage serves again in seconds, not minutes.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES,
                   min_ping_interval_ms: int = SERVER_MIN_PING_INTERVAL_MS) -> list[tuple[str, int]]:
    """Options for grpc.server(...): the channels' own, and pings accepted every `min_ping_interval_ms`."""
    return [*channel_options(max_message_bytes),
            ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
            # gRPC sets SO_REUSEPORT by default: a second server on a held port would bind silently
            # and the kernel would split connections between the two processes.
            ("grpc.so_reuseport", 0)]


def api_server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    """server_options for the public API: requests above `max_request_bytes` are refused with
    RESOURCE_EXHAUSTED by gRPC (answers keep the shared limit)."""
    return [(name, max_request_bytes if name == "grpc.max_receive_message_length" else value)
            for name, value in server_options()]


def bind(server, host: str, port: int, credentials=None) -> int:
    """Bind `server` (a grpc.Server) to host:port, over TLS with `credentials` (grpc.ServerCredentials,
    made by protos.tls.server_credentials), else plaintext; returns the port (chosen when 0)."""
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:  # grpcio's "Failed to bind to address"
        bound = 0
    if bound == 0:
        raise OSError(cannot_listen(host, port))
    return bound


def cannot_listen(host: str, port: int, reason: str = "") -> str:
    """The one-line error for a port a server cannot take (`reason`: the OS's words, if known)."""
    because = f" ({reason})" if reason else ""
    return (f"cannot listen on {host}:{port}{because}: the port is in use by another process, or the address "
            "is not one of this machine's; pick another --port or --host")
