"""How each supported model family is cut into stages and run slice by slice.

Owns: per-family knowledge — which parameter names belong to the embeddings, to
layer i, and to the head; and how to run embeddings → a slice of decoder layers →
final norm + LM head with Hugging Face's own modules and mask helpers.

Does not own: reading checkpoints (slice_loader), sessions (sessions), the wire.

Every adapter runs on a *sliced* model: a skeleton built from a config whose
`num_hidden_layers` is the slice's length, so attention modules carry local layer
indices and a compact `DynamicCache` of the slice's length is correct for padded
batches (the mask helpers measure past length from cache layer 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from stage_server.errors import check_stop
from stage_server.lean_layers import lean_layers_for


@dataclass(frozen=True)
class ParameterLayout:
    """Where a family keeps its weights, as module-name prefixes of the CausalLM class."""

    embedding_prefixes: tuple[str, ...]  # needed by stage 0 only
    layers_prefix: str  # "model.layers." — followed by the layer index
    head_prefixes: tuple[str, ...]  # final norm and LM head, needed by the last stage
    tied_head: str = "lm_head.weight"
    tied_embedding: str = "model.embed_tokens.weight"


class Architecture:
    """Runs one slice of one family. Subclasses fill in `layout` and the three steps."""

    layout: ParameterLayout

    def __init__(self, model: nn.Module, config) -> None:
        self.model = model
        self.config = config  # the sliced config

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] → hidden states [B, T, D] (stage 0 only)."""
        raise NotImplementedError

    def run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, cache, stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run the slice's decoder layers, appending this step's keys/values to `cache`. `stop()` is asked
        before each layer where the layers run one by one here: True abandons the step (StepAbandoned)."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the last position [B, D] → logits [B, V] (last stage only)."""
        raise NotImplementedError


class LlamaLike(Architecture):
    """Llama, Mistral (sliding window), Qwen2, Qwen3, SmolLM: pre-norm decoders with rotary.

    The slice runs through lean_layers (the same tensor calls with leaner glue) once that
    path has matched the base model's own forward bit for bit at load; otherwise through the
    base model's forward, given `inputs_embeds`, which builds the masks per layer type (full /
    sliding) and the rotary embeddings. The final norm is applied by `head` instead (replaced
    by Identity in the base).
    """

    layout = ParameterLayout(
        embedding_prefixes=("model.embed_tokens.",),
        layers_prefix="model.layers.",
        head_prefixes=("model.norm.", "lm_head."),
    )

    def __init__(self, model: nn.Module, config) -> None:
        super().__init__(model, config)
        self.final_norm = model.model.norm
        model.model.norm = nn.Identity()
        self.lean = lean_layers_for(model.model, config, self._stock_layers)

    def embed(self, input_ids, position_ids):
        return self.model.model.embed_tokens(input_ids)

    def run_layers(self, hidden, position_ids, attention_mask, cache, stop=None):
        if self.config.num_hidden_layers == 0:
            return hidden
        if self.lean is not None:
            return self.lean.run(hidden, position_ids, attention_mask, cache, stop)
        return self._stock_layers(hidden, position_ids, attention_mask, cache)

    def _stock_layers(self, hidden, position_ids, attention_mask, cache):
        out = self.model.model(inputs_embeds=hidden, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, use_cache=True)
        return out.last_hidden_state

    def head(self, hidden):
        return self.model.lm_head(self.final_norm(hidden))


class GPT2(Architecture):
    """GPT-2: learned absolute positions added at stage 0, blocks take the cache positionally."""

    layout = ParameterLayout(
        embedding_prefixes=("transformer.wte.", "transformer.wpe."),
        layers_prefix="transformer.h.",
        head_prefixes=("transformer.ln_f.", "lm_head."),
        tied_embedding="transformer.wte.weight",
    )

    def embed(self, input_ids, position_ids):
        body = self.model.transformer
        return body.wte(input_ids) + body.wpe(position_ids)

    def run_layers(self, hidden, position_ids, attention_mask, cache, stop=None):
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        for block in self.model.transformer.h:
            check_stop(stop)
            hidden = block(hidden, cache, mask, None, use_cache=True, position_ids=position_ids)
        return hidden

    def head(self, hidden):
        return self.model.lm_head(self.model.transformer.ln_f(hidden))


class OPT(Architecture):
    """OPT: learned positions with a +2 offset, optional project_in/out around the decoder."""

    layout = ParameterLayout(
        embedding_prefixes=("model.decoder.embed_tokens.", "model.decoder.embed_positions.",
                            "model.decoder.project_in."),
        layers_prefix="model.decoder.layers.",
        head_prefixes=("model.decoder.final_layer_norm.", "model.decoder.project_out.", "lm_head."),
        tied_embedding="model.decoder.embed_tokens.weight",
    )

    def embed(self, input_ids, position_ids):
        decoder = self.model.model.decoder
        hidden = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        # OPT's positional table is indexed by position + 2 (its padding offset).
        positions = decoder.embed_positions(None, 0, position_ids=position_ids)
        return hidden + positions

    def run_layers(self, hidden, position_ids, attention_mask, cache, stop=None):
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache)
        for layer in self.model.model.decoder.layers:
            check_stop(stop)
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
        return hidden

    def head(self, hidden):
        decoder = self.model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return self.model.lm_head(hidden)


ARCHITECTURES: dict[str, type[Architecture]] = {
    "llama": LlamaLike,
    "mistral": LlamaLike,
    "qwen2": LlamaLike,
    "qwen3": LlamaLike,
    "gpt2": GPT2,
    "opt": OPT,
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's model_type has no adapter."""


def architecture_for(model_type: str) -> type[Architecture]:
    """The adapter class for a config's `model_type`, or a clear error naming the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; layerline can split: {supported}") from None
