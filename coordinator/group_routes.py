"""Which route each batching group's session lives on.

Owns: `GroupRoutes`: giving an idle group a route for its next session (the least loaded of the
routes that serve now, by the rows each server runs for this engine: scheduler.route_loads), or
the UNAVAILABLE error that names the layers no server can take; whether a group takes newcomers
(`accepts`: not while a server of its route drains or is down; its rows finish there or move by
failover); and keeping at least one group that does (`keep_one_open`: a group beyond
`micro_batches` while others finish, dropped once idle).

Why per group and not per request: a group is one session on the stages, and sequences join it
by merging caches, which only stages holding both can do.

Does not own: choosing among servers (stage_pool via routes), admission (scheduler), failover.
Runs under the engine's lock.
"""

from __future__ import annotations

import grpc

from coordinator import scheduler
from coordinator.route_choice import NoRoute
from coordinator.running_batch import Group
from coordinator.scheduler import BatchState
from coordinator.stage_errors import StageCallError


class GroupRoutes:
    """Routes for the groups of one engine's batching state."""

    def __init__(self, state: BatchState, routes, groups_wanted: int) -> None:
        self.state = state
        self.routes = routes
        self.groups_wanted = groups_wanted

    def accepts(self, group: Group) -> bool:
        """Whether newcomers may join `group`: it is idle (it takes a new route) or its route still serves."""
        return group.idle or group.route is None or self.routes.accepts(group.route)

    def keep_one_open(self) -> None:
        """Keep `groups_wanted` groups, more while groups on draining or lost routes finish: at least one
        must take newcomers."""
        groups = self.state.groups
        while len(groups) > self.groups_wanted and any(g.idle for g in groups):
            groups.remove(next(g for g in groups if g.idle))
        if not any(self.accepts(g) for g in groups):
            groups.append(Group())

    def assign(self, group: Group) -> StageCallError | None:
        """Give an idle `group` the least loaded route that serves now (a busy group keeps its own);
        the error to fail its newcomers with when no route can be made."""
        if not group.idle and group.route is not None:
            return None
        loads = scheduler.route_loads(self.state)
        try:
            group.route = self.routes.new_route(lambda address: loads.get(address, 0))
        except NoRoute as err:
            return StageCallError(grpc.StatusCode.UNAVAILABLE, str(err))
        return None
