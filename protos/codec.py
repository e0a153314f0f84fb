"""Tensor <-> `stage_pb2.Tensor` wire codec.

Owns: turning a CPU/GPU `torch.Tensor` into a self-describing `stage_pb2.Tensor` message and back,
the byte layouts of every `Codec`, the validation of untrusted messages (`WireFormatError`), and the
int8 scheme's fixed defaults. Does not own: which codec a hop uses (the coordinator asks for one per
request), moving tensors to a device after decoding (`decode` returns CPU tensors), compression of
whole messages (gRPC does that), or anything about models and sessions.

Never uses pickle or `torch.save`: every payload is raw little-endian bytes, row-major.

Codecs (`Tensor.codec`; `CODEC_UNSPECIFIED` reads as `CODEC_NONE`):

* NONE: the tensor's own dtype, bit exact. Used for every non-floating tensor whatever was asked.
* FP16 / BF16: floating tensors cast to half / bfloat16 (2 B/elem). FP16 overflows above 65504, so
  a tensor holding a finite value fp16 cannot hold is sent raw (NONE) instead of turning it into inf.
* INT8: the ~1 byte per element tier, for floating tensors. A *row* is the last dimension (a token's
  hidden vector), of length N. Per row, the K largest-magnitude values (`outliers_per_row`) are sent
  on the side (column index + value) and zeroed; what is left is quantized to whole numbers of a
  step. Decoding multiplies back and scatters the outliers in, so every non-outlier is off by at most
  half a step. The step of a row is ``INT8_STEP_FRACTION`` (1/128) of the row's RMS after its
  outliers are out; the integers are zigzag mapped and Rice coded with one parameter per row
  (protos/rice_coding.py, `Tensor.int8_layout` = INT8_LAYOUT_RICE), so a value costs about log2 of
  its size in bits and the step is the same over the whole row. K = N //
  INT8_ROW_ELEMENTS_PER_OUTLIER (4 at N = 576). Measured on SmolLM2-135M's hidden states at the
  3-stage cuts: 1.16 bytes per element, and teacher-forced logits off by 0.012 (standard deviation)
  from the exact pipeline's, against 0.016 for bf16 (2 B/elem) and 0.026 for a fixed-rate int8 code
  with one scale per block of 32 columns (1.17 B/elem); see bench/codec_study.py.

  Fields, all little-endian, for R rows:

  - ``scales``: the R row steps, float16 when every one fits it (values are quantized with the
    step the decoder sees), else float32; `scale_dtype` says which. All finite and >= 0 (0 for an
    all-zero row);
  - ``data``: the unary stream (see stage.proto), with ``rice_parameters`` (R bytes) and ``low_bits``;
  - ``outlier_indices``: R*K column indices, int16 when N <= 32768 else int32, distinct within a row;
  - ``outlier_values``: R*K values, float16 when they all fit it, else float32; the decoder tells
    which from the byte length (2*R*K or 4*R*K).

  Every parameter is written into the message, so the decoder needs no out-of-band knowledge.
  Why these choices (bench/codec_study.py, bench/wire_codecs.py): SmolLM2's hidden states reach
  ~25,000 in the first token's row and ~100 in ordinary rows against a median of ~4, so a single
  int8 scale per row makes steps far coarser than the typical value (1/20 greedy continuations kept).
  Once the largest values are out the rest are close to Gaussian (absmax ~2.5 RMS), so a fixed-rate
  code cannot do much better in 1.2 B/elem. An entropy code can: it spends bits where the values are
  large, so the same bytes buy a step 2-3x finer, and few outliers are needed since a large value
  merely costs more bits.
  Empty tensors, and tensors whose non-outlier values are not all finite, are sent raw (NONE).

The decoded tensor always has the message's logical dtype (`Tensor.dtype`): a float32 tensor sent as
FP16 or INT8 comes back float32, a bfloat16 one comes back bfloat16.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from protos import rice_coding, stage_pb2

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
    "payload_bytes",
]


class WireFormatError(ValueError):
    """A `stage_pb2.Tensor` that is malformed or inconsistent; the message says what is wrong."""


CODEC_NAMES: dict[str, int] = {
    "none": stage_pb2.CODEC_NONE,
    "fp16": stage_pb2.CODEC_FP16,
    "bf16": stage_pb2.CODEC_BF16,
    "int8": stage_pb2.CODEC_INT8,
}

# int8: one outlier per this many elements of a row (576 -> 4; an int16 index and a float16 value,
# 0.03 B/elem).
INT8_ROW_ELEMENTS_PER_OUTLIER = 144
# int8: the quantization step of a row is this fraction of the row's root mean square (after its
# outliers are taken out), so every value is off by at most 1/256 of the row's RMS.
INT8_STEP_FRACTION = 1 / 128
# Rows this long or shorter index their outliers with int16.
_INT16_INDEX_MAX_ROW = 32768
# Deepest tensor shape accepted on decode (a sanity bound, far above anything layerline sends).
MAX_NDIM = 16

# DType -> (torch dtype, little-endian numpy dtype of the raw bytes). bfloat16 travels as int16 bits.
_WIRE_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    stage_pb2.DTYPE_FLOAT32: (torch.float32, np.dtype("<f4")),
    stage_pb2.DTYPE_FLOAT16: (torch.float16, np.dtype("<f2")),
    stage_pb2.DTYPE_BFLOAT16: (torch.bfloat16, np.dtype("<i2")),
    stage_pb2.DTYPE_INT64: (torch.int64, np.dtype("<i8")),
    stage_pb2.DTYPE_INT32: (torch.int32, np.dtype("<i4")),
    stage_pb2.DTYPE_INT8: (torch.int8, np.dtype("i1")),
    stage_pb2.DTYPE_UINT8: (torch.uint8, np.dtype("u1")),
    stage_pb2.DTYPE_BOOL: (torch.bool, np.dtype("u1")),
}
_TORCH_TO_WIRE: dict[torch.dtype, int] = {t: d for d, (t, _) in _WIRE_DTYPES.items()}
_FLOAT_DTYPES = (stage_pb2.DTYPE_FLOAT32, stage_pb2.DTYPE_FLOAT16, stage_pb2.DTYPE_BFLOAT16)
_LOSSY_CODECS = (stage_pb2.CODEC_FP16, stage_pb2.CODEC_BF16, stage_pb2.CODEC_INT8)
_KNOWN_CODECS = (stage_pb2.CODEC_UNSPECIFIED, stage_pb2.CODEC_NONE, *_LOSSY_CODECS)


def codec_from_name(name: str) -> int:
    """The `stage_pb2.Codec` value for a name such as "int8" (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    return CODEC_NAMES[key]


def default_outliers_per_row(row_length: int) -> int:
    """How many exact outliers the int8 codec keeps per row of `row_length` elements by default."""
    return max(0, int(row_length)) // INT8_ROW_ELEMENTS_PER_OUTLIER


def payload_bytes(message: stage_pb2.Tensor) -> int:
    """Bytes of tensor payload a message carries: data, scales and outlier fields (no framing).

    Costs about one copy of the payload: the upb protobuf runtime hands out a fresh `bytes` for
    every read of a bytes field (and `ByteSize()` serializes, which is slower still).
    """
    return (len(message.data) + len(message.scales) + len(message.outlier_indices)
            + len(message.outlier_values) + len(message.rice_parameters) + len(message.low_bits))


# --------------------------------------------------------------------------------------------------
# encode


def _le_bytes(t: torch.Tensor, le: np.dtype) -> bytes:
    """Row-major bytes of tensor `t` (any device, numpy-compatible dtype) as little-endian `le`."""
    return t.detach().contiguous().cpu().numpy().astype(le, copy=False).tobytes()


def _raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor of a supported dtype."""
    if t.dtype == torch.bfloat16:
        return _le_bytes(t.view(torch.int16), np.dtype("<i2"))
    if t.dtype == torch.bool:
        return _le_bytes(t.view(torch.uint8), np.dtype("u1"))
    return _le_bytes(t, _WIRE_DTYPES[_TORCH_TO_WIRE[t.dtype]][1])


def _overflowed(source: torch.Tensor, half: torch.Tensor) -> bool:
    """Whether casting `source` to float16 (giving `half`) turned a finite value into an infinity."""
    infinite = half.isinf()
    return bool(infinite.any()) and bool((infinite & source.isfinite()).any())


def _raw_message(t: torch.Tensor, wire_dtype: int) -> stage_pb2.Tensor:
    return stage_pb2.Tensor(shape=t.shape, dtype=wire_dtype, codec=stage_pb2.CODEC_NONE, data=_raw_bytes(t))


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
    wire_dtype = _TORCH_TO_WIRE.get(tensor.dtype)
    if wire_dtype is None:
        supported = ", ".join(str(t).removeprefix("torch.") for t in _TORCH_TO_WIRE)
        raise ValueError(f"cannot encode a {tensor.dtype} tensor; supported dtypes: {supported}")
    t = tensor.detach().contiguous()  # the lossy codecs compute on t's device; only bytes come back

    if codec not in _LOSSY_CODECS or wire_dtype not in _FLOAT_DTYPES or t.numel() == 0:
        return _raw_message(t, wire_dtype)
    if codec == stage_pb2.CODEC_FP16:
        half = t.to(torch.float16)
        if t.dtype != torch.float16 and _overflowed(t, half):
            return _raw_message(t, wire_dtype)  # would overflow fp16: send it exactly instead
        return stage_pb2.Tensor(shape=t.shape, dtype=wire_dtype, codec=codec, data=_raw_bytes(half))
    if codec == stage_pb2.CODEC_BF16:
        return stage_pb2.Tensor(shape=t.shape, dtype=wire_dtype, codec=codec,
                                data=_raw_bytes(t.to(torch.bfloat16)))
    message = _encode_int8(t, wire_dtype, outliers_per_row, step_fraction)
    return message if message is not None else _raw_message(t, wire_dtype)


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
    message.outlier_indices = _le_bytes(idx.to(torch.int16 if narrow else torch.int32),
                                        np.dtype("<i2" if narrow else "<i4"))
    half = values.to(torch.float16)
    if _overflowed(values, half):
        message.outlier_values = _le_bytes(values, np.dtype("<f4"))
    else:
        message.outlier_values = _le_bytes(half, np.dtype("<f2"))


def _half_scales(scales: torch.Tensor) -> torch.Tensor | None:
    """`scales` as float16, or None when one of them does not fit: overflows, or a positive scale
    that would become 0."""
    half = scales.to(torch.float16)
    if not bool(half.isfinite().all()) or bool(((half == 0) & (scales > 0)).any()):
        return None
    return half


def _scale_fields(scales: torch.Tensor, half: torch.Tensor | None) -> dict:
    if half is not None:
        return {"scales": _le_bytes(half.reshape(-1), np.dtype("<f2")), "scale_dtype": stage_pb2.DTYPE_FLOAT16}
    return {"scales": _le_bytes(scales.reshape(-1), np.dtype("<f4")), "scale_dtype": stage_pb2.DTYPE_FLOAT32}


def _encode_int8(t: torch.Tensor, wire_dtype: int, outliers_per_row: int | None,
                 step_fraction: float | None) -> stage_pb2.Tensor | None:
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


def _rice_message(residual: torch.Tensor, step_fraction: float) -> stage_pb2.Tensor | None:
    if not (math.isfinite(step_fraction) and step_fraction > 0):
        raise ValueError(f"step_fraction must be a positive number, got {step_fraction}")
    rms = residual.pow(2).mean(dim=1, keepdim=True).sqrt_()
    steps = rms * step_fraction
    if not bool(steps.isfinite().all()):
        return None  # inf/nan beyond the outliers: the caller sends the tensor raw
    half = _half_scales(steps)
    if half is not None:
        steps = half.to(torch.float32)  # quantize with exactly the step the decoder will see
    q = (residual / torch.where(steps > 0, steps, 1.0)).round_().to(torch.int64)  # all-zero rows stay 0
    zigzag = torch.where(q >= 0, 2 * q, -2 * q - 1)
    parameters, unary, low = rice_coding.encode_rows(zigzag.cpu().numpy())
    return stage_pb2.Tensor(codec=stage_pb2.CODEC_INT8, int8_layout=stage_pb2.INT8_LAYOUT_RICE, data=unary,
                            rice_parameters=parameters, low_bits=low, **_scale_fields(steps, half))


# --------------------------------------------------------------------------------------------------
# decode


def _expect_length(buf: bytes, le: np.dtype, count: int, what: str) -> None:
    expected = count * le.itemsize
    if len(buf) != expected:
        raise WireFormatError(f"{what} holds {len(buf)} bytes; expected {expected} "
                              f"({count} x {le.itemsize}-byte {le.name})")


def _read(buf: bytes, le: np.dtype, count: int, what: str, as_type: np.dtype | None = None) -> np.ndarray:
    """`count` little-endian items of `le` from `buf`, as a writable native-order array (a copy,
    converted to `as_type` if given): torch must not wrap the read-only protobuf buffer."""
    _expect_length(buf, le, count, what)
    native = le.newbyteorder("=") if as_type is None else as_type
    return np.frombuffer(buf, dtype=le).astype(native, copy=True)


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
    if message.dtype not in _WIRE_DTYPES:
        raise WireFormatError(f"unknown or unspecified dtype {message.dtype}; expected one of "
                              f"{', '.join(stage_pb2.DType.Name(d) for d in _WIRE_DTYPES)}")
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
    if codec in _LOSSY_CODECS and message.dtype not in _FLOAT_DTYPES:
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
    _expect_length(message.data, _WIRE_DTYPES[stage_pb2.DTYPE_INT64][1], numel, "data")
    return list(struct.unpack(f"<{numel}q", message.data))


def decode(message: stage_pb2.Tensor, *, max_elements: int = 1 << 31) -> torch.Tensor:
    """Decode and validate a `stage_pb2.Tensor` into a fresh, writable CPU tensor of its logical dtype.

    Raises WireFormatError for anything malformed, including tensors of more than `max_elements`.
    """
    codec, shape, numel = _checked(message, max_elements)
    torch_dtype, raw_dtype = _WIRE_DTYPES[message.dtype]
    if codec == stage_pb2.CODEC_INT8:
        return _decode_int8(message, shape, numel).to(torch_dtype).reshape(shape)
    _expect_empty(message, codec)
    if codec == stage_pb2.CODEC_NONE:  # shaped in numpy, wrapped once: fewer torch calls on cold caches
        array = _read(message.data, raw_dtype, numel, "data").reshape(shape)
        if message.dtype == stage_pb2.DTYPE_BOOL:
            if array.size and int(array.max()) > 1:
                raise WireFormatError("bool data holds bytes other than 0 and 1")
            return torch.from_numpy(array).view(torch.bool)
        out = torch.from_numpy(array)
        return out.view(torch.bfloat16) if message.dtype == stage_pb2.DTYPE_BFLOAT16 else out
    if codec == stage_pb2.CODEC_FP16:
        half = torch.from_numpy(_read(message.data, np.dtype("<f2"), numel, "data"))
    else:  # CODEC_BF16
        half = torch.from_numpy(_read(message.data, np.dtype("<i2"), numel, "data")).view(torch.bfloat16)
    return half.to(torch_dtype).reshape(shape)


def _decode_int8(message: stage_pb2.Tensor, shape: tuple[int, ...], numel: int) -> torch.Tensor:
    n = shape[-1] if shape else 1
    rows = numel // n if n else 0
    k = int(message.outliers_per_row)
    if k > n:
        raise WireFormatError(f"outliers_per_row {k} exceeds the row length {n}")
    scale_types = {stage_pb2.DTYPE_UNSPECIFIED: "<f4", stage_pb2.DTYPE_FLOAT32: "<f4", stage_pb2.DTYPE_FLOAT16: "<f2"}
    if message.scale_dtype not in scale_types:
        raise WireFormatError(f"int8 scale_dtype must be float16 or float32, got {message.scale_dtype}")
    scale_type = np.dtype(scale_types[message.scale_dtype])
    if message.int8_layout != stage_pb2.INT8_LAYOUT_RICE:
        raise WireFormatError(f"unknown int8 layout {message.int8_layout}; expected "
                              f"{stage_pb2.INT8_LAYOUT_RICE} (rice)")
    x = _decode_rice(message, rows, n, scale_type)
    if numel == 0:
        if message.outlier_indices or message.outlier_values:
            raise WireFormatError("an empty tensor carries no outliers")
        return torch.empty(shape, dtype=torch.float32)
    _scatter_outliers(x, message, rows, n, k)
    return x


def _read_scales(buf: bytes, scale_type: np.dtype, count: int, what: str) -> np.ndarray:
    scales = _read(buf, scale_type, count, what, as_type=np.dtype(np.float32))
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise WireFormatError(f"{what} must be finite and >= 0")
    return scales


def _decode_rice(message: stage_pb2.Tensor, rows: int, n: int, scale_type: np.dtype) -> torch.Tensor:
    steps = _read_scales(message.scales, scale_type, rows, "steps (scales)")
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
    idx = _read(message.outlier_indices, index_dtype, count, "outlier_indices").reshape(rows, k)
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise WireFormatError(f"outlier index out of range [0, {n}): "
                              f"min {int(idx.min())}, max {int(idx.max())}")
    if k > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        raise WireFormatError("duplicate outlier index within a row")
    nbytes = len(message.outlier_values)
    if nbytes == 2 * count:
        values = torch.from_numpy(_read(message.outlier_values, np.dtype("<f2"), count, "outlier_values"))
    elif nbytes == 4 * count:
        values = torch.from_numpy(_read(message.outlier_values, np.dtype("<f4"), count, "outlier_values"))
    else:
        raise WireFormatError(f"outlier_values holds {nbytes} bytes; expected {2 * count} (float16) or "
                              f"{4 * count} (float32) for {count} outliers")
    x.scatter_(1, torch.from_numpy(idx).to(torch.int64), values.view(rows, k).to(torch.float32))
