"""Bounded shutdown of a layerline server process: every wait has an end, and so does the process.

Owns: `stop_server`, which stops a grpc.Server and waits for it a bounded time; `exit_deadline`,
which ends the process once a deadline passes, whatever is still running; and `exit_now`, which
flushes the logs and ends the process at once.

Why: grpcio's `server.stop(grace)` does not always finish (1.85: after about ten streaming calls
it could not parse itself), and Python's exit joins every non-daemon thread, the server's
worker pool among them, so one stuck call would keep a stopped server's process alive forever.

Does not own: what a server drains before it stops (stage_server/server.py, coordinator/app.py)
or signal handling (their callers).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

log = logging.getLogger(__name__)

STOP_WAIT_S = 3.0  # how long past its grace a gRPC server gets to finish stopping
EXIT_DEADLINE_S = 10.0  # how long a server process may take to exit once told to (past a stage's drain)


def stop_server(server, grace_s: float, wait_s: float = STOP_WAIT_S) -> bool:
    """`server.stop(grace_s)` (a grpc.Server), then wait for it to finish up to `wait_s` past the
    grace; True when it did, False (with a warning) when it did not."""
    if server.stop(grace_s).wait(grace_s + wait_s):
        return True
    log.warning("the gRPC server did not finish stopping %.0f s after its %.0f s grace; going on without it",
                wait_s, grace_s)
    return False


def exit_now(status: int) -> NoReturn:
    """Flush every log handler and the standard streams, then end the process at once (no join of
    threads that a stuck shutdown left behind)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # a handler whose stream is gone: nothing left to flush there
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(status)


def exit_deadline(seconds: float, status: int = 1) -> threading.Timer:
    """End the process with `status` `seconds` from now unless it has exited by then (a daemon timer:
    it keeps running while Python's exit waits for other threads)."""

    def expire() -> None:
        log.error("still running %.0f s after the shutdown began: exiting now", seconds)
        exit_now(status)

    timer = threading.Timer(seconds, expire)
    timer.name = "exit-deadline"
    timer.daemon = True
    timer.start()
    return timer
