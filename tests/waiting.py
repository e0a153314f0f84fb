"""Polling helper for effects that land shortly after a call returns (sessions freed in the background)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(probe: Callable[[], object], expected: object, timeout_s: float = 10.0) -> object:
    """Call `probe` until it returns `expected` or the time runs out; returns the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
