"""Keeping freed memory in the process, so that the next step reuses it instead of faulting it in anew.

Owns: glibc malloc's thresholds for this process (`mallopt`), set once at stage start. Does not own
any tensor or cache; on a C library without `mallopt` (musl, macOS, Windows) it does nothing.

Why: with glibc's defaults, a block of more than a few MiB is mapped fresh from the kernel each time
and unmapped when freed, and memory freed at the top of the heap is handed back soon. A stage frees
and asks again for the same large blocks every step (a 512-token prefill's activations, oneDNN's
scratch buffers), so with the defaults each step pays thousands of page faults to zero pages it
has just returned. With these settings a 512-token prompt through 2 SmolLM2 bfloat16 stages takes
1.13x and 1.11x the unsplit model's time to first token, against 1.17x and 1.25x with the defaults.
The price: up to `keep_mb` of freed memory stays with the process after a large step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

DEFAULT_KEEP_MB = 1024
TOP_PAD_MB = 64  # asked of the kernel beyond each heap growth, so that growth comes in few steps


def _mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory(keep_mb: int = DEFAULT_KEEP_MB) -> bool:
    """Serve blocks of up to `keep_mb` MiB from the heap and keep up to that much freed memory at its top
    (0 = leave the C library's defaults). True if the settings took effect."""
    if keep_mb < 0:
        raise ValueError(f"keep_mb must be >= 0, got {keep_mb}")
    if keep_mb == 0:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        log.info("no mallopt in this C library; freed memory is kept as it decides")
        return False
    keep = min(keep_mb, 2047) << 20  # mallopt takes a C int
    done = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, keep), (M_TRIM_THRESHOLD, keep), (M_TOP_PAD, min(TOP_PAD_MB << 20, keep))))
    if not done:
        log.warning("the C library refused some malloc settings; large steps may fault their memory in anew")
    return done
