"""Greedy chaining on the last stage: it sends the next decode step to stage 0 itself.

Owns: deciding whether a step the last stage has just computed continues its chain
(chain_steps left, greedy answers, no stop token, no StopChain for the session),
building that next step from the step's own inputs (argmax tokens, positions + 1,
one more mask column), the stage-wide links that carry chained steps to the first
stage, and handing what comes back on them (errors of a chained step) to the
coordinator's collector. The first stage sends no receipts back, so a chained step is
done for its link once it is back here, computed (`arrived`).

Why: with one request decoding, a token the coordinator sends on travels last stage →
coordinator → first stage, two hops with the coordinator's Python on the critical path
(about 3.4 of the 4.8 ms a token spends outside the forwards through 2 local stages). A
chained step takes one hop instead; the coordinator still gets every answer at once,
samples nothing new (greedy), and takes control back by StopChain when a row finishes or
a request waits to join.

Does not own: validating requests or running steps (step_runner), computing
(stage_model), or when to chain (the coordinator decides chain_steps and stop ids).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from protos import codec, stage_pb2

log = logging.getLogger(__name__)

MAX_CHAIN_STEPS = 1 << 16
_STOP_MEMORY_S = 600.0  # a StopChain that found no running chain is forgotten after this
MAX_REMEMBERED_STOPS = 4096  # ... or once this many newer ones wait (a running chain takes its stop within a step)


def check_chain_fields(request: stage_pb2.ForwardRequest) -> str | None:
    """Why the request's chaining fields are unusable, or None when they are fine."""
    if not request.chain_steps:
        return None
    if request.chain_steps > MAX_CHAIN_STEPS:
        return f"chain_steps must be at most {MAX_CHAIN_STEPS}, got {request.chain_steps}"
    if request.logits_top_k != 1:
        return f"chain_steps needs logits_top_k = 1 (greedy answers), got {request.logits_top_k}"
    if not request.chain_route:
        return "chain_steps needs chain_route (the whole route, first stage first)"
    return None


def next_step(request: stage_pb2.ForwardRequest, tokens: list[int], positions: torch.Tensor,
              mask: torch.Tensor | None) -> stage_pb2.ForwardRequest:
    """The decode step after `request`: each row fed its greedy token, one position further,
    the mask one column of 1s longer. Built with numpy: this runs between two forwards, where
    every torch call costs a cold cache's price."""
    rows = len(tokens)
    step = stage_pb2.ForwardRequest(
        session_id=request.session_id, micro_batch_id=request.micro_batch_id + 1,
        route=request.chain_route[1:], activations=codec.encode_int64(np.asarray(tokens).reshape(rows, 1)),
        position_ids=codec.encode_int64(positions.numpy()[:, -1:] + 1), wire_codec=request.wire_codec,
        model_fingerprint=request.model_fingerprint, logits_top_k=1, reply_to=request.reply_to,
        chain_steps=request.chain_steps - 1, chain_route=request.chain_route,
        chain_stop_ids=request.chain_stop_ids, in_flight=1)  # a chained group has the stages to itself
    if mask is not None:
        step.attention_mask.CopyFrom(codec.encode_int64(np.pad(mask.numpy(), ((0, 0), (0, 1)), constant_values=1)))
    return step


class GreedyChain:
    """The last stage's side of chaining: stop requests, and links to first stages."""

    def __init__(self, open_link: Callable[..., object], collector: Callable[[str], object | None]) -> None:
        self._open_link = open_link  # (address, deliver, on_closed) -> a link (StageService.open_link)
        self._collector = collector  # collector id -> its collector (Collectors.get), or None
        self._lock = threading.Lock()
        self._links: dict[str, object] = {}  # first stage's address -> link (gRPC or same-machine)
        # chained step -> (its coordinator's collector, the first stage it went to)
        self._reply_to: dict[tuple[str, int], tuple[str, str]] = {}
        self._stops: dict[str, float] = {}  # session id -> when StopChain came

    def stop(self, session_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._stops = {s: t for s, t in self._stops.items() if now - t < _STOP_MEMORY_S}
            self._stops.pop(session_id, None)
            if len(self._stops) >= MAX_REMEMBERED_STOPS:  # the oldest goes first (dicts keep insertion order)
                del self._stops[next(iter(self._stops))]
            self._stops[session_id] = now

    def continues(self, request: stage_pb2.ForwardRequest, tokens: list[int]) -> bool:
        """Whether the step just computed chains on (consumes a pending StopChain when it does not)."""
        if not request.chain_steps or request.end_session:
            return False
        with self._lock:
            if self._stops.pop(request.session_id, None) is not None:
                return False
        return not (request.chain_stop_ids and not set(request.chain_stop_ids).isdisjoint(tokens))

    def send(self, step: stage_pb2.ForwardRequest) -> bool:
        """Send a chained step to its first stage; False if the link failed (the caller answers)."""
        address = step.chain_route[0]
        key = (step.session_id, step.micro_batch_id)
        with self._lock:
            self._reply_to[key] = (step.reply_to, address)
            link = self._links.get(address)
            if link is None or not link.alive:
                link = self._open_link(address, self._answer, lambda: None)
                self._links[address] = link
        if link.send(step, 0):  # the token ids' hop is the coordinator's, which is not counted either
            return True
        with self._lock:
            self._reply_to.pop(key, None)
        return False

    def arrived(self, session_id: str, micro_batch_id: int) -> None:
        """A step is back at this (last) stage and computed: if this stage chained it, the link that
        carried it stops waiting for it (the first stage sends no receipt back; errors still come)."""
        with self._lock:
            sent = self._reply_to.pop((session_id, micro_batch_id), None)
            link = self._links.get(sent[1]) if sent is not None else None
        if link is not None:
            link.forget(session_id, micro_batch_id)

    def _answer(self, response: stage_pb2.ForwardResponse) -> None:
        """What the chain relays back for a chained step: an error, for the coordinator that owns
        the chain."""
        with self._lock:
            sent = self._reply_to.pop((response.session_id, response.micro_batch_id), None)
        collector = self._collector(sent[0]) if sent is not None else None
        if collector is None:
            log.debug("the collector of chained step %s of session %s is gone", response.micro_batch_id,
                      response.session_id)
            return
        collector.put(response)

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
