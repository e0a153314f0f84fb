"""Little-endian bytes of tensors, and their checked reading back: the level below every codec.

Owns: `WireFormatError`, the table of `stage_pb2.DType` values and the torch / numpy dtypes they
travel as, turning a tensor (any device) into row-major little-endian bytes, reading untrusted bytes
back into writable native arrays with their length checked, and the float16 overflow test the codecs
share. Does not own: codecs, message fields other than the bytes handed in, or shapes (callers
reshape).
"""

from __future__ import annotations

import numpy as np
import torch

from protos import stage_pb2

__all__ = [
    "FLOAT_DTYPES",
    "TORCH_TO_WIRE",
    "WIRE_DTYPES",
    "WireFormatError",
    "expect_length",
    "le_bytes",
    "overflows_float16",
    "raw_bytes",
    "read",
]


class WireFormatError(ValueError):
    """A `stage_pb2.Tensor` that is malformed or inconsistent; the message says what is wrong."""


# DType -> (torch dtype, little-endian numpy dtype of the raw bytes). bfloat16 travels as int16 bits.
WIRE_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    stage_pb2.DTYPE_FLOAT32: (torch.float32, np.dtype("<f4")),
    stage_pb2.DTYPE_FLOAT16: (torch.float16, np.dtype("<f2")),
    stage_pb2.DTYPE_BFLOAT16: (torch.bfloat16, np.dtype("<i2")),
    stage_pb2.DTYPE_INT64: (torch.int64, np.dtype("<i8")),
    stage_pb2.DTYPE_INT32: (torch.int32, np.dtype("<i4")),
    stage_pb2.DTYPE_INT8: (torch.int8, np.dtype("i1")),
    stage_pb2.DTYPE_UINT8: (torch.uint8, np.dtype("u1")),
    stage_pb2.DTYPE_BOOL: (torch.bool, np.dtype("u1")),
}
TORCH_TO_WIRE: dict[torch.dtype, int] = {t: d for d, (t, _) in WIRE_DTYPES.items()}
FLOAT_DTYPES = (stage_pb2.DTYPE_FLOAT32, stage_pb2.DTYPE_FLOAT16, stage_pb2.DTYPE_BFLOAT16)


def le_bytes(t: torch.Tensor, le: np.dtype) -> bytes:
    """Row-major bytes of tensor `t` (any device, numpy-compatible dtype) as little-endian `le`."""
    return t.detach().contiguous().cpu().numpy().astype(le, copy=False).tobytes()


def raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor of a supported dtype."""
    if t.dtype == torch.bfloat16:
        return le_bytes(t.view(torch.int16), np.dtype("<i2"))
    if t.dtype == torch.bool:
        return le_bytes(t.view(torch.uint8), np.dtype("u1"))
    return le_bytes(t, WIRE_DTYPES[TORCH_TO_WIRE[t.dtype]][1])


def overflows_float16(source: torch.Tensor, half: torch.Tensor) -> bool:
    """Whether casting `source` to float16 (giving `half`) turned a finite value into an infinity."""
    infinite = half.isinf()
    return bool(infinite.any()) and bool((infinite & source.isfinite()).any())


def expect_length(buf: bytes, le: np.dtype, count: int, what: str) -> None:
    """Raise WireFormatError unless `buf` holds exactly `count` items of `le`."""
    expected = count * le.itemsize
    if len(buf) != expected:
        raise WireFormatError(f"{what} holds {len(buf)} bytes; expected {expected} "
                              f"({count} x {le.itemsize}-byte {le.name})")


def read(buf: bytes, le: np.dtype, count: int, what: str, as_type: np.dtype | None = None) -> np.ndarray:
    """`count` little-endian items of `le` from `buf`, as a writable native-order array (a copy,
    converted to `as_type` if given): torch must not wrap the read-only protobuf buffer."""
    expect_length(buf, le, count, what)
    native = le.newbyteorder("=") if as_type is None else as_type
    return np.frombuffer(buf, dtype=le).astype(native, copy=True)
