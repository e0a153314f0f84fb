"""Continuous batching: one loop that keeps every stage busy with every client's sequences.

Owns: the queue of admitted-but-waiting sequences and its bounds (rows generating
at once, cache positions reserved, queue length), prefilling newly admitted
sequences as their own sessions (whole prompts, up to --prefill-chunk tokens a micro-batch;
a longer prompt alone, in chunks, so stages overlap on it; one admission round at a
time, so a burst of arrivals shares its prefills),
merging them into a running group at that group's next decode step, dropping
finished or cancelled rows at the step after, and keeping `groups` sessions in
flight at once so that while one group is in stage k another is in stage k+1.
A greedy group that has the stages to itself is chained: a decode step carries a
credit of further steps that the last stage sends to stage 0 itself
(stage_server/greedy_chain.py); the loop mirrors each chained step as its answer
arrives and asks for control back (StopChain) when a row must leave, prefilled rows
wait to join, or a new prefill starts.

Runs on one thread that starts when work arrives and ends when none is left; answers from
the stages arrive as events on a queue. A decode step's answer is handled on the thread that
read it instead, when no scheduling is under way (see `_step_answered`). Either way all
sampling and bookkeeping happen under one lock, one answer at a time.

Does not own: the wire (pipeline_client), a group's cache mirror (running_batch),
tokens ⇄ text (text), or gRPC status mapping (service).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from coordinator.pipeline_client import PipelineClient, logits_of
from coordinator.running_batch import FINISH_CANCELLED, Group, LiveSequence, Prefill, SequenceResult, prefill_batches

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often an idle loop looks at cancellations
# Prefills (stage sessions) one admission round may open; a stage's --max-sessions (default 64)
# must leave room for these beside the running groups' sessions.
MAX_PREFILLS_PER_ROUND = 8


class GenerationCancelled(Exception):
    """The caller asked to stop (client went away or deadline passed)."""


class CapacityError(Exception):
    """A request cannot be queued: the queue is full or the request alone exceeds a bound."""


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on what the coordinator runs at once; beyond them requests wait in a queue."""

    max_batch_rows: int = 64  # sequences generating at once, over every group and prefill
    max_cache_positions: int = 1 << 16  # Σ (prompt + max_new_tokens) over those sequences
    max_queue: int = 1024  # sequences waiting for admission
    prefill_chunk_tokens: int = 512  # rows × longest prompt per prefill (longer: alone, in chunks); 0 = no bound

    def __post_init__(self) -> None:
        for name in ("max_batch_rows", "max_cache_positions", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be 0 (no chunks) or more, got {self.prefill_chunk_tokens}")


@dataclass(frozen=True)
class SchedulerStats:
    queued: int
    running: int
    prefilling: int
    reserved_positions: int
    sessions: int
    decode_steps: int
    prefills: int
    hop_bytes: int


class Scheduler:
    """Admits sequences, prefills them, and runs decode steps for `groups` sessions at once."""

    def __init__(self, pipeline: PipelineClient, *, pad_token_id: int = 0, groups: int = 1,
                 limits: BatchLimits | None = None, chain: bool = True, prefill_alone: bool = False) -> None:
        self.pipeline = pipeline
        self.prefill_alone = prefill_alone  # one prompt per prefill (running_batch.prefill_batches)
        # greedy groups let the last stage send their next steps (greedy chaining)
        self.chain = chain and getattr(pipeline, "can_chain", False)
        self.pad_token_id = pad_token_id
        self.limits = limits or BatchLimits()
        self._groups = [Group() for _ in range(max(1, groups))]
        self._waiting: deque[LiveSequence] = deque()
        self._prefills: list[Prefill] = []
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.RLock()  # re-entrant: an on_token callback may submit more work
        self._scheduling = False  # a thread holding the lock is in the loop's work or a handler
        self._thread: threading.Thread | None = None
        self._decode_steps = 0
        self._prefills_started = 0

    # ---- the caller's side ---------------------------------------------------------------

    def submit(self, sequences: list[LiveSequence]) -> None:
        """Queue sequences together (a batch submitted at once is prefilled together)."""
        for sequence in sequences:
            if sequence.cache_positions > self.limits.max_cache_positions:
                raise CapacityError(
                    f"the request needs {sequence.cache_positions} cache positions (prompt + max_new_tokens), "
                    f"more than this coordinator's {self.limits.max_cache_positions} in total; "
                    "lower max_new_tokens or shorten the prompt")
        with self._lock:
            if len(self._waiting) + len(sequences) > self.limits.max_queue:
                raise CapacityError(f"{len(self._waiting)} requests are already queued (limit "
                                    f"{self.limits.max_queue}); retry later")
            self._waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)
                self._thread.start()
        self._events.put(None)

    def stats(self) -> SchedulerStats:
        with self._lock:
            _, reserved = self._reserved()
            return SchedulerStats(
                queued=len(self._waiting), running=sum(s.finish is None for s in self._decoding()),
                prefilling=len(self._prefilling()), reserved_positions=reserved,
                sessions=sum(not g.empty for g in self._groups) + len(self._prefills),
                decode_steps=self._decode_steps, prefills=self._prefills_started,
                hop_bytes=self.pipeline.hop_bytes)

    def _decoding(self) -> list[LiveSequence]:
        """Rows of the running groups (finished ones included until the next edit drops them)."""
        return [s for g in self._groups for s in g.rows]

    def _prefilling(self) -> list[LiveSequence]:
        """Admitted sequences being prefilled, or prefilled and waiting to join their group."""
        return [s for p in self._prefills for s in p.sequences] + \
            [s for g in self._groups for p in g.joining for s in p.sequences]

    # ---- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                with self._lock, self._busy():
                    self._drop_cancelled()
                    self._admit()
                    for group in self._groups:
                        self._advance(group)
                    if self._idle():
                        self._thread = None
                        return
                try:
                    event = self._events.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                with self._lock, self._busy():
                    while True:
                        if event is not None:
                            self._handle(*event)
                        try:
                            event = self._events.get_nowait()
                        except queue.Empty:
                            break
            except Exception:  # a bug here must not strand every caller: fail what is running
                log.exception("batch scheduler failed")
                with self._lock:
                    self._fail_everything(RuntimeError("the batch scheduler failed; see the coordinator log"))
                    self._thread = None
                return

    @contextlib.contextmanager
    def _busy(self):
        """Mark the lock's holder as scheduling (under the lock), so that an answer whose callback
        runs inside that work, on the same thread, is queued rather than handled re-entrantly."""
        before, self._scheduling = self._scheduling, True
        try:
            yield
        finally:
            self._scheduling = before

    def _idle(self) -> bool:
        return not self._waiting and not self._prefills and all(
            g.empty and not g.joining and g.in_flight is None for g in self._groups)

    def _reserved(self) -> tuple[int, int]:
        """(sequences admitted and not finished, the cache positions they reserve)."""
        live = [s for s in self._decoding() if s.finish is None] + self._prefilling()
        return len(live), sum(s.cache_positions for s in live)

    def _admit(self) -> None:
        if self._prefills:
            # One admission round at a time: requests that arrive while a prefill is on its way wait
            # for it and are then prefilled together. Clients of a burst arrive one by one, and
            # admitting each at once made dozens of 1-row prefills, each costing a stage about as
            # much as a decode step of 32 rows (64 pinned clients: 40 % of the stages' time).
            return
        rows, positions = self._reserved()
        admitted: list[LiveSequence] = []
        while self._waiting and rows < self.limits.max_batch_rows and \
                positions + self._waiting[0].cache_positions <= self.limits.max_cache_positions:
            sequence = self._waiting.popleft()
            admitted.append(sequence)
            rows += 1
            positions += sequence.cache_positions
        if not admitted:
            return
        # Spread newcomers so every group ends up with about as many rows: groups in
        # flight at once only keep every stage busy if each takes about as long.
        shares: dict[int, list[LiveSequence]] = {}
        loads = [g.load + g.incoming for g in self._groups]
        for sequence in admitted:
            target = min(range(len(self._groups)), key=lambda i: loads[i])
            loads[target] += 1
            shares.setdefault(target, []).append(sequence)
        # Each prefill is a session on every stage: a round opens at most MAX_PREFILLS_PER_ROUND
        # (long prompts each take their own), the rest go back to the head of the queue.
        plans = sorted(((index, target, batch) for target, sequences in shares.items()
                        for index, batch in enumerate(prefill_batches(sequences, self.limits.prefill_chunk_tokens,
                                                                      alone=self.prefill_alone))),
                       key=lambda plan: (plan[0], plan[1]))
        later = {id(s) for _, _, batch in plans[MAX_PREFILLS_PER_ROUND:] for s in batch}
        self._waiting.extendleft(reversed([s for s in admitted if id(s) in later]))
        for _, target, batch in plans[:MAX_PREFILLS_PER_ROUND]:
            self._start_prefill(batch, self._groups[target])

    def _start_prefill(self, sequences: list[LiveSequence], target: Group) -> None:
        prefill = Prefill(sequences, self.pad_token_id, self.limits.prefill_chunk_tokens)
        prefill.target = target
        futures = []
        try:
            for i, (start, end) in enumerate(prefill.chunks):
                last = i == len(prefill.chunks) - 1
                futures.append(self.pipeline.submit(
                    prefill.session_id, prefill.input_ids[:, start:end], prefill.positions[:, start:end],
                    prefill.sent_mask(end), start_session=i == 0, end_session=last and prefill.ends_with_last_chunk,
                    logits_top_k=_top_k_needed(sequences) if last else 1))
        except Exception as err:
            self._resolve_all(sequences, err)
            return
        prefill.futures = futures
        self._prefills_started += 1
        target.incoming += len(sequences)
        self._prefills.append(prefill)
        futures[-1].add_done_callback(lambda f: self._events.put(("prefill", prefill, f)))
        for group in self._groups:  # the stages are shared from now on: no group chains past its next step
            self._take_control(group)

    def _advance(self, group: Group) -> None:
        """Send the group's next decode step, after the edit its rows need."""
        if group.in_flight is not None:
            return
        if not group.empty and all(s.finish is not None for s in group.rows):
            self._end_session(group.session_id)
            group.reset()
        while group.empty and group.joining:
            prefill = group.joining.pop(0)
            if any(s.finish is None for s in prefill.sequences):
                group.adopt(prefill)
            else:
                self._end_session(prefill.session_id)
        if group.empty:
            return
        edit = group.next_edit()
        tokens, positions, mask = group.step_inputs(self.pad_token_id)
        credit = group.chain_credit() if self.chain and self._has_the_stages_to_itself(group) else 0
        stop_ids = frozenset().union(*(s.eos_token_ids for s in group.rows)) if credit else frozenset()
        try:
            future = self.pipeline.submit(group.session_id, tokens, positions, mask, cache_edit=edit,
                                          logits_top_k=_top_k_needed(group.rows), chain_steps=credit,
                                          chain_stop_ids=stop_ids)
        except Exception as err:
            self._fail_group(group, err)
            return
        group.chaining, group.stop_asked = credit > 0, False
        self._expect(group, future)

    def _has_the_stages_to_itself(self, group: Group) -> bool:
        """Whether no other work shares the stages with `group` (no other group, prefill or queue).

        Only then does chaining pay: the stages idle while the coordinator turns a lone group's
        answer into its next step. With other work in flight that turn overlaps their compute
        anyway, and chained groups measured slower (2 pinned stages, 64 sequences in 2 groups:
        107 tok/s chained against 115 unchained, medians of 4 alternated runs)."""
        return not self._prefills and not self._waiting and all(
            other is group or (other.empty and other.in_flight is None and not other.joining)
            for other in self._groups)

    def _expect(self, group: Group, future) -> None:
        group.in_flight = future
        future.add_done_callback(lambda f: self._step_answered(group, f))

    def _step_answered(self, group: Group, future: Future) -> None:
        """A decode step's answer (or failure), on the thread that read it. Handled right here when
        nothing else is being scheduled (the lock is free), so the next step leaves without waking
        the loop's thread: that hand-off cost a lone decoding request 250 µs a token between the
        answer's arrival and the scheduler's start (4 local float32 stages, stamped per token). The
        loop is woken only if other work may now move. Otherwise (the loop or another answer holds
        the lock, or this runs inside their work) the answer is queued for the loop."""
        if self._lock.acquire(blocking=False):
            try:
                if not self._scheduling:
                    with self._busy():
                        self._step_done(group, future)
                        lone = self._has_the_stages_to_itself(group) and not group.joining
                    if not lone:
                        self._events.put(None)
                    return
            except Exception:  # as in the loop: a bug here must not strand every caller
                log.exception("batch scheduler failed handling an answer")
                self._fail_everything(RuntimeError("the batch scheduler failed; see the coordinator log"))
                return
            finally:
                self._lock.release()
        self._events.put(("step", group, future))

    def _take_control(self, group: Group) -> None:
        """Stop the group's chain (once), so that its next step is ours to shape: a row has
        finished and should leave, or prefilled rows wait to join."""
        if group.chaining and not group.stop_asked and group.in_flight is not None:
            group.stop_asked = True
            self.pipeline.stop_chain(group.session_id)

    # ---- answers from the stages ---------------------------------------------------------

    def _handle(self, kind: str, owner, future: Future) -> None:
        if kind == "prefill":
            self._prefill_done(owner, future)
        else:
            self._step_done(owner, future)

    def _logits(self, future: Future):
        response = future.result()
        return logits_of(response)

    def _prefill_done(self, prefill: Prefill, future: Future) -> None:
        self._prefills.remove(prefill)
        prefill.target.incoming -= len(prefill.sequences)
        try:
            for earlier in prefill.futures[:-1]:  # an early chunk's error says more than "unknown session"
                self._logits(earlier)
            logits = self._logits(future)
        except Exception as err:
            self._resolve_all(prefill.sequences, err)
            self._end_session(prefill.session_id)
            return
        finished = [s for row, s in enumerate(prefill.sequences) if self._take(s, logits, row) and self._notify(s)]
        if all(s.finish is not None for s in prefill.sequences):
            if not prefill.ends_with_last_chunk:  # else the stages freed it as the last chunk passed
                self._end_session(prefill.session_id, wait=True)
            _settle_all(finished)
            return
        _settle_all(finished)
        prefill.target.joining.append(prefill)
        self._take_control(prefill.target)

    def _step_done(self, group: Group, future: Future) -> None:
        group.in_flight = None
        try:
            logits = self._logits(future)
        except Exception as err:
            self._fail_group(group, err)
            return
        self._decode_steps += 1
        took = [s for row, s in enumerate(group.rows) if self._take(s, logits, row)]
        chained = getattr(future, "next_in_chain", None)
        if chained is not None:  # the last stage sent the next step itself: mirror it and wait for it
            group.step_inputs(self.pad_token_id)
            self._expect(group, chained)
        else:
            group.chaining = False
            if any(s.finish is None for s in group.rows):
                # Send the next step before telling the callers about this one, so that streaming the
                # token out and checking stop strings overlap the stages' work instead of delaying it.
                # A row a stop string ends now rides along in that step once; the next edit drops it.
                self._advance(group)
        finished = [s for s in took if self._notify(s)]
        if chained is not None and (group.joining or any(s.finish is not None for s in group.rows)):
            self._take_control(group)
        if all(s.finish is not None for s in group.rows) and not group.joining and group.in_flight is None:
            # Free the caches before answering, so a caller that gets its last result
            # and looks at the stages finds nothing left behind.
            self._end_session(group.session_id, wait=True)
            group.reset()
        _settle_all(finished)

    @staticmethod
    def _take(sequence: LiveSequence, logits, row: int) -> bool:
        """Sample the sequence's next token; True if it took one (a failing sampler ends only its own sequence)."""
        if sequence.finish is not None:
            return False
        try:
            sequence.take(logits, row)
        except Exception as err:
            _cancel(sequence, err)
            return False
        return True

    @staticmethod
    def _notify(sequence: LiveSequence) -> bool:
        """Hand the sequence's new token to its caller; True if it has just finished (settle it after)."""
        try:
            sequence.notify()
        except Exception as err:  # a failing on_token callback ends only its own sequence
            _cancel(sequence, err)
            return False
        return sequence.finish is not None

    # ---- failures and cancellation -------------------------------------------------------

    def _drop_cancelled(self) -> None:
        unwanted = [s for s in self._waiting if not _still_wanted(s)]
        for sequence in unwanted:
            self._waiting.remove(sequence)
        unwanted += [s for s in self._decoding() + self._prefilling() if s.finish is None and not _still_wanted(s)]
        self._resolve_all(unwanted, GenerationCancelled("generation cancelled by the caller"))
        for group in self._groups:
            if any(s.finish is not None for s in group.rows):
                self._take_control(group)

    def _fail_group(self, group: Group, err: Exception) -> None:
        self._resolve_all(group.rows, err)
        if group.session_id is not None:
            self._end_session(group.session_id)
        group.reset()

    def _resolve_all(self, sequences: list[LiveSequence], err: Exception) -> None:
        for sequence in sequences:
            if sequence.finish is None:
                _cancel(sequence, err)

    def _fail_everything(self, err: Exception) -> None:
        self._resolve_all(list(self._waiting) + self._decoding() + self._prefilling(), err)
        self._waiting.clear()
        for group in self._groups:
            if group.session_id is not None:
                self._end_session(group.session_id)
            for prefill in group.joining:
                self._end_session(prefill.session_id)
            group.joining = []
            group.reset()
            group.in_flight = None
            group.incoming = 0
        for prefill in self._prefills:
            self._end_session(prefill.session_id)
        self._prefills = []

    def _end_session(self, session_id: str, *, wait: bool = False) -> None:
        """Free a session on every stage: now (wait=True), or without blocking the loop."""
        def end() -> None:
            try:
                self.pipeline.end_session(session_id, timeout_s=5.0)
            except Exception as err:  # the stages expire idle sessions anyway
                log.debug("could not end session %s: %s", session_id, err)
        if wait:
            end()
        else:
            threading.Thread(target=end, name="end-session", daemon=True).start()


def _top_k_needed(sequences: list[LiveSequence]) -> int:
    """1 when every live row decodes greedily (the stage sends only argmaxes), else 0 (all logits)."""
    return 1 if all(s.greedy for s in sequences if s.finish is None) else 0


def _still_wanted(sequence: LiveSequence) -> bool:
    try:
        return bool(sequence.keep_going())
    except Exception:
        return False


def _settle_all(sequences: list[LiveSequence]) -> None:
    for sequence in sequences:
        _settle(sequence)


def _cancel(sequence: LiveSequence, error: Exception) -> None:
    """End the sequence here (whatever it finished by before) and resolve it with `error`."""
    sequence.finish = FINISH_CANCELLED
    _settle(sequence, error)


def _settle(sequence: LiveSequence, error: Exception | None = None) -> None:
    """Resolve a sequence's future once: with its tokens, or with the error that ended it."""
    if sequence.result.done():
        return
    if error is not None:
        sequence.result.set_exception(error)
    else:
        sequence.result.set_result(SequenceResult(list(sequence.output), sequence.finish))
