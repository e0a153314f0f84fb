"""Finding fields a request carries that its message type does not declare.

Owns: `first_unknown_field`, which names the first field of a parsed message (or of a message
inside it) that the schema does not know: a field number the sender's schema has and ours has
not, or a declared field sent with the wrong wire type (protobuf keeps such a field aside as
unknown, so `max_new_tokens` sent as bytes would otherwise read as 0 and be ignored). Both
services refuse such a request with INVALID_ARGUMENT rather than serve something the sender did
not ask for.

Does not own: parsing, or turning the answer into a status (coordinator/validation.py and the
stage's request checks do).
"""

from __future__ import annotations

import functools

from google.protobuf import unknown_fields
from google.protobuf.message import Message

_WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group start", 4: "group end", 5: "32-bit"}


def first_unknown_field(message: Message, path: str = "") -> str | None:
    """'field N (wire type T)' with where it sits, for the first unknown field of `message` or of a
    message inside it; None when every field is known. Runs on every stage step: the message fields
    to visit are worked out once per message type (`_message_fields`)."""
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        return _describe(message, unknown[0], path)
    singular, repeated = _message_fields(message.DESCRIPTOR)
    for name in singular:
        if message.HasField(name):
            found = first_unknown_field(getattr(message, name), f"{path}.{name}" if path else name)
            if found is not None:
                return found
    for name in repeated:
        for index, item in enumerate(getattr(message, name)):
            found = first_unknown_field(item, f"{path}.{name}[{index}]" if path else f"{name}[{index}]")
            if found is not None:
                return found
    return None


def _describe(message: Message, field, path: str) -> str:
    where = f" in {path}" if path else ""
    declared = message.DESCRIPTOR.fields_by_number.get(field.field_number)
    kind = _WIRE_TYPES.get(field.wire_type, str(field.wire_type))
    if declared is not None:
        return f"field {field.field_number} ({declared.name}){where} sent as {kind}, the wrong wire type"
    return f"field {field.field_number}{where} ({kind}), which {message.DESCRIPTOR.name} does not have"


@functools.cache
def _message_fields(descriptor) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(singular, repeated) names of the message-typed fields of a message type (maps left out: none
    of the requests has one)."""
    fields = [f for f in descriptor.fields if f.message_type is not None and not f.message_type.GetOptions().map_entry]
    return (tuple(f.name for f in fields if not f.is_repeated), tuple(f.name for f in fields if f.is_repeated))
