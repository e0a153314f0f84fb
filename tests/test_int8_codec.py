"""protos.int8_codec through protos.codec: error bounds of the int8 scheme, its defaults and byte
budget, outliers, non-finite values, and rejection of malformed int8 fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from wire_tensors import BF16, FLOAT_DTYPES, FP16, INT8, NONE, rejects, roundtrip, sample, wire

from protos import codec, stage_pb2
from protos.codec import decode, encode, payload_bytes

RICE = stage_pb2.INT8_LAYOUT_RICE


def hidden_with_outliers(rows: int = 64, width: int = 576, seed: int = 0) -> torch.Tensor:
    """Like SmolLM2's hidden states: ~N(0, 4) with a few channels thousands of times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 4
    for channel, size in [(17, 22453.0), (230, -9000.0), (401, 3100.0), (555, 800.0)]:
        x[:, channel] = size * (1 + 0.1 * torch.rand(rows, generator=g))
    return x


def int8_error_bounds(message: stage_pb2.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-element error bound of the int8 scheme, derived from the message's own side data.

    Non-outliers: half a quantization step, the row's step being INT8_STEP_FRACTION (or what the
    test asked for) of the row's RMS. Outliers: float16 rounding (2**-11 relative) or exact when
    sent as float32.
    """
    n = original.shape[-1] if original.dim() else 1
    x = original.reshape(-1, n).float()
    rows, k = x.shape[0], message.outliers_per_row
    outlier = torch.zeros_like(x, dtype=torch.bool)
    if k:
        idx_dtype = "<i2" if n <= 32768 else "<i4"
        idx = torch.from_numpy(np.frombuffer(message.outlier_indices, idx_dtype).astype(np.int64))
        outlier.scatter_(1, idx.view(rows, k), True)
    scale_type = "<f2" if message.scale_dtype == stage_pb2.DTYPE_FLOAT16 else "<f4"
    sent = torch.from_numpy(np.frombuffer(message.scales, scale_type).astype(np.float32))
    bound = (sent.view(rows, 1) / 2 * (1 + 1e-5) + 1e-30).expand_as(x)
    fp16_outliers = len(message.outlier_values) == 2 * rows * k
    outlier_bound = x.abs() * (2.0 ** -11) if fp16_outliers else torch.zeros_like(x)
    return torch.where(outlier, outlier_bound, bound).reshape(original.shape)


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(7,), (5, 40), (2, 3, 96), (3, 576), ()])
@pytest.mark.parametrize("params", [{}, {"outliers_per_row": 0}, {"outliers_per_row": 5, "step_fraction": 0.3}])
def test_int8_error_within_scheme_bound(dtype, shape, params):
    x = sample(dtype, shape, seed=3)
    message, y = roundtrip(x, INT8, **params)
    assert message.codec == INT8
    assert y.dtype == dtype and y.shape == x.shape
    # the decoded value is then rounded to the original dtype
    own = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11 if dtype == torch.float16 else 0.0
    bound = int8_error_bounds(message, x) + y.float().abs() * own
    assert bool(((y.float() - x.float()).abs() <= bound).all())


def test_int8_defaults_are_in_the_message():
    x = hidden_with_outliers(rows=4, width=576)
    message = encode(x, INT8)
    assert message.int8_layout == RICE
    assert message.outliers_per_row == codec.default_outliers_per_row(576) == 576 // 144
    assert len(message.rice_parameters) == 4
    assert message.scale_dtype == stage_pb2.DTYPE_FLOAT16 and len(message.scales) == 2 * 4  # a step per row
    k = message.outliers_per_row
    assert len(message.outlier_indices) == 2 * 4 * k  # int16: rows shorter than 32768
    assert len(message.outlier_values) == 2 * 4 * k  # float16: every outlier fits
    # the step is INT8_STEP_FRACTION of the row's RMS once its outliers are out
    steps = np.frombuffer(message.scales, "<f2").astype(np.float32)
    outlier = torch.zeros_like(x, dtype=torch.bool)
    outlier.scatter_(1, torch.from_numpy(np.frombuffer(message.outlier_indices, "<i2").astype(np.int64)).view(4, -1),
                     True)
    rms = x.masked_fill(outlier, 0).pow(2).mean(dim=1).sqrt().numpy()
    assert np.allclose(steps, rms * codec.INT8_STEP_FRACTION, rtol=2.0 ** -10)


def test_int8_bytes_per_element_budget():
    x = hidden_with_outliers(rows=32, width=576)
    message = encode(x, INT8)
    assert payload_bytes(message) / x.numel() <= 1.2
    assert payload_bytes(message) == sum(len(getattr(message, f)) for f in (
        "data", "scales", "outlier_indices", "outlier_values", "rice_parameters", "low_bits"))


def outlier_rows_error(params: dict) -> float:
    """Worst int8 error on the ordinary channels of rows holding huge outliers, relative to their size."""
    x = hidden_with_outliers()
    _, y = roundtrip(x, INT8, **params)
    normal = torch.ones(x.shape[1], dtype=torch.bool)
    normal[[17, 230, 401, 555]] = False
    typical = x[:, normal].abs().max()
    return float((y - x)[:, normal].abs().max() / typical)


def test_int8_survives_huge_outliers():
    # Half a step fit to the ordinary values: 1/160 of their RMS.
    assert outlier_rows_error({}) <= 1 / 200
    x = hidden_with_outliers()
    _, y = roundtrip(x, INT8)
    outliers = x[:, [17, 230, 401, 555]]
    assert bool(((y[:, [17, 230, 401, 555]] - outliers).abs() <= outliers.abs() * 2.0 ** -11).all())


def test_int8_without_outliers_would_fail_the_outlier_test():
    # A step per row fit to the RMS of a row with huge values in it is far too coarse.
    assert outlier_rows_error({"outliers_per_row": 0}) > 0.1


def test_int8_rows_of_zeros_and_constant_rows():
    x = torch.zeros(3, 50)
    x[1] = 2.5
    x[2, 7] = -1e4
    message, y = roundtrip(x, INT8, outliers_per_row=1)
    assert torch.equal(y[0], torch.zeros(50))
    assert torch.equal(y[2], x[2])  # the outlier is exact in fp16 (-10000) and the rest are zeros
    assert torch.allclose(y[1], x[1], rtol=0, atol=2.5 * codec.INT8_STEP_FRACTION / 2 * (1 + 2.0 ** -10))
    assert np.frombuffer(message.scales, "<f2")[[0, 2]].tolist() == [0.0, 0.0]


def test_int8_outliers_beyond_fp16_are_sent_as_float32():
    x = sample(torch.float32, (3, 64))
    x[1, 9] = 1e6
    message, y = roundtrip(x, INT8, outliers_per_row=2)
    assert len(message.outlier_values) == 4 * 3 * 2
    assert y[1, 9] == 1e6
    assert bool(((y - x).abs() <= int8_error_bounds(message, x)).all())


def test_int8_long_rows_use_int32_indices():
    x = sample(torch.float32, (2, 40000))
    x[0, 39999] = 5000.0
    message, y = roundtrip(x, INT8, outliers_per_row=3)
    assert len(message.outlier_indices) == 4 * 2 * 3
    assert y[0, 39999] == 5000.0
    assert bool(((y - x).abs() <= int8_error_bounds(message, x)).all())


def test_int8_non_finite_values():
    x = sample(torch.float32, (3, 64))
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    message, y = roundtrip(x, INT8, outliers_per_row=1)  # one per row: kept as outliers
    assert message.codec == INT8
    assert math.isnan(y[0, 3]) and y[1, 4] == float("inf")
    x[2, 5:7] = float("inf")  # two in a row with room for one: int8 cannot carry it, so raw
    message, y = roundtrip(x, INT8, outliers_per_row=1)
    assert message.codec == NONE
    assert torch.equal(y.nan_to_num(), x.nan_to_num())


def test_int8_rejects_bad_parameters():
    for kwargs in ({"outliers_per_row": -1}, {"step_fraction": 0.0}, {"step_fraction": float("nan")}):
        with pytest.raises(ValueError):
            encode(torch.ones(2, 8), INT8, **kwargs)


# --------------------------------------------------------------------------------------------------
# malformed int8 fields


def int8_message(rows: int = 3, width: int = 64, k: int = 2) -> stage_pb2.Tensor:
    return wire(encode(sample(torch.float32, (rows, width)), INT8, outliers_per_row=k))


def test_bad_scales_size():
    message = int8_message()
    message.scales = message.scales[:-2]
    rejects(message, "scales\\) holds")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_scale_values(bad):
    message = int8_message()
    scales = np.frombuffer(message.scales, "<f2").copy()
    scales[2] = bad
    message.scales = scales.astype("<f2").tobytes()
    rejects(message, "scales\\) must be finite")


def test_unknown_scale_dtype():
    message = int8_message()
    message.scale_dtype = stage_pb2.DTYPE_INT64
    rejects(message, "scale_dtype")


@pytest.mark.parametrize("bad_index", [64, 1000, -1])
def test_outlier_index_out_of_range(bad_index):
    message = int8_message()
    idx = np.frombuffer(message.outlier_indices, "<i2").copy()
    idx[3] = bad_index
    message.outlier_indices = idx.astype("<i2").tobytes()
    rejects(message, "out of range")


def test_duplicate_outlier_index():
    message = int8_message()
    idx = np.frombuffer(message.outlier_indices, "<i2").copy()
    idx[1] = idx[0]
    message.outlier_indices = idx.astype("<i2").tobytes()
    rejects(message, "duplicate")


def test_bad_outlier_array_sizes():
    message = int8_message()
    message.outlier_indices = message.outlier_indices[:-2]
    rejects(message, "outlier_indices holds")
    message = int8_message()
    message.outlier_values = message.outlier_values + b"\0"
    rejects(message, "outlier_values holds")
    message = int8_message()
    message.outliers_per_row = 0  # the outlier fields are now unexpected
    rejects(message, "outlier")
    message = int8_message()
    message.outliers_per_row = 65
    rejects(message, "exceeds the row length")


def test_int8_outlier_fields_read_back_as_the_message_says():
    message = int8_message(k=2)
    y = decode(message)
    values = np.frombuffer(message.outlier_values, "<f2").astype(np.float32)
    message.outlier_values = values.astype("<f4").tobytes()  # the same values, as float32
    assert torch.equal(decode(message), y)


def test_rice_steps_too_large_or_small_for_float16_travel_as_float32():
    for value in (1e9, 1e-9):
        x = torch.full((2, 64), value)
        message, y = roundtrip(x, INT8, outliers_per_row=0)
        assert message.scale_dtype == stage_pb2.DTYPE_FLOAT32 and len(message.scales) == 4 * 2
        assert bool(((y - x).abs() <= int8_error_bounds(message, x)).all())


def test_rice_malformed_streams():
    message = int8_message()
    message.data = message.data[:-1]
    rejects(message, "unary stream")
    message = int8_message()
    message.data = message.data + b"\xff"
    rejects(message, "after its last value")
    message = int8_message()
    message.data = message.data + b"\x00"
    rejects(message, "unary stream ends")
    message = int8_message()
    message.data = b"\xff" * 200 + message.data  # a unary part far longer than the encoder writes
    rejects(message, "unary")
    message = int8_message()
    message.rice_parameters = message.rice_parameters[:-1]
    rejects(message, "rice_parameters holds")
    message = int8_message()
    message.rice_parameters = bytes([41]) + message.rice_parameters[1:]
    rejects(message, "Rice parameter 41")
    message = int8_message()
    message.low_bits = message.low_bits[:-1]
    rejects(message, "low_bits holds")
    message = int8_message()
    message.scales = message.scales[:-2]
    rejects(message, "steps")
    for layout in (stage_pb2.INT8_LAYOUT_UNSPECIFIED, 5):
        message = int8_message()
        message.int8_layout = layout
        rejects(message, "unknown int8 layout")
    for codec_value in (NONE, FP16, BF16):
        message = wire(encode(torch.zeros(2, 4), codec_value))
        message.rice_parameters = b"\0\0"
        rejects(message, "rice_parameters")
        message = wire(encode(torch.zeros(2, 4), codec_value))
        message.int8_layout = RICE
        rejects(message, "int8_layout")
