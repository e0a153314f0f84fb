"""One log line per finished request, and the request id that ties it to the stages' lines.

Owns: `RequestLog`, held by an API handler for one request: its id (the caller's `x-request-id`
metadata when it is a sane one, else a new random one; sent back as `x-request-id` initial
metadata), the time of its first token, and, when the handler ends however it ends, one line on
the `coordinator.requests` logger (INFO, shown at the default level): id, API and method, status,
prompt and completion tokens, time to first token, duration, the route that served it and how
many times it was replayed. The id also goes to every stage with the request's prefill
(ForwardRequest.request_ids), so each stage's line about its session carries it.

Does not own: the log flags and formats (protos/log_setup.py) or the handlers (service).
"""

from __future__ import annotations

import logging
import re
import secrets
import time

log = logging.getLogger("coordinator.requests")
log.setLevel(logging.INFO)  # an access log: shown at the coordinator's default level (WARNING) too

REQUEST_ID_KEY = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(context) -> str:
    """The caller's x-request-id when it is 1-64 characters of [A-Za-z0-9._:-], else a new random one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return secrets.token_hex(8)


class RequestLog:
    """`with RequestLog(context, "grpc", "Generate") as record:` around a handler's work."""

    def __init__(self, context, api: str, method: str) -> None:
        self.context, self.api, self.method = context, api, method
        self.request_id = request_id_of(context)
        self.prompt_tokens = self.completion_tokens = 0
        self.route: tuple[str, ...] = ()
        self.replays = 0
        self._started = time.perf_counter()
        self._first_token_s: float | None = None

    def __enter__(self) -> RequestLog:
        self.context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))
        return self

    def token(self) -> None:
        """A token went out (the first one sets the time to first token)."""
        self.completion_tokens += 1
        if self._first_token_s is None:
            self._first_token_s = time.perf_counter() - self._started

    def finished(self, result) -> None:
        """The engine's SequenceResult: its route and replays."""
        self.completion_tokens = len(result.token_ids)
        self.route, self.replays = tuple(result.route), result.replays

    def __exit__(self, kind, error, _traceback) -> None:
        code = self.context.code() if hasattr(self.context, "code") else None
        if code is not None:
            status = code.name  # an abort's
        else:
            status = "OK" if kind is None else "CANCELLED" if kind is GeneratorExit else "UNKNOWN"
        duration = time.perf_counter() - self._started
        ttft = round(self._first_token_s, 4) if self._first_token_s is not None else None
        log.info("%s %s %s %s prompt=%d completion=%d ttft=%s duration=%.3fs route=%s replays=%d", self.api,
                 self.method, status, self.request_id, self.prompt_tokens, self.completion_tokens,
                 f"{ttft}s" if ttft is not None else "-", duration, ",".join(self.route) or "-", self.replays,
                 extra={"request_id": self.request_id, "api": self.api, "method": self.method, "status": status,
                        "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                        "ttft_s": ttft, "duration_s": round(duration, 4), "route": list(self.route),
                        "replays": self.replays})
