"""Mutations of protobuf requests for the RPC fuzzer (bench/fuzz_rpcs.py), all driven by one seeded Random.

Owns: three ways of making a bad request out of a valid one, each returning the bytes to send
and the mutation's name (for the failure report):
- `mutate_fields`: a parseable message with one field (at any depth, found through the message's
  descriptor) set to an edge value: extreme integers, unknown enum numbers, odd or long strings,
  random or cut bytes, repeated fields emptied or grown, sub-messages cleared;
- `mutate_wire`: the serialized message changed on the wire: bit flips, truncation, a field
  duplicated, a field's wire type changed, a length prefix made huge, an over-long varint, an
  unknown field, random bytes inserted, the same applied inside a nested message;
- `junk`: random bytes.
Every size stays small (at most a few KiB): this is about malformed input, not about limits.

Does not own: which messages are valid seeds, sending them, or judging the answers (fuzz_rpcs).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

VARINT, I64, LEN, I32 = 0, 1, 2, 5
WIRE_TYPES = (VARINT, I64, LEN, 3, 4, I32, 6, 7)  # 3, 4: groups; 6, 7: no such wire type

_INTS = (0, 1, -1, 2, 7, 127, 128, 255, 256, 4096, 65535, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63))
_STRINGS = ("", " ", "\x00", "a" * 300, "é🙂", "../../etc/passwd", "127.0.0.1:1", "localhost:1", "[::1]:1",
            "unix:/nonexistent", "%s%n", "fuzz-session", "x" * 2048)


def encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def split_fields(data: bytes) -> list[tuple[int, int, bytes]] | None:
    """The top-level fields of serialized bytes as (number, wire type, payload), a LEN payload
    without its length prefix; None when the bytes are not well-formed wire format."""
    fields, at = [], 0
    try:
        while at < len(data):
            tag, at = _read_varint(data, at)
            number, wire = tag >> 3, tag & 7
            if wire == VARINT:
                _, end = _read_varint(data, at)
            elif wire == I64:
                end = at + 8
            elif wire == I32:
                end = at + 4
            elif wire == LEN:
                length, at = _read_varint(data, at)
                end = at + length
            else:
                return None
            if end > len(data):
                return None
            fields.append((number, wire, data[at:end]))
            at = end
    except ValueError:
        return None
    return fields


def encode_field(number: int, wire: int, payload: bytes) -> bytes:
    tag = encode_varint(number << 3 | wire)
    return tag + encode_varint(len(payload)) + payload if wire == LEN else tag + payload


def join_fields(fields: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(encode_field(*field) for field in fields)


# ---- on the wire ----------------------------------------------------------------------------------

def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))] if data else b"\x08"


def _insert_random(data: bytes, rng: random.Random) -> bytes:
    at = rng.randint(0, len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]


def _overlong_varint(data: bytes, rng: random.Random) -> bytes:
    return data + encode_varint(rng.randint(1, 20) << 3) + b"\xff" * rng.randint(10, 12) + b"\x01"


def _unknown_field(data: bytes, rng: random.Random) -> bytes:
    number = rng.choice((99, 1000, 2**29 - 1))
    return data + encode_field(number, rng.choice((VARINT, LEN, I32, I64)), rng.randbytes(rng.choice((4, 8))))


def _field_op(op: Callable[[list, random.Random], list | bytes]) -> Callable[[bytes, random.Random], bytes]:
    """A mutation of one of the message's fields; plain bit flips where the bytes are not wire format."""
    def mutate(data: bytes, rng: random.Random) -> bytes:
        fields = split_fields(data)
        if not fields:
            return _flip_bits(data, rng)
        out = op(fields, rng)
        return out if isinstance(out, bytes) else join_fields(out)
    return mutate


def _duplicate(fields, rng):
    return [*fields, rng.choice(fields)]


def _wrong_wire_type(fields, rng):
    index = rng.randrange(len(fields))
    number, wire, payload = fields[index]
    other = rng.choice([w for w in WIRE_TYPES if w != wire])
    tag = encode_varint(number << 3 | other)
    fields = [encode_field(*f) for f in fields]
    fields[index] = tag + (encode_varint(len(payload)) + payload if other == LEN else payload)
    return b"".join(fields)


def _huge_length(fields, rng):
    nested = [i for i, f in enumerate(fields) if f[1] == LEN]
    if not nested:
        return join_fields(fields) + encode_field(rng.randint(1, 20), LEN, b"") + b"\xff\xff\xff\xff\x0f"
    index = rng.choice(nested)
    number, _, payload = fields[index]
    parts = [encode_field(*f) for f in fields]
    length = rng.choice((len(payload) + 1, 2**31 - 1, 2**32 + len(payload), 2**63))
    parts[index] = encode_varint(number << 3 | LEN) + encode_varint(length) + payload
    return b"".join(parts)


