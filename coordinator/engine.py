"""Token-level generation through the pipeline, for any number of concurrent callers.

Owns: `Engine`, the continuous-batching loop. Every call — one request from a gRPC handler, or a
whole batch from a benchmark — joins the same running batch, so concurrent callers share decode
steps. The engine applies the scheduler's decisions: it sends each admitted prefill as its own
session (in chunks when long), merges prefilled rows into their group at its next decode step,
drops finished or cancelled rows at the step after, and keeps `micro_batches` groups in flight
so that while one group is in stage k another is in stage k+1. A chained step's answer arrives
with the next step already sent by the last stage (stage_server/greedy_chain.py): the engine
mirrors it, and sends StopChain when the group's next step must be its own again. Each group's
session lives on one route (group_routes); when a route loses a server, its sequences restart
elsewhere by exact replay (failover), and their callers see a stall.

The loop runs on one thread that starts when work arrives and ends when none is left; answers
and servers going down arrive as events on a queue. A decode step's answer is handled on the
thread that read it instead, when no scheduling is under way (see `_step_answered`). Either way
all sampling and bookkeeping happen under one lock, one answer at a time.

Does not own: the decisions (scheduler), a request's tokens and outcome (sequence), a group's
cache mirror (running_batch), routes (routes, group_routes), moving sequences off a lost route
(failover), the wire (pipeline_client), text or gRPC servers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from coordinator import metrics, scheduler
from coordinator.failover import MAX_REPLAYS, Failover
from coordinator.group_routes import GroupRoutes
from coordinator.pipeline_client import logits_of
from coordinator.routes import SingleRoute, end_session
from coordinator.running_batch import Group, Prefill
from coordinator.scheduler import BatchingStats, BatchLimits, BatchState
from coordinator.sequence import FINISH_LENGTH, LiveSequence, SequenceRequest, SequenceResult, cancel_all, resolve_all

__all__ = ["BatchLimits", "BatchingStats", "CapacityError", "Engine", "GenerationCancelled", "SequenceRequest",
           "SequenceResult"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often an idle loop looks at cancellations


class GenerationCancelled(Exception):
    """The caller asked to stop (client went away or deadline passed)."""


class CapacityError(Exception):
    """A request cannot be queued: the queue is full or the request alone exceeds a bound."""


_always: Callable[[], bool] = lambda: True  # noqa: E731  (the default keep_going)

class Engine:
    """Generates for any number of callers through `routes` (routes.Routes, or one PipelineClient:
    every session on it, no failover). `micro_batches`: groups in flight at once (one per machine
    keeps every machine busy: planner.groups_in_flight). `chain`: greedy groups let the last stage
    send their next steps, where the route can. `prefill_alone`: one prompt per prefill
    (running_batch.prefill_batches); None asks the stages (per-sequence attention promises answers
    independent of the batch). `max_replays`: routes a sequence may restart on (failover)."""

    def __init__(self, routes, *, pad_token_id: int = 0, micro_batches: int = 1,
                 limits: BatchLimits | None = None, chain: bool = True, prefill_alone: bool | None = None,
                 max_replays: int = MAX_REPLAYS) -> None:
        self.routes = routes if hasattr(routes, "new_route") else SingleRoute(routes)
        if prefill_alone is None:
            prefill_alone = scheduler.per_sequence_stages(self.routes.stage_infos())
        self.prefill_alone = prefill_alone
        self.chain = chain
        self.pad_token_id = pad_token_id
        self.limits = limits or BatchLimits()
        self._state = BatchState([Group() for _ in range(max(1, micro_batches))])
        self.group_routes = GroupRoutes(self._state, self.routes, max(1, micro_batches))
        self.failover = Failover(self._state, self.routes, max_replays=max_replays)
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.RLock()  # re-entrant: an on_token callback may submit more work
        self._scheduling = False  # a thread holding the lock is in the loop's work or a handler
        self._thread: threading.Thread | None = None
        self._decode_steps = 0
        self._prefills_started = 0
        self.routes.subscribe(lambda address, state: self._events.put(("server", address, state)))

    # ---- the caller's side ---------------------------------------------------------------

    @property
    def hop_bytes(self) -> int:
        """Activation bytes the stages sent each other, over every run."""
        return self.routes.hop_bytes

    def submit_all(self, requests: list[SequenceRequest],
                   keep_going: Callable[[], bool] = _always) -> list[Future]:
        """Queue requests together (prefilled together); each future resolves to a SequenceResult (or raises)."""
        futures: list[Future] = []
        sequences: list[LiveSequence] = []
        for request in requests:
            future: Future = Future()
            futures.append(future)
            if request.max_new_tokens <= 0:
                future.set_result(SequenceResult([], FINISH_LENGTH))
                continue
            if not request.prompt_ids:
                raise ValueError("a prompt needs at least one token")
            sequences.append(LiveSequence.from_request(request, keep_going, future))
        if sequences:
            self._enqueue(sequences)
        return futures

    def generate(self, requests: list[SequenceRequest],
                 keep_going: Callable[[], bool] = _always) -> list[SequenceResult]:
        """Continue every request; returns results in request order."""
        return [future.result() for future in self.submit_all(requests, keep_going)]

    def stats(self) -> BatchingStats:
        with self._lock:
            return scheduler.batching_stats(self._state, decode_steps=self._decode_steps,
                                            prefills=self._prefills_started, hop_bytes=self.routes.hop_bytes)

    def route_loads(self) -> dict[str, int]:
        """Rows each stage server runs for this engine now."""
        with self._lock:
            return scheduler.route_loads(self._state)

    def _enqueue(self, sequences: list[LiveSequence]) -> None:
        """Queue sequences together and make sure the loop runs."""
        with self._lock:
            refusal = scheduler.refusal(self._state, self.limits, sequences)
            if refusal is not None:
                raise CapacityError(refusal)
            self._state.waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)
                self._thread.start()
        self._events.put(None)

    # ---- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                with self._lock, self._busy():
                    self._drop_cancelled()
                    self._admit()
                    for group in self._state.groups:
                        self._advance(group)
                    if scheduler.idle(self._state):
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

    def _admit(self) -> None:
        if not self._state.waiting:
            return
        self.group_routes.keep_one_open()
        admission = scheduler.admit(self._state, self.limits, prefill_alone=self.prefill_alone,
                                    accepts=self.group_routes.accepts)
        if admission is None:
            return
        waiting = self._state.waiting
        for _ in admission.admitted:
            waiting.popleft()
        waiting.extendleft(reversed(admission.requeued))
        for batch, target in admission.prefills:
            self._start_prefill(batch, self._state.groups[target])

    def _start_prefill(self, sequences: list[LiveSequence], target: Group) -> None:
        refusal = self.group_routes.assign(target)
        if refusal is not None:
            cancel_all(sequences, refusal)
            return
        prefill = Prefill(sequences, self.pad_token_id, self.limits.prefill_chunk_tokens, target)
        futures = []
        try:
            for i, (start, end) in enumerate(prefill.chunks):
                last = i == len(prefill.chunks) - 1
                futures.append(prefill.route.submit(
                    prefill.session_id, prefill.input_ids[:, start:end], prefill.positions[:, start:end],
                    prefill.sent_mask(end), start_session=i == 0, end_session=last and prefill.ends_with_last_chunk,
                    logits_top_k=scheduler.top_k_needed(sequences) if last else 1, request_ids=prefill.request_ids))
        except Exception as err:  # the route's first stage is gone, say
            self.failover.call_failed(sequences, err, prefill.route, prefill.session_id if futures else "")
            return
        prefill.futures = futures
        self._prefills_started += 1
        target.incoming += len(sequences)
        self._state.prefills.append(prefill)
        futures[-1].add_done_callback(lambda f: self._events.put(("prefill", prefill, f)))
        for group in self._state.groups:  # the stages are shared from now on: no group chains past its next step
            self._stop_chain(group)

    def _advance(self, group: Group) -> None:
        """Send the group's next decode step, after the edit its rows need."""
        if group.in_flight is not None:
            return
        if not group.empty and scheduler.all_finished(group):
            end_session(group.route, group.session_id)
            group.reset()
        while group.empty and group.joining:
            prefill = group.joining.pop(0)
            if any(s.finish is None for s in prefill.sequences):
                group.adopt(prefill)
            else:
                end_session(group.route, prefill.session_id)
        if group.empty:
            return
        edit = group.next_edit()
        tokens, positions, mask = group.step_inputs(self.pad_token_id)
        credit = scheduler.chain_steps(self._state, group, chain=self.chain and group.route.can_chain)
        try:
            future = group.route.submit(group.session_id, tokens, positions, mask, cache_edit=edit,
                                          logits_top_k=scheduler.top_k_needed(group.rows), chain_steps=credit,
                                          chain_stop_ids=scheduler.chain_stop_ids(group, credit))
        except Exception as err:
            self._group_failed(group, err)
            return
        group.chaining, group.stop_asked = credit > 0, False
        self._expect(group, future)

    def _expect(self, group: Group, future) -> None:
        group.in_flight = future
        future.add_done_callback(lambda f: self._step_answered(group, f))

    def _step_answered(self, group: Group, future: Future) -> None:
        """A decode step's answer (or failure), on the thread that read it. Handled right here when
        nothing else is being scheduled (the lock is free), so the next step leaves without waking
        the loop's thread: that hand-off costs a lone decoding request about 250 µs a token. The
        loop is woken only if other work may now move. Otherwise (the loop or another answer holds
        the lock, or this runs inside their work) the answer is queued for the loop."""
        if self._lock.acquire(blocking=False):
            try:
                if not self._scheduling:
                    with self._busy():
                        self._step_done(group, future)
                        lone = scheduler.runs_alone(self._state, group)
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

    def _stop_chain(self, group: Group) -> None:
        """Stop the group's chain (once), so that its next step is the engine's to shape."""
        if scheduler.chain_to_stop(group):
            group.stop_asked = True
            group.route.stop_chain(group.session_id)

    # ---- answers from the stages ---------------------------------------------------------

    def _handle(self, kind: str, owner, future) -> None:
        if kind == "prefill":
            self._prefill_done(owner, future)
        elif kind == "server":
            if future == "down":
                self.failover.server_lost(owner)
        else:
            self._step_done(owner, future)

    def _prefill_done(self, prefill: Prefill, future: Future) -> None:
        if prefill not in self._state.prefills:
            return  # abandoned (its callers went away) or moved off a lost route
        self._state.prefills.remove(prefill)
        prefill.target.incoming -= len(prefill.sequences)
        try:
            for earlier in prefill.futures[:-1]:  # an early chunk's error says more than "unknown session"
                logits_of(earlier.result())
            logits = logits_of(future.result())
        except Exception as err:
            self.failover.call_failed(prefill.sequences, err, prefill.route, prefill.session_id)
            return
        finished = [s for row, s in enumerate(prefill.sequences) if s.sample(logits, row) and s.notify()]
        if all(s.finish is not None for s in prefill.sequences):
            if not prefill.ends_with_last_chunk:  # else the stages freed it as the last chunk passed
                end_session(prefill.route, prefill.session_id, wait=True)
            resolve_all(finished)
            return
        resolve_all(finished)
        prefill.target.joining.append(prefill)
        self._stop_chain(prefill.target)

    def _step_done(self, group: Group, future: Future) -> None:
        if future is not group.in_flight:
            return  # a step of a route the group has left (failover)
        group.in_flight = None
        try:
            logits = logits_of(future.result())
        except Exception as err:
            self._group_failed(group, err)
            return
        self._decode_steps += 1
        metrics.decode_step(len(group.rows))
        sampled = [s for row, s in enumerate(group.rows) if s.sample(logits, row)]
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
        finished = [s for s in sampled if s.notify()]
        if chained is not None and scheduler.wants_control(group):
            self._stop_chain(group)
        if scheduler.drained(group):
            # Free the caches before answering, so a caller that gets its last result
            # and looks at the stages finds nothing left behind.
            end_session(group.route, group.session_id, wait=True)
            group.reset()
        resolve_all(finished)

    # ---- failures and cancellation -------------------------------------------------------

    def _drop_cancelled(self) -> None:
        waiting = self._state.waiting
        unwanted = [s for s in waiting if not s.still_wanted()]
        for sequence in unwanted:
            waiting.remove(sequence)
        unwanted += [s for s in scheduler.decoding(self._state) + scheduler.prefilling(self._state)
                     if s.finish is None and not s.still_wanted()]
        cancel_all(unwanted, GenerationCancelled("generation cancelled by the caller"))
        for prefill in scheduler.abandoned(self._state):  # free it now: the stages drop its queued chunks
            self._state.prefills.remove(prefill)
            prefill.target.incoming -= len(prefill.sequences)
            end_session(prefill.route, prefill.session_id)
        for group in self._state.groups:
            if scheduler.has_finished_rows(group):
                self._stop_chain(group)

    def _group_failed(self, group: Group, err: Exception) -> None:
        """A step of `group` failed: replay its sequences on another route if the route lost a
        server, else fail them."""
        if group.route is not None and self.routes.failover(group.route, err, chained=group.chaining):
            self.failover.group_lost(group, err)
            self._events.put(None)  # the loop admits them again
            return
        cancel_all(group.rows, err)
        if group.session_id is not None:
            end_session(group.route, group.session_id)
        group.reset()

    def _fail_everything(self, err: Exception) -> None:
        state = self._state
        cancel_all(list(state.waiting) + scheduler.decoding(state) + scheduler.prefilling(state), err)
        state.waiting.clear()
        for group in state.groups:
            if group.session_id is not None:
                end_session(group.route, group.session_id)
            for prefill in group.joining:
                end_session(group.route, prefill.session_id)
            group.abandon()
        for prefill in state.prefills:
            end_session(prefill.route, prefill.session_id)
        state.prefills.clear()

