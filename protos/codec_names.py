"""The wire codecs by name, as flags and messages spell them.

Owns: CODEC_NAMES (name → `stage_pb2.Codec` value) and `codec_from_name`. Apart from the codecs
themselves (codec.py imports torch) so that a command line can offer the names without loading
torch. Does not own encoding or decoding (codec).
"""

from __future__ import annotations

from protos import stage_pb2

CODEC_NAMES: dict[str, int] = {
    "none": stage_pb2.CODEC_NONE,
    "fp16": stage_pb2.CODEC_FP16,
    "bf16": stage_pb2.CODEC_BF16,
    "int8": stage_pb2.CODEC_INT8,
}


def codec_from_name(name: str) -> int:
    """The `stage_pb2.Codec` value for a name such as "int8" (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    return CODEC_NAMES[key]
