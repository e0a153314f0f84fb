"""What a Llama GGUF file (llama.cpp's format) means in Hugging Face terms.

Owns: reading scalar metadata from a parsed GGUF file, building a ``LlamaConfig`` from that
metadata (refusing architectures and features the converter does not handle), mapping GGUF tensor
names to Hugging Face ones, and undoing the rotary interleaving llama.cpp applies to q/k rows.

Does not own: opening the file, dequantizing, or writing anything (gguf_convert does that with
these pieces). Errors are :class:`~protos.model_files.catalog.ModelFetchError`. gguf and
transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from protos.model_files.catalog import ModelFetchError

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


def gguf_scalar(reader, key: str, default=None):
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


def hf_tensor_name(gguf_name: str) -> tuple[int | None, str]:
    """``blk.3.attn_q.weight`` -> ``(3, "model.layers.3.self_attn.q_proj.weight")``."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LLAMA_BLOCK_TENSORS:
        layer = int(parts[1])
        return layer, f"model.layers.{layer}.{_LLAMA_BLOCK_TENSORS[parts[2]]}.{suffix}"
    if stem in _LLAMA_GLOBAL_TENSORS:
        return None, f"{_LLAMA_GLOBAL_TENSORS[stem]}.{suffix}"
    raise ModelFetchError(f"unexpected tensor {gguf_name!r} in a Llama GGUF file; cannot convert it")


def undo_rotary_permutation(weight, n_heads: int):
    """llama.cpp stores q/k rows of each head with the two rotary halves interleaved; undo that."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_config_from_gguf(reader, tensor_names: set[str]):
    """The ``LlamaConfig`` a GGUF file's metadata and tensor names describe (float32, HF names)."""
    from gguf import GGUFValueType
    from transformers import LlamaConfig

    arch = gguf_scalar(reader, "general.architecture")
    if arch != "llama":
        raise ModelFetchError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    for key in reader.fields:
        if key.startswith("llama.rope.scaling.") or key.startswith("llama.expert_"):
            raise ModelFetchError(f"GGUF uses {key}, which this converter does not handle")

    def need(key: str):
        value = gguf_scalar(reader, key)
        if value is None:
            raise ModelFetchError(f"GGUF metadata lacks {key}")
        return value

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = gguf_scalar(reader, "llama.vocab_size")
    if vocab is None and tokens is not None and tokens.types[0] == GGUFValueType.ARRAY:
        vocab = len(tokens.data)
    if vocab is None:
        raise ModelFetchError("GGUF metadata gives no vocabulary size")
    token_ids = {
        f"{which}_token_id": gguf_scalar(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        for which, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_scalar(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(gguf_scalar(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(need("llama.context_length")),
        rms_norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(gguf_scalar(reader, "llama.rope.freq_base", 10000.0)),
        },
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **{key: int(value) for key, value in token_ids.items() if value is not None},
    )
