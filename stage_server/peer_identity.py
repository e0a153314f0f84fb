"""Who is at the other end of a call into a stage: one identity, and the host names it goes by.

Owns: `Peer` and `peer_of(context)`, read from a gRPC servicer context or the same-machine
listener's stand-in for one. Over loopback or the Unix socket the peer is this machine, whatever
it presents (the Unix socket is open to every process of the machine's network namespace, so one
identity for both keeps a coordinator that streams over the socket and ends sessions over gRPC one
peer). Otherwise, with TLS, it is the subject of the client certificate the server's CA verified
(its subject alternative names are the names it goes by); without TLS, it is the peer's host, not
its port, so every connection from one host is one peer.

Does not own: what a peer may do (deployment), nor the TLS handshake (gRPC's credentials).
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.addresses import is_loopback_host

THIS_MACHINE = "this machine"


@dataclass(frozen=True)
class Peer:
    identity: str  # THIS_MACHINE, "x509:<subject>" or "host:<ip>"
    names: frozenset[str]  # hosts it goes by: its IP, or its certificate's subject alternative names
    local: bool  # loopback or the Unix socket
    verified: bool  # it presented a client certificate the server's CA verified


def _host(peer: str) -> str:
    """The host part of a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", "unix:..."), lowercase."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0].lower()
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def _text(values: list[bytes]) -> list[str]:
    return [value.decode("utf-8", "replace").lower() for value in values]


def peer_of(context) -> Peer:
    """The peer of a call (a gRPC servicer context, or unix_listener's stand-in for one)."""
    peer = context.peer() or ""
    auth = context.auth_context() or {}
    host = _host(peer)
    local = peer.startswith(("unix:", "unix-abstract:")) or is_loopback_host(host)
    subject = b",".join(auth.get("x509_subject", []) or auth.get("x509_common_name", []))
    verified = auth.get("transport_security_type") == [b"ssl"] and bool(subject)
    if local:
        return Peer(THIS_MACHINE, frozenset(), True, verified)
    if verified:
        names = frozenset(_text(auth.get("x509_subject_alternative_name", [])))
        return Peer(f"x509:{subject.decode('utf-8', 'replace')}", names, False, True)
    return Peer(f"host:{host}", frozenset([host]) if host else frozenset(), False, False)
