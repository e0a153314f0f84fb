"""KV-cache sessions of one stage: creation, lookup, byte budget, idle expiry.

Owns: the table of live sessions, each a compact cache of this stage's layers for a
fixed batch of rows, and the limits on how many sessions and cache bytes a stage
holds. Does not own: what goes into a cache (the stage model writes it) or the wire.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stage_server.errors import InvalidRequest, ResourceExhausted, SessionNotFound


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

    def start(self, session_id: str, batch_size: int) -> Session:
        """A fresh, empty session; an existing one with this id is replaced (a replay)."""
        if not session_id:
            raise InvalidRequest("session_id is empty")
        self.expire_idle()
        with self._lock:
            old = self._sessions.pop(session_id, None)
            if len(self._sessions) >= self.max_sessions:
                if old is not None:
                    self._sessions[session_id] = old
                raise ResourceExhausted(
                    f"this stage already holds {self.max_sessions} sessions (--max-sessions); "
                    "retry later or end idle sessions")
            session = Session(session_id, self._make_cache(), batch_size, last_used=self._clock())
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> Session:
        """The live session, or SessionNotFound if unknown or expired. Looking a session up does not
        keep it alive (`touch` does, once a step has passed its checks): steps that fail let it expire."""
        self.expire_idle()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionNotFound(
                    f"session {session_id!r} is unknown or expired on this stage; start it again "
                    "with start_session (replay the prefix)")
            return session

    def touch(self, session: Session) -> None:
        """`session` is in use: its idle time starts again."""
        session.last_used = self._clock()

    def reserve(self, session: Session, new_tokens: int) -> None:
        """Account for `new_tokens` more positions of every row, or refuse."""
        needed = new_tokens * session.batch_size * self.bytes_per_token
        with self._lock:
            if self.cached_bytes_locked() + needed > self.max_cache_bytes:
                raise ResourceExhausted(
                    f"KV cache budget exhausted: {needed} more bytes would exceed this stage's "
                    f"{self.max_cache_bytes} (--max-cache-mb); shorten the request or retry later")
            session.reserved_bytes += needed

    def end(self, session_id: str) -> bool:
        """Free a session; False if it was not here."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

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
