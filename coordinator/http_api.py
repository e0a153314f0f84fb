"""The OpenAI-compatible HTTP face of a coordinator: a Starlette app over the gRPC API's own path.

Owns: the routes (`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /health`, `GET /metrics`), the API keys on them (`Authorization: Bearer KEY`, the gRPC API's
key file and per-key slots; /health and /metrics stay open for probes and scrapers), the bound on
a body's size, OpenAI's error shape with gRPC statuses mapped onto HTTP ones, answers streamed as
server-sent events, and cancelling a generation whose client goes away (or when the server stops).

Does not own: which fields are taken (openai_requests), the rules on values (validation, through
the same `prepare` as gRPC), running a generation or mapping its failures (service), or the
server that runs the app (http_server).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator import openai_requests
from coordinator.api_keys import ApiKeys
from coordinator.engine import GenerationCancelled
from coordinator.http_generation import EventPump, Generation, HttpCall
from coordinator.metrics import REGISTRY
from coordinator.openai_requests import OpenAiRequest, RequestRefused
from coordinator.request_log import REQUEST_ID_KEY
from coordinator.service import CoordinatorService, failure_status
from coordinator.validation import ApiError, PreparedRequest, prepare

log = logging.getLogger(__name__)

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
               "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
RETRY_AFTER_S = "1"  # a full queue or a key's slots free up within seconds
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpError(Exception):
    """An answer in OpenAI's error shape: status, message, and the `param` and `code` it names."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    @classmethod
    def from_grpc(cls, code_name: str, message: str) -> HttpError:
        return cls(HTTP_STATUS.get(code_name, 500), message, code=code_name.lower())

    def response(self) -> JSONResponse:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        headers = {"Retry-After": RETRY_AFTER_S} if self.status in (429, 503) else None
        return JSONResponse(error_body(str(self), kind, self.param, self.code), self.status, headers=headers)


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sse(body: dict | str) -> bytes:
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class HttpApi:
    """The app and what its routes share: the service, the keys, and the threads generations run on."""

    def __init__(self, service: CoordinatorService, *, api_keys: ApiKeys | None, serving: Callable[[], bool],
                 max_body_bytes: int, max_running: int) -> None:
        self.service, self.api_keys, self.serving = service, api_keys, serving
        self.max_body_bytes, self.max_running = max_body_bytes, max_running
        self.model_id = service.model_info.model_name
        self.stopping = threading.Event()
        self._running = 0  # generations holding a thread; only the event loop's thread changes it
        self._pump: EventPump | None = None
        self._executor = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="http-generate")
        routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", metrics, methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})

    def close(self) -> None:
        """Cancel every generation and let their threads end (they return at the next token)."""
        self.stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- routes --------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        serving = self.serving() and not self.stopping.is_set()
        return JSONResponse({"status": "serving" if serving else "not_serving"}, 200 if serving else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except HttpError as err:
            return err.response()
        return JSONResponse(openai_requests.models(self.model_id))

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    # ---- one generation ------------------------------------------------------------------------

    async def _generate(self, request: Request, chat: bool) -> Response:
        """One request, logged and metered as the gRPC API's are once its key is checked: its id (sent
        back as X-Request-Id), status (the HTTP one; a stream's when it ends, 499 when its client
        leaves), tokens and times."""
        call = HttpCall(request.headers.get(REQUEST_ID_KEY), "chat.completions" if chat else "completions")
        response = await self._respond(request, chat, call)
        response.headers[REQUEST_ID_KEY] = call.record.request_id
        if response.status_code == 401:
            call.drop()  # refused before it is a request, as the gRPC API's interceptor refuses
        elif not isinstance(response, EventStream):
            call.finish(str(response.status_code))
        return response

    async def _respond(self, request: Request, chat: bool, call: HttpCall) -> Response:
        release, streaming = None, False
        try:
            digest = self._authenticate(request)
            asked = openai_requests.read_request(await self._json(request), chat=chat, model_id=self.model_id)
            prepared = await asyncio.to_thread(self._prepare, asked)  # tokenizing a long prompt takes a while
            call.meter.prompt(len(prepared.prompt_ids))
            release = self._take_slot(digest)
            generation = self._start(prepared, asked.stream, call)
            if asked.stream:
                response = await self._stream(request, asked, prepared, generation, release, call)
                streaming = True
                return response
            return await self._answer(request, asked, prepared, generation)
        except RequestRefused as err:
            status = 404 if err.code == "model_not_found" else 400
            return HttpError(status, str(err), param=err.param, code=err.code).response()
        except HttpError as err:
            return err.response()
        finally:
            if release is not None and not streaming:  # a stream frees its slot when it ends
                release()

    def _start(self, prepared: PreparedRequest, stream: bool, call: HttpCall) -> Generation:
        loop = asyncio.get_running_loop()
        if self._pump is None:  # made here: the loop is uvicorn's, started after this object
            self._pump = EventPump(loop)
        generation = Generation(self.service, prepared, self.stopping, stream, self._pump, call)
        try:
            done = loop.run_in_executor(self._executor, generation.run)
        except RuntimeError:  # the executor has shut down
            raise HttpError(503, "the coordinator is stopping", code="unavailable") from None
        self._running += 1
        done.add_done_callback(self._finished)
        return generation

    def _finished(self, _) -> None:
        self._running -= 1

    def _authenticate(self, request: Request) -> bytes | None:
        if self.api_keys is None:
            return None
        digest, why = self.api_keys.authenticate(request.headers.getlist("authorization"))
        if digest is None:
            raise HttpError(401, why.replace("metadata", "header"), code="invalid_api_key")
        return digest

    async def _json(self, request: Request) -> object:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise HttpError(413, f"the body has {declared} bytes, more than this server's {self.max_body_bytes}",
                            code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise HttpError(413, f"the body is over this server's {self.max_body_bytes} bytes",
                                code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as err:
            raise HttpError(400, f"the body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None

    def _prepare(self, asked: OpenAiRequest) -> PreparedRequest:
        try:
            return prepare(asked.generate, self.service.tokenization, self.service.limits)
        except ApiError as err:
            raise HttpError.from_grpc(err.code, str(err)) from None

    def _take_slot(self, digest: bytes | None) -> Callable[[], None]:
        """One of the key's request slots and one of the generation threads, or 429."""
        if self.stopping.is_set():
            raise HttpError(503, "the coordinator is stopping", code="unavailable")
        if self._running >= self.max_running:
            raise HttpError(429, f"the coordinator runs {self._running} HTTP requests, its most; retry shortly",
                            code="resource_exhausted")
        if digest is None:
            return _once(lambda: None)
        refusal = self.api_keys.acquire(digest)
        if refusal is not None:
            raise HttpError.from_grpc(refusal[0].name, refusal[1])
        return _once(lambda: self.api_keys.release(digest))

    async def _answer(self, request: Request, asked: OpenAiRequest, prepared: PreparedRequest,
                      generation: Generation) -> Response:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            kind, value = None, None
            while kind not in ("done", "error"):
                kind, value = await generation.events.get()
        finally:
            watcher.cancel()
            generation.cancelled.set()  # a no-op once it has ended; stops it when this task is cancelled
        if kind == "error":
            raise _failure(value, self.stopping.is_set())
        return JSONResponse(openai_requests.answer(asked.chat, openai_requests.new_id(asked.chat), self.model_id,
                                                   generation.text.text, value.finish_reason,
                                                   len(prepared.prompt_ids), len(value.token_ids)))

    async def _stream(self, request: Request, asked: OpenAiRequest, prepared: PreparedRequest,
                      generation: Generation, release: Callable[[], None], call: HttpCall) -> Response:
        """Wait for the first event, so that a refusal (a full queue) still gets its own status; then
        stream. The key's slot goes with the stream, which frees it when it ends in any way; from
        there Starlette watches for the client going away (it cancels the stream)."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            first = await generation.events.get()
        except BaseException:
            release()
            raise
        finally:
            watcher.cancel()
        if first[0] == "error":
            release()
            raise _failure(first[1], self.stopping.is_set())

        def ended() -> None:
            generation.cancelled.set()
            release()
            call.finish(generation.outcome)

        return EventStream(self._events(asked, prepared, generation, first), ended)

    async def _events(self, asked: OpenAiRequest, prepared: PreparedRequest, generation: Generation,
                      first: tuple) -> AsyncIterator[bytes]:
        chat, answer_id = asked.chat, openai_requests.new_id(asked.chat)

        def chunk(*args, **kwargs) -> bytes:
            return _sse(openai_requests.chunk(chat, answer_id, self.model_id, *args, **kwargs))

        try:
            if chat:
                yield chunk(role=True)
            kind, value = first
            while kind == "token":
                if value:
                    yield chunk(value)
                kind, value = await generation.events.get()
            if kind == "error":
                err = _failure(value, self.stopping.is_set())
                generation.outcome = str(err.status)
                yield _sse(error_body(str(err), "server_error" if err.status >= 500 else "invalid_request_error",
                                      None, err.code))
                return
            tail = generation.text.release(final=True)
            if tail:
                yield chunk(tail)
            yield chunk(finish=value.finish_reason)
            if asked.include_usage:
                yield chunk(usage_of=(len(prepared.prompt_ids), len(value.token_ids)))
            generation.outcome = "200"
            yield _sse("[DONE]")
        finally:  # ended, failed, or its client went away: the generation stops and frees its sessions
            generation.cancelled.set()


class EventStream(StreamingResponse):
    """Server-sent events that call `ended` once the response is over, however it ends (even when
    the client leaves before the first byte and the events are never read)."""

    def __init__(self, events: AsyncIterator[bytes], ended: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._ended = ended

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ended()


def _failure(err: Exception, stopping: bool = False) -> HttpError:
    """The answer for a generation that raised `err`; `stopping`: the server is shutting down."""
    if isinstance(err, GenerationCancelled) and stopping:
        return HttpError(503, "the coordinator is stopping; the work stopped", code="unavailable")
    if isinstance(err, GenerationCancelled):
        return HttpError(499, "the request was cancelled; the work stopped", code="cancelled")
    code, message = failure_status(err)
    return HttpError.from_grpc(code.name, message)


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Set `cancelled` when the client goes away (the server tells the app with http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancelled.set()
            return


def _once(release: Callable[[], None]) -> Callable[[], None]:
    """`release` that runs at most once, however many ways a request ends."""
    lock, held = threading.Lock(), [True]

    def run() -> None:
        with lock:
            if not held[0]:
                return
            held[0] = False
        release()

    return run


def _no_slot() -> None:
    pass


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such path, wrong method) in OpenAI's error shape."""
    return HttpError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     code="not_found" if exc.status_code == 404 else None).response()


async def metrics(request: Request) -> Response:
    """The coordinator's Prometheus families (coordinator/metrics.py), as --metrics-port serves them."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
