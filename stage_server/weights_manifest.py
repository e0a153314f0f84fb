"""The weights manifest: the SHA-256 of every tensor of a checkpoint, and its id.

Owns: making the manifest from the bytes of this machine's safetensors files (each tensor's raw
bytes, read from its byte range), checking the tensors a load reads against it (SliceCheck), where
it lives (`layerline-manifest.json` in the model directory, or under the cache's `manifests/` when
the directory cannot be written), its id (the first 16 hex digits of the SHA-256 of its canonical
JSON), one maker at a time per manifest on a machine (a lock file beside it, waited for with a
bound; the file appears whole by an atomic rename), and refusing a tensor whose bytes differ from
the manifest's digest.

Why a manifest: the model fingerprint covers the config and the tensors' names, shapes and dtypes,
not their contents. Each machine makes its manifest from its own files, so stages of two machines
holding different weights at the same path report different ids and the coordinator refuses the
chain; a stage whose files changed after the manifest was made refuses to start.

Does not own: reading tensors (checkpoint_reader, which feeds a stage's bytes to the digest as it
reads them), which tensors a stage loads (slice_loader), nor comparing ids across stages
(coordinator/stage_agreement.py).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path

from protos.model_files.cache import cache_root
from stage_server.checkpoint_reader import TensorEntry

log = logging.getLogger(__name__)

MANIFEST_NAME = "layerline-manifest.json"
MANIFEST_FORMAT = 1
ALGORITHM = "sha256"
MAKE_WAIT_S = 600.0  # how long a stage waits for another process of this machine making the manifest
BLOCK_BYTES = 8 << 20  # bytes read and digested per step while making the manifest
WORKERS = 2  # threads digesting a load's tensors (SHA-256 runs at ~1.5 GB/s a core, a page-cached read faster)

try:
    import fcntl
except ImportError:  # no flock (Windows): makers race, and the atomic rename keeps the file whole
    fcntl = None

# file name -> tensor name -> where the tensor lies (checkpoint_reader.read_header's entries)
Layout = Mapping[str, Mapping[str, TensorEntry]]


class ManifestError(ValueError):
    """The weights do not match their manifest, or the manifest cannot be read or made; one line."""


class WeightsManifest:
    """A checkpoint's per-tensor digests; `check` refuses bytes that do not match."""

    def __init__(self, path: Path, digests: dict[str, dict[str, str]]) -> None:
        self.path = path
        self.digests = digests  # file name -> tensor name -> hex SHA-256
        self.id = manifest_id(digests)

    def check(self, file: str, tensor: str, digest: str) -> None:
        if self.digests.get(file, {}).get(tensor) != digest:
            raise ManifestError(
                f"tensor {tensor!r} of {file} does not match its digest in {self.path}: the weights changed "
                f"after the manifest was made; fetch the model again, or delete {self.path} to make it anew "
                "from these files")


class SliceCheck:
    """Checks the tensors one load reads against a manifest. A tensor read whole and kept as read
    (no dtype conversion) is digested on a worker thread while the next ones are read, at most
    BACKLOG_BYTES of them waiting; one converted as it is read is digested chunk by chunk as the
    reader goes (`hasher`), since its source bytes are not kept. Use as a context manager; `finish`
    waits for the worker and raises ManifestError for a tensor that does not match."""

    BACKLOG_BYTES = 256 << 20  # tensors read but not yet digested; bounds the memory a GPU load holds

    def __init__(self, manifest: WeightsManifest) -> None:
        self.manifest = manifest
        self._worker = futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="weights-digest")
        self._pending: collections.deque = collections.deque()
        self._pending_bytes = 0

    def __enter__(self) -> SliceCheck:
        return self

    def __exit__(self, *exc) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def hasher(self):
        return hashlib.new(ALGORITHM)

    def check(self, file: str, tensor: str, hasher) -> None:
        self.manifest.check(file, tensor, hasher.hexdigest())

    def check_later(self, file: str, tensor: str, data: memoryview) -> None:
        """Digest `data` (the tensor's bytes as the file holds them, not to be changed) on the worker."""
        self._pending.append((file, tensor, len(data), self._worker.submit(_digest_of, data)))
        self._pending_bytes += len(data)
        while self._pending_bytes > self.BACKLOG_BYTES:
            self._check_oldest()

    def finish(self) -> None:
        while self._pending:
            self._check_oldest()

    def _check_oldest(self) -> None:
        file, tensor, size, digest = self._pending.popleft()
        self._pending_bytes -= size
        self.manifest.check(file, tensor, digest.result())


def _digest_of(data: memoryview) -> str:
    return hashlib.new(ALGORITHM, data).hexdigest()


