"""Tensor <-> `stage_pb2.Tensor` wire codec: the public face of protos/ for tensors on the wire.

Owns: turning a CPU/GPU `torch.Tensor` into a self-describing `stage_pb2.Tensor` message and back,
the codec names, the FP16 / BF16 codecs, the checks every received message passes (dtype, codec,
shape, size, side fields), and the short raw paths for the small numpy tensors of a decode step.
Does not own: the byte level (protos/tensor_bytes.py), the int8 scheme (protos/int8_codec.py),
which codec a hop uses (the coordinator asks for one per request), moving tensors to a device after
decoding (`decode` returns CPU tensors), compression of whole messages (gRPC does that), or anything
about models and sessions.

Never uses pickle or `torch.save`: every payload is raw little-endian bytes, row-major.

Codecs (`Tensor.codec`; `CODEC_UNSPECIFIED` reads as `CODEC_NONE`):

* NONE: the tensor's own dtype, bit exact. Used for every non-floating tensor whatever was asked.
* FP16 / BF16: floating tensors cast to half / bfloat16 (2 B/elem). FP16 overflows above 65504, so
  a tensor holding a finite value fp16 cannot hold is sent raw (NONE) instead of turning it into inf.
* INT8: the ~1 byte per element tier for floating tensors: exact outliers plus Rice-coded whole
  numbers of a per-row step (protos/int8_codec.py says how and why). A tensor whose non-outlier
  values are not all finite is sent raw (NONE).

Empty tensors are sent raw (NONE) whatever was asked. The decoded tensor always has the message's
logical dtype (`Tensor.dtype`): a float32 tensor sent as FP16 or INT8 comes back float32, a bfloat16
one comes back bfloat16.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from protos import stage_pb2
from protos.codec_names import CODEC_NAMES, codec_from_name
from protos.int8_codec import (
    INT8_ROW_ELEMENTS_PER_OUTLIER,
    INT8_STEP_FRACTION,
    decode_int8,
    default_outliers_per_row,
    encode_int8,
)
from protos.tensor_bytes import (
    FLOAT_DTYPES,
    TORCH_TO_WIRE,
    WIRE_DTYPES,
    WireFormatError,
    expect_length,
    overflows_float16,
    raw_bytes,
    read,
)

__all__ = [
    "CODEC_NAMES",
    "INT8_ROW_ELEMENTS_PER_OUTLIER",
    "INT8_STEP_FRACTION",
    "MAX_NDIM",
    "WireFormatError",
    "codec_from_name",
    "decode",
    "default_outliers_per_row",
    "encode",
    "encode_float32",
    "encode_int64",
    "int64_values",
    "payload_bytes",
]


# Deepest tensor shape accepted on decode (a sanity bound, far above anything layerline sends).
MAX_NDIM = 16

_LOSSY_CODECS = (stage_pb2.CODEC_FP16, stage_pb2.CODEC_BF16, stage_pb2.CODEC_INT8)
_KNOWN_CODECS = (stage_pb2.CODEC_UNSPECIFIED, stage_pb2.CODEC_NONE, *_LOSSY_CODECS)


def payload_bytes(message: stage_pb2.Tensor) -> int:
    """Bytes of tensor payload a message carries: data, scales and outlier fields (no framing).

    Costs about one copy of the payload: the upb protobuf runtime hands out a fresh `bytes` for
    every read of a bytes field (and `ByteSize()` serializes, which is slower still).
    """
    return (len(message.data) + len(message.scales) + len(message.outlier_indices)
            + len(message.outlier_values) + len(message.rice_parameters) + len(message.low_bits))


# --------------------------------------------------------------------------------------------------
# encode


def _raw_message(t: torch.Tensor, wire_dtype: int) -> stage_pb2.Tensor:
    return stage_pb2.Tensor(shape=t.shape, dtype=wire_dtype, codec=stage_pb2.CODEC_NONE, data=raw_bytes(t))


def _array_message(values: np.ndarray, little_endian: str, wire_dtype: int) -> stage_pb2.Tensor:
    array = np.ascontiguousarray(values, dtype=little_endian)
    return stage_pb2.Tensor(shape=array.shape, dtype=wire_dtype, codec=stage_pb2.CODEC_NONE, data=array.tobytes())


def encode_int64(values: np.ndarray) -> stage_pb2.Tensor:
    """A raw int64 tensor straight from a numpy array of integers (token ids, positions, masks):
    the short path for the few small tensors a stage builds between two forwards."""
    return _array_message(values, "<i8", stage_pb2.DTYPE_INT64)


def encode_float32(values: np.ndarray) -> stage_pb2.Tensor:
    """A raw float32 tensor straight from a numpy array (a greedy answer's best logits), no torch call."""
    return _array_message(values, "<f4", stage_pb2.DTYPE_FLOAT32)


def encode(
    tensor: torch.Tensor,
    codec: int = stage_pb2.CODEC_NONE,
    *,
    outliers_per_row: int | None = None,
    step_fraction: float | None = None,
) -> stage_pb2.Tensor:
    """Encode `tensor` with `codec` (a `stage_pb2.Codec` value).

    Lossy codecs apply to floating tensors only; other tensors, empty ones, and the cases described
    in the module docstring go out raw and the message records `CODEC_NONE`. The keywords override
    the int8 defaults and are ignored by the other codecs: `outliers_per_row` (None =
    `default_outliers_per_row(N)`) and `step_fraction` (None = `INT8_STEP_FRACTION`).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"encode expects a torch.Tensor, got {type(tensor).__name__}")
    if codec not in _KNOWN_CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {sorted(_KNOWN_CODECS)}")
    wire_dtype = TORCH_TO_WIRE.get(tensor.dtype)
    if wire_dtype is None:
        supported = ", ".join(str(t).removeprefix("torch.") for t in TORCH_TO_WIRE)
        raise ValueError(f"cannot encode a {tensor.dtype} tensor; supported dtypes: {supported}")
    t = tensor.detach().contiguous()  # the lossy codecs compute on t's device; only bytes come back

    if codec not in _LOSSY_CODECS or wire_dtype not in FLOAT_DTYPES or t.numel() == 0:
        return _raw_message(t, wire_dtype)
    if codec == stage_pb2.CODEC_FP16:
        half = t.to(torch.float16)
        if t.dtype != torch.float16 and overflows_float16(t, half):
            return _raw_message(t, wire_dtype)  # would overflow fp16: send it exactly instead
        return stage_pb2.Tensor(shape=t.shape, dtype=wire_dtype, codec=codec, data=raw_bytes(half))
    if codec == stage_pb2.CODEC_BF16:
        return stage_pb2.Tensor(shape=t.shape, dtype=wire_dtype, codec=codec,
                                data=raw_bytes(t.to(torch.bfloat16)))
    message = encode_int8(t, wire_dtype, outliers_per_row, step_fraction)
    return message if message is not None else _raw_message(t, wire_dtype)


# --------------------------------------------------------------------------------------------------
# decode


def _expect_empty(message: stage_pb2.Tensor, codec: int) -> None:
    if message.scales or message.outlier_indices or message.outlier_values or message.rice_parameters \
            or message.low_bits:  # one expression: this runs for every tensor a stage receives
        field = next(f for f in ("scales", "outlier_indices", "outlier_values", "rice_parameters", "low_bits")
                     if getattr(message, f))
        raise WireFormatError(f"codec {stage_pb2.Codec.Name(codec)} carries no {field}, "
                              f"got {len(getattr(message, field))} bytes")
    if message.outliers_per_row or message.int8_layout:
        raise WireFormatError(f"codec {stage_pb2.Codec.Name(codec)} takes no outliers_per_row/int8_layout, "
                              f"got {message.outliers_per_row}/{message.int8_layout}")


def _checked(message: stage_pb2.Tensor, max_elements: int) -> tuple[int, tuple[int, ...], int]:
    """The codec (unspecified read as none), shape and element count of a well-formed message;
    raises WireFormatError for anything malformed."""
    if not isinstance(message, stage_pb2.Tensor):
        raise TypeError(f"decode expects a stage_pb2.Tensor, got {type(message).__name__}")
    if message.dtype not in WIRE_DTYPES:
        raise WireFormatError(f"unknown or unspecified dtype {message.dtype}; expected one of "
                              f"{', '.join(stage_pb2.DType.Name(d) for d in WIRE_DTYPES)}")
    codec = message.codec
    if codec not in _KNOWN_CODECS:
        raise WireFormatError(f"unknown codec {codec}; expected one of "
                              f"{', '.join(stage_pb2.Codec.Name(c) for c in _KNOWN_CODECS)}")
    if codec == stage_pb2.CODEC_UNSPECIFIED:
        codec = stage_pb2.CODEC_NONE
    shape = tuple(message.shape)
    if len(shape) > MAX_NDIM:
        raise WireFormatError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are accepted")
    if shape and min(shape) < 0:
        raise WireFormatError(f"negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise WireFormatError(f"tensor of shape {list(shape)} has {numel} elements; limit is {max_elements}")
    if codec in _LOSSY_CODECS and message.dtype not in FLOAT_DTYPES:
        raise WireFormatError(f"codec {stage_pb2.Codec.Name(codec)} applies to floating tensors, not "
                              f"{stage_pb2.DType.Name(message.dtype)}")
    return codec, shape, numel


def int64_values(message: stage_pb2.Tensor, *, max_elements: int = 1 << 20) -> list[int]:
    """The values of a raw int64 tensor (token ids), row-major, as Python ints, with neither torch
    nor numpy: the short path for the token ids of the coordinator's decode steps (the counterpart
    of `encode_int64`). Raises WireFormatError for anything else or anything malformed."""
    codec, _, numel = _checked(message, max_elements)
    if message.dtype != stage_pb2.DTYPE_INT64 or codec != stage_pb2.CODEC_NONE:
        raise WireFormatError(f"expected a raw int64 tensor, got {stage_pb2.DType.Name(message.dtype)} with codec "
                              f"{stage_pb2.Codec.Name(codec)}")
    _expect_empty(message, codec)
    expect_length(message.data, WIRE_DTYPES[stage_pb2.DTYPE_INT64][1], numel, "data")
    return list(struct.unpack(f"<{numel}q", message.data))


def decode(message: stage_pb2.Tensor, *, max_elements: int = 1 << 31) -> torch.Tensor:
    """Decode and validate a `stage_pb2.Tensor` into a fresh, writable CPU tensor of its logical dtype.

    Raises WireFormatError for anything malformed, including tensors of more than `max_elements`.
    """
    codec, shape, numel = _checked(message, max_elements)
    torch_dtype, raw_dtype = WIRE_DTYPES[message.dtype]
    if codec == stage_pb2.CODEC_INT8:
        return decode_int8(message, shape, numel).to(torch_dtype).reshape(shape)
    _expect_empty(message, codec)
    if codec == stage_pb2.CODEC_NONE:  # shaped in numpy, wrapped once: fewer torch calls on cold caches
        array = read(message.data, raw_dtype, numel, "data").reshape(shape)
        if message.dtype == stage_pb2.DTYPE_BOOL:
            if array.size and int(array.max()) > 1:
                raise WireFormatError("bool data holds bytes other than 0 and 1")
            return torch.from_numpy(array).view(torch.bool)
        out = torch.from_numpy(array)
        return out.view(torch.bfloat16) if message.dtype == stage_pb2.DTYPE_BFLOAT16 else out
    if codec == stage_pb2.CODEC_FP16:
        half = torch.from_numpy(read(message.data, np.dtype("<f2"), numel, "data"))
    else:  # CODEC_BF16
        half = torch.from_numpy(read(message.data, np.dtype("<i2"), numel, "data")).view(torch.bfloat16)
    return half.to(torch_dtype).reshape(shape)
