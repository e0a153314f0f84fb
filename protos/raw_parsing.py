"""Registering a servicer whose handlers parse their own requests: raw bytes in, INVALID_ARGUMENT out.

Owns: `add_servicer`, the one way a layerline server registers a service's handlers. It builds
them from the service's descriptor (every RPC it declares, unary or streaming either way), with
no request deserializer, so each handler receives the request's bytes and parses them with the
request message's `FromString`; bytes that do not parse end the call with INVALID_ARGUMENT and a
one-line message, logged at DEBUG only; so, for the public API, does a known field sent with a
wire type its type cannot have (`misencoded_field`: the parser would keep it aside and the field
read as unset). For a request stream, the servicer gets an iterator that parses each message as
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
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import FieldDescriptorProto
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

log = logging.getLogger(__name__)

_MAX_DETAIL_CHARS = 200  # of the parser's own words in the status message


def malformed_message(type_name: str, err: Exception) -> str:
    """The one-line status message for bytes that are not a `type_name`."""
    reason = re.sub(r"^Error parsing message( with type '[^']*')?:?\s*", "", " ".join(str(err).split()))
    reason = reason[:_MAX_DETAIL_CHARS] or type(err).__name__
    return f"the request is not a valid {type_name} message ({reason}); send one serialized from layerline's .proto"


def _message_fields(descriptor: Descriptor) -> list[tuple[str, bool]]:
    """(name, repeated) of each message-typed field of a message type (maps aside)."""
    return [(field.name, field.is_repeated) for field in descriptor.fields
            if field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry]


def misencoded_field(message: Message) -> str | None:
    """A field of `message`, at any depth, that arrived with a wire type its type cannot have (the
    parser keeps it aside as an unknown field, and the field reads as unset), in words; or None.
    A field number the message does not know is no such field: a newer sender may add fields."""
    descriptor = message.DESCRIPTOR
    for unknown in UnknownFieldSet(message):
        field = descriptor.fields_by_number.get(unknown.field_number)
        if field is not None:
            kind = FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()
            return (f"field {field.name} of {descriptor.full_name} was sent with wire type {unknown.wire_type}, "
                    f"which fields of type {kind} do not have")
    for name, repeated in _message_fields(descriptor):
        nested = getattr(message, name) if repeated else [getattr(message, name)] if message.HasField(name) else []
        for item in nested:
            if (problem := misencoded_field(item)) is not None:
                return problem
    return None


def _parser(method: MethodDescriptor, strict: bool) -> Callable[[bytes, object], object]:
    """parse(raw, context) -> the request message, or the call ends with INVALID_ARGUMENT; with
    `strict`, also for a field sent with the wrong wire type (misencoded_field)."""
    from_string = message_factory.GetMessageClass(method.input_type).FromString
    type_name, method_name = method.input_type.full_name, method.full_name

    def parse(raw: bytes, context):
        try:
            message = from_string(raw)
            problem = misencoded_field(message) if strict else None
            if problem is None:
                return message
            details = f"the request is not a valid {type_name} message: {problem}"
        except Exception as err:  # protobuf's DecodeError, whatever the runtime names it
            details = malformed_message(type_name, err)
        log.debug("%s: %s", method_name, details)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)  # raises

    return parse


def _parsed_stream(raw_requests: Iterator[bytes], parse, context) -> Iterator:
    for raw in raw_requests:
        yield parse(raw, context)


def _handler(method: MethodDescriptor, behaviour: Callable, strict: bool) -> grpc.RpcMethodHandler:
    parse = _parser(method, strict)
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


def method_handlers(servicer, service: ServiceDescriptor, *,
                    strict_wire_types: bool = False) -> dict[str, grpc.RpcMethodHandler]:
    """A handler for every RPC `service` declares, calling the servicer's method of the same name."""
    return {method.name: _handler(method, getattr(servicer, method.name), strict_wire_types)
            for method in service.methods}


def add_servicer(servicer, server: grpc.Server, service: ServiceDescriptor, *, strict_wire_types: bool = False) -> None:
    """Serve `service`'s RPCs on `server` with `servicer`'s methods (what the generated
    `add_..._to_server` does, except that requests are parsed in the handlers). With
    `strict_wire_types`, a field sent with the wrong wire type is refused too: the public API takes
    it (per request), the stages do not (a few µs a message on every hop, from peers of their own
    deployment)."""
    handlers = method_handlers(servicer, service, strict_wire_types=strict_wire_types)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
