"""A stage whose forward waits until the test lets it go, so a test can act while a step computes."""

from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def stalled_forward(service, timeout_s: float = 30):
    """While the block runs, each forward of `service` (a StageService) sets `computing`, then waits
    for `release` (at most timeout_s). Yields (computing, release); releases and restores on exit."""
    computing, release = threading.Event(), threading.Event()
    forward = service.model.forward

    def stalled(*args, **kwargs):
        computing.set()
        release.wait(timeout_s)
        return forward(*args, **kwargs)

    service.model.forward = stalled
    try:
        yield computing, release
    finally:
        release.set()
        service.model.forward = forward
