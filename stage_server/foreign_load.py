"""How many of a stage's usable cores other programs keep busy, read from /proc.

Owns: sampling the busy time of the CPUs a stage may use (/proc/stat) and the CPU time of the
stage processes of its machine (/proc/PID/stat), and turning the difference over the last
interval into whole cores that other programs took. Does not own: what the stages do with it
(core_share gives their steps that many cores fewer).

Why: a step's thread team waits at every barrier for its slowest thread, and a thread that shares
its core with a busy program runs half the time. One group of 16 clients on 2 stages with two
threads a step fell to 0.23 of its quiet throughput beside a busy loop on one core; a step on the
one free core degrades only as far as the lost core.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

SAMPLE_EVERY_S = 1.0
# A stage that computed nothing for longer than this starts a new interval at its next step: what
# other programs did while it sat idle says nothing about the cores its steps will find. Why: a
# program that kept the cores busy meanwhile, and has stopped, would otherwise cost the stage's next
# second of steps their cores (a lone request's 4-stage decode just after the unsplit model ran:
# 0.75 of it). Not shorter: beside a busy neighbour a stage's steps come a few hundred ms apart, and
# each of those gaps must not hide the neighbour.
IDLE_GAP_S = SAMPLE_EVERY_S
# A core counts as taken once other programs used more than half of it over the interval: a busy loop
# sharing a core with a stage's thread still gets about half of it, and a coordinator far less.
SLACK = 0.5


class ForeignLoad:
    """`cores_taken(stage_pids)`: whole cores of `cpus` that programs other than the stage processes
    kept busy over the last interval of the stage's own activity, re-sampled at most every `every_s`
    (0 where /proc is missing, and until a first interval ends after a pause of IDLE_GAP_S)."""

    def __init__(self, cpus: set[int], *, every_s: float = SAMPLE_EVERY_S, proc: Path = Path("/proc"),
                 clock=time.monotonic) -> None:
        self._cpus, self._every_s, self._proc, self._clock = cpus, every_s, proc, clock
        self._last_call: float | None = None  # when a step last asked
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, int, int] | None = None  # (time, CPUs' busy ticks, stages' ticks)
        self._taken = 0

    def _busy_ticks(self) -> int:
        busy = 0
        for line in (self._proc / "stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self._cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in values[:8])
                busy += user + nice + system + irq + softirq + steal
        return busy

    def _process_ticks(self, pids: Iterable[int]) -> int:
        ticks = 0
        for pid in set(pids):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (self._proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks

    def cores_taken(self, stage_pids: Iterable[int]) -> int:
        now = self._clock()
        if self._last_call is not None and now - self._last_call > IDLE_GAP_S:
            self._last, self._taken = None, 0  # idle meanwhile: a new interval starts here
        self._last_call = now
        if self._last is not None and now - self._last[0] < self._every_s:
            return self._taken
        try:
            sample = (now, self._busy_ticks(), self._process_ticks(stage_pids))
        except (OSError, ValueError):
            return 0
        if self._last is not None:
            wall = (sample[0] - self._last[0]) * self._ticks_per_s
            others = (sample[1] - self._last[1]) - (sample[2] - self._last[2])
            self._taken = max(0, int(others / wall + 1 - SLACK)) if wall > 0 else 0
        self._last = sample
        return self._taken
