"""protos.codec: codec names, exact round trips, the fp16/bf16 codecs, rejection of malformed
messages, and the raw int64 short paths. The int8 scheme has its own tests (test_int8_codec.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from wire_tensors import BF16, FLOAT_DTYPES, FP16, INT8, NONE, rejects, roundtrip, sample, wire

from protos import codec, stage_pb2
from protos.codec import WireFormatError, decode, encode, payload_bytes

ALL_CODECS = [stage_pb2.CODEC_UNSPECIFIED, NONE, FP16, BF16, INT8]
SHAPES = [(7,), (5, 40), (2, 3, 96), ()]


# --------------------------------------------------------------------------------------------------
# names


def test_codec_names():
    assert codec.CODEC_NAMES == {"none": NONE, "fp16": FP16, "bf16": BF16, "int8": INT8}
    for name, value in codec.CODEC_NAMES.items():
        assert codec.codec_from_name(name) == value
        assert codec.codec_from_name(name.upper()) == value


def test_unknown_codec_name_lists_choices():
    with pytest.raises(ValueError, match="none, fp16, bf16, int8"):
        codec.codec_from_name("int4")


# --------------------------------------------------------------------------------------------------
# exact round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", SHAPES)
def test_none_roundtrip_is_exact(dtype, shape):
    x = sample(dtype, shape)
    message, y = roundtrip(x, NONE)
    assert message.codec == NONE
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert payload_bytes(message) == x.numel() * itemsize


def test_raw_bytes_are_little_endian_row_major():
    x = torch.tensor([[1, 2], [3, 258]], dtype=torch.int32)
    assert encode(x).data == np.array([1, 2, 3, 258], dtype="<i4").tobytes()
    b = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert encode(b).data == b.view(torch.int16).numpy().astype("<i2").tobytes()


def test_unspecified_codec_reads_as_none():
    x = sample(torch.float32, (3, 4))
    message = encode(x)
    message.codec = stage_pb2.CODEC_UNSPECIFIED
    assert torch.equal(decode(wire(message)), x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("codec_value", [FP16, BF16, INT8])
def test_non_float_tensors_fall_back_to_raw(dtype, codec_value):
    x = sample(dtype, (4, 33))
    message, y = roundtrip(x, codec_value)
    assert message.codec == NONE
    assert not message.scales and not message.outlier_indices and not message.outlier_values
    assert y.dtype == dtype and torch.equal(y, x)


@pytest.mark.parametrize("codec_value", ALL_CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(0,), (0, 576), (3, 0), (2, 0, 8)])
def test_zero_size_tensors(codec_value, dtype, shape):
    x = torch.zeros(shape, dtype=dtype)
    message, y = roundtrip(x, codec_value)
    assert y.shape == x.shape and y.dtype == dtype
    assert payload_bytes(message) == 0


def test_decoded_tensor_is_writable_and_independent_of_the_message():
    x = sample(torch.float32, (4, 8))
    message = wire(encode(x))
    data = bytes(message.data)
    y = decode(message)
    y += 1  # would fail or warn on a read-only buffer
    assert message.data == data
    assert torch.equal(decode(message), x)


def test_noncontiguous_and_grad_inputs():
    base = torch.randn(6, 10, requires_grad=True)
    x = base.t()[2:]  # non-contiguous view of a tensor that requires grad
    for codec_value in ALL_CODECS:
        _, y = roundtrip(x, codec_value)
        assert y.shape == x.shape
    _, y = roundtrip(x, NONE)
    assert torch.equal(y, x.detach())


def test_encode_rejects_unsupported_inputs():
    with pytest.raises(ValueError, match="float64"):
        encode(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown codec"):
        encode(torch.zeros(3), 42)
    with pytest.raises(TypeError):
        encode(np.zeros(3))


# --------------------------------------------------------------------------------------------------
# fp16 / bf16


@pytest.mark.parametrize("codec_value, relative", [(FP16, 2.0 ** -11), (BF16, 2.0 ** -8)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_half_codecs_bounded_relative_error(codec_value, relative, dtype, shape):
    x = sample(dtype, shape) + 0.5  # keep values clear of fp16's subnormal range
    message, y = roundtrip(x, codec_value)
    assert message.codec == codec_value
    assert y.dtype == dtype and y.shape == x.shape
    assert payload_bytes(message) == 2 * x.numel()
    # Rounding to the wire type, then (for a narrower original) rounding back to it.
    own = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11 if dtype == torch.float16 else 0.0
    err = (y.float() - x.float()).abs()
    assert bool((err <= x.float().abs() * (relative + own) * (1 + 1e-6)).all())


def test_fp16_overflow_falls_back_to_raw():
    x = torch.tensor([[1.0, 70000.0, -3.0]])
    message, y = roundtrip(x, FP16)
    assert message.codec == NONE
    assert torch.equal(y, x)


def test_bf16_keeps_large_values():
    x = torch.tensor([[1.0, 1e30, -3e5]])
    message, y = roundtrip(x, BF16)
    assert message.codec == BF16
    assert bool(((y - x).abs() <= x.abs() * 2.0 ** -8).all())


# --------------------------------------------------------------------------------------------------
# malformed messages


def test_wire_format_error_is_a_value_error():
    assert issubclass(WireFormatError, ValueError)


@pytest.mark.parametrize("codec_value", [NONE, FP16, BF16, INT8])
def test_truncated_data(codec_value):
    message = wire(encode(sample(torch.float32, (4, 8)), codec_value))
    message.data = message.data[:-1]
    rejects(message, "data holds|unary stream")  # the latter: int8's Rice layout


@pytest.mark.parametrize("codec_value", [NONE, FP16, BF16, INT8])
def test_shape_inconsistent_with_data(codec_value):
    message = wire(encode(sample(torch.float32, (4, 8)), codec_value))
    del message.shape[:]
    message.shape.extend([4, 9])
    rejects(message, "expected|needs")


def test_negative_dimension():
    message = wire(encode(torch.zeros(0, 3)))
    message.shape[0] = -1
    rejects(message, "negative dimension")


def test_too_many_elements_rejected_before_allocating():
    message = stage_pb2.Tensor(shape=[1 << 20, 1 << 20], dtype=stage_pb2.DTYPE_FLOAT32, codec=NONE)
    rejects(message, "limit")
    message = wire(encode(torch.zeros(10, 10)))
    rejects(message, "100 elements; limit is 99", max_elements=99)
    assert decode(message, max_elements=100).shape == (10, 10)


def test_too_many_dimensions():
    message = stage_pb2.Tensor(shape=[1] * (codec.MAX_NDIM + 1), dtype=stage_pb2.DTYPE_FLOAT32, codec=NONE,
                               data=b"\0" * 4)
    rejects(message, "dimensions")


@pytest.mark.parametrize("dtype_value", [stage_pb2.DTYPE_UNSPECIFIED, 99, -1])
def test_bad_dtype_enum(dtype_value):
    message = wire(encode(torch.zeros(2)))
    message.dtype = dtype_value
    rejects(message, "dtype")


@pytest.mark.parametrize("codec_value", [5, 99, -3])
def test_bad_codec_enum(codec_value):
    message = wire(encode(torch.zeros(2)))
    message.codec = codec_value
    rejects(message, "unknown codec")


@pytest.mark.parametrize("codec_value", [FP16, BF16, INT8])
def test_lossy_codec_on_integer_dtype(codec_value):
    message = wire(encode(torch.arange(4)))
    message.codec = codec_value
    rejects(message, "floating")


def test_side_data_on_raw_codecs():
    for codec_value in (NONE, FP16, BF16):
        message = wire(encode(torch.zeros(2, 4), codec_value))
        message.scales = b"\0" * 8
        rejects(message, "scales")
        message = wire(encode(torch.zeros(2, 4), codec_value))
        message.outliers_per_row = 1
        rejects(message, "outliers_per_row")


def test_invalid_bool_bytes():
    message = wire(encode(torch.tensor([True, False])))
    message.data = b"\x01\x02"
    rejects(message, "bool")


def test_int64_short_paths_round_trip_without_torch_and_refuse_anything_else():
    ids = np.array([[7], [-3], [2**40]], dtype=np.int64)
    message = codec.encode_int64(ids)
    assert decode(message).tolist() == ids.tolist()  # the general path reads it alike
    assert codec.int64_values(message) == [7, -3, 2**40]
    assert codec.int64_values(encode(torch.tensor([[1, 2]]))) == [1, 2]
    for other in (encode(torch.tensor([1.5])), encode(torch.tensor([1], dtype=torch.int32))):
        with pytest.raises(WireFormatError, match="expected a raw int64 tensor"):
            codec.int64_values(other)
    short = stage_pb2.Tensor(shape=[2, 1], dtype=stage_pb2.DTYPE_INT64, data=b"\0" * 8)
    with pytest.raises(WireFormatError, match="holds 8 bytes"):
        codec.int64_values(short)
    with pytest.raises(WireFormatError, match="elements"):
        codec.int64_values(message, max_elements=2)
