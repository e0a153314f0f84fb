"""Registering a servicer whose handlers parse their own requests: raw bytes in, INVALID_ARGUMENT out.

Owns: `add_servicer`, the one way a layerline server registers a service's handlers. It builds
them from the service's descriptor (every RPC it declares, unary or streaming either way), with
no request deserializer, so each handler receives the request's bytes and parses them with the
request message's `FromString`; bytes that do not parse end the call with INVALID_ARGUMENT and a
one-line message, logged at DEBUG only. For a request stream, the servicer gets an iterator that parses each message as
it is read; a malformed one ends the call the same way (the servicer sees the iteration fail, as
when its client goes away). Responses are serialized as usual.

Why: grpcio (1.85) answers a request it cannot parse itself with INTERNAL, logs a traceback
for it, keeps about 16 KB of it for good, and after about ten such streaming calls never
finishes `server.stop`; a handler given the bytes does none of that.

Does not own: the servicers, the generated stubs (clients use them unchanged), health or
reflection (registered as they come), nor the same-machine socket, which parses its own frames
(protos/unix_socket.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

log = logging.getLogger(__name__)

_MAX_DETAIL_CHARS = 200  # of the parser's own words in the status message


def malformed_message(type_name: str, err: Exception) -> str:
    """The one-line status message for bytes that are not a `type_name`."""
    reason = re.sub(r"^Error parsing message( with type '[^']*')?:?\s*", "", " ".join(str(err).split()))
    reason = reason[:_MAX_DETAIL_CHARS] or type(err).__name__
    return f"the request is not a valid {type_name} message ({reason}); send one serialized from layerline's .proto"


def _parser(method: MethodDescriptor) -> Callable[[bytes, object], object]:
    """parse(raw, context) -> the request message, or the call ends with INVALID_ARGUMENT."""
    from_string = message_factory.GetMessageClass(method.input_type).FromString
    type_name, method_name = method.input_type.full_name, method.full_name

    def parse(raw: bytes, context):
        try:
            return from_string(raw)
        except Exception as err:  # protobuf's DecodeError, whatever the runtime names it
            details = malformed_message(type_name, err)
        log.debug("%s: %s", method_name, details)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)  # raises

    return parse


def _parsed_stream(raw_requests: Iterator[bytes], parse, context) -> Iterator:
    for raw in raw_requests:
        yield parse(raw, context)


def _handler(method: MethodDescriptor, behaviour: Callable) -> grpc.RpcMethodHandler:
    parse = _parser(method)
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
    if method.client_streaming:
        def stream_in(raw_requests, context):
            return behaviour(_parsed_stream(raw_requests, parse, context), context)

        make = (grpc.stream_stream_rpc_method_handler if method.server_streaming
                else grpc.stream_unary_rpc_method_handler)
        return make(stream_in, request_deserializer=None, response_serializer=serialize)

    def one_in(raw, context):
        return behaviour(parse(raw, context), context)

    make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
    return make(one_in, request_deserializer=None, response_serializer=serialize)


def method_handlers(servicer, service: ServiceDescriptor) -> dict[str, grpc.RpcMethodHandler]:
    """A handler for every RPC `service` declares, calling the servicer's method of the same name."""
    return {method.name: _handler(method, getattr(servicer, method.name))
            for method in service.methods}


def add_servicer(servicer, server: grpc.Server, service: ServiceDescriptor) -> None:
    """Serve `service`'s RPCs on `server` with `servicer`'s methods (what the generated
    `add_..._to_server` does, except that requests are parsed in the handlers). Fields a message
    does not declare, or sent with the wrong wire type, are the services' own check
    (protos/unknown_fields.py)."""
    handlers = method_handlers(servicer, service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
