"""Load layers [start, end) of a Hugging Face checkpoint — and nothing else — into memory.

Owns: building a weightless skeleton of the *sliced* model with accelerate, choosing
the checkpoint tensors the slice needs (embeddings only on the first stage, final
norm + head only on the last, tied heads served from the embedding matrix), reading
exactly those from single-file or sharded safetensors, converting them to the target
dtype/device one at a time, checking each tensor's bytes against the weights manifest as they are
read, and the model fingerprint every stage of one model shares.

Does not own: running the slice (architectures, stage_model), making or reading the weights
manifest (weights_manifest), or the network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from stage_server import per_sequence_attention
from stage_server.architectures import Architecture, architecture_for
from stage_server.checkpoint_reader import CheckpointFormatError, SafetensorsReader, TensorEntry, read_header
from stage_server.weights_manifest import ManifestError, SliceCheck, manifest_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SliceLoadError(ValueError):
    """The slice cannot be loaded; the message says why and what to do."""


class LayerRangeError(SliceLoadError):
    """The requested layer range does not fit the model."""


@dataclass
class LoadedSlice:
    """A loaded slice, ready to run."""

    architecture: Architecture
    config: object  # the full model's config
    sliced_config: object  # config of the slice (num_hidden_layers = end - start)
    layer_start: int
    layer_end: int
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    parameter_bytes: int
    weights_manifest_id: str = ""  # stage_server/weights_manifest.py: the same on every stage of a chain
    attention: str = "batched"  # "per-sequence" or "batched" (stage_server/per_sequence_attention.py)
    # Set from the fields above once: read on every step, and a Hugging Face config's attribute
    # lookup runs Python code of its own.
    num_layers: int = field(init=False)
    is_first: bool = field(init=False)
    is_last: bool = field(init=False)

    def __post_init__(self) -> None:
        self.num_layers = self.config.num_hidden_layers
        self.is_first = self.layer_start == 0
        self.is_last = self.layer_end == self.num_layers


def parse_layer_range(text: str) -> tuple[int, int]:
    """'A:B' → (A, B). Raises LayerRangeError on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise LayerRangeError(f"layer range {text!r} is not of the form START:END, e.g. 0:10")
    return int(match.group(1)), int(match.group(2))


