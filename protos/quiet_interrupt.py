"""Ctrl-C while a command starts ends it with one line, not a traceback.

Owns: on import (both commands import this first), a SIGINT handler that records the interrupt
before raising KeyboardInterrupt as Python's own does, `interrupted()`, and an excepthook that
prints "interrupted" instead of the report of whatever reached the top level after an interrupt.
Why record it: an interrupt that lands inside a library's import can leave that library half
made, and the error it then raises (numpy: a RecursionError) is not a KeyboardInterrupt, yet it is
the interrupt's doing. The commands' `main` asks `interrupted()` when anything ends their start.
"""

from __future__ import annotations

import signal
import sys

_interrupted = False
_previous_hook = sys.excepthook


def _on_interrupt(_signum, _frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) came while this handler was installed."""
    return _interrupted


def _hook(kind, error, traceback) -> None:
    if _interrupted or issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
    else:
        _previous_hook(kind, error, traceback)


sys.excepthook = _hook
signal.signal(signal.SIGINT, _on_interrupt)
