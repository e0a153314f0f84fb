"""Llama-like decoder layers run as direct tensor calls, checked bit for bit against transformers.

Owns: running a sliced Llama / Mistral / Qwen2 / Qwen3 model's decoder layers without going
through their module forwards, and the check, made once when a slice is loaded, that this path
gives exactly the hidden states and cache that transformers' own forward gives.

Why: a decode step of SmolLM2-135M spends ~5 ms of its ~35 ms in Python (module calls, keyword
deprecation wrappers, config look-ups, per-layer dispatch), measured with the same 30 layers
shrunk to width 64. The tensor work here is the same calls, in the same order, on the same
tensors as the families' forwards in transformers 5.x (norm, projections, rotary, cache update,
the registered attention function, MLP), so the numbers are identical; only the glue is leaner
(~1.5 ms a step for 30 layers). Norms and linear layers are called through their own `forward`
(skipping only nn.Module's call machinery), so each family's norm is its own and row chunks
(row_chunks.py) that replace a linear layer's forward still apply; attention goes through the function transformers
would pick (`sdpa` or per_sequence_attention), with the masks transformers' mask helpers build.

Does not own: embeddings or the head (architectures.LlamaLike), GPT-2 and OPT (their adapters
already loop over blocks), or deciding what a model family is (architectures).

If transformers changes a family's forward, the load-time check fails and the stage falls back to
the stock forward with a warning, so a newer transformers can cost speed but never tokens.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from stage_server.errors import check_stop

log = logging.getLogger(__name__)

# The decoder layer classes whose forward this module reproduces (transformers 5.x).
LEAN_LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                                "Qwen3DecoderLayer"})


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, H, T, D] with cos/sin already unsqueezed to [B, 1, T, D]."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class _Layer:
    """One decoder layer's modules, held as plain attributes (no nn.Module look-ups per step)."""

    def __init__(self, layer: nn.Module, config) -> None:
        attention = layer.self_attn
        self.attention = attention
        self.layer_index = attention.layer_idx
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        # Qwen2/Qwen3 keep the window per layer; Mistral reads it from the config.
        self.window = attention.sliding_window if hasattr(attention, "sliding_window") \
            else getattr(config, "sliding_window", None)
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.q_norm = getattr(attention, "q_norm", None)  # Qwen3: per-head norms before rotary
        self.k_norm = getattr(attention, "k_norm", None)
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        mlp = layer.mlp
        self.gate_proj, self.up_proj, self.down_proj, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def run(self, hidden, cos, sin, mask, cache, attend) -> torch.Tensor:
        batch, tokens = hidden.shape[:2]
        heads_shape = (batch, tokens, -1, self.head_dim)
        residual = hidden
        normed = self.input_norm.forward(hidden)
        query = self.q_proj.forward(normed).view(heads_shape)
        key = self.k_proj.forward(normed).view(heads_shape)
        if self.q_norm is not None:
            query = self.q_norm.forward(query)
            key = self.k_norm.forward(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj.forward(normed).view(heads_shape).transpose(1, 2)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        key, value = cache.update(key, value, self.layer_index)
        out, _ = attend(self.attention, query, key, value, mask, dropout=0.0, scaling=self.scaling,
                        sliding_window=self.window)
        out = self.o_proj.forward(out.reshape(batch, tokens, -1).contiguous())
        hidden = residual + out
        residual = hidden
        normed = self.post_norm.forward(hidden)
        out = self.down_proj.forward(self.act(self.gate_proj.forward(normed)) * self.up_proj.forward(normed))
        return residual + out


class LeanLayers:
    """Runs a sliced base model's decoder layers (the base model of a Llama-like CausalLM)."""

    def __init__(self, base: nn.Module, config) -> None:
        self.base, self.config = base, config
        self.layers = [_Layer(layer, config) for layer in base.layers[: config.num_hidden_layers]]
        self.needs_full = any(layer.window is None for layer in self.layers)
        self.needs_sliding = any(layer.window is not None for layer in self.layers)

    def run(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            cache, stop=None) -> torch.Tensor:
        mask_kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                       "cache": cache, "position_ids": position_ids}
        full = create_causal_mask(**mask_kwargs) if self.needs_full else None
        sliding = create_sliding_window_causal_mask(**mask_kwargs) if self.needs_sliding else None
        cos, sin = self.base.rotary_emb(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        for layer in self.layers:
            check_stop(stop)
            hidden = layer.run(hidden, cos, sin, full if layer.window is None else sliding, cache, attend)
        return hidden


def lean_layers_for(base: nn.Module, config, stock_run) -> LeanLayers | None:
    """A checked LeanLayers for `base`, or None (with a warning when it was tried and differed).

    `stock_run(hidden, position_ids, attention_mask, cache)` is transformers' own path; both run a
    left-padded two-row prefill and one decode step on throwaway caches and must agree exactly.
    """
    layers = base.layers[: config.num_hidden_layers]
    if len(layers) == 0 or any(type(layer).__name__ not in LEAN_LAYER_CLASSES for layer in layers):
        return None
    if config._attn_implementation not in ALL_ATTENTION_FUNCTIONS:
        return None  # eager attention: keep the stock forward, which carries the family's own
    lean = LeanLayers(base, config)
    try:
        same = _agree(lean.run, stock_run, base, config)
    except Exception as err:  # a changed signature in a newer transformers: the stock path still works
        log.warning("the lean layer path failed its check (%s: %s); using transformers' forward",
                    type(err).__name__, err)
        return None
    if not same:
        log.warning("the lean layer path differs from transformers' forward on this version; using the latter")
        return None
    return lean


@torch.inference_mode()
def _agree(lean_run, stock_run, base: nn.Module, config) -> bool:
    parameter = next(base.layers[0].parameters())
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(2, 3, config.hidden_size, generator=generator).to(parameter.dtype).to(parameter.device)
    step = torch.randn(2, 1, config.hidden_size, generator=generator).to(parameter.dtype).to(parameter.device)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], device=parameter.device)  # row 0 left-padded, like the coordinator's
    positions = torch.tensor([[0, 0, 1], [0, 1, 2]], device=parameter.device)
    outputs, caches = [], []
    for run in (lean_run, stock_run):
        cache = DynamicCache(config=config)
        first = run(prompt, positions, mask, cache)
        second = run(step, positions[:, -1:] + 1, torch.cat([mask, mask.new_ones(2, 1)], dim=1), cache)
        outputs.append((first, second))
        caches.append(cache)
    for ours, theirs in zip(outputs[0], outputs[1]):
        if not _identical(ours, theirs):
            return False
    for ours, theirs in zip(caches[0].layers, caches[1].layers):
        if not (_identical(ours.keys, theirs.keys) and _identical(ours.values, theirs.values)):
            return False
    return True


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaNs in the same places count as equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()))
