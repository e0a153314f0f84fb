"""Whether greedy chaining can work on a route: can its last stage reach its first?

Owns: `check_chain`, one throwaway session of one token whose step asks the last stage to chain one
more step to the first stage, and its verdict: WORKS when that chained step's answer comes back,
BLOCKED when a stage refused the chained route, the last stage could not open the link or the
chained step did not come back in time, UNKNOWN when the unchained step itself failed for a passing
reason or took too long (a busy or restarting stage says
nothing about the hop). Why: the chaining hop (last stage → first stage) is the one connection of a
route the coordinator never makes itself, and a firewall that drops it makes a chained step wait
for the connection attempt to time out (about 20 s) before it fails. Routes check before they
chain, in the background, and check again later while the verdict is not WORKS.

Does not own: when to chain (scheduler, chain_policy), when to check again (routes) or the routes.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time

import grpc
import numpy as np

from coordinator.pipeline_client import PipelineClient, logits_of
from coordinator.stage_errors import SERVER_FAILURES, SESSION_LOST, StageCallError

log = logging.getLogger(__name__)

# The chained step computes what the unchained one did, once more, plus the hop: it gets this much
# more than twice the unchained step's time before the hop is judged blocked.
CHAINED_SLACK_S = 3.0
FIRST_STEP_TIMEOUT_S = 60.0  # an unchained step slower than this says the route is busy, not blocked
# An unchained step failing with these says nothing about the hop; any other refusal (a stage that may
# not send to the first stage: PERMISSION_DENIED) means the route cannot chain.
TRANSIENT = SERVER_FAILURES | {SESSION_LOST, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class Verdict(enum.Enum):
    WORKS = "works"
    BLOCKED = "blocked"
    UNKNOWN = "unknown"


def check_chain(route: PipelineClient, first_step_timeout_s: float = FIRST_STEP_TIMEOUT_S) -> Verdict:
    """Whether a step chained by `route`'s last stage reaches its first stage and comes back."""
    session_id = secrets.token_hex(16)
    token = np.zeros((1, 1), dtype=np.int64)
    try:
        started = time.monotonic()
        try:
            future = route.submit(session_id, token, token, None, start_session=True, logits_top_k=1, chain_steps=1)
            answer = future.result(timeout=first_step_timeout_s)
            logits_of(answer)
        except Exception as err:
            log.debug("chain check on %s: the unchained step failed: %s", route.addresses, err)
            refused = isinstance(err, StageCallError) and err.code not in TRANSIENT
            return Verdict.BLOCKED if refused else Verdict.UNKNOWN
        if not answer.chained:
            return Verdict.BLOCKED  # the last stage could not even open the link
        try:
            logits_of(future.next_in_chain.result(timeout=CHAINED_SLACK_S + 2 * (time.monotonic() - started)))
        except Exception as err:
            log.debug("chain check on %s: the chained step failed: %s", route.addresses, err)
            return Verdict.BLOCKED
        return Verdict.WORKS
    finally:
        try:
            route.end_session(session_id, timeout_s=CHAINED_SLACK_S)
        except Exception:  # the stages expire it anyway
            pass
