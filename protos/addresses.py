"""What a stage address ("host:port", "[v6]:port", "unix:path") says about where the stage runs.

Owns: telling a loopback address (this machine, this network namespace) from one of another
machine, and the TCP port of a loopback address. Used by the coordinator (whether to chain greedy
steps, coordinator/chain_policy.py) and by both sides' links (which Unix socket a loopback stage
listens on, protos/unix_socket.py). Does not own resolving names or opening connections.
"""

from __future__ import annotations

import ipaddress


def host_and_port(address: str) -> tuple[str, str]:
    if address.startswith("["):  # [v6]:port
        host, _, port = address[1:].partition("]")
        return host, port.removeprefix(":")
    if address.count(":") == 1:
        host, _, port = address.partition(":")
        return host, port
    return address, ""


def is_loopback(address: str) -> bool:
    """Whether a stage address names this machine by a loopback form (unix sockets included)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = host_and_port(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_port(address: str) -> int | None:
    """The TCP port of a loopback "host:port" address, or None for any other address."""
    if address.startswith(("unix:", "unix-abstract:")) or not is_loopback(address):
        return None
    port = host_and_port(address)[1]
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else None
