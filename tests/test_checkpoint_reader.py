"""The plain-read safetensors reader: every dtype round-trips, conversions match torch's, bad files fail clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import save_tiny_model

from stage_server.checkpoint_reader import CheckpointFormatError, SafetensorsReader, read_header
from stage_server.slice_loader import CheckpointIndex, SliceLoadError, checkpoint_name_candidates, load_slice


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, 7, generator=gen) * 100
    ints = torch.randint(-2**40, 2**40, (4, 6), generator=gen)
    return {
        "f32": floats,
        "f16": floats.to(torch.float16),
        "bf16": floats.to(torch.bfloat16),
        "i64": ints,
        "i32": (ints % 2**31).to(torch.int32),
        "i8": torch.randint(-128, 128, (9,), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 256, (2, 3), generator=gen, dtype=torch.uint8),
        "bool": torch.rand(11, generator=gen) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "odd_bf16": torch.randn(1, 3, generator=gen).to(torch.bfloat16),  # 6 bytes: unaligned neighbours
    }


@pytest.fixture
def sample_file(tmp_path):
    path = tmp_path / "sample.safetensors"
    tensors = sample_tensors()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_every_dtype_round_trips(sample_file):
    path, tensors = sample_file
    entries, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert {name: e.dtype for name, e in entries.items()} == {name: t.dtype for name, t in tensors.items()}
    with SafetensorsReader(path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for name, expected in tensors.items():
            got = reader.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got, expected), name
            assert got.is_contiguous()


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [0, 12, 64, 1 << 20])
def test_conversion_matches_torch_to(sample_file, target, chunk_bytes):
    """Converting a chunk at a time gives bit-for-bit what .to(dtype) gives; ints and bools keep their dtype."""
    path, tensors = sample_file
    with SafetensorsReader(path) as reader:
        for name, stored in tensors.items():
            got = reader.read(name, dtype=target, chunk_bytes=chunk_bytes)
            expected = stored.to(target) if stored.is_floating_point() else stored
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got, expected), (name, chunk_bytes)


def test_results_are_owned_and_writable(sample_file):
    path, tensors = sample_file
    with SafetensorsReader(path) as reader:
        a = reader.read("f32", dtype=torch.bfloat16)
        b = reader.read("f16", dtype=torch.bfloat16)  # reuses the scratch buffer
        a.add_(1)
    assert torch.equal(b, tensors["f16"].to(torch.bfloat16))
    assert torch.equal(a, tensors["f32"].to(torch.bfloat16) + 1)


def test_reader_needs_with_and_known_names(sample_file):
    path, _ = sample_file
    reader = SafetensorsReader(path)
    with pytest.raises(RuntimeError, match="outside `with`"):
        reader.read("f32")
    with reader, pytest.raises(KeyError, match="no tensor 'nope'"):
        reader.read("nope")


def write_raw(path, header, data: bytes = b"", *, length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header,data,length,message", [
    (b"", b"", None, "header claims 0 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**62, "header claims"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", 10_000, "file has only"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"\xff\xfe", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"a": [1]}, b"", None, "entry of 'a' is not a JSON object"),
    ({"a": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "no valid dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "not \\[begin, end\\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "spans bytes 8:0"),
    # A header claiming a huge tensor must not allocate it: the data section is checked first.
    ({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 8, None, "data section of 8"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"__metadata__": [1], "a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "__metadata__"),
])
def test_corrupt_headers_fail_clearly(tmp_path, header, data, length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_file_shorter_than_the_length_field(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointFormatError, match="shorter than the 8-byte header length"):
        read_header(path)


def test_unsupported_dtype_is_named(tmp_path):
    path = write_raw(tmp_path / "c.safetensors", {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
                     b"\0" * 8)
    with pytest.raises(CheckpointFormatError, match="dtype C64, which layerline cannot load"):
        read_header(path)


def test_truncated_data_fails_on_read(sample_file, tmp_path):
    """A file cut short after its header was read (or parsed from a cached header) fails clearly on read."""
    path, _ = sample_file
    entries, _ = read_header(path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:entries["f32"].offset + 10])
    with pytest.raises(CheckpointFormatError, match="data section"):
        read_header(cut)  # the header's offsets run past the end
    with SafetensorsReader(cut, entries) as reader, pytest.raises(CheckpointFormatError, match="ends at byte"):
        reader.read("f32", dtype=torch.bfloat16)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(CheckpointFormatError, match="cannot read"):
        read_header(tmp_path / "absent.safetensors")


def test_slice_loader_reports_corruption_as_slice_load_error(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    weights = model_dir / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[8:12] = b"\xff\xff\xff\xff"  # garbage at the start of the JSON header
    weights.write_bytes(bytes(blob))
    with pytest.raises(SliceLoadError, match="not valid JSON"):
        CheckpointIndex(model_dir)
    weights.write_bytes(bytes(blob[:len(blob) // 2]))  # truncated
    with pytest.raises(SliceLoadError, match="not a valid safetensors file"):
        load_slice(model_dir, 0, 2, progress=False)


def test_sharded_index_naming_a_missing_tensor(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "llama", sharded=True)
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    other = next(f for k, f in index["weight_map"].items() if f != index["weight_map"][key])
    index["weight_map"][key] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(SliceLoadError, match="has no tensor 'model.layers.0.mlp.up_proj.weight'"):
        load_slice(model_dir, 0, 2, progress=False)


@pytest.mark.parametrize("family,tied,sharded", [("llama", True, True), ("gpt2", False, False), ("opt", True, False)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_weights_equal_the_checkpoint(tmp_path, family, tied, sharded, dtype):
    """Every parameter a slice holds equals the checkpoint's tensor cast to the slice's dtype."""
    from safetensors import safe_open

    model_dir = save_tiny_model(tmp_path / family, family, tied=tied, sharded=sharded)
    index = CheckpointIndex(model_dir)
    for start, end in [(0, 4), (1, 3), (2, 4)]:
        piece = load_slice(model_dir, start, end, dtype=dtype, progress=False)
        layout = piece.architecture.layout
        compared = 0
        for name, param in piece.architecture.model.named_parameters(remove_duplicate=False):
            if param.device.type == "meta":
                continue
            if name.startswith(layout.layers_prefix):
                local, _, rest = name[len(layout.layers_prefix):].partition(".")
                name = f"{layout.layers_prefix}{start + int(local)}.{rest}"
            if tied and name == layout.tied_head:
                name = layout.tied_embedding
            key = index.find(*checkpoint_name_candidates(name))
            with safe_open(model_dir / index.file_of[key], framework="pt") as handle:
                expected = handle.get_tensor(key).to(piece.dtype)
            assert torch.equal(param.detach(), expected), (family, start, end, name)
            compared += 1
        assert compared > 0
