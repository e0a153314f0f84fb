"""Read tensors from a safetensors file one at a time, with plain reads instead of a memory map.

Owns: parsing and validating the safetensors header (8-byte little-endian length, then a JSON
object naming each tensor's dtype, shape and byte range), and reading one tensor's bytes into
memory the caller then owns — converting a floating-point tensor to another floating-point
dtype a few MiB at a time, so that converting fp32 → bf16 never holds the fp32 copy.

Why not `safetensors.safe_open`: on CPU it memory-maps the file, and every page of the mapping a
process touches counts in its RSS until the file is closed; loading a slice into a smaller dtype
then holds the source bytes and the converted copy at once.

Does not own: which tensors a slice needs (slice_loader). Errors are CheckpointFormatError
(a ValueError) with the file and the reason; the slice loader reports them as SliceLoadError.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype name → torch dtype. The loader needs F32/F16/BF16/I64/I32/I8/U8/BOOL; the rest
# cost nothing where this torch has them.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

MAX_HEADER_BYTES = 100 * (1 << 20)  # safetensors' own limit
CHUNK_BYTES = 16 * (1 << 20)  # source bytes converted per step when the dtype changes


class CheckpointFormatError(ValueError):
    """The file is not a valid safetensors file (or could not be read); the message says which and why."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file."""

    dtype_name: str  # as the header spells it, e.g. "F32"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path} is not a valid safetensors file: {why}. It may be truncated or corrupt; "
        "download or convert it again")


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of `path`: (tensor entries by name, __metadata__)."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            return _parse_header(path, handle, size)
    except OSError as err:
        raise CheckpointFormatError(f"cannot read {path}: {err.strerror or err}") from err


