"""The public gRPC boundary: Generate, GenerateStream and GetModelInfo.

Owns: turning API requests into engine runs and engine results into API replies,
mapping every failure to a gRPC status (validation → INVALID_ARGUMENT/OUT_OF_RANGE,
stage failures → their own code with the failing stage named), and stopping the
work on every stage when the client cancels or its deadline passes; each call's status,
tokens and times go to a RequestMeter.

Does not own: validation rules (validation), generation (engine), text (text), the metrics
(metrics).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import grpc

from coordinator.engine import CapacityError, Engine, GenerationCancelled
from coordinator.metrics import RequestMeter, grpc_request
from coordinator.request_log import RequestLog
from coordinator.sequence import SequenceRequest, SequenceResult
from coordinator.stage_errors import StageCallError
from coordinator.text import TextStream, Tokenization
from coordinator.validation import ApiError, Limits, PreparedRequest, prepare
from protos import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "length": coordinator_pb2.FINISH_REASON_LENGTH,
    "eos": coordinator_pb2.FINISH_REASON_EOS,
    "stop": coordinator_pb2.FINISH_REASON_STOP,
}
_DONE = object()


def failure_status(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and one-line message a generation that raised `err` ends with (both APIs)."""
    if isinstance(err, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
    if isinstance(err, StageCallError):
        where = f" (stage {err.failed_stage})" if err.failed_stage else ""
        return err.code, f"pipeline error{where}: {err}"
    log.error("generation failed", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, engine: Engine, tokenization: Tokenization, limits: Limits,
                 model_info: coordinator_pb2.ModelInfo, refresh_stage_info=None, batching_state=None) -> None:
        self.engine = engine
        self.tokenization = tokenization
        self.limits = limits
        self.model_info = model_info
        self._refresh_stage_info = refresh_stage_info
        self._batching_state = batching_state
        self._tokens = 0  # sent to callers since start (GetModelInfo's batching.tokens)
        self._tokens_lock = threading.Lock()

    # ---- helpers -------------------------------------------------------------------------

    def _prepare(self, request, context) -> PreparedRequest:
        try:
            return prepare(request, self.tokenization, self.limits)
        except ApiError as err:
            context.abort(getattr(grpc.StatusCode, err.code), str(err))

    def _run(self, prepared: PreparedRequest, text: TextStream, context, record: RequestLog,
             on_token=None, meter: RequestMeter | None = None) -> SequenceResult:
        def keep_going() -> bool:
            remaining = context.time_remaining()
            return context.is_active() and (remaining is None or remaining > 0)

        return self.generate_one(prepared, text, keep_going, on_token, record=record, meter=meter)

    def generate_one(self, prepared: PreparedRequest, text: TextStream, keep_going: Callable[[], bool],
                     on_token: Callable[[int], None] | None = None, *, record: RequestLog | None = None,
                     meter: RequestMeter | None = None) -> SequenceResult:
        """Run one prepared request to its end (either API); each token goes through `text` first,
        then to `on_token`. Raises GenerationCancelled once `keep_going` answers False."""
        def token_seen(token_id: int) -> bool:
            if meter is not None:
                meter.token()
            stopped = text.add(token_id)
            if record is not None:
                record.token()
            with self._tokens_lock:
                self._tokens += 1
            if on_token is not None:
                on_token(token_id)
            return stopped

        if record is not None:
            record.prompt_tokens = len(prepared.prompt_ids)
        request = SequenceRequest(prepared.prompt_ids, prepared.max_new_tokens, prepared.sampling,
                                  frozenset() if prepared.ignore_eos else self.tokenization.eos_token_ids,
                                  on_token=token_seen, request_id=record.request_id if record else "")
        result = self.engine.generate([request], keep_going=keep_going)[0]
        if record is not None:
            record.finished(result)
        return result

    @staticmethod
    def _abort_stopped(context) -> None:
        """The work stopped because the caller's deadline passed or it cancelled: end with that status.
        A stream that just returned would end with OK, which a client whose own timer has not fired
        yet takes for a finished answer with no tokens."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed; the work stopped")
        context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled; the work stopped")

    @staticmethod
    def _abort_for(err: Exception, context) -> None:
        context.abort(*failure_status(err))

    # ---- RPCs ----------------------------------------------------------------------------

    def Generate(self, request, context):
        with RequestLog(context, "grpc", "Generate") as record, grpc_request(context) as meter:
            return self._generate(request, context, record, meter)

    def _generate(self, request, context, record: RequestLog, meter: RequestMeter):
        prepared = self._prepare(request, context)
        meter.prompt(len(prepared.prompt_ids))
        text = TextStream(self.tokenization, prepared.stop)
        try:
            result = self._run(prepared, text, context, record, meter=meter)
        except GenerationCancelled:
            self._abort_stopped(context)
        except Exception as err:
            self._abort_for(err, context)
        return coordinator_pb2.GenerateResponse(
            text=text.text, token_ids=result.token_ids, finish_reason=FINISH_REASONS[result.finish_reason],
            prompt_tokens=len(prepared.prompt_ids), completion_tokens=len(result.token_ids))

    def GenerateStream(self, request, context):
        with RequestLog(context, "grpc", "GenerateStream") as record, grpc_request(context) as meter:
            yield from self._generate_stream(request, context, record, meter)

    def _generate_stream(self, request, context, record: RequestLog, meter: RequestMeter):
        prepared = self._prepare(request, context)
        meter.prompt(len(prepared.prompt_ids))
        text = TextStream(self.tokenization, prepared.stop)
        events: queue.Queue = queue.Queue()
        outcome: dict[str, object] = {}

        def work() -> None:
            try:
                outcome["result"] = self._run(prepared, text, context, record, on_token=events.put, meter=meter)
            except Exception as err:
                outcome["error"] = err
            finally:
                events.put(_DONE)

        threading.Thread(target=work, name="generate-stream", daemon=True).start()
        produced = 0
        while (event := events.get()) is not _DONE:
            produced += 1
            yield coordinator_pb2.GenerateStreamResponse(
                text=text.release(), token_ids=[event], prompt_tokens=len(prepared.prompt_ids),
                completion_tokens=produced)
        error = outcome.get("error")
        if isinstance(error, GenerationCancelled):
            self._abort_stopped(context)
        if error is not None:
            self._abort_for(error, context)
        result: SequenceResult = outcome["result"]
        yield coordinator_pb2.GenerateStreamResponse(
            text=text.release(final=True), finish_reason=FINISH_REASONS[result.finish_reason],
            prompt_tokens=len(prepared.prompt_ids), completion_tokens=len(result.token_ids))

    def GetModelInfo(self, request, context):
        info = coordinator_pb2.ModelInfo()
        info.CopyFrom(self.model_info)
        if self._refresh_stage_info is not None:
            try:
                del info.stages[:]
                info.stages.extend(self._refresh_stage_info())
            except Exception as err:  # stages unreachable: report what we know
                log.warning("could not refresh stage info: %s", err)
                info.CopyFrom(self.model_info)
        if self._batching_state is not None:
            info.batching.CopyFrom(self._batching_state())
        info.batching.tokens = self._tokens
        return info
