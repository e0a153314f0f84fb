"""The test run's exit watchdog: a finished run with a thread stuck for good still exits, with its status."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

_IMPORTS = "import sys, threading\nsys.path.insert(0, sys.argv[1])\nimport exit_watchdog\n"


def _python(body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `body` (after importing exit_watchdog) in a fresh interpreter; sys.argv[2:] are `args`."""
    script = _IMPORTS + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_stuck_thread_is_named_and_the_process_still_exits_with_the_runs_status():
    started = time.monotonic()
    done = _python("""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(2)
        pool.submit(lambda: None).result()  # an idle worker: not busy, and the exit's join ends it
        never = threading.Event()
        threading.Thread(target=never.wait, name="stuck-for-good").start()
        print(exit_watchdog.busy_threads_report(settle_s=0.2), flush=True)
        exit_watchdog.arm(3, grace_s=1.0)
    """)
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - started < 30
    report = done.stdout
    assert "1 non-daemon thread(s) still busy" in report
    assert "--- thread 'stuck-for-good':" in report and "in wait" in report
    assert "ThreadPoolExecutor" not in report  # the idle worker is not reported
    assert "exit watchdog: the tests finished" in done.stderr
    assert "is 'stuck-for-good'" in done.stderr
    assert "in _shutdown" in done.stderr  # the main thread is held in the exit's join


HANGS_IN_TEARDOWN = """
    class HangsInTeardown:
        def __del__(self):  # runs as the interpreter clears this module, after every exit handler
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()

    kept = HangsInTeardown()
    if sys.argv[2] == "armed":
        exit_watchdog.arm(5, grace_s=30.0)
"""


def test_a_hang_in_the_interpreters_teardown_is_skipped_with_the_runs_status():
    armed = _python(HANGS_IN_TEARDOWN, "armed")
    assert armed.returncode == 5, armed.stderr
    assert "exit watchdog" not in armed.stderr  # ended by the exit handler, not the watchdog's grace
    with pytest.raises(subprocess.TimeoutExpired):  # unguarded, the same process never exits
        _python(HANGS_IN_TEARDOWN, "bare", timeout=5)


def test_a_clean_exit_is_not_held_up_and_reports_nothing():
    started = time.monotonic()
    done = _python("""
        print(repr(exit_watchdog.busy_threads_report(settle_s=0.2)), flush=True)
        exit_watchdog.arm(0, grace_s=20.0)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "''"
    assert time.monotonic() - started < 15
    assert "exit watchdog" not in done.stderr