def _parse_header(path: Path, handle, size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    if size < 8:
        raise _corrupt(path, f"it is {size} bytes long, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", _read_exact(path, handle, 0, 8))
    if length < 2 or length > MAX_HEADER_BYTES:
        raise _corrupt(path, f"its header claims {length} bytes (expected 2 to {MAX_HEADER_BYTES})")
    if 8 + length > size:
        raise _corrupt(path, f"its header claims {length} bytes but the file has only {size - 8} after the length")
    raw = _read_exact(path, handle, 8, length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "its __metadata__ is not a JSON object")
    data_start, data_size = 8 + length, size - 8 - length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(path, name, info, data_start, data_size)
    spans = sorted((e.offset, e.offset + e.nbytes, name) for name, e in entries.items() if e.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _corrupt(path, f"tensors {first!r} and {second!r} overlap")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _parse_entry(path: Path, name: str, info, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _corrupt(path, f"the entry of {name!r} is not a JSON object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype_name not in DTYPES:
        if isinstance(dtype_name, str):
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which layerline cannot load "
                f"(supported: {', '.join(DTYPES)})")
        raise _corrupt(path, f"tensor {name!r} has no valid dtype")

    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if begin > end or end > data_size:
        raise _corrupt(path, f"tensor {name!r} spans bytes {begin}:{end} of a data section of {data_size} bytes")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} and dtype {dtype_name} needs {expected} bytes "
                             f"but its data_offsets span {end - begin}")
    return TensorEntry(dtype_name, dtype, tuple(shape), data_start + begin, end - begin)


def _read_exact(path: Path, handle, offset: int, count: int) -> bytes:
    handle.seek(offset)
    data = handle.read(count)
    if len(data) != count:
        raise _corrupt(path, f"it ends at byte {offset + len(data)}, before the {count} bytes at {offset}")
    return data


class SafetensorsReader:
    """One safetensors file, read a tensor at a time; use as a context manager.

    Example:
        >>> with SafetensorsReader("model.safetensors") as reader:  # doctest: +SKIP
        ...     weight = reader.read("model.embed_tokens.weight", dtype=torch.bfloat16)
    """

    def __init__(self, path: str | Path, entries: dict[str, TensorEntry] | None = None) -> None:
        self.path = Path(path)
        self.entries = entries if entries is not None else read_header(self.path)[0]
        self._handle = None
        self._scratch_map: mmap.mmap | None = None

    def __enter__(self) -> SafetensorsReader:
        try:
            self._handle = open(self.path, "rb", buffering=0)  # closed in __exit__
        except OSError as err:
            raise CheckpointFormatError(f"cannot read {self.path}: {err.strerror or err}") from err
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._release_scratch()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def converts(self, name: str, dtype: torch.dtype | None) -> bool:
        """Whether `read(name, dtype)` converts the tensor (else it returns the file's bytes as they are,
        on a little-endian machine)."""
        source = self.entries[name].dtype
        return dtype is not None and dtype != source and source.is_floating_point and dtype.is_floating_point

    def read(self, name: str, dtype: torch.dtype | None = None, *, chunk_bytes: int = CHUNK_BYTES,
             hasher=None) -> torch.Tensor:
        """The tensor `name`, in memory this call allocates and the caller owns.

        With `dtype`, a floating-point tensor is converted to it (if it differs) `chunk_bytes` of the
        source at a time, so only the result and one chunk are ever held; chunk_bytes=0 reads the
        whole tensor, then converts. Integer and bool tensors keep their dtype. `hasher` (a hashlib
        object) is fed the tensor's bytes as the file holds them, as they are read: checking them
        against the weights manifest costs no second pass over the file.
        """
        if self._handle is None:
            raise RuntimeError("SafetensorsReader.read outside `with`")
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        source = entry.dtype
        if not self.converts(name, dtype):
            raw = torch.empty(entry.nbytes, dtype=torch.uint8)
            self._read_into(raw, entry.offset, source.itemsize, hasher)
            return raw.view(source).reshape(entry.shape)
        result = torch.empty(entry.shape, dtype=dtype)
        flat, item = result.view(-1), source.itemsize
        per_chunk = max(1, entry.numel if chunk_bytes <= 0 else chunk_bytes // item)
        scratch = self._scratch(min(per_chunk, entry.numel) * item)
        for first in range(0, entry.numel, per_chunk):
            count = min(per_chunk, entry.numel - first)
            piece = scratch[:count * item]
            self._read_into(piece, entry.offset + first * item, item, hasher)
            flat[first:first + count].copy_(piece.view(source))
            del piece
        del scratch
        return result

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """A reusable uint8 buffer of at least `nbytes`, kept until close().

        It is an anonymous memory map, not malloc'ed memory: glibc raises its mmap threshold to the
        size of every large block that is freed, after which blocks of up to that size come from the
        heap, where short-lived buffers freed between long-lived weights stay resident (measured:
        ~90 MiB more peak for a quarter of a 1 GiB model). Unmapping returns the pages at once.
        """
        if self._scratch_map is None or len(self._scratch_map) < nbytes:
            self._release_scratch()
            self._scratch_map = mmap.mmap(-1, max(nbytes, 1))
        return torch.frombuffer(self._scratch_map, dtype=torch.uint8, count=nbytes) if nbytes else \
            torch.empty(0, dtype=torch.uint8)

    def _release_scratch(self) -> None:
        if self._scratch_map is not None:
            try:
                self._scratch_map.close()
            except BufferError:  # a view still alive (say, in an exception's traceback): unmapped when it goes
                pass
            self._scratch_map = None

    def _read_into(self, buffer: torch.Tensor, offset: int, itemsize: int, hasher=None) -> None:
        """Fill the contiguous uint8 tensor `buffer` with the file's bytes from `offset` (fed to `hasher`)."""
        if buffer.numel() == 0:
            return
        array = buffer.numpy()
        view = memoryview(array).cast("B")
        handle, done = self._handle, 0
        handle.seek(offset)
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise _corrupt(self.path, f"it ends at byte {offset + done}, inside a tensor that needs "
                                          f"{len(view)} bytes from {offset}")
            done += got
        if hasher is not None:
            hasher.update(view)
        if sys.byteorder == "big" and itemsize > 1:  # safetensors is little-endian
            array.view(f"u{itemsize}").byteswap(inplace=True)
