"""Rough compute costs of a model's parts, for planning a balanced split.

Owns: estimating, from a Hugging Face config alone, how much work the final norm +
LM head does compared with one decoder layer (both are dominated by their matrix
products, so parameter counts stand in for work). A 135M model with a 49k
vocabulary has a head worth about eight of its thirty layers: a plain even split
leaves the last stage the slowest, and a pipeline runs at its slowest stage's pace.

Does not own: the split itself (planner) or anything measured at run time.
"""

from __future__ import annotations

_UNGATED_MLP = {"gpt2", "opt"}  # two MLP matrices instead of three


def layer_parameters(config) -> int:
    """Weights in one decoder layer (attention + MLP), ignoring norms and biases."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
             or getattr(config, "n_inner", None) or 4 * hidden)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = (2 if config.model_type in _UNGATED_MLP else 3) * hidden * inner
    return attention + mlp


def head_cost_in_layers(config, workload: tuple[int, int] | None = None) -> float:
    """The LM head's work in units of one decoder layer's: per token in decode (the default), or
    for a `workload` of requests of (prompt tokens, new tokens).

    Layers run for every prompt position and every generated token but the last; the head runs
    once per generated token (the prefill's last position, then each decode step). With long
    prompts the head's share shrinks: 256 SmolLM2 requests of ~40 + 32 tokens on a split for decode
    alone (head = 8 layers, 19:11) keep the first stage 93 % busy and the last 82 %.
    """
    per_token = config.vocab_size * config.hidden_size / layer_parameters(config)
    if workload is None:
        return per_token
    prompt_tokens, new_tokens = workload
    if prompt_tokens < 0 or new_tokens < 1:
        raise ValueError(f"a workload needs prompt_tokens >= 0 and new_tokens >= 1, got {prompt_tokens}:{new_tokens}")
    return per_token * new_tokens / (prompt_tokens + new_tokens - 1)
