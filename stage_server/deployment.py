"""The deployment a stage belongs to: the only addresses it sends to, and the peers it trusts.

Owns: the stage's allow-list of next-hop addresses, filled from its own configuration (`--peers`,
`add_peers_argument`) and from an authenticated coordinator (`set`, the SetDeployment call: a peer
with a client certificate the stage's CA verified, or a call from this machine); checking the
addresses a request names against it (`check_addresses`) before any connection is made; and who
may act on a session (`caller`): the peer that opened it, or a trusted peer (this machine, a
coordinator that set the deployment, or a stage of the deployment, which a chained step or a
relayed EndSession comes from).

Why an allow-list rather than checking each request's sender: a route is followed by stages that
never saw the original sender, so each hop must itself refuse to open a connection that its own
deployment did not name.

Does not own: reading a peer's identity (peer_identity), the session table (sessions), nor opening
connections (next_hop).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from protos.addresses import host_and_port
from stage_server.errors import InvalidRequest, PermissionDenied
from stage_server.peer_identity import Peer
from stage_server.step_bounds import MAX_ADDRESS_CHARS

MAX_STAGES = 256  # addresses one SetDeployment may name
MAX_COORDINATORS = 64  # coordinator identities kept as trusted (the oldest goes first)


def normalized(address: str) -> str:
    """`address` ("host:port", "[v6]:port" or a gRPC "unix:" address) as the allow-list compares it;
    ValueError if it is none of these."""
    address = address.strip().lower()
    if address.startswith(("unix:", "unix-abstract:")) and 5 < len(address) <= MAX_ADDRESS_CHARS:
        return address  # a socket of this machine, as gRPC names one
    host, port = host_and_port(address)
    if (not host or len(address) > MAX_ADDRESS_CHARS or not port.isdigit() or not 0 < int(port) < 65536
            or any(c.isspace() or c in ",/@" for c in address)):
        raise ValueError(f"{address[:80]!r} is not a stage address (host:port)")
    return address


def _peer_addresses(text: str) -> tuple[str, ...]:
    try:
        return tuple(normalized(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_peers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=_peer_addresses, default=(), metavar="HOST:PORT,...",
                        help="addresses of this deployment's other stages, as the coordinator names them: this "
                             "stage sends micro-batches and EndSession only to these and to those an authenticated "
                             "coordinator gives it (a client certificate its CA verified, or a call from this "
                             "machine); needed only when the coordinator cannot tell it, e.g. a plaintext "
                             "(--insecure) stage called from another machine")


def _hosts(addresses: Iterable[str]) -> frozenset[str]:
    """The hosts of `addresses` and, for names, the IPs they resolve to now (a plaintext peer is known by
    its IP; a TLS peer by its certificate's names, which name its host as the addresses do)."""
    hosts = set()
    for address in addresses:
        host = host_and_port(address)[0]
        hosts.add(host)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                hosts.update(str(info[4][0]).lower() for info in socket.getaddrinfo(host, None))
            except OSError:
                pass  # a name that does not resolve here matches certificates only
    return frozenset(hosts)


@dataclass(frozen=True)
class Caller:
    """The peer of a request, as far as sessions are concerned."""

    identity: str  # recorded as the owner of a session it opens
    trusted: bool  # this machine, a coordinator that set the deployment, or a stage of it

    def may_use(self, owner: str) -> bool:
        """Whether this caller may step, edit, end or stop a session that `owner` opened."""
        return self.trusted or owner == self.identity


class Deployment:
    """The allow-list of one stage: its --peers and the last authenticated SetDeployment's stages."""

    def __init__(self, peers: Iterable[str] = ()) -> None:
        self._configured = frozenset(normalized(address) for address in peers)
        self._allowed = self._configured
        self._hosts = _hosts(self._configured)
        self._coordinators: dict[str, None] = {}  # identities of the peers that set the deployment
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._allowed)

    def allows(self, address: str) -> bool:
        if address in self._allowed:  # as the coordinator wrote it: every step of every hop asks
            return True
        try:
            return normalized(address) in self._allowed
        except ValueError:
            return False

    def check_addresses(self, addresses: Iterable[str], field: str) -> None:
        """Refuse (PermissionDenied) when `field` names an address outside the deployment."""
        for address in addresses:
            if not self.allows(address):
                raise PermissionDenied(
                    f"{field} names {address[:80]!r}, which is not a stage of this deployment: a stage sends only "
                    "to the stages its coordinator named (SetDeployment) and to its --peers")

    def set(self, stages: Iterable[str], peer: Peer) -> int:
        """The stages an authenticated coordinator names (they replace the last ones it named; --peers
        stay); returns how many addresses this stage may send to now."""
        if not (peer.verified or peer.local):
            raise PermissionDenied(
                "SetDeployment is accepted only from a peer with a client certificate this stage's CA verified, "
                "or from this machine: a plaintext stage takes other machines' stages from --peers")
        stages = list(stages)
        if len(stages) > MAX_STAGES:
            raise InvalidRequest(f"SetDeployment names {len(stages)} stages; at most {MAX_STAGES}")
        try:
            given = frozenset(normalized(address) for address in stages)
        except ValueError as err:
            raise InvalidRequest(f"SetDeployment: {err}") from None
        allowed = self._configured | given
        hosts = _hosts(allowed)
        with self._lock:
            self._allowed, self._hosts = allowed, hosts
            self._coordinators.pop(peer.identity, None)
            self._coordinators[peer.identity] = None
            while len(self._coordinators) > MAX_COORDINATORS:
                del self._coordinators[next(iter(self._coordinators))]
        return len(allowed)

    def caller(self, peer: Peer) -> Caller:
        """What `peer` may do with sessions here, by the deployment as it is now."""
        trusted = peer.local or peer.identity in self._coordinators or not peer.names.isdisjoint(self._hosts)
        return Caller(peer.identity, trusted)
