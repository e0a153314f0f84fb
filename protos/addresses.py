"""What a stage address ("host:port", "[v6]:port", "unix:path") says about where the stage runs.

Owns: telling a loopback address (this machine, this network namespace) from one of another
machine (and a bare host, `is_loopback_host`: where a server may listen without TLS, whether a
caller is this machine), and the TCP port of a loopback address. Used by the coordinator (whether to chain greedy
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


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name, an IP, or "[v6]") is this machine by a loopback form: localhost,
    127.0.0.0/8, ::1, or an IPv4-mapped loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def is_loopback(address: str) -> bool:
    """Whether a stage address names this machine by a loopback form (unix sockets included)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    return is_loopback_host(host_and_port(address)[0])


def loopback_port(address: str) -> int | None:
    """The TCP port of a loopback "host:port" address, or None for any other address."""
    if address.startswith(("unix:", "unix-abstract:")) or not is_loopback(address):
        return None
    port = host_and_port(address)[1]
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else None
