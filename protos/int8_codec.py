"""The CODEC_INT8 scheme: outlier-aware, entropy-coded quantization of floating tensors.

Owns: how a float32 matrix becomes the int8 fields of a `stage_pb2.Tensor` (outliers, per-row steps,
Rice-coded whole numbers of a step) and back, the scheme's defaults, and the validation of those
fields on decode. Does not own: the bit layout of the Rice streams (protos/rice_coding.py), the
message's dtype and shape checks, or the choice of codec (protos/codec.py).

A *row* is the last dimension (a token's hidden vector), of length N. Per row, the K largest-magnitude
values (`outliers_per_row`) are sent on the side (column index + value) and zeroed; what is left is
quantized to whole numbers of a step. Decoding multiplies back and scatters the outliers in, so every
non-outlier is off by at most half a step. The step of a row is ``INT8_STEP_FRACTION`` (1/128) of the
row's RMS after its outliers are out; the integers are zigzag mapped and Rice coded with one parameter
per row (`Tensor.int8_layout` = INT8_LAYOUT_RICE), so a value costs about log2 of its size in bits and
the step is the same over the whole row. K = N // INT8_ROW_ELEMENTS_PER_OUTLIER (4 at N = 576).
Measured on SmolLM2-135M's hidden states at the 3-stage cuts: 1.16 bytes per element, and
teacher-forced logits off by 0.012 (standard deviation) from the exact pipeline's, against 0.016 for
bf16 (2 B/elem) and 0.026 for a fixed-rate int8 code with one scale per block of 32 columns
(1.17 B/elem); see bench/codec_study.py.

Fields, all little-endian, for R rows:

- ``scales``: the R row steps, float16 when every one fits it (values are quantized with the step
  the decoder sees), else float32; `scale_dtype` says which. All finite and >= 0 (0 for an all-zero
  row);
- ``data``: the unary stream (see stage.proto), with ``rice_parameters`` (R bytes) and ``low_bits``;
- ``outlier_indices``: R*K column indices, int16 when N <= 32768 else int32, distinct within a row;
- ``outlier_values``: R*K values, float16 when they all fit it, else float32; the decoder tells which
  from the byte length (2*R*K or 4*R*K).

Every parameter is written into the message, so the decoder needs no out-of-band knowledge. Why these
choices (bench/codec_study.py, bench/wire_codecs.py): SmolLM2's hidden states reach ~25,000 in the
first token's row and ~100 in ordinary rows against a median of ~4, so a single int8 scale per row
makes steps far coarser than the typical value (1/20 greedy continuations kept). Once the largest
values are out the rest are close to Gaussian (absmax ~2.5 RMS), so a fixed-rate code cannot do much
better in 1.2 B/elem. An entropy code can: it spends bits where the values are large, so the same
bytes buy a step 2-3x finer, and few outliers are needed since a large value merely costs more bits.
Tensors whose non-outlier values are not all finite cannot be carried: `encode_int8` returns None
and the caller sends them raw.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protos import rice_coding, stage_pb2
from protos.tensor_bytes import WireFormatError, le_bytes, overflows_float16, read

__all__ = [
    "INT8_ROW_ELEMENTS_PER_OUTLIER",
    "INT8_STEP_FRACTION",
    "decode_int8",
    "default_outliers_per_row",
    "encode_int8",
]

# One outlier per this many elements of a row (576 -> 4; an int16 index and a float16 value,
# 0.03 B/elem).
INT8_ROW_ELEMENTS_PER_OUTLIER = 144
# The quantization step of a row is this fraction of the row's root mean square (after its outliers
# are taken out), so every value is off by at most 1/256 of the row's RMS.
INT8_STEP_FRACTION = 1 / 128
# Rows this long or shorter index their outliers with int16.
_INT16_INDEX_MAX_ROW = 32768
_STEP_TYPES = {stage_pb2.DTYPE_UNSPECIFIED: "<f4", stage_pb2.DTYPE_FLOAT32: "<f4", stage_pb2.DTYPE_FLOAT16: "<f2"}


def default_outliers_per_row(row_length: int) -> int:
    """How many exact outliers the int8 codec keeps per row of `row_length` elements by default."""
    return max(0, int(row_length)) // INT8_ROW_ELEMENTS_PER_OUTLIER


# --------------------------------------------------------------------------------------------------
# encode


def encode_int8(t: torch.Tensor, wire_dtype: int, outliers_per_row: int | None = None,
                step_fraction: float | None = None) -> stage_pb2.Tensor | None:
    """The CODEC_INT8 message for the non-empty floating tensor `t` (any device; `wire_dtype` is its
    `stage_pb2.DType`), or None when values beyond the outliers are not finite. None for a keyword
    means the default: `default_outliers_per_row(N)`, `INT8_STEP_FRACTION`."""
    n = t.shape[-1] if t.dim() > 0 else 1
    x = t.reshape(-1, n).to(torch.float32)  # a copy unless t already is float32
    k = default_outliers_per_row(n) if outliers_per_row is None else int(outliers_per_row)
    if k < 0:
        raise ValueError(f"outliers_per_row must be >= 0, got {k}")
    idx, values, residual = _split_outliers(x, min(k, n))
    message = _rice_message(residual, INT8_STEP_FRACTION if step_fraction is None else float(step_fraction))
    if message is None:
        return None
    message.shape[:] = t.shape
    message.dtype = wire_dtype
    message.outliers_per_row = min(k, n)
    _attach_outliers(message, idx, values, n)
    return message


def _split_outliers(x: torch.Tensor, k: int):
    """The k largest-magnitude columns of every row (ascending), their values, and x with them zeroed."""
    if not k:
        return None, None, x  # x is only read by the callers
    idx = x.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # deterministic order
    return idx, x.gather(1, idx), x.scatter(1, idx, 0.0)


def _attach_outliers(message: stage_pb2.Tensor, idx: torch.Tensor | None, values: torch.Tensor | None,
                     n: int) -> None:
    if idx is None:
        return
    narrow = n <= _INT16_INDEX_MAX_ROW
    message.outlier_indices = le_bytes(idx.to(torch.int16 if narrow else torch.int32),
                                       np.dtype("<i2" if narrow else "<i4"))
    half = values.to(torch.float16)
    if overflows_float16(values, half):
        message.outlier_values = le_bytes(values, np.dtype("<f4"))
    else:
        message.outlier_values = le_bytes(half, np.dtype("<f2"))


def _half_steps(steps: torch.Tensor) -> torch.Tensor | None:
    """`steps` as float16, or None when one of them does not fit: overflows, or a positive step
    that would become 0."""
    half = steps.to(torch.float16)
    if not bool(half.isfinite().all()) or bool(((half == 0) & (steps > 0)).any()):
        return None
    return half


def _step_fields(steps: torch.Tensor, half: torch.Tensor | None) -> dict:
    if half is not None:
        return {"scales": le_bytes(half.reshape(-1), np.dtype("<f2")), "scale_dtype": stage_pb2.DTYPE_FLOAT16}
    return {"scales": le_bytes(steps.reshape(-1), np.dtype("<f4")), "scale_dtype": stage_pb2.DTYPE_FLOAT32}


def _rice_message(residual: torch.Tensor, step_fraction: float) -> stage_pb2.Tensor | None:
    if not (math.isfinite(step_fraction) and step_fraction > 0):
        raise ValueError(f"step_fraction must be a positive number, got {step_fraction}")
    rms = residual.pow(2).mean(dim=1, keepdim=True).sqrt_()
    steps = rms * step_fraction
    if not bool(steps.isfinite().all()):
        return None  # inf/nan beyond the outliers: the caller sends the tensor raw
    half = _half_steps(steps)
    if half is not None:
        steps = half.to(torch.float32)  # quantize with exactly the step the decoder will see
    q = (residual / torch.where(steps > 0, steps, 1.0)).round_().to(torch.int64)  # all-zero rows stay 0
    zigzag = torch.where(q >= 0, 2 * q, -2 * q - 1)
    parameters, unary, low = rice_coding.encode_rows(zigzag.cpu().numpy())
    return stage_pb2.Tensor(codec=stage_pb2.CODEC_INT8, int8_layout=stage_pb2.INT8_LAYOUT_RICE, data=unary,
                            rice_parameters=parameters, low_bits=low, **_step_fields(steps, half))


# --------------------------------------------------------------------------------------------------
# decode


def decode_int8(message: stage_pb2.Tensor, shape: tuple[int, ...], numel: int) -> torch.Tensor:
    """The float32 values of a CODEC_INT8 message whose dtype and `shape` (of `numel` elements) are
    already checked, as a fresh CPU tensor; raises WireFormatError for malformed int8 fields."""
    n = shape[-1] if shape else 1
    rows = numel // n if n else 0
    k = int(message.outliers_per_row)
    if k > n:
        raise WireFormatError(f"outliers_per_row {k} exceeds the row length {n}")
    if message.scale_dtype not in _STEP_TYPES:
        raise WireFormatError(f"int8 scale_dtype must be float16 or float32, got {message.scale_dtype}")
    step_type = np.dtype(_STEP_TYPES[message.scale_dtype])
    if message.int8_layout != stage_pb2.INT8_LAYOUT_RICE:
        raise WireFormatError(f"unknown int8 layout {message.int8_layout}; expected "
                              f"{stage_pb2.INT8_LAYOUT_RICE} (rice)")
    x = _decode_rice(message, rows, n, step_type)
    if numel == 0:
        if message.outlier_indices or message.outlier_values:
            raise WireFormatError("an empty tensor carries no outliers")
        return torch.empty(shape, dtype=torch.float32)
    _scatter_outliers(x, message, rows, n, k)
    return x


def _read_steps(buf: bytes, step_type: np.dtype, count: int, what: str) -> np.ndarray:
    steps = read(buf, step_type, count, what, as_type=np.dtype(np.float32))
    if not np.isfinite(steps).all() or (steps < 0).any():
        raise WireFormatError(f"{what} must be finite and >= 0")
    return steps


def _decode_rice(message: stage_pb2.Tensor, rows: int, n: int, step_type: np.dtype) -> torch.Tensor:
    steps = _read_steps(message.scales, step_type, rows, "steps (scales)")
    try:
        zigzag = rice_coding.decode_rows(message.rice_parameters, message.data, message.low_bits, rows, n)
    except rice_coding.RiceFormatError as err:
        raise WireFormatError(str(err)) from None
    q = np.where(zigzag & 1, -((zigzag + 1) >> 1), zigzag >> 1)
    return torch.from_numpy(q.astype(np.float32) * steps.reshape(rows, 1))


def _scatter_outliers(x: torch.Tensor, message: stage_pb2.Tensor, rows: int, n: int, k: int) -> None:
    count = rows * k
    if count == 0:
        if message.outlier_indices or message.outlier_values:
            raise WireFormatError("outliers_per_row is 0 but outlier fields are not empty")
        return
    index_dtype = np.dtype("<i2") if n <= _INT16_INDEX_MAX_ROW else np.dtype("<i4")
    idx = read(message.outlier_indices, index_dtype, count, "outlier_indices").reshape(rows, k)
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise WireFormatError(f"outlier index out of range [0, {n}): "
                              f"min {int(idx.min())}, max {int(idx.max())}")
    if k > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        raise WireFormatError("duplicate outlier index within a row")
    nbytes = len(message.outlier_values)
    if nbytes == 2 * count:
        values = torch.from_numpy(read(message.outlier_values, np.dtype("<f2"), count, "outlier_values"))
    elif nbytes == 4 * count:
        values = torch.from_numpy(read(message.outlier_values, np.dtype("<f4"), count, "outlier_values"))
    else:
        raise WireFormatError(f"outlier_values holds {nbytes} bytes; expected {2 * count} (float16) or "
                              f"{4 * count} (float32) for {count} outliers")
    x.scatter_(1, torch.from_numpy(idx).to(torch.int64), values.view(rows, k).to(torch.float32))
