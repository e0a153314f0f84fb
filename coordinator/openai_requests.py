"""OpenAI request bodies → the gRPC API's GenerateRequest, and its results → OpenAI answer bodies.

Owns: which fields `/v1/chat/completions` and `/v1/completions` accept (every other field is
refused, `RequestRefused`, never ignored), their JSON types, the fields the server takes only at
their neutral value (`n: 1`, `logprobs: false`, ...), the translation into a
`coordinator_pb2.GenerateRequest` (`max_tokens` → `max_new_tokens`, `prompt` as text or token ids),
and the shape of answers, stream chunks and `/v1/models`. JSON `null` counts as absent.

Does not own: the rules on values (coordinator/validation.py checks the GenerateRequest built
here, with the gRPC API's limits and messages), HTTP (coordinator/http_api.py) or generation.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from protos import coordinator_pb2

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # engine reason → OpenAI's
# Fields taken only at the value that asks for nothing beyond what the server does.
NEUTRAL = {"n": 1, "best_of": 1, "logprobs": False, "echo": False, "presence_penalty": 0,
           "frequency_penalty": 0, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
NEUTRAL_WHY = {"n": "this server returns one choice per request", "best_of": "this server returns one choice",
               "logprobs": "this server does not return log probabilities",
               "top_logprobs": "this server does not return log probabilities",
               "echo": "this server does not echo the prompt",
               "presence_penalty": "this server applies no penalties",
               "frequency_penalty": "this server applies no penalties",
               "tools": "this server does not call tools", "tool_choice": "this server does not call tools",
               "response_format": "this server produces plain text only"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
          "top_k", "ignore_eos"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt"}
INT32_MAX = 2**31 - 1


class RequestRefused(ValueError):
    """A body this server does not take; `param` names the field at fault (None: the body)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_argument") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class OpenAiRequest:
    """One request read from a body: what the engine runs and how the answer is shaped."""

    generate: coordinator_pb2.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool  # streams: a last chunk carrying usage (stream_options.include_usage)


def read_request(body: object, *, chat: bool, model_id: str) -> OpenAiRequest:
    """Check a parsed JSON body field by field and build the GenerateRequest; raises RequestRefused."""
    if not isinstance(body, dict):
        raise RequestRefused("the body must be a JSON object")
    fields = {name: value for name, value in body.items() if value is not None}
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, value in fields.items():
        if name in NEUTRAL_WHY:
            if name not in NEUTRAL or value != NEUTRAL[name] or isinstance(value, bool) != isinstance(
                    NEUTRAL[name], bool):
                raise RequestRefused(f"{name}={_show(value)} is not supported: {NEUTRAL_WHY[name]}", name)
        elif name not in allowed:
            raise RequestRefused(f"unknown field {name!r}; this endpoint takes {', '.join(sorted(allowed))}", name)
    model = fields.get("model")
    if model is not None and model != model_id:
        raise RequestRefused(f"the model {_show(model)} is not served here; this server serves {model_id!r}",
                             "model", code="model_not_found")
    stream = _typed(fields, "stream", bool, False)
    include_usage = _stream_options(fields, stream)
    request = coordinator_pb2.GenerateRequest()
    if chat:
        _messages(fields.get("messages"), request)
    else:
        _prompt(fields.get("prompt"), request)
    if "max_tokens" in fields and "max_completion_tokens" in fields:
        raise RequestRefused("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    for name in ("max_tokens", "max_completion_tokens"):
        if name in fields:
            request.max_new_tokens = _int(fields, name, 1, INT32_MAX)
    request.temperature = _number(fields, "temperature")
    request.top_p = _number(fields, "top_p")
    request.top_k = _int(fields, "top_k", 0, INT32_MAX) if "top_k" in fields else 0
    if "seed" in fields:
        request.seed = _int(fields, "seed", 0, 2**64 - 1)
    request.stop.extend(_stop(fields.get("stop")))
    request.ignore_eos = _typed(fields, "ignore_eos", bool, False)
    return OpenAiRequest(request, chat, stream, include_usage)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed(fields: dict, name: str, kind: type, default):
    value = fields.get(name, default)
    if not isinstance(value, kind):
        raise RequestRefused(f"{name} must be a {kind.__name__}, got {_show(value)}", name)
    return value


def _int(fields: dict, name: str, low: int, high: int) -> int:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestRefused(f"{name} must be an integer, got {_show(value)}", name)
    if not low <= value <= high:
        raise RequestRefused(f"{name} must lie in [{low}, {high}], got {value}", name)
    return value


def _number(fields: dict, name: str) -> float:
    value = fields.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestRefused(f"{name} must be a number, got {_show(value)}", name)
    return float(value)


def _stream_options(fields: dict, stream: bool) -> bool:
    options = fields.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestRefused("stream_options is only for stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestRefused("stream_options takes only include_usage", "stream_options")
    return _typed(options, "include_usage", bool, False)


def _messages(messages: object, request: coordinator_pb2.GenerateRequest) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestRefused("messages must be a non-empty list of {role, content}", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or not isinstance(
                message.get("role"), str):
            raise RequestRefused(f"messages[{i}] must be an object with only role and content (strings)",
                                 "messages")
        request.messages.add(role=message["role"], content=_content(message.get("content"), i))


def _content(content: object, index: int) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {
            "type", "text"} and isinstance(p["text"], str) for p in content):
        return "".join(part["text"] for part in content)
    raise RequestRefused(f"messages[{index}].content must be a string or a list of text parts "
                         "({\"type\": \"text\", \"text\": ...}); this server reads text only", "messages")


def _prompt(prompt: object, request: coordinator_pb2.GenerateRequest) -> None:
    """`prompt`: a string, token ids, or a list holding one of those (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in prompt):
        if any(not -INT32_MAX <= t <= INT32_MAX for t in prompt):
            raise RequestRefused("prompt token ids must be 32-bit integers", "prompt")
        request.token_ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestRefused("one prompt per request: this server does not batch prompts in one call", "prompt")
    else:
        raise RequestRefused("prompt must be a string or a list of token ids", "prompt")


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise RequestRefused("stop must be a string or a list of strings", "stop")


# ---- answers -------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(chat: bool, text: str, finish: str | None, *, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, "delta" if delta else "message": body, "logprobs": None, "finish_reason": finish}


def answer(chat: bool, answer_id: str, model_id: str, text: str, finish: str, prompt_tokens: int,
           completion_tokens: int) -> dict:
    """The body of a non-streamed answer."""
    return {"id": answer_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_id,
            "choices": [_choice(chat, text, FINISH_REASONS[finish], delta=False)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(chat: bool, answer_id: str, model_id: str, text: str | None = None, finish: str | None = None,
          usage_of: tuple[int, int] | None = None, *, role: bool = False) -> dict:
    """One streamed chunk: a text delta, the finish reason, the usage (no choices), or the chat's role."""
    body = {"id": answer_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model_id}
    if usage_of is not None:
        return {**body, "choices": [], "usage": usage(*usage_of)}
    choice = _choice(chat, text or "", FINISH_REASONS[finish] if finish else None, delta=True)
    if chat and role:
        choice["delta"] = {"role": "assistant", "content": ""}
    elif chat and finish:
        choice["delta"] = {}
    return {**body, "choices": [choice]}


def models(model_id: str) -> dict:
    """The body of GET /v1/models: the one model this coordinator serves."""
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "layerline"}]}