def _inside(fields, rng):
    """One mutation applied inside a nested (length-delimited) field, the lengths kept right."""
    nested = [i for i, f in enumerate(fields) if f[1] == LEN and f[2]]
    if not nested:
        return _duplicate(fields, rng)
    index = rng.choice(nested)
    number, wire, payload = fields[index]
    name, mutate = rng.choice(WIRE_MUTATIONS[:-1])
    fields = list(fields)
    fields[index] = (number, wire, mutate(payload, rng))
    return fields


WIRE_MUTATIONS: list[tuple[str, Callable[[bytes, random.Random], bytes]]] = [
    ("bit flips", _flip_bits),
    ("truncated", _truncate),
    ("random bytes inserted", _insert_random),
    ("over-long varint", _overlong_varint),
    ("unknown field", _unknown_field),
    ("field duplicated", _field_op(_duplicate)),
    ("wrong wire type", _field_op(_wrong_wire_type)),
    ("huge length", _field_op(_huge_length)),
    ("inside a nested field", _field_op(_inside)),
]


def mutate_wire(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    name, mutate = rng.choice(WIRE_MUTATIONS)
    return mutate(data, rng), name


def junk(rng: random.Random) -> tuple[bytes, str]:
    return rng.randbytes(rng.choice((0, 1, 2, 5, 17, 64, 300))), "random bytes"


# ---- through the descriptor -----------------------------------------------------------------------

def _fields_within(message: Message, depth: int = 0) -> list[tuple[Message, FieldDescriptor]]:
    """(message, field) for every field of `message` and of its set sub-messages, a few levels deep."""
    found = [(message, field) for field in message.DESCRIPTOR.fields]
    if depth < 3:
        for field in message.DESCRIPTOR.fields:
            if field.type != FieldDescriptor.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
                continue
            if field.is_repeated:
                for item in getattr(message, field.name):
                    found += _fields_within(item, depth + 1)
            elif message.HasField(field.name):
                found += _fields_within(getattr(message, field.name), depth + 1)
    return found


def _int_value(field: FieldDescriptor, rng: random.Random) -> int:
    value = rng.choice(_INTS) if rng.random() < 0.8 else rng.randint(-(2**40), 2**40)
    bits = 32 if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT32,
                                FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32) else 64
    unsigned = field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
                              FieldDescriptor.TYPE_FIXED64)
    value %= 1 << bits
    return value if unsigned or value < 1 << (bits - 1) else value - (1 << bits)


def _scalar(field: FieldDescriptor, rng: random.Random, current=None):
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice((0.0, -1.0, 1e-45, 3.4e38, -3.4e38, float("nan"), float("inf"), float("-inf"), 2.5))
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([*field.enum_type.values_by_number, 99, -1, 2**31 - 1])
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS)
    if kind == FieldDescriptor.TYPE_BYTES:
        if current and rng.random() < 0.5:
            return current[:rng.randrange(len(current))] if rng.random() < 0.5 else current + current[:7]
        return rng.randbytes(rng.choice((0, 1, 3, 8, 24, 1000)))
    return _int_value(field, rng)


def mutate_fields(message: Message, rng: random.Random) -> tuple[bytes, str]:
    """A copy of `message` with one field, at any depth, set to an edge value; serialized."""
    mutated = type(message)()
    mutated.CopyFrom(message)
    candidates = _fields_within(mutated)
    if not candidates:
        return mutated.SerializeToString(), "empty message"
    owner, field = rng.choice(candidates)
    name = f"{owner.DESCRIPTOR.name}.{field.name}"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            target = getattr(owner, field.name)
            target[rng.choice(_STRINGS)] = rng.choice(_STRINGS)
        elif field.is_repeated:
            container = getattr(owner, field.name)
            if rng.random() < 0.5:
                del container[:]
            else:
                container.add()
        else:
            owner.ClearField(field.name)
        return mutated.SerializeToString(), f"{name} changed"
    if field.is_repeated:
        container = getattr(owner, field.name)
        choice = rng.random()
        if choice < 0.3:
            del container[:]
            what = "emptied"
        elif choice < 0.6 and len(container):
            container.extend([container[0]] * rng.choice((1, 15, 63)))
            what = "grown"
        else:
            container.append(_scalar(field, rng))
            what = "given an edge value"
        return mutated.SerializeToString(), f"{name} {what}"
    current = getattr(owner, field.name)
    try:
        setattr(owner, field.name, _scalar(field, rng, current))
    except (ValueError, TypeError):  # an enum number the runtime will not set: set it on the wire instead
        return mutated.SerializeToString() + encode_field(field.number, VARINT, encode_varint(99)), f"{name} = 99"
    return mutated.SerializeToString(), f"{name} set to an edge value"
