"""Moving sequences off a route that lost a server, so that their callers see a stall, not an error.

Owns: `Failover`: what the engine does when a call on a route failed as a lost server's would, or
the stage pool reports a server down: the group on that route gives up its session, its joining
and incoming prefills too, every stage of the old route is told to free them (each directly: the
route through the lost server is broken), and each unfinished sequence restarts (sequence.restart:
it replays its prompt and re-feeds the tokens it had produced on a new route) at the head of the
queue. A sequence that has already restarted `max_replays` times fails UNAVAILABLE instead.

Does not own: judging an error or marking servers down (routes), choosing the new route (routes,
stage_pool), re-feeding tokens (sequence), or the loop and its lock (engine: every method here runs
under the engine's lock).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

import grpc

from coordinator.stage_errors import StageCallError
from coordinator.stage_pool import DEFAULT_STALL_TIMEOUT_S

if TYPE_CHECKING:  # imported for their names only: the command line takes this module's flags without torch
    from coordinator.running_batch import Group
    from coordinator.scheduler import BatchState
    from coordinator.sequence import LiveSequence

log = logging.getLogger(__name__)

MAX_REPLAYS = 3  # routes a sequence may restart on before it fails


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_failover_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stall-timeout", type=_positive_seconds, default=DEFAULT_STALL_TIMEOUT_S,
                        help="seconds a stage server may leave its health probe (an Info call each second) "
                             "unanswered before it counts as down: its routes' requests move to replicas "
                             f"(default {DEFAULT_STALL_TIMEOUT_S:g})")
    parser.add_argument("--max-replays", type=int, default=MAX_REPLAYS,
                        help="times a request may restart on another route after losing a stage server before "
                             f"it fails UNAVAILABLE (default {MAX_REPLAYS})")


class Failover:
    """Requeues the sequences of lost routes; `routes` frees their sessions on the old stages."""

    def __init__(self, state: BatchState, routes, *, max_replays: int = MAX_REPLAYS) -> None:
        self.state = state
        self.routes = routes
        self.max_replays = max_replays
        self.replayed = 0  # sequences restarted on a new route, over every run
        self.failovers = 0  # times a lost route's sequences restarted on another, over every run

    def group_lost(self, group: Group, error: Exception) -> None:
        """`group`'s route is lost: its rows, its joining prefills and the prefills on their way to it
        restart elsewhere; the group is left idle (its next prefill picks a new route)."""
        route = group.route
        lost: list[LiveSequence] = [s for s in group.rows if s.finish is None]
        sessions = [group.session_id] if group.session_id is not None else []
        for prefill in group.joining:
            lost += [s for s in prefill.sequences if s.finish is None]
            sessions.append(prefill.session_id)
        for prefill in [p for p in self.state.prefills if p.target is group]:
            self.state.prefills.remove(prefill)
            lost += [s for s in prefill.sequences if s.finish is None]
            sessions.append(prefill.session_id)
        group.abandon()
        group.route = None
        if route is not None:
            for session_id in sessions:
                self.routes.free_session(route, session_id)
        self.requeue(lost, error, route)

    def requeue(self, sequences: list[LiveSequence], error: Exception, route=None) -> None:
        """Put `sequences` back at the head of the queue to restart on a new route, or fail those that
        have used up their replays."""
        again = []
        for sequence in sequences:
            if sequence.finish is not None:
                continue
            if sequence.replays >= self.max_replays:
                sequence.cancel(StageCallError(grpc.StatusCode.UNAVAILABLE,
                                               f"the stages failed {sequence.replays + 1} times during this request "
                                               f"(last: {error}); giving up", getattr(error, "failed_stage", "")))
                continue
            sequence.restart()
            again.append(sequence)
        if again:
            where = " -> ".join(route.addresses) if route is not None else "its route"
            log.warning("route %s lost (%s): replaying %d sequence(s) on another route", where, error, len(again))
            self.replayed += len(again)
            self.failovers += 1
            self.state.waiting.extendleft(reversed(again))

    def call_failed(self, sequences: list[LiveSequence], error: Exception, route, session_id: str = "") -> None:
        """A call for `sequences` on `route` failed: they restart elsewhere if it lost the route (a
        server went away), else they fail; either way `session_id` is freed on the route's stages."""
        from coordinator.routes import end_session  # (it loads torch; the flags above must not)

        if self.routes.failover(route, error):
            if session_id:
                self.routes.free_session(route, session_id)
            self.requeue(sequences, error, route)
            return
        for sequence in sequences:
            if sequence.finish is None:
                sequence.cancel(error)
        if session_id:
            end_session(route, session_id)

    def server_lost(self, address: str) -> None:
        """The pool reports `address` down: every group whose route holds it is lost now, even while its
        step is still in flight (a frozen stage answers nothing, ever)."""
        for group in self.state.groups:
            if group.route is not None and address in group.route.addresses:
                if group.idle:
                    group.route = None
                else:
                    self.group_lost(group, StageCallError(grpc.StatusCode.UNAVAILABLE,
                                                          f"stage {address} is down", address))
