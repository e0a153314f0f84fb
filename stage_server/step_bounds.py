"""What one request may make a stage hold, checked before anything is decoded, allocated or stored.

Owns: the bounds on a step's size (rows × new tokens, `--max-step-tokens`; rows × attended
positions, what the KV budget `--max-cache-mb` can hold; the elements each tensor may decode
to), read from the tensors' declared shapes so that a few bytes on the wire cannot make the
stage allocate gigabytes (an int8 Rice-coded tensor spends about a bit per element); the bound
on the length of every id a request names (session, collector, appended sessions) and of every
address, so that junk ids are refused before any table keeps them; the request's unknown
fields; and the stage-server flags that set these bounds.

Does not own: checking a decoded step against its session (stage_model.check_step), the KV
budget's accounting (sessions), or the stream slots (stream_slots).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from protos import stage_pb2
from protos.unknown_fields import first_unknown_field
from stage_server.errors import InvalidRequest, ResourceExhausted

MAX_REQUEST_IDS = 1024  # public request ids one step may carry (one per row of a prefill, for logs)
MAX_ID_CHARS = 64  # session and collector ids (the coordinator's are 32 hex digits and a suffix)
MAX_ADDRESS_CHARS = 256  # host:port of a next hop
MAX_ROUTE_HOPS = 64
DEFAULT_MAX_STEP_TOKENS = 16384  # rows × new tokens; a coordinator's prefill steps default to 512


def check_id(what: str, value: str) -> None:
    """Refuse an id longer than MAX_ID_CHARS (InvalidRequest), before it is stored or looked up."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{what} has {len(value)} characters; ids are at most {MAX_ID_CHARS}")


def check_route(what: str, addresses) -> None:
    if len(addresses) > MAX_ROUTE_HOPS:
        raise InvalidRequest(f"{what} names {len(addresses)} stages; at most {MAX_ROUTE_HOPS}")
    for address in addresses:
        if len(address) > MAX_ADDRESS_CHARS:
            raise InvalidRequest(f"{what} names an address longer than {MAX_ADDRESS_CHARS} characters")


def check_known_fields(request) -> None:
    """Refuse a request with a field the stage's schema lacks, or a field sent with the wrong wire type."""
    if (unknown := first_unknown_field(request)) is not None:
        raise InvalidRequest(f"the request carries {unknown}; the sender's stage.proto differs from this stage's")


def check_side_request(request) -> None:
    """The bounds of a StopChain, EndSession or Results request: its fields, its id and its route."""
    check_known_fields(request)
    for name in ("session_id", "collector_id"):
        if hasattr(request, name):
            check_id(name, getattr(request, name))
    if hasattr(request, "route"):
        check_route("route", request.route)


def _elements(shape) -> int:
    count = 1
    for size in shape:
        count *= size if size > 0 else 0
    return count


@dataclass(frozen=True)
class StepBounds:
    """The size bounds of one stage's steps."""

    max_step_tokens: int  # rows × new tokens of one step (--max-step-tokens)
    max_attended: int  # rows × (cached + new) positions: what the KV budget holds (--max-cache-mb)
    hidden_size: int
    takes_token_ids: bool  # the first stage: activations are token ids [rows, tokens]

    @classmethod
    def for_stage(cls, *, max_step_tokens: int, max_cache_bytes: int, bytes_per_token: int, hidden_size: int,
                  takes_token_ids: bool) -> StepBounds:
        return cls(max_step_tokens, max(1, max_cache_bytes // max(1, bytes_per_token)), hidden_size, takes_token_ids)

    def check(self, request: stage_pb2.ForwardRequest) -> None:
        """Refuse a request whose ids, fields or declared tensor shapes are out of bounds, before any
        of its tensors is decoded and before any session is started or looked up. Runs on every step,
        so it reads each field once."""
        check_known_fields(request)
        if len(request.session_id) > MAX_ID_CHARS or len(request.reply_to) > MAX_ID_CHARS:
            check_id("session_id", request.session_id)
            check_id("reply_to", request.reply_to)
        if request.HasField("cache_edit"):
            for name in request.cache_edit.append_sessions:
                check_id("cache_edit.append_sessions", name)
        if request.request_ids:
            if len(request.request_ids) > MAX_REQUEST_IDS:
                raise InvalidRequest(f"request_ids names {len(request.request_ids)} ids; at most {MAX_REQUEST_IDS}")
            for name in request.request_ids:
                check_id("request_ids", name)
        check_route("route", request.route)
        if request.chain_route:
            check_route("chain_route", request.chain_route)
        shape = request.activations.shape
        dims = len(shape)
        if self.takes_token_ids:
            if dims != 2:
                raise InvalidRequest(f"this stage takes token ids [rows, tokens]; the activations are shaped "
                                     f"{list(shape)}")
        elif dims != 3 or shape[2] != self.hidden_size:
            raise InvalidRequest(f"this stage takes hidden states [rows, tokens, {self.hidden_size}]; the "
                                 f"activations are shaped {list(shape)}")
        rows, tokens = max(shape[0], 0), max(shape[1], 0)
        if rows * tokens > self.max_step_tokens:
            raise ResourceExhausted(f"a step of {rows} rows × {tokens} tokens exceeds this stage's "
                                    f"{self.max_step_tokens} (--max-step-tokens); send it in smaller steps")
        if _elements(request.position_ids.shape) > self.max_step_tokens:
            raise InvalidRequest(f"position_ids shaped {list(request.position_ids.shape)} has more elements than "
                                 f"the step's {rows} rows × {tokens} tokens")
        if request.HasField("attention_mask") and _elements(request.attention_mask.shape) > self.max_attended:
            raise ResourceExhausted(f"attention_mask shaped {list(request.attention_mask.shape)} covers more "
                                    f"positions than this stage's KV budget holds ({self.max_attended}, "
                                    "--max-cache-mb)")

    def max_elements(self, tensor: str) -> int:
        """The most elements `tensor` ("activations", "position_ids", "attention_mask") may decode to."""
        if tensor == "activations":
            return self.max_step_tokens * (1 if self.takes_token_ids else self.hidden_size)
        return self.max_step_tokens if tensor == "position_ids" else self.max_attended


def add_step_bound_arguments(parser: argparse.ArgumentParser, at_least_one) -> None:
    """stage-server's flags for these bounds; `at_least_one` parses a whole number >= 1."""
    parser.add_argument("--max-step-tokens", type=at_least_one, default=DEFAULT_MAX_STEP_TOKENS,
                        help="rows × new tokens one step may carry (default %(default)s; a coordinator sends at "
                             "most --prefill-chunk a prefill step); larger steps get RESOURCE_EXHAUSTED before "
                             "anything is decoded")
