"""Tiny random checkpoints of every supported family, saved as real safetensors.

Owns: configs small enough for CI, saving them single-file or sharded with tied or
untied heads, and the reference greedy output of the unsplit model. Nothing here
touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128


def tiny_config(family: str, *, tied: bool = False, layers: int = 4):
    """A config of a few layers and a hidden size of 64."""
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, sliding_window=6, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "qwen3":
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=256, **common)
    if family == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, **common)
    raise ValueError(family)


def save_tiny_model(directory: Path, family: str, *, tied: bool = False, sharded: bool = False,
                    layers: int = 4, seed: int = 0) -> Path:
    """Build a random tiny model and save it with safetensors; returns the directory."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied=tied, layers=layers))
    # Scale up the random weights a little so greedy tokens are not near-ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.mul_(2.0)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB" if sharded else "10GB")
    return Path(directory)


def reference_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
                     device: str = "cpu") -> list[list[int]]:
    """Greedy continuations of the unsplit model via `generate`, one left-padded batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    model.eval()
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return [row[longest:].tolist() for row in out]


def greedy_alone(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, *,
                 eos_token_ids: frozenset[int] = frozenset(), pad_token_id: int = 0) -> list[list[int]]:
    """Greedy continuations of the unsplit model, each prompt alone (no padding), ending at an EOS token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(eos_token_ids) or None, pad_token_id=pad_token_id)
            expected.append(out[0, len(ids):].tolist())
    return expected


def chat_reference(model_dir: Path, chats: list[str], max_new_tokens: int):
    """The model's Tokenization, each chat message as a one-turn chat prompt, and the unsplit model's
    greedy tokens for each (greedy_alone, ending at the model's EOS tokens)."""
    from coordinator.text import Tokenization

    tokenization = Tokenization.from_model_dir(model_dir)
    prompts = [tokenization.encode_chat([{"role": "user", "content": chat}]) for chat in chats]
    expected = greedy_alone(model_dir, prompts, max_new_tokens, eos_token_ids=tokenization.eos_token_ids,
                            pad_token_id=tokenization.pad_token_id)
    return tokenization, prompts, expected


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: match the tiny configs
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_tokenizer(directory: Path) -> Path:
    """A character-level tokenizer (printable ASCII) with a chat template, saved beside a tiny model."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    if len(vocab) > VOCAB:
        raise ValueError("tiny vocabulary overflow")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return Path(directory)
