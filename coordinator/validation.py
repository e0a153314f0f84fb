"""Checking a public GenerateRequest and turning it into what the engine runs.

Owns: every rule a request must meet (only fields the API declares, one input kind,
non-empty, a prompt no longer than the context could hold before it is tokenized, token
ids inside the model's vocabulary, sane sampling values, limits on new tokens and
context), each
failure an `ApiError` carrying the gRPC status code name and a message that says
what was wrong, checked one field at a time. Nothing here imports grpc.

Does not own: mapping the codes onto gRPC statuses (service) or tokenization (text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.sampling import SamplingParams
from coordinator.text import Tokenization
from protos.unknown_fields import first_unknown_field

DEFAULT_MAX_NEW_TOKENS = 64
# A prompt longer than the context times this many characters cannot fit, whatever the tokenizer:
# it is refused before tokenizing, which costs hundreds of bytes of memory per character.
CHARS_PER_TOKEN_BOUND = 32
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the coordinator refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int  # the most a request may ask for
    max_context: int  # prompt + new tokens
    vocab_size: int  # token ids lie in [0, vocab_size): the model's vocabulary (its embedding rows)

    @property
    def max_prompt_chars(self) -> int:
        return self.max_context * CHARS_PER_TOKEN_BOUND


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    ignore_eos: bool = False


def prepare(request, tokenization: Tokenization, limits: Limits) -> PreparedRequest:
    """Validate a coordinator_pb2.GenerateRequest field by field, in this order; raises ApiError."""
    if (unknown := first_unknown_field(request)) is not None:
        raise ApiError("INVALID_ARGUMENT", f"the request carries {unknown}; check the client's coordinator.proto")
    prompt_ids = _prompt_ids(request, tokenization, limits)
    max_new = _max_new_tokens(request, len(prompt_ids), limits)
    sampling = _sampling(request)
    stop = _stop_strings(request)
    return PreparedRequest(prompt_ids, max_new, sampling, stop, request.ignore_eos)


def _prompt_ids(request, tokenization: Tokenization, limits: Limits) -> list[int]:
    """The prompt's token ids from exactly one of prompt, messages or token_ids."""
    given = [name for name, present in (("prompt", bool(request.prompt)), ("messages", len(request.messages) > 0),
                                        ("token_ids", len(request.token_ids) > 0)) if present]
    if not given:
        raise ApiError("INVALID_ARGUMENT", "the request is empty: set one of prompt, messages or token_ids")
    if len(given) > 1:
        raise ApiError("INVALID_ARGUMENT", f"set only one of prompt, messages or token_ids (got {', '.join(given)})")
    _check_input_size(request, limits)
    if request.prompt:
        prompt_ids = tokenization.encode_prompt(request.prompt)
    elif request.messages:
        prompt_ids = _chat_ids(request.messages, tokenization)
    else:
        prompt_ids = _token_ids(request.token_ids, limits.vocab_size)
    if not prompt_ids:
        raise ApiError("INVALID_ARGUMENT", "the prompt is empty after tokenization")
    return prompt_ids


def _check_input_size(request, limits: Limits) -> None:
    """Refuse an input that cannot fit the context before any of it is tokenized or copied."""
    if len(request.token_ids) > limits.max_context:
        raise ApiError("OUT_OF_RANGE", f"token_ids has {len(request.token_ids)} tokens; the model's context is "
                                       f"{limits.max_context} tokens")
    chars = len(request.prompt) + sum(len(m.content) + len(m.role) for m in request.messages)
    if chars > limits.max_prompt_chars:
        raise ApiError("INVALID_ARGUMENT", f"the prompt has {chars} characters, more than the model's context of "
                                           f"{limits.max_context} tokens could hold "
                                           f"(at most {limits.max_prompt_chars})")


def _chat_ids(messages, tokenization: Tokenization) -> list[int]:
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise ApiError("INVALID_ARGUMENT",
                           f"messages[{i}].role {message.role!r} is not one of {', '.join(CHAT_ROLES)}")
    try:
        return tokenization.encode_chat([{"role": m.role, "content": m.content} for m in messages])
    except ValueError as err:
        raise ApiError("INVALID_ARGUMENT", str(err)) from None


def _token_ids(token_ids, vocab_size: int) -> list[int]:
    prompt_ids = list(token_ids)
    if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size):
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        raise ApiError("INVALID_ARGUMENT", f"token_ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return prompt_ids


def _max_new_tokens(request, prompt_length: int, limits: Limits) -> int:
    max_new = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new < 0:
        raise ApiError("INVALID_ARGUMENT", f"max_new_tokens must be positive, got {max_new}")
    if max_new > limits.max_new_tokens:
        raise ApiError("OUT_OF_RANGE", f"max_new_tokens {max_new} is above this server's limit of "
                                       f"{limits.max_new_tokens}")
    if prompt_length + max_new > limits.max_context:
        raise ApiError("OUT_OF_RANGE", f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new}) exceeds "
                                       f"the model's context of {limits.max_context} tokens")
    return max_new


def _sampling(request) -> SamplingParams:
    temperature, top_p, top_k = request.temperature, request.top_p, request.top_k
    if not math.isfinite(temperature) or temperature < 0:
        raise ApiError("INVALID_ARGUMENT", f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise ApiError("INVALID_ARGUMENT", f"top_p must lie in [0, 1] (0 or 1 = off), got {top_p}")
    if top_k < 0:
        raise ApiError("INVALID_ARGUMENT", f"top_k must be >= 0 (0 = off), got {top_k}")
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p or 1.0,
                          seed=request.seed if request.HasField("seed") else None)


def _stop_strings(request) -> tuple[str, ...]:
    stop = tuple(request.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError("INVALID_ARGUMENT", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
        raise ApiError("INVALID_ARGUMENT", f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long")
    return stop
