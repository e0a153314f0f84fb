"""Rice coding of rows of non-negative integers, vectorized with numpy.

Owns: the bit layout of `Int8Layout.INT8_LAYOUT_RICE` (see stage.proto) for a matrix of
non-negative integers, one Rice parameter per row, and the validation of untrusted streams. Does not
own: quantization, zigzag mapping of signed values or scales (protos/int8_codec.py does that), or protobuf.

A value u with parameter k is split into ``u >> k`` (written in unary: that many 1 bits, then a 0)
and its k low bits. The unary parts of all values go, in row-major order, into one bit stream; the
low bits into another, where each row starts on a byte boundary so that rows sharing a k can be
unpacked together. Bits are most significant first (numpy's packbits order). A row's unary part
is at most `MAX_UNARY` ones, which bounds the size of a stream and the work to decode it: the
encoder picks k large enough for that.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_PARAMETER", "MAX_UNARY", "RiceFormatError", "decode_rows", "encode_rows"]

MAX_UNARY = 63  # most 1 bits in one value's unary part
MAX_PARAMETER = 40  # largest k a stream may use: keeps (MAX_UNARY << k | low) well inside int64
_CHUNK_ELEMENTS = 1 << 16  # rows are bit-unpacked this many elements at a time (bounds temporaries)


class RiceFormatError(ValueError):
    """A Rice-coded stream that is malformed; the message says what is wrong."""


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Number of bits needed to write each non-negative integer (0 for 0)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _choose_parameters(u: np.ndarray) -> np.ndarray:
    """Per row, the k near log2 of the mean that writes the row in the fewest bits, no smaller than
    what keeps every unary part within MAX_UNARY."""
    rows, n = u.shape
    smallest = np.maximum(_bit_length(u.max(axis=1)) - _bit_length(np.int64(MAX_UNARY)), 0)
    guess = np.maximum(_bit_length(u.sum(axis=1) // max(n, 1)) - 1, smallest)
    best_k, best_bits = guess, np.full(rows, np.iinfo(np.int64).max)
    for offset in (-1, 0, 1):
        k = np.maximum(guess + offset, smallest)
        bits = (u >> k[:, None]).sum(axis=1) + n * (1 + k)
        better = bits < best_bits
        best_k, best_bits = np.where(better, k, best_k), np.where(better, bits, best_bits)
    return best_k


def _low_bits_layout(parameters: np.ndarray, n: int):
    """Where each row's low bits lie: (total bytes, an iterator of (k, byte offsets, rows)) with rows
    grouped by their parameter k > 0, in batches of about _CHUNK_ELEMENTS values so that the
    bit-level temporaries stay small."""
    row_bytes = (parameters * n + 7) // 8
    starts = np.concatenate(([0], np.cumsum(row_bytes)[:-1]))
    batches = max(1, -(-parameters.size * n // _CHUNK_ELEMENTS))

    def groups():
        for k in np.unique(parameters[parameters > 0]):
            same_k = np.flatnonzero(parameters == k)
            for part in np.array_split(same_k, min(batches, same_k.size)):
                yield int(k), starts[part, None] + np.arange(int(row_bytes[part[0]])), part

    return int(row_bytes.sum()), groups()


def encode_rows(u: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """Rice-code a (rows, n) array of non-negative int64: (parameters, unary stream, low bits)."""
    u = np.ascontiguousarray(u, dtype=np.int64)
    rows, n = u.shape
    if rows == 0 or n == 0:
        return b"", b"", b""
    parameters = _choose_parameters(u)
    high = u >> parameters[:, None]

    ends = np.cumsum(high.reshape(-1) + 1) - 1  # position of each value's terminating 0
    unary = np.ones(-(-int(ends[-1] + 1) // 8) * 8, dtype=np.uint8)
    unary[ends] = 0

    total, groups = _low_bits_layout(parameters, n)
    low = np.empty(total, dtype=np.uint8)
    for k, offsets, part in groups:
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        bits = ((u[part, :, None] >> shifts) & 1).astype(np.uint8).reshape(part.size, n * k)
        low[offsets] = np.packbits(bits, axis=1)  # pads each row to whole bytes with 0 bits
    return parameters.astype(np.uint8).tobytes(), np.packbits(unary).tobytes(), low.tobytes()


def decode_rows(parameters: bytes, unary: bytes, low: bytes, rows: int, n: int) -> np.ndarray:
    """The (rows, n) int64 array that `encode_rows` wrote; RiceFormatError if the streams disagree."""
    if len(parameters) != rows:
        raise RiceFormatError(f"rice_parameters holds {len(parameters)} bytes; expected one per row ({rows})")
    if rows == 0 or n == 0:
        if unary or low:
            raise RiceFormatError("an empty tensor carries no Rice-coded bits")
        return np.zeros((rows, n), dtype=np.int64)
    k = np.frombuffer(parameters, dtype=np.uint8).astype(np.int64)
    if int(k.max()) > MAX_PARAMETER:
        raise RiceFormatError(f"Rice parameter {int(k.max())} exceeds the limit of {MAX_PARAMETER}")

    count = rows * n
    if len(unary) > -(-count * (MAX_UNARY + 1) // 8):
        raise RiceFormatError(f"the unary stream holds {len(unary)} bytes, more than {count} values can take")
    bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
    ends = np.flatnonzero(bits == 0)
    if ends.size != count:
        raise RiceFormatError(f"the unary stream ends {ends.size} values; the shape needs {count}")
    if len(unary) != -(-int(ends[-1] + 1) // 8):
        raise RiceFormatError("the unary stream has bytes after its last value")
    high = np.diff(ends, prepend=-1) - 1
    if int(high.max()) > MAX_UNARY:
        raise RiceFormatError(f"a unary part is {int(high.max())} bits long; at most {MAX_UNARY} are allowed")
    values = high.reshape(rows, n) << k[:, None]

    total, groups = _low_bits_layout(k, n)
    if len(low) != total:
        raise RiceFormatError(f"low_bits holds {len(low)} bytes; the Rice parameters need {total}")
    low_array = np.frombuffer(low, dtype=np.uint8)
    for kk, offsets, part in groups:
        weights = np.left_shift(1, np.arange(kk - 1, -1, -1, dtype=np.int64))
        field = np.unpackbits(low_array[offsets], axis=1)[:, : n * kk].reshape(part.size, n, kk)
        values[part] |= field.astype(np.int64) @ weights
    return values
