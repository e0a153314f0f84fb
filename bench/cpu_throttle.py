"""A CPU quota on some processes of this machine, as a slower host would have: a cgroup of its own.

Owns: making a child cgroup with a CPU quota (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over
`cpu.cfs_period_us`, whichever this machine mounts; root is needed), moving processes into it
(`add`, or `enter` in a child before it runs the program) and removing it again (its processes go
back to the parent). Does not own: which processes are throttled or what is measured.

Why a short period: a quota lets a process run at full speed until the period's share is spent.
With the kernel's default period of 100 ms, a stage that computes a few ms per token and then
waits for its neighbour never spends its share and is not slowed at all; with a period about as
long as a step, every step runs at about the quota's fraction of a core. Not much shorter: each
period the group waits to be scheduled again, and at 2 ms that wait made half a core a third.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class CpuThrottle:
    """A cgroup named `name` whose processes get `share` of a CPU, in periods of `period_us`, and
    `weight` times a plain process's claim to it against other work (cpu.shares, cpu.weight): a
    group competes with the machine's other processes and session groups as one process would,
    whatever niceness its members have, so a busy machine would slow it below its quota."""

    def __init__(self, name: str, share: float, period_us: int = 10000, weight: float = 1.0) -> None:
        if not 0 < share <= 64 or not 1000 <= period_us <= 1_000_000:
            raise ValueError(f"share must lie in (0, 64] CPUs and period_us in [1000, 1000000], got {share}, "
                             f"{period_us}")
        quota = max(1000, round(share * period_us))
        if (ROOT / "cgroup.controllers").exists():  # cgroup v2, the unified hierarchy at the root
            self.parent = ROOT
            with contextlib.suppress(OSError):  # already on, or not ours to turn on (then mkdir says so)
                (ROOT / "cgroup.subtree_control").write_text("+cpu")
            self.path = ROOT / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {period_us}")
            (self.path / "cpu.weight").write_text(str(max(1, min(10000, round(100 * weight)))))
        else:  # cgroup v1: the cpu controller's own hierarchy
            self.parent = ROOT / "cpu"
            self.path = self.parent / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            (self.path / "cpu.shares").write_text(str(max(2, min(262144, round(1024 * weight)))))
        self.share, self.period_us = share, period_us

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def enter(self) -> None:
        """Move the calling process into the group (a child's preexec_fn, before it runs the program)."""
        self.add(os.getpid())

    def remove(self, timeout_s: float = 5.0) -> None:
        """Move what is left in the group back to the parent and delete the group."""
        deadline = time.monotonic() + timeout_s
        while self.path.exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for pid in (self.path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.parent / "cgroup.procs").write_text(pid)
                self.path.rmdir()
                return
            time.sleep(0.1)