def manifest_id(digests: Mapping[str, Mapping[str, str]]) -> str:
    canonical = json.dumps({"algorithm": ALGORITHM, "files": digests}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cache_location(model_dir: Path) -> Path:
    """Where the manifest of a model directory that cannot be written lives (one per resolved path)."""
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "manifests" / f"{key}.json"


def manifest_for(model_dir: Path, layout: Layout) -> WeightsManifest:
    """The manifest of the checkpoint in `model_dir` whose files hold `layout`: read where one
    exists, else made from the files now (by one process of this machine at a time)."""
    locations = (model_dir / MANIFEST_NAME, cache_location(model_dir))
    for path in locations:
        if path.exists():
            return read_manifest(path, layout)
    errors = []
    for path in locations:
        try:
            return _make_once(path, model_dir, layout)
        except OSError as err:  # cannot write there: try the next place
            errors.append(f"{path.parent}: {err.strerror or err}")
    raise ManifestError(f"cannot write a weights manifest ({'; '.join(errors)}); make the model directory "
                        "writable or set LAYERLINE_CACHE to a writable directory")


def read_manifest(path: Path, layout: Layout) -> WeightsManifest:
    """Read and check `path`: it must describe exactly the tensors `layout` holds."""
    remedy = f"delete {path} to make it anew from the model's files"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read the weights manifest {path} ({err}); {remedy}") from err
    if not isinstance(data, dict):
        data = {}
    files = data.get("files")
    if data.get("format") != MANIFEST_FORMAT or data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
        raise ManifestError(f"{path} is not a weights manifest of format {MANIFEST_FORMAT}; {remedy}")
    digests: dict[str, dict[str, str]] = {}
    for file, entries in layout.items():
        described = files.get(file)
        if not isinstance(described, dict) or set(described) != set(entries):
            raise ManifestError(f"{path} describes other tensors than {file} holds: the checkpoint changed after "
                                f"the manifest was made; fetch the model again, or {remedy}")
        digests[file] = {}
        for name, entry in entries.items():
            row = described[name]
            if not isinstance(row, dict) or row.get("dtype") != entry.dtype_name or \
                    row.get("shape") != list(entry.shape) or not isinstance(row.get(ALGORITHM), str):
                raise ManifestError(f"{path} gives tensor {name!r} of {file} another dtype or shape than the file: "
                                    f"the checkpoint changed after the manifest was made; fetch the model again, "
                                    f"or {remedy}")
            digests[file][name] = row[ALGORITHM]
    if set(files) != set(layout):
        extra = ", ".join(sorted(set(files) - set(layout)))
        raise ManifestError(f"{path} names files the checkpoint does not have ({extra}); {remedy}")
    return WeightsManifest(path, digests)


def make_digests(model_dir: Path, layout: Layout) -> dict[str, dict[str, str]]:
    """SHA-256 of every tensor's bytes, read from the files in plain blocks (nothing mapped)."""
    block = bytearray(BLOCK_BYTES)
    digests: dict[str, dict[str, str]] = {}
    for file, entries in sorted(layout.items()):
        path = model_dir / file
        digests[file] = {}
        try:
            with open(path, "rb", buffering=0) as handle:
                for name, entry in sorted(entries.items(), key=lambda item: item[1].offset):
                    digests[file][name] = _digest_range(path, handle, name, entry, block)
        except OSError as err:
            raise ManifestError(f"cannot read {path} to make the weights manifest: {err.strerror or err}") from err
    return digests


def _digest_range(path: Path, handle, name: str, entry: TensorEntry, block: bytearray) -> str:
    digest, view = hashlib.new(ALGORITHM), memoryview(block)
    handle.seek(entry.offset)
    left = entry.nbytes
    while left:
        got = handle.readinto(view[:min(left, len(view))])
        if not got:
            raise ManifestError(f"{path} ends inside tensor {name!r}; download or convert it again")
        digest.update(view[:got])
        left -= got
    return digest.hexdigest()


def _make_once(path: Path, model_dir: Path, layout: Layout) -> WeightsManifest:
    """Make the manifest at `path` unless another process of this machine makes it meanwhile.
    OSError only where `path` cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _maker_lock(path):
        if path.exists():  # made by another stage while this one waited
            return read_manifest(path, layout)
        started = time.monotonic()
        log.info("making the weights manifest of %s (once per machine): digesting every tensor", model_dir)
        digests = make_digests(model_dir, layout)
        manifest = WeightsManifest(path, digests)
        files = {file: {name: {"dtype": entry.dtype_name, "shape": list(entry.shape), ALGORITHM: digests[file][name]}
                        for name, entry in entries.items()} for file, entries in layout.items()}
        text = json.dumps({"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, "id": manifest.id,
                           "model_dir": str(model_dir.resolve()), "files": files}, indent=1, sort_keys=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            staging.write_text(text + "\n", encoding="utf-8")
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)
    size = sum(entry.nbytes for entries in layout.values() for entry in entries.values())
    log.info("made the weights manifest %s (id %s): %d tensors, %.1f MiB in %.1f s", path, manifest.id,
             sum(len(entries) for entries in layout.values()), size / 2**20, time.monotonic() - started)
    return manifest


@contextlib.contextmanager
def _maker_lock(path: Path) -> Iterator[None]:
    """Exclusive hold on a lock file beside `path`, waited for at most MAKE_WAIT_S; after that the
    waiter makes the manifest too (the same bytes give the same file, and the rename is atomic)."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        deadline = time.monotonic() + MAKE_WAIT_S
        locked = False
        while not locked:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError:
                if time.monotonic() >= deadline:
                    log.warning("waited %.0f s for another process making %s; making it here too", MAKE_WAIT_S, path)
                    break
                time.sleep(0.1)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
