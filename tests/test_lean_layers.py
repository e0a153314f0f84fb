"""The lean layer path (stage_server/lean_layers.py) gives transformers' own bits, and steps aside
when it would not."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config

from stage_server import lean_layers
from stage_server.slice_loader import load_slice

LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3"]


def save_qwen2_with_sliding_layers(directory):
    """Qwen2 whose last two layers see a window of 5 keys (layer types mixed in one slice)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=5, max_window_layers=2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tiny_model, tmp_path_factory):
    dirs = {family: tiny_model(family) for family in LLAMA_LIKE}
    dirs["qwen2_sliding"] = save_qwen2_with_sliding_layers(tmp_path_factory.mktemp("qwen2_sliding"))
    return dirs


def run_steps(run, config, dtype, device="cpu") -> tuple[list[torch.Tensor], DynamicCache]:
    """A left-padded 3-row prefill of 9 positions, then 8 decode steps (past every window)."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long, device=device)
    mask[0, :4], mask[1, :1] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=config)
    outputs = []
    with torch.inference_mode():
        hidden = torch.randn(3, 9, config.hidden_size, generator=generator).to(dtype).to(device)
        outputs.append(run(hidden, positions, mask, cache))
        for _ in range(8):
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            positions = positions[:, -1:] + 1
            hidden = torch.randn(3, 1, config.hidden_size, generator=generator).to(dtype).to(device)
            outputs.append(run(hidden, positions, mask, cache))
    return outputs, cache


def assert_lean_matches_stock(piece, device="cpu"):
    arch = piece.architecture
    ours, our_cache = run_steps(arch.lean.run, piece.sliced_config, piece.dtype, device)
    theirs, their_cache = run_steps(arch._stock_layers, piece.sliced_config, piece.dtype, device)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert lean_layers._identical(a, b), f"step {step} differs from transformers' forward"
    for a, b in zip(our_cache.layers, their_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("family", LLAMA_LIKE + ["qwen2_sliding"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_path_is_used_and_bit_identical_to_transformers(model_dirs, family, dtype):
    piece = load_slice(model_dirs[family], 1, 4, dtype=dtype, progress=False)
    arch = piece.architecture
    assert arch.lean is not None, "the load-time check should accept the lean path for this family"
    assert_lean_matches_stock(piece)
    # and the stage's own entry point takes it
    with torch.inference_mode():
        cache = DynamicCache(config=piece.sliced_config)
        hidden = torch.ones(1, 2, piece.sliced_config.hidden_size, dtype=piece.dtype)
        assert torch.equal(arch.run_layers(hidden, torch.tensor([[0, 1]]), None, cache),
                           arch._stock_layers(hidden, torch.tensor([[0, 1]]), None,
                                              DynamicCache(config=piece.sliced_config)))


def test_a_lean_path_that_differs_is_refused_with_a_warning(model_dirs, monkeypatch, caplog):
    def off_by_a_little(x, cos, sin):  # what a changed rotary convention in a newer release would do
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((x[..., half:], -x[..., :half]), dim=-1) * sin)

    monkeypatch.setattr(lean_layers, "_rotate", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger="stage_server.lean_layers"):
        piece = load_slice(model_dirs["llama"], 0, 4, progress=False)
    assert piece.architecture.lean is None
    assert "differs from transformers' forward" in caplog.text
    with torch.inference_mode():  # the stage still runs, through transformers' forward
        ids = torch.tensor([[5, 6, 7]])
        hidden = piece.architecture.run_layers(piece.architecture.embed(ids, None), torch.tensor([[0, 1, 2]]),
                                               None, DynamicCache(config=piece.sliced_config))
    assert hidden.shape == (1, 3, 64)


def test_a_lean_path_that_raises_is_refused_with_a_warning(model_dirs, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise TypeError("update() got an unexpected keyword argument")

    monkeypatch.setattr(lean_layers._Layer, "run", broken)
    with caplog.at_level(logging.WARNING, logger="stage_server.lean_layers"):
        piece = load_slice(model_dirs["qwen3"], 0, 2, progress=False)
    assert piece.architecture.lean is None
    assert "failed its check (TypeError" in caplog.text


def test_eager_attention_keeps_the_stock_forward(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], attn_implementation="eager")
    assert lean_layers.lean_layers_for(model.model, model.config, lambda *args: None) is None
