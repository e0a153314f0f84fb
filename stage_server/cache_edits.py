"""Reshaping a session's KV cache between steps: rows leave, rows join.

Owns: the tensor surgery continuous batching needs on a `DynamicCache` — keeping a
subset of rows, dropping left padding no row needs any more, and appending the rows
of other caches left-padded to a common length — for full-attention and
sliding-window layers alike (a sliding layer keeps at most `window - 1` positions
and counts every position it has seen in `cumulative_length`).

Also owns checking a `CacheEdit` against its session before any tensor changes
(`PlannedEdit`).

Does not own: deciding which rows go where (the coordinator decides and sends a
`CacheEdit`), session bookkeeping (sessions), or checking the step itself against the
edited session (stage_model.check_step, which step_runner calls with the planned shape).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from stage_server.errors import InvalidRequest


def cache_layers(cache) -> list:
    return list(getattr(cache, "layers", []))


def _set_total(layer, total_positions: int) -> None:
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = total_positions


def keep_rows_and_positions(cache, rows: list[int] | None, keep_positions: int) -> None:
    """Keep `rows` (in that order; None keeps all) and only the last `keep_positions` positions."""
    index = None
    for layer in cache_layers(cache):
        if not layer.is_initialized or layer.keys is None:
            continue
        if rows is not None:
            if index is None or index.device != layer.keys.device:
                index = torch.tensor(rows, dtype=torch.long, device=layer.keys.device)
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        length = min(layer.keys.shape[-2], keep_positions)
        if length < layer.keys.shape[-2]:
            layer.keys = layer.keys[..., -length:, :].contiguous() if length else layer.keys[..., :0, :]
            layer.values = layer.values[..., -length:, :].contiguous() if length else layer.values[..., :0, :]
        _set_total(layer, keep_positions)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([pad, tensor], dim=-2)


def append_caches(cache, others: list, total_positions: int) -> None:
    """Append the rows of `others` after `cache`'s, every layer left-padded to the longest.

    `total_positions` is the merged session's position count (the longest of the
    merged sessions); sliding layers record it as their cumulative length.
    """
    layer_lists = [cache_layers(cache)] + [cache_layers(other) for other in others]
    for layers in zip(*layer_lists, strict=True):
        target = layers[0]
        if not all(layer.is_initialized for layer in layers):
            raise ValueError("a session with an empty cache cannot be merged (run its prefill first)")
        length = max(layer.keys.shape[-2] for layer in layers)
        target.keys = torch.cat([_left_pad(layer.keys, length) for layer in layers], dim=0)
        target.values = torch.cat([_left_pad(layer.values, length) for layer in layers], dim=0)
        _set_total(target, total_positions)


class PlannedEdit:
    """A validated `CacheEdit` for one session: what the session looks like after it.

    Validating everything before touching any tensor means a bad edit leaves every
    cache as it was.
    """

    def __init__(self, session, edit, sessions, caller=None) -> None:
        """`caller` (a deployment.Caller) must be allowed to use every session it appends."""
        self.session = session
        batch = session.batch_size
        self.rows: list[int] | None = None
        if edit.keep_rows:
            rows = list(edit.keep_rows)
            if max(rows) >= batch:
                raise InvalidRequest(f"cache_edit.keep_rows names row {max(rows)}, but session "
                                     f"{session.session_id!r} holds {batch} rows")
            if len(set(rows)) != len(rows):
                raise InvalidRequest("cache_edit.keep_rows names a row twice")
            self.rows = rows
        self.keep_positions = edit.keep_positions or session.tokens_seen
        if self.keep_positions > session.tokens_seen:
            raise InvalidRequest(f"cache_edit.keep_positions is {edit.keep_positions}, but session "
                                 f"{session.session_id!r} holds {session.tokens_seen} positions")
        names = list(edit.append_sessions)
        if len(set(names)) != len(names) or session.session_id in names:
            raise InvalidRequest("cache_edit.append_sessions names a session twice (or the session itself)")
        if names and session.tokens_seen == 0:
            raise InvalidRequest(f"cache_edit.append_sessions needs session {session.session_id!r} to hold "
                                 "cached positions first; start it with a prefill, then append in a later step")
        self.others = [sessions.get(name, caller) for name in names]
        for other in self.others:
            if other.tokens_seen == 0:
                raise InvalidRequest(f"session {other.session_id!r} has no cached positions to merge yet")
        kept_rows = len(self.rows) if self.rows is not None else batch
        self.batch_size = kept_rows + sum(other.batch_size for other in self.others)
        self.tokens_seen = max([self.keep_positions] + [other.tokens_seen for other in self.others])

    def apply(self, sessions) -> None:
        """Reshape the caches and the session table; the appended sessions are freed."""
        session = self.session
        if self.rows is not None or self.keep_positions < session.tokens_seen:
            keep_rows_and_positions(session.cache, self.rows, self.keep_positions)
        if self.others:
            append_caches(session.cache, [other.cache for other in self.others], self.tokens_seen)
            for other in self.others:
                sessions.end(other.session_id)
        session.batch_size = self.batch_size
        session.tokens_seen = self.tokens_seen
        session.reserved_bytes = self.batch_size * self.tokens_seen * sessions.bytes_per_token
