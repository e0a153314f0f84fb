"""Whether greedy chaining can work on a route: can its last stage reach its first?

Owns: `chain_works`, one throwaway session of one token whose step asks the last stage to chain one
more step to the first stage; it works if that chained step's answer comes back in time. Why: the
chaining hop (last stage → first stage) is the one connection of a route the coordinator never
makes itself, and a firewall that drops it makes a chained step wait for the connection attempt to
time out (about 20 s) before it fails. Routes check before they chain, in the background, and a
route whose check fails stays unchained (every step through the coordinator).

Does not own: when to chain (scheduler, chain_policy) or the routes (routes).
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from coordinator.pipeline_client import PipelineClient, logits_of

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0


def chain_works(route: PipelineClient, timeout_s: float = CHECK_TIMEOUT_S) -> bool:
    """True when a step chained by `route`'s last stage reaches its first stage and comes back."""
    session_id = secrets.token_hex(16)
    token = np.zeros((1, 1), dtype=np.int64)
    try:
        future = route.submit(session_id, token, token, None, start_session=True, logits_top_k=1, chain_steps=1)
        answer = future.result(timeout=timeout_s)
        logits_of(answer)
        if not answer.chained:
            return False  # the last stage could not even open the link
        logits_of(future.next_in_chain.result(timeout=timeout_s))
        return True
    except Exception as err:
        log.debug("chain check on %s: %s", route.addresses, err)
        return False
    finally:
        try:
            route.end_session(session_id, timeout_s=timeout_s)
        except Exception:  # the stages expire it anyway
            pass
