"""Which of gRPC's TCP transports a layerline process uses; importing this module chooses it.

Owns: the one switch, set in the process environment before gRPC loads (gRPC reads its
experiments once, when it initializes; set later, it does nothing). Both command lines,
`stage-server` and `coordinator`, import this module before anything imports grpc. Does not
own: message limits or keepalive (channel_options), or any other gRPC setting.

Why: in the gRPC releases listed below, the C core serves TCP connections from its EventEngine by
default: as we read it, an EventEngine thread reads a message's bytes and then wakes the thread
that waits on the completion queue (a server's poller, a channel's reader), which wakes the Python
thread that takes the message. gRPC also ships its older TCP path, where the thread waiting on
the completion queue polls and reads the socket itself, one thread fewer woken per message. A
decode step crosses stages+1 such hops one way (bench/hop_latency.py, one-token round trip on
2 cores: ~310-370 µs on the EventEngine path, ~150-230 µs on the older one).

GRPC_EXPERIMENTS already set (even empty) is left alone, so `GRPC_EXPERIMENTS= stage-server ...`
keeps gRPC's own defaults. The switch is applied only to the gRPC releases it was measured on
(TRANSPORT_MEASURED_ON): a later release may drop these experiment names, and gRPC logs an error
line at start for a name it does not know.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

#: gRPC experiments turned off: TCP clients and listeners back on the completion-queue path.
OLDER_TCP_PATH = "-event_engine_client,-event_engine_listener"
#: grpcio releases (major, minor) from the first to the last measured that have both experiments.
TRANSPORT_MEASURED_ON = ((1, 85), (1, 85))


def _grpcio_release() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("grpcio").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def applies_to(release: tuple[int, int] | None) -> bool:
    """Whether the switch is made for this grpcio release (None: not installed or unreadable)."""
    first, last = TRANSPORT_MEASURED_ON
    return release is not None and first <= release <= last


def choose_tcp_transport(environ: MutableMapping[str, str] = os.environ,
                         release: tuple[int, int] | None = None) -> str | None:
    """Set GRPC_EXPERIMENTS to OLDER_TCP_PATH unless it is set already or the installed grpcio
    (`release`, default: looked up without importing grpc) is outside TRANSPORT_MEASURED_ON.
    Returns the value in force (None: unset). Must run before grpc is imported."""
    if "GRPC_EXPERIMENTS" not in environ and applies_to(release if release is not None else _grpcio_release()):
        environ["GRPC_EXPERIMENTS"] = OLDER_TCP_PATH
    return environ.get("GRPC_EXPERIMENTS")


choose_tcp_transport()
