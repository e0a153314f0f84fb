"""How many CPU threads each forward step of a stage runs on.

Owns: the choice, per step, between the stage's full thread count and a smaller one for small
steps, measuring which is faster for this slice on this machine, and applying it to torch.
Does not own: running the step (stage_model), the thread it runs on (compute_thread; the step
runner sets the count there before each step), nor how many cores the stages of this machine may
use at this moment (core_share caps each step's count by it).

Why small steps may get fewer threads: a step of a few tokens (one sequence decoding) does little
arithmetic per weight it reads. In float32 it is bound by memory bandwidth: a second thread gains
nothing alone, and when stages share cores their thread teams fight over them as the token passes
from stage to stage. In bfloat16 on a CPU without bf16 units the same step is bound by arithmetic
and all threads pay. So by default ("auto") a stage times one small step of its own slice both
ways when it starts (the best of 6 rounds each way, as one round is noisy) and keeps one thread
only if all threads are not clearly faster. Prefill and batched decode always get all threads.

Stages that share a machine calibrate one at a time and never while another imports or loads
(machine_lock): a stage timing itself while another stage works finds the other core busy, sees
no gain from a second thread, and chooses one where two are 1.3-1.5x faster alone.

A start-up calibration can still land wrong: the machine may be in a slow phase, or the stage's
neighbours may work differently under load than at start. So in "auto" mode a stage keeps
checking while it serves: every PROBE_EVERY-th single-token step runs on the other count, and it
is timed together with the step just before it (so that both counts are timed at the same moment
of a machine whose speed drifts), keeping the last few such pairs. One thread switches to all
once their median is clearly (AUTO_MIN_GAIN) faster; all switch back to one only once one is no
slower at all. Between the two the choice stays, so that a gain near AUTO_MIN_GAIN does not flip
the count at every probe. Only single-token steps are compared (one sequence decoding, all alike
in cost).

A probe on the slower count is a slow step, and every stage of a pipeline counts the same steps,
so all of them probe the same token. So each probe that leaves the choice as it was doubles the
distance to the next one, up to PROBE_EVERY_MAX steps (a probe every 32 steps costs ~2 % of a
4-stage decode's speed, one every 512 ~0.1 %); a change of choice starts again at PROBE_EVERY, so
that a count that just changed is checked soon.

Thread counts must not change results, or greedy answers would drift from the unsplit model's:
torch's CPU kernels give bit-identical logits for 1 and 2 threads (float32 and bfloat16, decode
and prefill shapes), and the equivalence tests run stages under this policy against the unsplit
model at full threads.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable

import torch

from stage_server.core_share import CoreShare
from stage_server.machine_lock import MachineLock

log = logging.getLogger(__name__)

# Steps carrying at most this many new tokens in total (rows x tokens) count as small.
SMALL_STEP_TOKENS = 4
# "auto" keeps one thread for small steps unless all threads are at least this much faster.
AUTO_MIN_GAIN = 1.15
AUTO = "auto"
# While serving, "auto" runs a single-token step on the other thread count every PROBE_EVERY
# steps, and compares the medians of the last PROBE_WINDOW timings of each count. Each probe that
# confirms the choice doubles the distance to the next, up to PROBE_EVERY_MAX.
PROBE_EVERY = 32
PROBE_EVERY_MAX = 512
PROBE_WINDOW = 5


class ThreadCounts:
    """`for_step(tokens)` sets torch's intra-op threads for a step of `tokens` new tokens.

    `small_step` is a thread count (0 = as many as `full`) or "auto": one thread until
    `calibrate` has timed the slice and found that all threads pay.
    """

    def __init__(self, full: int = 0, small_step: int | str = AUTO, share: CoreShare | None = None) -> None:
        if full < 0 or (small_step != AUTO and (not isinstance(small_step, int) or small_step < 0)):
            raise ValueError(f"thread counts must be >= 0 (or small_step 'auto'), got {full} and {small_step!r}")
        self.full = full or torch.get_num_threads()
        self.share = share  # caps each step by the cores the machine's busy stages leave it
        self.auto = small_step == AUTO
        self.small_step = 1 if self.auto else min(small_step or self.full, self.full)
        self.probe_every = PROBE_EVERY  # single-token steps from one probe to the next
        self._until_probe = PROBE_EVERY  # single-token steps left until the next probe (0: this one)
        self._timed: int | None = None  # the thread count of the step being run, if it is timed
        # (a probe or the step before one)
        self._timings = {count: deque(maxlen=PROBE_WINDOW) for count in {1, self.full}}

    def threads_for(self, tokens: int) -> int:
        return self.small_step if tokens <= SMALL_STEP_TOKENS else self.full

    def for_step(self, tokens: int, in_flight: int = 0) -> int:
        """Apply the thread count for a step of `tokens` new tokens; returns it (in "auto" mode,
        every `probe_every`-th single-token step gets the other count, to time it). With a share,
        the step is marked busy until `record` and gets no more than its share of the cores, given
        the micro-batches in the pipeline (`in_flight`, 0 = unknown)."""
        threads = self.threads_for(tokens)
        self._timed = None
        if tokens == 1 and self.auto and self.full > 1:
            self._until_probe -= 1
            if self._until_probe == 0:
                threads = self.full if threads == 1 else 1
                self._until_probe = self.probe_every
            if self._until_probe in (1, self.probe_every):  # the step before the probe, and the probe
                self._timed = threads
        if self.share is not None:
            allowed = self.share.begin_step(in_flight)
            if allowed < threads:
                threads, self._timed = allowed, None  # a step capped by the share times nothing
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def record(self, seconds: float) -> None:
        """How long the step for_step was last called for took. In "auto" mode, the timings of probes
        and of the steps just before them move the small-step count to all threads when they are
        AUTO_MIN_GAIN faster, and back to one when one is no slower (in between, it stays). A probe
        that confirms the choice doubles the distance to the next one; a change resets it.
        Call it after every step for_step began, failed or not: it ends the step's busy mark."""
        if self.share is not None:
            self.share.end_step()
        if self._timed is None:
            return
        probe = self._timed != self.small_step
        self._timings[self._timed].append(seconds)
        self._timed = None
        one, full = self._timings[1], self._timings[self.full]
        if len(one) < 3 or len(full) < 3:
            return
        on_one, on_all = statistics.median(one), statistics.median(full)
        if self.small_step == 1:
            chosen = self.full if on_one > on_all * AUTO_MIN_GAIN else 1
        else:
            chosen = 1 if on_one <= on_all else self.full
        if chosen != self.small_step:
            log.info("small steps: now %.1f ms on 1 thread, %.1f ms on %d (medians of the last %d); using %d",
                     on_one * 1e3, on_all * 1e3, self.full, PROBE_WINDOW, chosen)
            self.small_step = chosen
            self.probe_every = PROBE_EVERY
            self._until_probe = min(self._until_probe, PROBE_EVERY)
        elif probe:
            self.probe_every = self._until_probe = min(2 * self.probe_every, PROBE_EVERY_MAX)

    def calibrate(self, small_step_seconds: Callable[[], float], rounds: int = 6,
                  lock: MachineLock | None = None) -> None:
        """In "auto" mode, time `small_step_seconds` (one small step) on one thread and on all,
        alternating, and keep one thread only if all threads are not AUTO_MIN_GAIN faster.
        Holds `lock` (default: this machine's stage lock) exclusively meanwhile."""
        if not self.auto or self.full == 1:
            return
        best = {1: float("inf"), self.full: float("inf")}
        with (lock or MachineLock()).held(exclusive=True):
            try:
                for _ in range(rounds + 1):  # the first round warms up both
                    for threads in best:
                        torch.set_num_threads(threads)
                        best[threads] = min(best[threads], small_step_seconds())
            finally:
                torch.set_num_threads(self.full)
        self.small_step = self.full if best[1] > best[self.full] * AUTO_MIN_GAIN else 1
        log.info("small steps: %.1f ms on 1 thread, %.1f ms on %d; using %d", best[1] * 1e3,
                 best[self.full] * 1e3, self.full, self.small_step)
