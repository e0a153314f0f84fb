"""The weights manifest: made once per machine from its own files, checked for the tensors a stage loads,
and different for different weights at the same path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_models import save_tiny_model, save_tiny_tokenizer

from stage_server import weights_manifest
from stage_server.checkpoint_reader import read_header
from stage_server.slice_loader import CheckpointIndex, SliceLoadError, load_slice
from stage_server.weights_manifest import MANIFEST_NAME, manifest_for


def flip_a_byte_of(model_dir: Path, tensor: str) -> None:
    """Change one byte inside `tensor`'s data: the header and every shape stay as they were."""
    for file in sorted(model_dir.glob("*.safetensors")):
        entries, _ = read_header(file)
        if tensor in entries:
            with open(file, "r+b") as handle:
                handle.seek(entries[tensor].offset + 3)
                byte = handle.read(1)
                handle.seek(entries[tensor].offset + 3)
                handle.write(bytes([byte[0] ^ 0x40]))
            return
    raise AssertionError(f"no tensor {tensor}")


def test_made_once_beside_the_model_and_reported_by_every_slice(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "llama", sharded=True)
    first = load_slice(model_dir, 0, 2, progress=False)
    manifest = model_dir / MANIFEST_NAME
    made = manifest.stat().st_mtime_ns
    second = load_slice(model_dir, 2, 4, progress=False)
    assert manifest.stat().st_mtime_ns == made  # read, not made again
    assert len(first.weights_manifest_id) == 16 and first.weights_manifest_id == second.weights_manifest_id
    assert json.loads(manifest.read_text())["id"] == first.weights_manifest_id
    index = CheckpointIndex(model_dir)
    described = json.loads(manifest.read_text())["files"]
    assert {file: set(tensors) for file, tensors in described.items()} == \
        {file: set(entries) for file, entries in index.layout().items()}


def test_other_weights_of_one_config_have_one_fingerprint_and_another_manifest_id(tmp_path):
    a = load_slice(save_tiny_model(tmp_path / "a", "llama", seed=0), 0, 4, progress=False)
    b = load_slice(save_tiny_model(tmp_path / "b", "llama", seed=1), 0, 4, progress=False)
    same = load_slice(shutil.copytree(tmp_path / "a", tmp_path / "copy", ignore=shutil.ignore_patterns(MANIFEST_NAME)),
                      0, 4, progress=False)
    assert a.fingerprint == b.fingerprint == same.fingerprint  # wherever the directory is
    assert a.weights_manifest_id != b.weights_manifest_id
    assert same.weights_manifest_id == a.weights_manifest_id  # made anew from the same bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # kept as read (digested on the worker); converted
def test_a_changed_tensor_in_the_slice_refuses_the_load_naming_it(tmp_path, dtype):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    load_slice(model_dir, 0, 4, progress=False)
    flip_a_byte_of(model_dir, "model.layers.3.mlp.down_proj.weight")
    assert load_slice(model_dir, 0, 2, dtype=dtype, progress=False).weights_manifest_id  # only its slice is checked
    with pytest.raises(SliceLoadError) as caught:
        load_slice(model_dir, 2, 4, dtype=dtype, progress=False)
    message = str(caught.value)
    assert "'model.layers.3.mlp.down_proj.weight' of model.safetensors" in message and "\n" not in message
    assert f"delete {model_dir / MANIFEST_NAME}" in message and "fetch the model again" in message
    (model_dir / MANIFEST_NAME).unlink()  # as the message says: made anew from these bytes
    assert load_slice(model_dir, 2, 4, dtype=dtype, progress=False).weights_manifest_id


def test_a_copied_manifest_does_not_vouch_for_other_weights(tmp_path):
    """A manifest carried to a machine whose files differ refuses the load there."""
    ours = save_tiny_model(tmp_path / "ours", "llama", seed=0)
    theirs = save_tiny_model(tmp_path / "theirs", "llama", seed=1)
    load_slice(ours, 0, 1, progress=False)
    shutil.copy(ours / MANIFEST_NAME, theirs / MANIFEST_NAME)
    with pytest.raises(SliceLoadError, match="does not match its digest"):
        load_slice(theirs, 0, 1, progress=False)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "algorithm": "md5", "files": {}}),
                                     json.dumps({"format": 1, "algorithm": "sha256", "files": {}})])
def test_a_broken_manifest_refuses_the_load_saying_to_delete_it(tmp_path, content):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    (model_dir / MANIFEST_NAME).write_text(content)
    with pytest.raises(SliceLoadError, match=f"delete {model_dir / MANIFEST_NAME}"):
        load_slice(model_dir, 0, 2, progress=False)


def test_stages_starting_at_once_make_it_once(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    layout = CheckpointIndex(model_dir).layout()
    made, make = [], weights_manifest.make_digests

    def counted(*args):
        made.append(1)
        return make(*args)

    monkeypatch.setattr(weights_manifest, "make_digests", counted)
    ids, start = [], threading.Barrier(4)

    def stage():
        start.wait()
        ids.append(manifest_for(model_dir, layout).id)

    threads = [threading.Thread(target=stage) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(ids) == 4 and len(set(ids)) == 1 and made == [1]
    assert not list(model_dir.glob(f".{MANIFEST_NAME}.*.tmp"))


def test_a_directory_that_cannot_be_written_keeps_its_manifest_in_the_cache(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    monkeypatch.setenv("LAYERLINE_CACHE", str(tmp_path / "cache"))
    replace = os.replace

    def read_only_model_dir(source, target):
        if Path(target).parent == model_dir:
            raise PermissionError(30, "Read-only file system")
        replace(source, target)

    monkeypatch.setattr(weights_manifest.os, "replace", read_only_model_dir)
    piece = load_slice(model_dir, 0, 2, progress=False)
    stored = weights_manifest.cache_location(model_dir)
    assert stored.parent == tmp_path / "cache" / "manifests" and json.loads(stored.read_text())["id"] == \
        piece.weights_manifest_id
    assert not (model_dir / MANIFEST_NAME).exists()
    assert load_slice(model_dir, 2, 4, progress=False).weights_manifest_id == piece.weights_manifest_id


def test_stage_server_with_a_changed_tensor_refuses_to_start_in_one_line(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    save_tiny_tokenizer(model_dir)
    load_slice(model_dir, 0, 4, progress=False)
    flip_a_byte_of(model_dir, "model.layers.1.self_attn.q_proj.weight")
    result = subprocess.run([sys.executable, "-m", "stage_server.cli", "--model", str(model_dir), "--layers", "0:2",
                             "--port", "0", "--quiet"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("stage-server: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "'model.layers.1.self_attn.q_proj.weight'" in errors[0] and MANIFEST_NAME in errors[0]
