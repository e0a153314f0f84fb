"""Tests for the pieces of protos.model_files' GGUF conversion: tensor names, rotary un-permutation, streaming writer.

The whole conversion of the real default model is checked by test_model_files.py's ``real_model`` test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protos.model_files.catalog import ModelFetchError
from protos.model_files.gguf_llama import hf_tensor_name, undo_rotary_permutation
from protos.model_files.safetensors_writer import write_safetensors_streaming


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The interleaving llama.cpp's converter applies to q/k rows (written out independently)."""
    rows = weight.shape[0]
    out = np.empty_like(weight)
    per_head = rows // n_heads
    half = per_head // 2
    for h in range(n_heads):
        for i in range(half):
            out[h * per_head + 2 * i] = weight[h * per_head + i]
            out[h * per_head + 2 * i + 1] = weight[h * per_head + half + i]
    return out


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_undo_rotary_permutation(n_heads: int) -> None:
    rng = np.random.default_rng(0)
    original = rng.standard_normal((n_heads * 8, 5)).astype(np.float32)
    restored = undo_rotary_permutation(_llama_cpp_permute(original, n_heads), n_heads)
    np.testing.assert_array_equal(restored, original)


def test_tensor_names() -> None:
    name = hf_tensor_name
    assert name("token_embd.weight") == (None, "model.embed_tokens.weight")
    assert name("output_norm.weight") == (None, "model.norm.weight")
    assert name("output.weight") == (None, "lm_head.weight")
    assert name("blk.29.attn_k.weight") == (29, "model.layers.29.self_attn.k_proj.weight")
    assert name("blk.0.ffn_norm.weight") == (0, "model.layers.0.post_attention_layernorm.weight")
    with pytest.raises(ModelFetchError, match="unexpected tensor"):
        name("blk.0.mystery.weight")


def test_streaming_safetensors_writer_roundtrip(tmp_path: Path) -> None:
    from safetensors import safe_open

    arrays = {
        "model.embed_tokens.weight": np.arange(21, dtype=np.float32).reshape(7, 3),
        "model.norm.weight": np.ones(3, dtype=np.float32),
        "model.layers.0.mlp.up_proj.weight": np.linspace(-1, 1, 10, dtype=np.float64).reshape(5, 2),
    }
    written = []
    path = tmp_path / "model.safetensors"
    write_safetensors_streaming(
        path,
        [(key, value.shape, lambda value=value: value) for key, value in arrays.items()],
        metadata={"format": "pt"},
        on_written=written.append,
    )
    assert written == list(arrays)
    with safe_open(str(path), framework="numpy") as handle:
        assert handle.metadata() == {"format": "pt"}
        for key, value in arrays.items():
            got = handle.get_tensor(key)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, value.astype(np.float32))

    with pytest.raises(ModelFetchError, match="expected"):
        write_safetensors_streaming(
            tmp_path / "bad.safetensors",
            [("x", (2, 2), lambda: np.zeros((4,), dtype=np.float32))],
            metadata={},
            on_written=lambda _: None,
        )
