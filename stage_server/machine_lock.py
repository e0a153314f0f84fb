"""A lock shared by every stage process on this machine.

Owns: one lock file in the temp directory, taken shared or exclusive with a bounded wait. Stages
hold it shared from start-up until their weights are loaded, and exclusive while they time
themselves (thread_counts.calibrate), so a stage is timed only when no other stage on the
machine is importing, loading or being timed: a busy neighbour makes a second thread look useless.

Does not own: what is timed or decided under it (thread_counts), nor anything across machines.
Imports nothing heavy, so the stage CLI can take it before importing torch.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_PATH = Path(tempfile.gettempdir()) / "layerline-stages.lock"
WAIT_S = 120.0  # a stage that waits longer than this goes on without the lock (and says so)

try:
    import fcntl
except ImportError:  # no flock (Windows): every acquire says it could not lock
    fcntl = None


class MachineLock:
    """Shared or exclusive hold on `path`; `acquire` drops any mode held before taking the new one."""

    def __init__(self, path: Path | None = None, *, wait_s: float = WAIT_S, poll_s: float = 0.05) -> None:
        self.path, self.wait_s, self.poll_s = Path(path or LOCK_PATH), wait_s, poll_s
        self._handle = None

    def acquire(self, *, exclusive: bool) -> bool:
        """Take the lock; False if locks are unavailable here or `wait_s` passed first."""
        self.release()  # converting in place is not atomic; let the other waiters in first
        if fcntl is None:
            return False
        try:
            handle = open(self.path, "a")
        except OSError as err:
            log.debug("no machine-wide stage lock: %s", err)
            return False
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(handle, mode)
                self._handle = handle
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    handle.close()
                    log.warning("waited %.0f s for %s (another stage on this machine is loading or timing "
                                "itself); going on without it", self.wait_s, self.path)
                    return False
                time.sleep(self.poll_s)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @contextlib.contextmanager
    def held(self, *, exclusive: bool) -> Iterator[bool]:
        try:
            yield self.acquire(exclusive=exclusive)
        finally:
            self.release()
