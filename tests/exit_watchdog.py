"""Keeps a finished test run from hanging at exit, and says what would have hung it.

Python's exit joins every thread that is not a daemon: the worker pools of the in-process gRPC
servers and each stage's compute thread among them; then it tears the interpreter down, native
libraries included. A thread stuck there keeps a run whose tests have all passed alive, silently,
until CI gives up on it. So, once the session ends:

- `busy_threads_report()` names the non-daemon threads still busy (an idle pool worker waiting for
  work is not busy: the exit's join ends it at once) with their stacks, for the terminal summary;
- `arm(status)` makes the process end with pytest's own exit status: a watchdog prints every
  thread's stack and ends it if the exit's join of those threads has not returned `EXIT_GRACE_S`
  later, and once the join returns the process ends at once, without the interpreter's teardown.

Owns only that; it does not decide whether the suite passed.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import threading
import time
import traceback

EXIT_GRACE_S = 30.0  # how long a finished run may take to exit before the watchdog ends it
SETTLE_S = 5.0  # how long busy threads get to finish (servers stopping) before they are reported


def _idle_pool_worker(frame) -> bool:
    """True for a concurrent.futures worker waiting for work (its own frame is the innermost one)."""
    code = frame.f_code
    return code.co_name == "_worker" and code.co_filename.endswith(os.path.join("concurrent", "futures", "thread.py"))


def busy_threads(settle_s: float = SETTLE_S) -> list[tuple[threading.Thread, list[str]]]:
    """Non-daemon threads other than this one that are still working after `settle_s`, with stacks."""
    deadline = time.monotonic() + settle_s
    while True:
        frames = sys._current_frames()
        busy = [(thread, frames.get(thread.ident)) for thread in threading.enumerate()
                if thread is not threading.current_thread() and not thread.daemon and thread.is_alive()]
        busy = [(thread, frame) for thread, frame in busy if frame is not None and not _idle_pool_worker(frame)]
        if not busy or time.monotonic() > deadline:
            return [(thread, traceback.format_stack(frame)) for thread, frame in busy]
        time.sleep(0.1)


def busy_threads_report(settle_s: float = SETTLE_S) -> str:
    """A warning naming each busy thread with its stack, or '' when none is busy."""
    busy = busy_threads(settle_s)
    if not busy:
        return ""
    parts = [f"{len(busy)} non-daemon thread(s) still busy after the tests: the process may not exit"]
    for thread, stack in busy:
        parts.append(f"--- thread {thread.name!r}:\n{''.join(stack[-12:])}")
    return "\n".join(parts)


def arm(status: int, grace_s: float = EXIT_GRACE_S) -> None:
    """Make sure the process ends with `status`: a watchdog ends it `grace_s` from now (after
    printing every thread's stack) if the exit's join of non-daemon threads hangs; once that join is
    over, the first exit handler ends it at once, skipping the interpreter's teardown (module
    clean-up, native libraries' destructors), which a test run has no need of and where a hang
    would leave no Python thread to report it."""
    err = sys.__stderr__

    def watch() -> None:
        time.sleep(grace_s)
        err.write(f"\nexit watchdog: the tests finished {grace_s:.0f} s ago but the process has not exited; "
                  "the stacks of its threads follow, then it ends with the tests' own status\n")
        for thread in threading.enumerate():  # faulthandler names threads by id only
            err.write(f"  thread 0x{thread.ident or 0:016x} is {thread.name!r}{' (daemon)' * thread.daemon}\n")
        err.flush()
        faulthandler.dump_traceback(file=err, all_threads=True)
        _exit_now(status)

    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()
    atexit.register(_exit_now, status)  # registered last, so called first


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(status)
