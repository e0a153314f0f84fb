"""The one thread a stage runs its torch work on, and how long its OpenMP workers spin.

Owns: a single long-lived thread that loads the slice, calibrates thread counts and runs every
forward step, whichever stream the step came in on; and the stage's default for GOMP_SPINCOUNT.
Does not own: how many threads a step uses (thread_counts), nor which steps run or in what order
(forward_stream submits them; this thread runs them one at a time, in the order submitted).

Why one thread: torch's CPU kernels use GNU OpenMP, which gives every thread that starts
parallel work a team of worker threads of its own, kept for that thread's life. Computing on
whichever thread read the request (the coordinator's stream for prefills, the greedy chain's
stream for decode steps) and loading on the main thread would make three teams. Once a process
holds more OpenMP threads than it has CPUs, libgomp stops spinning between parallel regions (a
few hundred rounds instead of GOMP_SPINCOUNT), so the workers sleep in the kernel between the
hundreds of regions of a step and each region waits for them to wake (20-25 % slower steps).

Why a shorter spin: libgomp's default (300000 rounds when OMP_WAIT_POLICY is unset) keeps a
stage's workers spinning for milliseconds after its step ends, on the cores the next stage now
needs; a spin of a few thousand rounds lets them fall asleep inside a step again. Through a
pipeline 30000 rounds serve as well as 100000 (10000 is slower), and the shorter spin matters
when both stages compute at once (batched decode with groups in flight) and each one's spinning
workers take a core from the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

SPIN_COUNT = "30000"  # GOMP_SPINCOUNT a stage process starts with, unless its environment sets one
Result = TypeVar("Result")


def set_openmp_spin(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set GOMP_SPINCOUNT unless already set; returns the value in force. Must run before torch is
    imported: libgomp reads its environment when it is loaded."""
    return environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


class ComputeThread:
    """`run(fn)` runs `fn` on the stage's compute thread and returns its result (or raises its error);
    `submit(fn)` queues it there and returns at once. Either way, one at a time, in submission order."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="compute")

    def run(self, fn: Callable[[], Result]) -> Result:
        return self._executor.submit(fn).result()

    def submit(self, fn: Callable[[], Result]) -> Future:
        """Queue `fn` behind the work already submitted; returns at once."""
        return self._executor.submit(fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
