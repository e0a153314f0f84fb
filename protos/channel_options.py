"""gRPC message-size limits and keepalive settings shared by every server and channel.

Owns: the one place where layerline's limits are set. Activations of a large
micro-batch exceed gRPC's 4 MiB default (8×2048×4096 fp16 is 128 MiB), so the limit is
raised deliberately; requests above it are refused with RESOURCE_EXHAUSTED by gRPC.
"""

from __future__ import annotations

import os

#: Largest message a stage or coordinator sends or receives (LAYERLINE_MAX_MESSAGE_MB overrides).
MAX_MESSAGE_BYTES = int(os.environ.get("LAYERLINE_MAX_MESSAGE_MB", "256")) * (1 << 20)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for grpc.server(...) and grpc.*_channel(...)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