def resolve_dtype(name: str, config) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 when it names none)."""
    if name == "auto":
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, torch.dtype):
            return declared
        return DTYPES.get(str(declared).replace("torch.", ""), torch.float32)
    if name not in DTYPES:
        raise SliceLoadError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SliceLoadError(f"device {name!r} is not valid: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SliceLoadError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SliceLoadError(f"device {name} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise SliceLoadError(f"device {name!r} is not supported: use cpu, cuda or cuda:N")
    return device


def slice_config(config, start: int, end: int):
    """A copy of `config` describing only layers [start, end)."""
    sliced = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    sliced.num_hidden_layers = end - start
    if layer_types is not None:
        sliced.layer_types = list(layer_types[start:end])
    return sliced


class CheckpointIndex:
    """Which safetensors file holds which tensor, for single-file and sharded checkpoints.

    Headers are parsed (and validated) by checkpoint_reader, once per file; a corrupt or
    missing file is a SliceLoadError.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        index_file = model_dir / "model.safetensors.index.json"
        self.file_of: dict[str, str] = {}
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        if index_file.exists():
            try:
                self.file_of = dict(json.loads(index_file.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as err:
                raise SliceLoadError(f"{index_file} is not a valid safetensors index (no weight_map): {err}") from err
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise SliceLoadError(
                    f"{model_dir} holds no *.safetensors file; layerline loads safetensors checkpoints only "
                    "(convert with `save_pretrained(..., safe_serialization=True)`)")
            for file in files:
                for key in self.entries(file.name):
                    self.file_of[key] = file.name

    def entries(self, file: str) -> dict[str, TensorEntry]:
        """The parsed header of one of the checkpoint's files (cached)."""
        if file not in self._headers:
            try:
                self._headers[file] = read_header(self.model_dir / file)[0]
            except CheckpointFormatError as err:
                raise SliceLoadError(str(err)) from err
        return self._headers[file]

    def entry(self, key: str) -> TensorEntry:
        """Where tensor `key` lies; SliceLoadError if its file does not hold it."""
        file = self.file_of[key]
        found = self.entries(file).get(key)
        if found is None:
            raise SliceLoadError(f"{self.model_dir / file} has no tensor {key!r}, though the checkpoint's index "
                                 "says it does; the checkpoint is incomplete or its index is stale")
        return found

    def layout(self) -> dict[str, dict[str, TensorEntry]]:
        """Every file of the checkpoint with the tensors it holds (what the weights manifest covers)."""
        return {file: self.entries(file) for file in sorted(set(self.file_of.values()))}

    def find(self, *candidates: str) -> str | None:
        """The first candidate name the checkpoint holds."""
        return next((name for name in candidates if name in self.file_of), None)

    def describe(self) -> str:
        """Names, shapes and dtypes of every tensor, as a stable string (for the fingerprint)."""
        rows = []
        for key in self.file_of:
            entry = self.entry(key)
            rows.append(f"{key}:{entry.dtype_name}:{list(entry.shape)}")
        return "\n".join(sorted(rows))


def checkpoint_name_candidates(name: str) -> list[str]:
    """Names a parameter may have in a checkpoint: as is, or without/with the base prefix."""
    candidates = [name]
    head, _, rest = name.partition(".")
    if head in ("model", "transformer") and rest:
        candidates.append(rest)
    return candidates


def model_fingerprint(config, index: CheckpointIndex) -> str:
    """A short hash shared by every stage of one model: config plus tensor names/shapes/dtypes. Not the
    directory the config was read from (transformers keeps it in the config as `_name_or_path`):
    machines may hold one model at different paths."""
    described = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    config_json = json.dumps(described, sort_keys=True, default=str)
    digest = hashlib.sha256(config_json.encode())
    digest.update(index.describe().encode())
    return digest.hexdigest()[:16]


def _needed(name: str, layout, is_first: bool, is_last: bool) -> bool:
    if name.startswith(layout.layers_prefix):
        return True
    if is_first and name.startswith(layout.embedding_prefixes):
        return True
    return is_last and name.startswith(layout.head_prefixes)


def _checkpoint_key(name: str, start: int, layout, index: CheckpointIndex, tied: bool) -> str:
    if tied and name == layout.tied_head:
        name = layout.tied_embedding
    elif name.startswith(layout.layers_prefix):
        local, _, rest = name[len(layout.layers_prefix):].partition(".")
        name = f"{layout.layers_prefix}{start + int(local)}.{rest}"
    key = index.find(*checkpoint_name_candidates(name))
    if key is None:
        raise SliceLoadError(
            f"the checkpoint has no tensor for {name!r}; is it complete and of model_type it declares?")
    return key


def load_slice(model_dir: str | Path, start: int, end: int, *, dtype: str = "auto",
               device: str = "cpu", attention: str = "auto", progress: bool = True) -> LoadedSlice:
    """Load layers [start, end) of the checkpoint in `model_dir`.

    `attention`: auto | per-sequence | batched (stage_server/per_sequence_attention.py).

    Example:
        >>> piece = load_slice("/models/smollm2", 0, 10, dtype="bfloat16")  # doctest: +SKIP
        >>> piece.is_first, piece.is_last
        (True, False)
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise SliceLoadError(f"{model_dir} has no config.json: pass a Hugging Face model directory")
    config = AutoConfig.from_pretrained(model_dir)
    adapter_class = architecture_for(config.model_type)
    total = config.num_hidden_layers
    if not (0 <= start < end <= total):
        raise LayerRangeError(
            f"layer range {start}:{end} is outside the model, which has layers 0:{total} "
            "(START must be < END, END at most the number of layers)")
    torch_dtype = resolve_dtype(dtype, config)
    torch_device = resolve_device(device)

    sliced = slice_config(config, start, end)
    attention_mode = per_sequence_attention.mode_for(attention, torch_dtype, torch_device)
    per_sequence_attention.register()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            sliced, dtype=torch_dtype, attn_implementation=per_sequence_attention.IMPLEMENTATIONS[attention_mode])
    model.eval()
    layout = adapter_class.layout
    is_first, is_last = start == 0, end == total
    tied = bool(getattr(config, "tie_word_embeddings", False))

    index = CheckpointIndex(model_dir)
    try:
        manifest = manifest_for(model_dir, index.layout())
    except ManifestError as err:
        raise SliceLoadError(str(err)) from err
    wanted = [name for name, _ in model.named_parameters(remove_duplicate=False)
              if _needed(name, layout, is_first, is_last)]
    # A tied head on a stage that also holds the embedding shares its tensor.
    share_tied = tied and is_first and is_last and layout.tied_head in wanted
    to_read = [n for n in wanted if not (share_tied and n == layout.tied_head)]
    keys = {name: _checkpoint_key(name, start, layout, index, tied) for name in to_read}

    by_file: dict[str, list[str]] = {}
    for name in to_read:
        by_file.setdefault(index.file_of[keys[name]], []).append(name)
    bar = tqdm(total=len(to_read), desc=f"loading layers {start}:{end}", unit="tensor", disable=not progress)
    for file, names in by_file.items():
        # Plain reads, not safe_open's memory map: touched pages of a mapping count in RSS while it is
        # open, so converting (say fp32 → bf16) would hold the source bytes and the result together.
        # The reader returns fresh memory already in the target dtype (converted a chunk at a time),
        # which set_module_tensor_to_device then adopts without another copy on CPU.
        try:
            with SafetensorsReader(model_dir / file, index.entries(file)) as reader, SliceCheck(manifest) as check:
                for name in names:
                    key = keys[name]
                    index.entry(key)  # a clear error if the index names a tensor its file lacks
                    if reader.converts(key, torch_dtype) or sys.byteorder != "little":
                        digest = check.hasher()
                        value = reader.read(key, dtype=torch_dtype, hasher=digest)
                        check.check(file, key, digest)
                    else:  # the file's bytes as they are: digested on the worker while the next are read
                        value = reader.read(key, dtype=torch_dtype)
                        check.check_later(file, key, memoryview(value.reshape(-1).view(torch.uint8).numpy()))
                    set_module_tensor_to_device(model, name, torch_device, value=value, dtype=torch_dtype)
                    del value
                    bar.update(1)
                check.finish()
        except (CheckpointFormatError, ManifestError) as err:
            raise SliceLoadError(str(err)) from err
    bar.close()
    if share_tied:
        _tie_head_to_embedding(model, layout)
    _move_buffers(model, torch_device)

    parameter_bytes = _parameter_bytes(model)
    return LoadedSlice(
        architecture=adapter_class(model, sliced), config=config, sliced_config=sliced,
        layer_start=start, layer_end=end, dtype=torch_dtype, device=torch_device,
        fingerprint=model_fingerprint(config, index), parameter_bytes=parameter_bytes,
        weights_manifest_id=manifest.id, attention=attention_mode)


def _tie_head_to_embedding(model: nn.Module, layout) -> None:
    embedding = model.get_parameter(layout.tied_embedding)
    owner_name, _, attr = layout.tied_head.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, embedding)


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != "meta" and buffer.device != device:
            set_module_tensor_to_device(model, name, device, value=buffer)


def _parameter_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for param in model.parameters():
        if param.device.type == "meta" or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total
