"""Running one micro-batch on this stage, from the request to wherever its output goes.

Owns: checking a request against this stage (loading, draining, session id, addresses outside the
deployment, model fingerprint, route, wire codec, chaining fields), decoding its tensors, its
session (started, looked up, ended on request, never left half made, used only by a caller that
may), its cache edit, the thread count and split-head mode of the step, the forward itself, and
then where the output goes: sent on to the next hop with the size of the hop, relayed back as an
answer, or answered straight to the coordinator's collector, after sending the next greedy step
when the chain goes on. Errors become in-band answers here, and each step's stamps go to the step
trace.

Does not own: reading streams or the order steps run in (forward_stream), the math (stage_model),
the session table (sessions), the encoding of answers (answers), the links to next hops
(next_hop), nor the chain's stop requests and links (greedy_chain).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from protos import codec, stage_pb2
from protos.protocol import DRAINING_REFUSAL
from stage_server.answers import error_response, greedy_ids, logits_response
from stage_server.cache_edits import PlannedEdit
from stage_server.collectors import Collector, Collectors
from stage_server.deployment import Caller, Deployment
from stage_server.errors import InvalidRequest, SessionNotFound, StageRequestError, StageUnavailable, WrongRoute
from stage_server.greedy_chain import GreedyChain, check_chain_fields, next_step
from stage_server.metrics import StageMetrics, Unmetered
from stage_server.next_hop import unreachable
from stage_server.sessions import Session, SessionStore, check_session_id
from stage_server.split_head import SplitHead
from stage_server.stage_model import StageModel
from stage_server.step_bounds import StepBounds
from stage_server.step_trace import StepRecord, StepTrace, now_ns
from stage_server.thread_counts import ThreadCounts

log = logging.getLogger(__name__)

_CODEC_VALUES = frozenset(stage_pb2.Codec.values())


@dataclass(frozen=True)
class ServedSlice:
    """What a stage computes with once its weights are in."""

    model: StageModel
    sessions: SessionStore
    bounds: StepBounds  # what one step may carry (step_bounds.py)
    threads: ThreadCounts | None = None  # None: torch's thread count is left alone (not on CPU)
    split_head: SplitHead | None = None  # the last stage's LM head, when split (split_head.py)


class StepRunner:
    """Runs micro-batches for one stage. Until `serve` gives it the loaded slice, every step is
    refused UNAVAILABLE (the weights are loading); once `draining` is set, so is every step that
    starts a session, while the sessions it holds go on stepping until they end."""

    def __init__(self, name: str, *, chain: GreedyChain, collectors: Collectors, trace: StepTrace | None,
                 draining: threading.Event, deployment: Deployment, meter: StageMetrics | None = None) -> None:
        self.name = name  # "layers A:B @ host:port", used in error messages
        self._deployment = deployment  # the addresses a step may go on to
        self._chain = chain
        self._collectors = collectors
        self._trace = trace  # per-micro-batch timestamps (--trace-steps), until a write fails
        self._meter = meter if meter is not None else Unmetered()  # --metrics-port (stage_server/metrics.py)
        self._draining = draining
        self.served: ServedSlice | None = None
        self.micro_batches_served = 0
        self.compute_seconds = 0.0  # the forwards' time, for Info

    def serve(self, served: ServedSlice) -> None:
        """The weights are in: compute steps from now on."""
        self.served = served

    @property
    def loading(self) -> bool:
        return self.served is None

    def run(self, request: stage_pb2.ForwardRequest, caller: Caller, link_to, deliver, done: Callable[[], None],
            received_ns: int) -> None:
        """Compute one micro-batch, then send it on or answer it; never raises. Runs on the compute
        thread, so that every torch call of the stage, the answer's argmax included, runs there
        (only while the weights load does it run on the stream's reader thread, and then only refuses).

        `caller` is who sent it (deployment.Caller: whose sessions it may use); `link_to(address)` is
        the stream's link to a next hop; `deliver(answer)` sends an answer (or error) back up the
        stream, which makes its micro-batch done there; `done()` makes it done without one: a
        micro-batch whose answer goes to a reply_to collector is done here once sent on or answered, and
        nothing comes back for it (a message back per hop would cost every token a send and a wake-up on
        each side while the next stage computes). The link to the next stage still reports it as failed
        if that stage goes away.
        With a trace (--trace-steps), the step's stamps are written once it is sent on or answered;
        a forwarded step's `sent` is stamped as it is handed to the link (over a same-machine socket
        the next stage may have it before the write returns)."""
        started, computed, handed, outcome, sent_bytes = now_ns(), 0, 0, "failed", 0
        try:
            output, positions, mask = self._compute(request, caller, received_ns)
            computed = now_ns()
            if request.route:
                activations = codec.encode(output, request.wire_codec)
                sent_bytes = codec.payload_bytes(activations)
                sent = stage_pb2.ForwardRequest(
                    session_id=request.session_id, micro_batch_id=request.micro_batch_id,
                    route=request.route[1:], activations=activations,
                    position_ids=request.position_ids, wire_codec=request.wire_codec,
                    start_session=request.start_session, end_session=request.end_session,
                    model_fingerprint=request.model_fingerprint, logits_top_k=request.logits_top_k,
                    reply_to=request.reply_to, chain_steps=request.chain_steps,
                    chain_route=request.chain_route, chain_stop_ids=request.chain_stop_ids,
                    hop_bytes=[*request.hop_bytes, sent_bytes], in_flight=request.in_flight,
                    request_ids=request.request_ids)
                if request.HasField("cache_edit"):
                    sent.cache_edit.CopyFrom(request.cache_edit)
                if request.HasField("attention_mask"):
                    sent.attention_mask.CopyFrom(request.attention_mask)
                handed = now_ns()
                if not link_to(request.route[0]).send(sent, sent_bytes):
                    if request.start_session:  # the session exists nowhere past this stage: none is kept here
                        self.served.sessions.end(request.session_id)
                    deliver(unreachable(request.route[0], request.session_id, request.micro_batch_id,
                                        "the link failed while sending"))
                else:
                    outcome = "forwarded"
                    if request.reply_to:
                        done()
            else:
                collector = self._collectors.get(request.reply_to)
                if collector is None:
                    deliver(logits_response(request, output))
                else:  # straight to the coordinator; nothing goes back upstream
                    self._answer_and_chain(request, output, positions, mask, collector)
                    done()
                outcome = "answered"
        except StageRequestError as err:
            deliver(error_response(request, err.code, str(err), self.name))
        except codec.WireFormatError as err:
            deliver(error_response(request, "INVALID_ARGUMENT", f"malformed tensor: {err}", self.name))
        except Exception as err:
            log.exception("micro-batch %s of session %s failed", request.micro_batch_id, request.session_id)
            deliver(error_response(request, "INTERNAL", f"{type(err).__name__}: {err}", self.name))
        self._meter.step(request, outcome, started, computed, sent_bytes, now_ns())
        if self._trace is not None:
            self._write_trace(request, outcome, received_ns, started, computed, handed if outcome == "forwarded" else 0)

    def _write_trace(self, request: stage_pb2.ForwardRequest, outcome: str, received: int, started: int,
                     computed: int, handed: int) -> None:
        sent = handed or now_ns()
        record = StepRecord(stage=self.name, session_id=request.session_id, micro_batch_id=request.micro_batch_id,
                            outcome=outcome, received=received, started=started, computed=computed or sent,
                            sent=sent)
        try:
            self._trace.write(record)
        except OSError as err:  # a full disk must not fail the steps: stop tracing instead
            log.warning("stopped writing the step trace %s: %s", self._trace.path, err)
            trace, self._trace = self._trace, None
            trace.close()

    def _answer_and_chain(self, request: stage_pb2.ForwardRequest, logits: torch.Tensor, positions: torch.Tensor,
                          mask: torch.Tensor | None, collector: Collector) -> None:
        """If the chain goes on, send the next step first (it is what the stages wait for), then
        hand this step's answer, with the sizes of the hops it took, to the coordinator's collector.
        The coordinator keeps an answer that overtakes the one announcing it (pipeline_client), so
        the order is free."""
        self._chain.arrived(request.session_id, request.micro_batch_id)  # if chained here, it is done
        best = greedy_ids(logits) if request.logits_top_k == 1 else None
        tokens = best.tolist() if best is not None and request.chain_steps else []
        chained = False
        if self._chain.continues(request, tokens):
            following = next_step(request, tokens, positions, mask)
            chained = self._chain.send(following)  # False: the link failed; the coordinator sends it
        answer = logits_response(request, logits, best)
        answer.chained = chained
        answer.hop_bytes.extend(request.hop_bytes)
        collector.put(answer)

    def _compute(self, request: stage_pb2.ForwardRequest, caller: Caller, received_ns: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the request's step, which arrived at monotonic `received_ns`; returns (output, its position
        ids, its attention mask or None)."""
        check_session_id(request.session_id)
        served = self.served
        if served is None:
            raise StageUnavailable(f"stage {self.name} is still loading its weights; retry shortly")
        if served.sessions.abandoned(request.session_id, received_ns, caller):  # checked as it would compute
            raise SessionNotFound(f"session {request.session_id!r} was ended (EndSession) while this step waited "
                                  "here; it is not computed")
        if request.start_session and self._draining.is_set():
            raise StageUnavailable(f"stage {self.name} {DRAINING_REFUSAL}; route it to a replica of this stage")
        model, sessions = served.model, served.sessions
        loaded = model.loaded
        if request.model_fingerprint and request.model_fingerprint != loaded.fingerprint:
            raise WrongRoute(f"model fingerprint {request.model_fingerprint} does not match this stage's "
                             f"{loaded.fingerprint}: the stages serve different models")
        if not request.route and not loaded.is_last:
            raise WrongRoute(f"the route ends at {self.name}, but the model continues after layer "
                             f"{loaded.layer_end} of {loaded.num_layers}")
        if request.route and loaded.is_last:
            raise WrongRoute(f"{self.name} holds the last layer, yet the route continues to {request.route[0]}")
        if request.wire_codec not in _CODEC_VALUES:
            raise InvalidRequest(f"unknown wire codec {request.wire_codec}; valid: {list(codec.CODEC_NAMES)}")
        if not request.HasField("activations") or not request.HasField("position_ids"):
            raise InvalidRequest("a micro-batch needs activations and position_ids")
        if (problem := check_chain_fields(request)) is not None:
            raise InvalidRequest(problem)
        served.bounds.check(request)  # sizes first: the allow-list below walks routes already bounded
        # before anything connects anywhere: a route outside the deployment would make this stage a relay
        self._deployment.check_addresses(request.route, "route")
        self._deployment.check_addresses(request.chain_route, "chain_route")
        activations = codec.decode(request.activations, max_elements=served.bounds.max_elements("activations"))
        position_ids = codec.decode(request.position_ids, max_elements=served.bounds.max_elements("position_ids"))
        mask = codec.decode(request.attention_mask, max_elements=served.bounds.max_elements("attention_mask")) \
            if request.HasField("attention_mask") else None
        if request.start_session:  # checked in full against a session not yet stored: a bad step stores nothing
            batch = activations.shape[0] if activations.dim() else 0
            _checked_step(model, sessions, Session(request.session_id, None, batch), request, activations,
                          position_ids, mask, caller)
            session = sessions.start(request.session_id, batch, caller)
            if request.request_ids:
                log.info("session %s opened for request(s) %s", request.session_id, ",".join(request.request_ids),
                         extra={"session_id": request.session_id, "request_ids": list(request.request_ids)})
        else:
            session = sessions.get(request.session_id, caller)
        try:
            with session.lock:
                edit, new_tokens = _checked_step(model, sessions, session, request, activations, position_ids, mask,
                                                 caller)
                if edit is not None:
                    edit.apply(sessions)
                sessions.reserve(session, new_tokens)
                sessions.touch(session)  # only a step that passed every check keeps a session alive
                if request.reply_to and not request.route:
                    session.answers_to = request.reply_to
                if served.threads is not None:
                    served.threads.for_step(activations.shape[0] * new_tokens, request.in_flight)
                if served.split_head is not None:  # chaining fields: the group has the stages to itself
                    served.split_head.alone = bool(request.chain_route)
                started = time.perf_counter()
                try:
                    output = model.forward(session, activations, position_ids, mask)
                finally:
                    if served.threads is not None:
                        served.threads.record(time.perf_counter() - started)
                self.micro_batches_served += 1
                self.compute_seconds += time.perf_counter() - started
        except Exception:
            if request.start_session:
                sessions.end(request.session_id)  # never leave a half-made session behind
            raise
        if request.end_session:
            sessions.end(request.session_id)
        return output, position_ids, mask


def _checked_step(model: StageModel, sessions: SessionStore, session: Session, request: stage_pb2.ForwardRequest,
                  activations: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, caller: Caller
                  ) -> tuple[PlannedEdit | None, int]:
    """The request's cache edit planned against `session` (None without one; `caller` may use every
    session it appends) and the step's new positions, every check passed; nothing is changed yet."""
    edit = PlannedEdit(session, request.cache_edit, sessions, caller) if request.HasField("cache_edit") else None
    shape = (edit.batch_size, edit.tokens_seen) if edit is not None else None
    return edit, model.check_step(session, activations, position_ids, mask, rows_and_positions=shape)
