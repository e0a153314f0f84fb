"""Rice coding of integer rows (protos/rice_coding.py): exact round trips and bounded streams."""

import numpy as np
import pytest

from protos.rice_coding import MAX_UNARY, RiceFormatError, decode_rows, encode_rows


def roundtrip(u: np.ndarray) -> tuple[np.ndarray, int]:
    parameters, unary, low = encode_rows(u)
    return decode_rows(parameters, unary, low, *u.shape), len(parameters) + len(unary) + len(low)


@pytest.mark.parametrize("shape", [(1, 576), (3, 7), (40, 13), (1, 1), (200, 576)])
def test_round_trip_is_exact(shape):
    rng = np.random.default_rng(sum(shape))
    # rows of very different sizes, so rows get different parameters within one stream
    scale = np.exp(rng.uniform(0, 12, size=(shape[0], 1)))
    u = np.abs(rng.laplace(0, 1, size=shape) * scale).astype(np.int64)
    back, _ = roundtrip(u)
    assert back.dtype == np.int64 and np.array_equal(back, u)


def test_zeros_and_empty():
    back, size = roundtrip(np.zeros((4, 9), dtype=np.int64))
    assert np.array_equal(back, np.zeros((4, 9))) and size == 4 + 36 // 8 + 1  # k = 0: one 0 bit each
    assert encode_rows(np.zeros((0, 5), dtype=np.int64)) == (b"", b"", b"")
    assert decode_rows(b"", b"", b"", 0, 5).shape == (0, 5)


def test_huge_values_keep_the_unary_parts_bounded():
    u = np.zeros((2, 64), dtype=np.int64)
    u[0, 5] = 1 << 40
    u[1] = np.arange(64) * 1000
    parameters, unary, low = encode_rows(u)
    assert np.array_equal(decode_rows(parameters, unary, low, 2, 64), u)
    bits = np.unpackbits(np.frombuffer(unary, np.uint8))
    ends = np.flatnonzero(bits == 0)
    assert int((np.diff(ends, prepend=-1) - 1).max()) <= MAX_UNARY


def test_cost_is_close_to_the_entropy_of_geometric_values():
    rng = np.random.default_rng(1)
    p = 1 / 40
    u = rng.geometric(p, size=(64, 576)).astype(np.int64) - 1
    _, size = roundtrip(u)
    entropy_bits = (-(1 - p) * np.log2(1 - p) - p * np.log2(p)) / p
    assert size * 8 / u.size <= entropy_bits * 1.03


def test_malformed_streams_are_rejected():
    u = np.arange(24, dtype=np.int64).reshape(3, 8)
    parameters, unary, low = encode_rows(u)
    with pytest.raises(RiceFormatError, match="one per row"):
        decode_rows(parameters[:2], unary, low, 3, 8)
    with pytest.raises(RiceFormatError, match="more than"):
        decode_rows(parameters, b"\xff" * 10_000, low, 3, 8)
    with pytest.raises(RiceFormatError, match="low_bits"):
        decode_rows(parameters, unary, low + b"\0", 3, 8)
    with pytest.raises(RiceFormatError, match="carries no"):
        decode_rows(b"", b"\0", b"", 0, 8)
    long_unary = np.packbits(np.concatenate([np.ones(MAX_UNARY + 1, np.uint8), np.zeros(24, np.uint8)])).tobytes()
    with pytest.raises(RiceFormatError, match="unary part"):
        decode_rows(bytes(3), long_unary, b"", 3, 8)
