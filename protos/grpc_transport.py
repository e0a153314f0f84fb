"""Which of gRPC's TCP transports a layerline process uses; importing this module chooses it.

Owns: the one switch, set in the process environment before gRPC loads (gRPC reads its
experiments once, when it initializes; set later, it does nothing). Both command lines,
`stage-server` and `coordinator`, import this module before anything imports grpc. Does not
own: message limits or keepalive (channel_options), or any other gRPC setting.

Why: in the gRPC releases listed below, the C core serves TCP connections from its EventEngine by
default: as we read it, an EventEngine thread reads a message's bytes and then wakes the thread
that waits on the completion queue, which wakes the Python thread that takes the message. gRPC
also ships its older TCP path, where the thread waiting on the completion queue polls and reads
the socket itself. Only listeners (servers) take the older path: on grpcio 1.85 its client side
never gets a TLS channel through once the channel's connection attempts have failed (a stage that
was not up yet, or restarted while probed, stayed unreachable for good; tests/test_grpc_transport.py),
so channels keep gRPC's default. Measured (bench/hop_latency.py, 2 cores): a decode step's round
trip 104 µs against 110 on gRPC's defaults, a 512-token prompt's 1.34 ms against 1.07.

GRPC_EXPERIMENTS already set (even empty) is left alone, so `GRPC_EXPERIMENTS= stage-server ...`
keeps gRPC's own defaults. The switch is applied only to the gRPC releases it was measured on
(TRANSPORT_MEASURED_ON): a later release may drop these experiment names, and gRPC logs an error
line at start for a name it does not know.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

#: gRPC experiments turned off: TCP listeners back on the completion-queue path (clients stay on the
#: EventEngine: see above).
OLDER_TCP_PATH = "-event_engine_listener"
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
