"""The stage servers a coordinator may route through, and which of them can serve now.

Owns: `StagePool`, every known stage server (`--stages`, replicas joined by `|`, or announced with
`stage-server --join`) with its span, last Info and state (serving, draining, down, joining); the
health probe that keeps states true (an Info call every PROBE_EVERY_S; a server silent for
`stall_timeout_s`, frozen or not, is down); marking servers down on failed calls, with backoff
before the next probe; routes over the serving ones (`choose`, by route_choice); telling servers
the deployment (SetDeployment) when one comes (back) into service; and telling listeners of a
server that went down, drains or serves again. Why probes rather than failed calls: a frozen
stage keeps its TCP connections, so no call fails until gRPC's keepalive gives up (40 s).

Does not own: the calls a route carries (pipeline_client), what happens to the sessions of a
lost server (routes, failover), or whether servers agree on the model (stage_agreement).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from coordinator.route_choice import Candidate, NoRoute, best_route
from coordinator.stage_agreement import chain_refusal
from protos import stage_pb2, stage_pb2_grpc
from protos.channel_pool import ChannelPool

log = logging.getLogger(__name__)

SERVING, DRAINING, DOWN, JOINING = "serving", "draining", "down", "joining"
PROBE_EVERY_S = 1.0  # Info to each serving server this often
WATCH_EVERY_S = 0.2  # how often the watcher looks at probe times and silences
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 2.0  # a down server is probed again after these, doubling (cheap)
DEFAULT_STALL_TIMEOUT_S = 5.0
FORGET_JOINED_AFTER_S = 30.0  # a joined server neither renewing nor answering this long is forgotten


@dataclass
class Server:
    """One stage server as the pool knows it."""

    address: str
    state: str = JOINING
    info: stage_pb2.InfoResponse | None = None
    seen_at: float | None = None  # monotonic time of its last answer to a probe
    down_reason: str = ""
    probe_at: float = 0.0  # next probe (monotonic)
    backoff_s: float = FIRST_BACKOFF_S
    probing: bool = False
    admitting: bool = False  # being told the deployment before it serves
    joined: bool = False  # announced through the Registry (forgotten when silent), not given by --stages
    renewed_at: float = 0.0

    @property
    def span(self) -> tuple[int, int] | None:
        if self.info is None or not self.info.model_fingerprint:
            return None
        return self.info.layer_start, self.info.layer_end

    def describe(self) -> str:
        span = self.span
        return f"{self.address} (layers {span[0]}:{span[1]})" if span else self.address


@dataclass(frozen=True)
class ServerView:
    """A snapshot of one server, for GetModelInfo and logs."""

    address: str
    state: str
    info: stage_pb2.InfoResponse | None
    seen_seconds_ago: float  # -1: never answered
    down_reason: str


Listener = Callable[[str, str], None]  # (address, new state): down, draining, or serving again


class StagePool:
    """Known stage servers, their states, and routes over them."""

    def __init__(self, addresses: Sequence[str], *, tls=None, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                 allow_mixed_versions: bool = False) -> None:
        """`addresses`: every server given on the command line (any order; spans come from their Info)."""
        if stall_timeout_s <= 0:
            raise ValueError(f"the stall timeout must be positive, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self.allow_mixed_versions = allow_mixed_versions
        self.channels = ChannelPool(tls)  # routes' calls go over these too
        self._servers: dict[str, Server] = {a: Server(a) for a in dict.fromkeys(addresses)}
        self._reference: tuple[str, stage_pb2.InfoResponse] | None = None  # the first server that served
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- what the pool holds -------------------------------------------------------------

    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._servers)

    def views(self) -> list[ServerView]:
        """Every server, in layer order (servers whose span is unknown last)."""
        now = time.monotonic()
        with self._lock:
            servers = sorted(self._servers.values(), key=lambda s: (s.span or (1 << 30, 0), s.address))
            return [ServerView(s.address, s.state, s.info, now - s.seen_at if s.seen_at is not None else -1.0,
                               s.down_reason if s.state == DOWN else "") for s in servers]

    def serving_infos(self) -> list[tuple[str, stage_pb2.InfoResponse]]:
        with self._lock:
            return [(s.address, s.info) for s in self._servers.values() if s.state == SERVING]

    def state(self, address: str) -> str | None:
        with self._lock:
            server = self._servers.get(address)
            return server.state if server is not None else None

    def accepts(self, route: Sequence[str]) -> bool:
        """Whether every server of `route` serves (takes new sessions) now."""
        with self._lock:
            return all((s := self._servers.get(a)) is not None and s.state == SERVING for a in route)

    def subscribe(self, listener: Listener) -> None:
        """`listener(address, state)` runs (on the pool's threads) when a server goes down, drains or serves
        again."""
        with self._lock:
            self._listeners.append(listener)

    # ---- routes --------------------------------------------------------------------------

    def choose(self, load: Callable[[str], int] = lambda address: 0) -> tuple[str, ...]:
        """A route over serving servers (route_choice.best_route): fewest hops, then least load
        (`load(address)`: the rows this coordinator runs through it; then the sessions it reports)."""
        with self._lock:
            known = [s for s in self._servers.values() if s.span is not None]
            candidates = [Candidate(s.address, *s.span, serving=s.state == SERVING,
                                    load=(load(s.address) << 16) + s.info.active_sessions,
                                    state=s.state + (f" ({s.down_reason})" if s.down_reason else ""))
                          for s in known]
            num_layers = known[0].info.num_layers if known else None
        if num_layers is None:
            raise NoRoute("no stage server is serving yet")
        return best_route(candidates, num_layers)

    # ---- failures --------------------------------------------------------------------------

    def failed(self, address: str, reason: str) -> None:
        """A call to `address` failed as a dead server's would: it is down until a probe answers again."""
        with self._lock:
            server = self._servers.get(address)
            if server is None or server.state == DOWN:
                return
            self._set_down_locked(server, reason, time.monotonic())
        self._tell(address, DOWN)

    def draining(self, address: str) -> None:
        """`address` refused a new session because it drains: no new sessions go to it (the probe keeps it so)."""
        with self._lock:
            server = self._servers.get(address)
            if server is None or server.state != SERVING:
                return
            server.state = DRAINING
        self._tell(address, DRAINING)

    def _set_down_locked(self, server: Server, reason: str, now: float) -> None:
        log.warning("stage %s is down: %s", server.describe(), reason)
        server.state, server.down_reason = DOWN, reason
        server.probe_at = now + server.backoff_s
        server.backoff_s = min(MAX_BACKOFF_S, server.backoff_s * 2)

    def _tell(self, address: str, state: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(address, state)
            except Exception:  # a listener's bug must not stop the probes
                log.exception("stage pool listener failed")

    # ---- joining ---------------------------------------------------------------------------

    def join(self, address: str, draining: bool = False) -> str:
        """A server announced itself (Registry.Join): known from now on, probed at once; returns its state."""
        now = time.monotonic()
        with self._lock:
            server = self._servers.get(address)
            if server is None:
                server = self._servers[address] = Server(address, joined=True)
                log.info("stage %s joined; probing it", address)
            server.renewed_at = now
            if server.state == DOWN and server.probe_at > now and not draining:
                server.probe_at = now  # it says it is back: look now
            state = server.state
        if draining:
            self.draining(address)
        return DRAINING if draining and state == SERVING else state

    # ---- probes ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start probing (a daemon thread); `close` stops it."""
        self._watcher = threading.Thread(target=self._watch, name="stage-pool", daemon=True)
        self._watcher.start()

    def seed(self, answers) -> None:
        """Start from Info answers already read (address, InfoResponse), as serving: the caller has
        checked that they agree and tells them the deployment itself."""
        now = time.monotonic()
        with self._lock:
            for address, info in answers:
                server = self._servers.setdefault(address, Server(address))
                server.info, server.seen_at, server.state = info, now, SERVING if info.model_fingerprint else JOINING
                server.probe_at = now + PROBE_EVERY_S
                if self._reference is None and server.state == SERVING:
                    self._reference = (address, info)

    def wait_for_route(self, timeout_s: float, progress_every_s: float = 10.0) -> tuple[str, ...]:
        """A route, once the servers form one; logs (WARNING) every `progress_every_s` which servers
        it still waits for and why; NoRoute naming them after `timeout_s`."""
        started = time.monotonic()
        next_report = started + progress_every_s
        while True:
            try:
                return self.choose()
            except NoRoute as missing:
                now, views = time.monotonic(), self.views()
                waiting = "; ".join(f"{v.address}: {v.down_reason or v.state}" for v in views if v.state != SERVING)
                if now - started > timeout_s:
                    raise NoRoute(f"stages not ready after {timeout_s:.0f}s ({waiting or missing}): are they running, "
                                  "and reachable at these addresses?") from None
                if now >= next_report:
                    log.warning("waiting for stages (%.0f s of %.0f): %s", now - started, timeout_s, waiting or missing)
                    next_report = now + progress_every_s
                with self._changed:
                    self._changed.wait(0.5)

    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_EVERY_S):
            now = time.monotonic()
            due, silent, forgotten = [], [], []
            with self._lock:
                for server in list(self._servers.values()):
                    if server.joined and now - max(server.renewed_at, server.seen_at or 0) > FORGET_JOINED_AFTER_S:
                        forgotten.append(server.address)
                        del self._servers[server.address]
                        continue
                    if (server.state in (SERVING, DRAINING) and server.seen_at is not None
                            and now - server.seen_at > self.stall_timeout_s):
                        self._set_down_locked(server, f"no answer to its health probe for {self.stall_timeout_s:.0f}s "
                                                      "(frozen, overloaded or cut off)", now)
                        silent.append(server.address)
                    if not server.probing and now >= server.probe_at:
                        server.probing = True
                        server.probe_at = now + PROBE_EVERY_S
                        due.append(server.address)
            for address in forgotten:
                log.warning("forgot joined stage %s: it neither renewed nor answered for %.0fs", address,
                            FORGET_JOINED_AFTER_S)
            for address in silent:
                self._tell(address, DOWN)
            for address in due:
                self._probe(address)

    def _probe(self, address: str) -> None:
        try:
            call = stage_pb2_grpc.StageStub(self.channels.get(address)).Info.future(
                stage_pb2.InfoRequest(), timeout=self.stall_timeout_s)
        except Exception as err:  # a closed channel while stopping
            self._probe_failed(address, err)
            return

        def done(call) -> None:
            err = call.exception()
            if err is None:
                self._probe_answered(address, call.result())
            else:
                self._probe_failed(address, err)
        call.add_done_callback(done)

    def _probe_failed(self, address: str, err: Exception) -> None:
        reason = (f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) and hasattr(err, "code")
                  else str(err))
        with self._lock:
            server = self._servers.get(address)
            if server is None:
                return
            server.probing = False
            if server.state != DOWN:
                self._set_down_locked(server, reason, time.monotonic())
                tell = True
            else:
                server.down_reason = reason
                server.probe_at = time.monotonic() + server.backoff_s
                server.backoff_s = min(MAX_BACKOFF_S, server.backoff_s * 2)
                tell = False
            self._changed.notify_all()
        if tell:
            self._tell(address, DOWN)

    def _probe_answered(self, address: str, info: stage_pb2.InfoResponse) -> None:
        now = time.monotonic()
        bring_in = False
        with self._lock:
            server = self._servers.get(address)
            if server is None:
                return
            server.probing = False
            server.seen_at = now
            before = server.state
            server.info = info
            if not info.model_fingerprint:
                state, reason = JOINING, "loading its weights"
            elif info.draining:
                state, reason = DRAINING, ""
            else:
                refusal = self._refusal_locked(address, info)
                state, reason = (DOWN, refusal) if refusal else (SERVING, "")
                if refusal is None and self._reference is None:
                    self._reference = (address, info)
            if state == DOWN:
                if before != DOWN or server.down_reason != reason:
                    log.warning("stage %s cannot serve with the others: %s", server.describe(), reason)
                server.state, server.down_reason = DOWN, reason
                server.probe_at = now + MAX_BACKOFF_S
            elif state == SERVING and before != SERVING:
                # It serves once it knows the deployment: a route through it before that would have its
                # steps refused where it sends them on.
                server.state, server.down_reason = JOINING, "being told the deployment"
                bring_in = not server.admitting
                server.admitting = True
            else:
                server.state, server.down_reason = state, reason
            self._changed.notify_all()
        if bring_in:
            threading.Thread(target=self._bring_in, args=(address,), name="stage-pool-admit", daemon=True).start()
        elif state == DRAINING and before != DRAINING:
            log.info("stage %s is draining: no new sessions go to it", server.describe())
            self._tell(address, DRAINING)

    def _bring_in(self, address: str) -> None:
        """Tell every live server the deployment (this one included), then let routes use this one."""
        serving = False
        try:
            self.tell_deployment()
        finally:
            with self._lock:
                server = self._servers.get(address)
                if server is not None:
                    server.admitting = False
                    if server.state == JOINING and server.down_reason == "being told the deployment":
                        server.state, server.down_reason = SERVING, ""
                        server.backoff_s = FIRST_BACKOFF_S
                        serving = True
                        log.info("stage %s is serving", server.describe())
                self._changed.notify_all()
        if serving:
            self._tell(address, SERVING)

    def _refusal_locked(self, address: str, info: stage_pb2.InfoResponse) -> str | None:
        """Why a server must not serve beside the pool's first one (model, weights, protocol, versions)."""
        if self._reference is None or self._reference[0] == address:
            return None
        reference_address, reference = self._reference
        return chain_refusal([reference_address, address], [reference, info],
                             allow_mixed_versions=self.allow_mixed_versions)

    def tell_deployment(self, timeout_s: float = 5.0, raise_errors: bool = False) -> list[str]:
        """SetDeployment on every live server: the addresses of every known server, which each may then
        send to. Returns the servers that refused (plaintext from another machine: they use --peers);
        other failures are logged (the next probe brings the server in again) or, with `raise_errors`,
        raised."""
        with self._lock:
            addresses = list(self._servers)
            live = [s.address for s in self._servers.values() if s.state in (SERVING, DRAINING, JOINING)]
        request = stage_pb2.SetDeploymentRequest(stages=addresses)
        refused = []
        for address in live:
            try:
                stage_pb2_grpc.StageStub(self.channels.get(address)).SetDeployment(request, timeout=timeout_s)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                    refused.append(address)
                elif raise_errors:
                    raise
                else:
                    log.debug("SetDeployment on %s failed: %s", address, err.details())
        return refused

    def close(self) -> None:
        self._stopped.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2.0)
        self.channels.close()
