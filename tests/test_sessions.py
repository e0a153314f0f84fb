"""Session store limits: count, bytes, idle expiry, replay."""

from __future__ import annotations

import pytest

from stage_server.errors import InvalidRequest, ResourceExhausted, SessionNotFound
from stage_server.sessions import SessionStore


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def store(clock=None, **limits):
    return SessionStore(make_cache=dict, bytes_per_token=100, clock=clock or FakeClock(), **limits)


def test_start_get_end():
    sessions = store()
    s = sessions.start("a", batch_size=2)
    assert sessions.get("a") is s and "a" in sessions
    assert sessions.end("a") and not sessions.end("a")
    with pytest.raises(SessionNotFound, match="unknown or expired"):
        sessions.get("a")


def test_session_count_limit():
    sessions = store(max_sessions=2)
    sessions.start("a", 1)
    sessions.start("b", 1)
    with pytest.raises(ResourceExhausted, match="2 sessions"):
        sessions.start("c", 1)
    sessions.start("a", 1)  # restarting an existing id (a replay) is not a new session
    assert sessions.stats()[0] == 2


def test_byte_budget_is_reserved_up_front():
    sessions = store(max_cache_bytes=1000)
    s = sessions.start("a", batch_size=2)
    sessions.reserve(s, 4)  # 4 tokens x 2 rows x 100 bytes
    assert sessions.stats() == (1, 800)
    with pytest.raises(ResourceExhausted, match="budget"):
        sessions.reserve(s, 2)
    sessions.end("a")
    assert sessions.stats() == (0, 0)


def test_idle_sessions_expire():
    clock = FakeClock()
    sessions = store(clock, idle_timeout_s=10)
    sessions.start("old", 1)
    clock.now = 5
    sessions.start("new", 1)
    clock.now = 12
    assert sessions.expire_idle() == 1
    assert "old" not in sessions and "new" in sessions
    with pytest.raises(SessionNotFound):
        sessions.get("old")


def test_busy_session_does_not_expire():
    clock = FakeClock()
    sessions = store(clock, idle_timeout_s=1)
    s = sessions.start("busy", 1)
    with s.lock:
        clock.now = 100
        assert sessions.expire_idle() == 0


def test_empty_id_rejected():
    with pytest.raises(InvalidRequest):
        store().start("", 1)
