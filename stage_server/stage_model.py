"""One forward step of a stage's slice for one session, with input checks.

Owns: turning a decoded micro-batch (token ids or hidden states, positions, mask)
into this stage's output (hidden states, or last-position logits on the last
stage), validating shapes and lengths against the session's cache first.

Does not own: decoding bytes (protos.codec), the session table (sessions), the
network or the route (step_runner).
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from stage_server.errors import InvalidRequest, OutOfRange
from stage_server.sessions import Session
from stage_server.slice_loader import LoadedSlice

# Up to this many elements, value_range reads the values as Python ints: a torch reduction costs
# ~70 µs each on the cold caches a step starts with, a tolist of a few ids a few µs.
_SMALL_RANGE_ELEMENTS = 4096


def value_range(values: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor as Python ints; (0, 0) when it is empty."""
    if values.numel() == 0:
        return 0, 0
    if values.dim() == 2 and values.numel() <= _SMALL_RANGE_ELEMENTS and values.device.type == "cpu":
        flat = [value for row in values.tolist() for value in row]
        return min(flat), max(flat)
    low, high = torch.aminmax(values)
    return int(low), int(high)


def _as(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` on `device` as `dtype`; itself, without a torch call, when it is already (a call
    costs tens of µs on the cold caches a step starts with)."""
    if tensor.dtype == dtype and tensor.device == device:
        return tensor
    return tensor.to(device=device, dtype=dtype)


class StageModel:
    """Runs micro-batches through one loaded slice."""

    def __init__(self, loaded: LoadedSlice) -> None:
        self.loaded = loaded
        config = loaded.config
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.max_positions = getattr(config, "max_position_embeddings", None) or (1 << 20)

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes one position of one row costs on this stage (keys + values, all layers)."""
        config = self.loaded.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = self.loaded.layer_end - self.loaded.layer_start
        element = torch.empty((), dtype=self.loaded.dtype).element_size()
        return 2 * layers * heads * head_dim * element

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.loaded.sliced_config)

    @torch.inference_mode()
    def small_step_seconds(self) -> float:
        """Seconds one single-token step of this slice takes, on a throwaway cache (for calibration)."""
        loaded, arch = self.loaded, self.loaded.architecture
        zeros = torch.zeros(1, 1, dtype=torch.long, device=loaded.device)  # token 0 at position 0
        positions = zeros
        started = time.perf_counter()
        if loaded.is_first:
            hidden = arch.embed(zeros, positions)
        else:
            hidden = torch.zeros(1, 1, self.hidden_size, dtype=loaded.dtype, device=loaded.device)
        hidden = arch.run_layers(hidden, positions, None, self.new_cache())
        if loaded.is_last:
            arch.head(hidden[:, -1, :])
        return time.perf_counter() - started

    def check_step(self, session: Session, activations: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, rows_and_positions: tuple[int, int] | None = None) -> int:
        """Validate one step against the session; returns the number of new positions T.

        `rows_and_positions` overrides the session's (rows, cached positions) with what
        they will be once a pending cache edit is applied.
        """
        rows, cached = rows_and_positions or (session.batch_size, session.tokens_seen)
        if self.loaded.is_first:
            if activations.dim() != 2 or activations.dtype not in (torch.int64, torch.int32):
                raise InvalidRequest(
                    f"stage 0 takes token ids as an int64 tensor [batch, tokens]; got {activations.dtype} "
                    f"{list(activations.shape)}")
            low, high = value_range(activations)
            if low < 0 or high >= self.vocab_size:
                raise InvalidRequest(f"token ids must lie in the vocabulary [0, {self.vocab_size}); got "
                                     f"{low}..{high}")
        elif activations.dim() != 3 or activations.shape[-1] != self.hidden_size \
                or not activations.dtype.is_floating_point:
            raise InvalidRequest(
                f"this stage takes hidden states [batch, tokens, {self.hidden_size}] of a float dtype; "
                f"got {activations.dtype} {list(activations.shape)}")
        batch, new_tokens = activations.shape[0], activations.shape[1]
        if batch != rows:
            raise InvalidRequest(f"session {session.session_id!r} holds {rows} rows, "
                                 f"this step has {batch}")
        if new_tokens == 0:
            raise InvalidRequest("a step must carry at least one token")
        if list(position_ids.shape) != [batch, new_tokens] or position_ids.dtype not in (torch.int64, torch.int32):
            raise InvalidRequest(
                f"position_ids must be int64 [{batch}, {new_tokens}]; got {position_ids.dtype} "
                f"{list(position_ids.shape)}")
        total = cached + new_tokens
        low, high = value_range(position_ids)
        if low < 0 or high >= self.max_positions:
            raise OutOfRange(f"positions must lie in [0, {self.max_positions}) for this model")
        if total > self.max_positions:
            raise OutOfRange(
                f"the sequence would reach {total} positions; this model handles {self.max_positions}")
        if attention_mask is not None and list(attention_mask.shape) != [batch, total]:
            raise InvalidRequest(
                f"attention_mask must be [{batch}, {total}] (cached {cached} + new {new_tokens}); "
                f"got {list(attention_mask.shape)}")
        return new_tokens

    @torch.inference_mode()
    def forward(self, session: Session, activations: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run one checked step; returns hidden states [B, T, D] or, on the last stage, logits [B, V] fp32."""
        loaded, arch = self.loaded, self.loaded.architecture
        device = loaded.device
        position_ids = _as(position_ids, device, torch.long)
        if attention_mask is not None:
            attention_mask = _as(attention_mask, device, torch.long)
        if loaded.is_first:
            hidden = arch.embed(_as(activations, device, torch.long), position_ids)
        else:
            hidden = _as(activations, device, loaded.dtype)
        hidden = arch.run_layers(hidden, position_ids, attention_mask, session.cache, stop=lambda: session.ended)
        session.tokens_seen += activations.shape[1]
        if loaded.is_last:
            return arch.head(hidden[:, -1, :]).float()  # [B, V]
        return hidden  # [B, T, D]
