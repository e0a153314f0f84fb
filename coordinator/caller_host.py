"""Whether the host a Registry caller announces is the caller's own.

Owns: `host_refusal`, the rule that keeps a Join from pointing the coordinator at a machine other
than the caller: the caller's IP (gRPC's `context.peer()`) must be the announced host (an IP
literal equal to it; a name every address of which is it; any loopback form when the caller is
on loopback), and over mutual TLS the caller's verified certificate must also name that host
(a subject alternative name or its common name; an exact match, IPs compared as addresses).

Why: the coordinator probes, routes to and tells every stage the address a Join announces, so an
announcement of someone else's host would make it connect, and send, where the caller is not.

Does not own: the address's syntax (registry checks it first), the TLS handshake (gRPC verifies the
certificate against the CA before the call is seen here), or what the Join then does (registry).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence

from protos.addresses import is_loopback_host

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Sequence[str]]  # a name -> the IP addresses it resolves to
MAX_NAMES_SHOWN = 4  # of a certificate's names, in a refusal


def as_ip(text: str) -> IpAddress | None:
    """`text` as an IP address ("[v6]" and IPv4-mapped IPv6 unwrapped), or None for a name."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def peer_ip(peer: str) -> IpAddress | None:
    """The caller's IP from gRPC's peer string ("ipv4:10.0.0.2:4321", "ipv6:[::1]:4321"); None for
    anything else (a Unix socket, an unknown form)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return as_ip(rest.rpartition(":")[0])
    if kind == "ipv6":
        return as_ip(rest.rpartition(":")[0]) if rest.startswith("[") else None
    return None


def same_host(caller: IpAddress, ip: IpAddress) -> bool:
    """Loopback addresses all name the caller's (and this) machine; any other must be equal."""
    return ip == caller or (ip.is_loopback and caller.is_loopback)


def resolve(name: str) -> list[str]:
    """Every IP address `name` resolves to here (what the coordinator's channel would dial)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)})


def _certificate_names(auth: Mapping[str, Sequence[bytes]]) -> list[str]:
    names = [*auth.get("x509_subject_alternative_name", ()), *auth.get("x509_common_name", ())]
    return [name.decode("utf-8", "replace") for name in names]


def _names_host(names: Sequence[str], host: str) -> bool:
    ip = as_ip(host)
    for name in names:
        if ip is not None:
            if as_ip(name) == ip:
                return True
        elif name.rstrip(".").lower() == host.rstrip(".").lower():
            return True
    return False


def host_refusal(peer: str, auth: Mapping[str, Sequence[bytes]], host: str,
                 resolver: Resolver = resolve) -> str | None:
    """Why `host` is not the caller's own (one line), or None. `peer`: context.peer(); `auth`:
    context.auth_context() (over TLS it holds the verified certificate's names)."""
    if auth.get("transport_security_type") == [b"ssl"]:
        names = _certificate_names(auth)
        if not _names_host(names, host):
            shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (", ..." if len(names) > MAX_NAMES_SHOWN else "")
            return (f"the caller's certificate names {shown or 'no host'}, not {host}: announce a host its "
                    "certificate names (coordinator certs --hosts)")
    caller = peer_ip(peer)
    if caller is None:
        return f"cannot tell the caller's IP address from {peer[:64]!r}"
    if is_loopback_host(host):
        addresses = [ipaddress.ip_address("127.0.0.1")]
    elif (ip := as_ip(host)) is not None:
        addresses = [ip]
    else:
        try:
            addresses = [a for a in (as_ip(text) for text in resolver(host)) if a is not None]
        except (OSError, UnicodeError) as err:
            return f"cannot resolve {host} here ({err}); announce the host as an IP address or a name this resolves"
        if not addresses:
            return f"{host} resolves to no IP address here"
    others = [str(a) for a in addresses if not same_host(caller, a)]
    if others:
        return (f"the call comes from {caller}, but {host} is {', '.join(others[:MAX_NAMES_SHOWN])}: a stage "
                "announces only its own host (join from the address it announces)")
    return None
