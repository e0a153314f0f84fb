"""How many cores a stage may use, and how stages on one machine share them step by step.

Owns: `usable_cores` (the cores this process may run on: its affinity mask, capped by a cgroup CPU
quota, so a container limited to 2 CPUs on a 64-core host counts 2) and `CoreShare`, a table in
shared memory where every stage process of this machine has a slot and says whether it is
computing a step now. A step may use the usable cores over the stages of this machine that may
compute at once: with the coordinator's count of micro-batches in the pipeline (`in_flight`),
the smaller of that count and the stages here; without it, the stages computing at that moment.
Cores that other programs keep busy are left out (foreign_load).
So one sequence decoding (one micro-batch: its stages compute one at a time) gets every core at
each stage, and under concurrent load each of two stages on two cores gets one: their thread
teams never oversubscribe the cores. Does not own: which count a step would like
(thread_counts) or applying it to torch.

Why the coordinator's count before the busy marks: stages of one pipeline start their steps
staggered, so a stage that starts while its neighbour is between steps would take every core and
then share them with the neighbour's next step (2 stages, 16 clients: 104 tok/s by busy marks
alone, 130 with the count).

Why shared per step rather than planned once: a plan fixed at start must choose between the two
cases. On a 2-core host, 2 stages at one thread each decode one request at 0.64 of the unsplit
model (every core idle but one), and at two threads each 16 concurrent clients collapse to ~1x
one client (4 stages: two thread teams spinning on each core). Pinning stages to their own
cores reads the same as one thread each for a lone request (0.62) and wins nothing under load.

A stage killed in a step leaves its busy mark: marks of processes that no longer exist are cleared
every CLEAN_EVERY_S while stages compute, and their slots freed when a stage joins.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

from stage_server.foreign_load import ForeignLoad

log = logging.getLogger(__name__)

TABLE_PATH = Path(tempfile.gettempdir()) / "layerline-core-share"
SLOTS = 128  # stage processes on one machine that take part; more run without a share (and say so)
_PIDS = 0  # SLOTS little-endian int32 process ids (0 = free), then SLOTS busy bytes
_BUSY = 4 * SLOTS
TABLE_BYTES = 5 * SLOTS
CLEAN_EVERY_S = 5.0

try:
    import fcntl
except ImportError:  # no flock (Windows): stages run without a share
    fcntl = None


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores(affinity: set[int] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may keep busy: its affinity mask, capped by a CPU quota of cgroup
    v2 (`cpu.max`) or v1 (`cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`), rounded up; at least 1."""
    if affinity is None:
        affinity = _affinity()
    cores = max(1, len(affinity))
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of time per period the cgroup allows, or None when unlimited or unknown."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class CoreShare:
    """This process's slot in the machine's table. `begin_step()` marks it busy and returns the
    threads a step may use now; `end_step()` clears the mark. Without a slot (no table could be
    opened, or all SLOTS taken) every step may use all `cores`."""

    def __init__(self, cores: int, path: Path | None = None, *, pid: int | None = None,
                 affinity: set[int] | None = None) -> None:
        self.cores = cores
        self.path = Path(path or TABLE_PATH)
        self._pid = pid or os.getpid()
        self._table: mmap.mmap | None = None
        self._slot = -1
        self._next_clean = 0.0
        self._pids = [self._pid]  # live slots' pids, this stage's included (refreshed with the cleaning)
        self._foreign = ForeignLoad(affinity if affinity is not None else _affinity())
        try:
            self._join()
        except OSError as err:
            log.warning("no core share with other stages on this machine (%s): steps use all %d cores", err, cores)

    def _join(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size < TABLE_BYTES:
                os.ftruncate(fd, TABLE_BYTES)
            table = mmap.mmap(fd, TABLE_BYTES)
            self._clean(table)
            for slot in range(SLOTS):
                if struct.unpack_from("<i", table, _PIDS + 4 * slot)[0] == 0:
                    struct.pack_into("<i", table, _PIDS + 4 * slot, self._pid)
                    table[_BUSY + slot] = 0
                    self._table, self._slot = table, slot
                    return
            table.close()
            log.warning("%d stages already share this machine's cores; this one uses all %d", SLOTS, self.cores)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the mapping holds a duplicate of fd, and the lock
            os.close(fd)  # lives as long as any duplicate does

    @staticmethod
    def _clean(table: mmap.mmap, *, free_slots: bool = True) -> None:
        """Clear the busy marks of processes that no longer exist, and (only under the table's
        lock, as joining stages write pids under it) free their slots."""
        for slot, pid in enumerate(struct.unpack_from(f"<{SLOTS}i", table, _PIDS)):
            if pid and not _alive(pid):
                table[_BUSY + slot] = 0
                if free_slots:
                    struct.pack_into("<i", table, _PIDS + 4 * slot, 0)

    def _live_pids(self) -> list[int]:
        """The pid of every live slot, this stage's included (a process with several stages, once each)."""
        if self._table is None:
            return [self._pid]
        pids = struct.unpack_from(f"<{SLOTS}i", self._table, _PIDS)
        return [pid for slot, pid in enumerate(pids) if slot == self._slot or (pid and _alive(pid))]

    def neighbours(self) -> int:
        """Other stage processes of this machine in the table now."""
        return len(self._live_pids()) - 1

    def begin_step(self, in_flight: int = 0) -> int:
        """Mark this stage busy; the threads a step may use: the cores over the stages that may
        compute at once. With `in_flight` micro-batches in the pipeline (the coordinator says how
        many), at most that many of this machine's stages compute at once; 0 (not said): the
        stages computing at this moment."""
        table = self._table
        if table is None:
            return self.cores
        table[_BUSY + self._slot] = 1
        now = time.monotonic()
        if now >= self._next_clean:  # a stage killed mid-step must not hold a share for good
            self._next_clean = now + CLEAN_EVERY_S
            self._clean(table, free_slots=False)
            self._pids = self._live_pids()
        cores = max(1, self.cores - self._foreign.cores_taken(self._pids))
        if in_flight:
            return max(1, cores // min(in_flight, len(self._pids)))
        return max(1, cores // max(1, table[_BUSY:_BUSY + SLOTS].count(1)))

    def end_step(self) -> None:
        table = self._table
        if table is not None:
            with contextlib.suppress(ValueError):  # closed meanwhile by a stop that did not wait for the step
                table[_BUSY + self._slot] = 0

    def close(self) -> None:
        """Give the slot back (stage shutdown)."""
        table, self._table = self._table, None
        if table is not None:
            struct.pack_into("<i", table, _PIDS + 4 * self._slot, 0)
            table[_BUSY + self._slot] = 0
            table.close()
