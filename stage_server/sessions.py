"""KV-cache sessions of one stage: creation, lookup, ownership, byte budget, idle expiry.

Owns: the table of live sessions, each a compact cache of this stage's layers for a
fixed batch of rows and owned by the peer that opened it, the limits on how many
sessions and cache bytes a stage holds, and the sessions ended by EndSession lately, so that
steps of theirs still queued here are not computed (`abandon`, `abandoned`).
Does not own: what goes into a cache (the stage model writes it), the wire, nor who
may act on whose session (deployment.Caller decides; a lookup here asks it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stage_server.errors import InvalidRequest, PermissionDenied, ResourceExhausted, SessionNotFound
from stage_server.step_bounds import check_id

ABANDONED_MEMORY_S = 600.0  # how long an ended session's steps still waiting here are recognised
MAX_ABANDONED = 4096  # ... or until this many sessions ended after it


def check_session_id(session_id: str) -> None:
    """Refuse (InvalidRequest) an empty session id or one longer than step_bounds.MAX_ID_CHARS (the
    coordinator's are 32 hex characters, 128 random bits)."""
    if not session_id:
        raise InvalidRequest("session_id is empty")
    check_id("session_id", session_id)


def _check_owner(session: Session, caller) -> None:
    """Refuse (PermissionDenied) a caller (deployment.Caller; None: this stage itself) that may not use
    `session`. The answer does not say who owns it."""
    if caller is not None and not caller.may_use(session.owner):
        raise PermissionDenied(f"session {session.session_id!r} belongs to another peer")


@dataclass
class Session:
    """One generation's cache on this stage."""

    session_id: str
    cache: object
    batch_size: int
    tokens_seen: int = 0  # positions already in the cache (padding included)
    reserved_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: str = ""  # identity of the peer that opened it (peer_identity)
    answers_to: str = ""  # last stage: the collector its answers go to (whose subscriber may StopChain it)
    ended: bool = False  # freed (EndSession, expiry): a step computing for it stops at its next layer


class SessionStore:
    """Live sessions with a count limit, a byte budget and an idle timeout.

    Cache bytes are reserved before each step from `bytes_per_token` (all layers of
    this stage, keys and values), so a step that would overrun the budget is refused
    up front instead of running out of memory half way.
    """

    def __init__(self, *, make_cache: Callable[[], object], bytes_per_token: int,
                 max_sessions: int = 64, max_cache_bytes: int = 2 << 30,
                 idle_timeout_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._make_cache = make_cache
        self.bytes_per_token = bytes_per_token
        self.max_sessions = max_sessions
        self.max_cache_bytes = max_cache_bytes
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        # session id -> (when EndSession ended it, monotonic ns; its caller), oldest first
        self._abandoned: dict[str, tuple[int, object]] = {}

    def start(self, session_id: str, batch_size: int, caller=None) -> Session:
        """A fresh, empty session owned by `caller` (a deployment.Caller); an existing one with this id
        is replaced (a replay) if `caller` may use it."""
        check_session_id(session_id)
        self.expire_idle()
        with self._lock:
            old = self._sessions.get(session_id)
            if old is not None:
                _check_owner(old, caller)
                del self._sessions[session_id]
            if len(self._sessions) >= self.max_sessions:
                if old is not None:
                    self._sessions[session_id] = old
                raise ResourceExhausted(
                    f"this stage already holds {self.max_sessions} sessions (--max-sessions); "
                    "retry later or end idle sessions")
            if old is not None:
                old.ended = True  # a step still computing for the replaced session stops
            session = Session(session_id, self._make_cache(), batch_size, last_used=self._clock(),
                              owner=caller.identity if caller is not None else "")
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str, caller=None) -> Session:
        """The live session, or SessionNotFound if unknown or expired (PermissionDenied if `caller`, a
        deployment.Caller, may not use it). Looking a session up does not keep it alive (`touch` does,
        once a step has passed its checks): steps that fail let it expire."""
        check_session_id(session_id)
        self.expire_idle()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(
                    f"session {session_id!r} is unknown or expired on this stage; start it again "
                    "with start_session (replay the prefix)")
            _check_owner(session, caller)
            return session

    def touch(self, session: Session) -> None:
        """`session` is in use: its idle time starts again."""
        session.last_used = self._clock()

    def find(self, session_id: str) -> Session | None:
        """The live session, or None; its idle clock is left alone."""
        with self._lock:
            return self._sessions.get(session_id)

    def reserve(self, session: Session, new_tokens: int) -> None:
        """Account for `new_tokens` more positions of every row, or refuse."""
        needed = new_tokens * session.batch_size * self.bytes_per_token
        with self._lock:
            if self.cached_bytes_locked() + needed > self.max_cache_bytes:
                raise ResourceExhausted(
                    f"KV cache budget exhausted: {needed} more bytes would exceed this stage's "
                    f"{self.max_cache_bytes} (--max-cache-mb); shorten the request or retry later")
            session.reserved_bytes += needed

    def end(self, session_id: str, caller=None) -> bool:
        """Free a session; False if it was not here (PermissionDenied if `caller` may not use it)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            _check_owner(session, caller)
            session.ended = True
            del self._sessions[session_id]
            return True

    def abandon(self, session_id: str, caller=None) -> bool:
        """`end` it, and remember when: a step of it that arrived before now and still waits for the
        compute thread (the rest of a chunked prefill, say) is then not computed (`abandoned`). Also
        remembered when the session is not here yet (its first step may be among those waiting)."""
        ended = self.end(session_id, caller)
        now = time.monotonic_ns()
        with self._lock:
            self._abandoned.pop(session_id, None)
            self._abandoned[session_id] = (now, caller)
            oldest = now - int(ABANDONED_MEMORY_S * 1e9)
            while self._abandoned and (len(self._abandoned) > MAX_ABANDONED
                                       or next(iter(self._abandoned.values()))[0] < oldest):
                del self._abandoned[next(iter(self._abandoned))]
        return ended

    def abandoned(self, session_id: str, received_ns: int, caller=None) -> bool:
        """Whether EndSession ended `session_id` after a step of it arrived (at monotonic `received_ns`),
        by a caller that may use the sessions of the step's `caller`: such a step is not computed."""
        with self._lock:
            ended = self._abandoned.get(session_id)
        if ended is None or ended[0] < received_ns:
            return False
        by = ended[1]
        return by is None or caller is None or by.may_use(caller.identity)

    def expire_idle(self) -> int:
        """Drop sessions idle longer than the timeout; returns how many went."""
        now = self._clock()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s
                     and not s.lock.locked()]
            for sid in stale:
                del self._sessions[sid]
        return len(stale)

    def cached_bytes_locked(self) -> int:
        return sum(s.reserved_bytes for s in self._sessions.values())

    def stats(self) -> tuple[int, int]:
        """(live sessions, reserved cache bytes)."""
        with self._lock:
            return len(self._sessions), self.cached_bytes_locked()

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions
