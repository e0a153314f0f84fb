"""One persistent gRPC channel per address, shared by every caller of a process.

Owns: `ChannelPool`, which opens a channel to an address on first use (over mutual TLS with the
process's own certificate and CA, or plaintext) and keeps it until `close`. A stage sends to its
next hops over it; a coordinator reaches every stage server of its pool over it, whichever routes
the server is on.

Does not own: TLS files and channel options (protos/tls.py, channel_options), or the calls made.
"""

from __future__ import annotations

import threading

import grpc

from protos.tls import TlsFiles, open_channel


class ChannelPool:
    """One gRPC channel per address, created on first use and kept; over mutual TLS with `tls` (this
    process's certificate, and the CA the peer's must chain to), plaintext without."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self._tls = tls
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = open_channel(address, self._tls)
                self._channels[address] = channel
            return channel

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
