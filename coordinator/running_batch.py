"""The coordinator's mirror of what each stage session holds: rows, padding, positions.

Owns: how admitted sequences are cut into prefills (`prefill_batches`), a `Prefill` (a
new session holding freshly admitted sequences, a long prompt sent in chunks), and a
`Group` (a running session that sequences join and leave between decode steps). A group
computes the `CacheEdit` that the stages apply before its next step, and applies the same
edit to its own attention mask, so the mask it sends always matches the caches.

Does not own: a sequence's tokens and outcome (sequence), when to admit, which group to
join, or whether a group chains (scheduler), nor sending or answers (engine).
"""

from __future__ import annotations

import secrets
from concurrent.futures import Future

import numpy as np
import torch

from coordinator import metrics
from coordinator.sequence import LiveSequence
from protos import stage_pb2


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, T] left-padded to the longest row, and the 0/1 mask [b, T]."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (longest - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def _has_padding(mask: torch.Tensor) -> bool:
    return bool((mask == 0).any())


def _pad_mask_left(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1) if missing > 0 else mask


def prefill_batches(sequences: list[LiveSequence], chunk_tokens: int, *,
                    alone: bool = False) -> list[list[LiveSequence]]:
    """Cut admitted sequences into prefills of whole prompts: rows × longest prompt ≤ chunk_tokens.

    A prompt is never cut across micro-batches beside other prompts: a prompt prefilled with
    others is then computed in the same pieces as alone (whole, or alone in chunks when it is
    longer than `chunk_tokens`), which per-sequence attention needs to give it the same numbers
    (stage_server/per_sequence_attention.py). Stages still overlap: each prefill is its own
    micro-batch. Sorted by length, so rows of a prefill waste little padding.

    `alone`: one prompt per prefill, for stages in per-sequence mode. Their linear layers' products
    may change a row's bits with the number of rows (bfloat16 on AMX: 8 prompts of 30 tokens
    together, 240 rows, differ from 30 alone; stage_server/row_chunks.py).
    """
    if alone:
        return [[sequence] for sequence in sorted(sequences, key=lambda s: len(s.prompt_ids))]
    if chunk_tokens <= 0:
        return [list(sequences)] if sequences else []
    batches: list[list[LiveSequence]] = []
    current: list[LiveSequence] = []
    for sequence in sorted(sequences, key=lambda s: len(s.prompt_ids)):
        if current and (len(current) + 1) * len(sequence.prompt_ids) > chunk_tokens:
            batches.append(current)
            current = []
        current.append(sequence)
    if current:
        batches.append(current)
    return batches


class Prefill:
    """Newly admitted sequences, prefilled together as their own session (in chunks when long)."""

    def __init__(self, sequences: list[LiveSequence], pad_token_id: int, chunk_tokens: int, target: Group) -> None:
        self.session_id = secrets.token_hex(16)  # 128 random bits: not guessed, not reused
        self.sequences = sequences
        self.input_ids, self.mask = left_padded([s.prompt_ids for s in sequences], pad_token_id)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.padded = _has_padding(self.mask)  # see Group.padded
        route = tuple(getattr(target.route, "addresses", ()))
        for sequence in sequences:
            sequence.last_position = len(sequence.prompt_ids) - 1
            sequence.route = route
        rows, length = self.input_ids.shape
        step = max(1, chunk_tokens // rows) if chunk_tokens > 0 else length
        self.chunks = [(start, min(start + step, length)) for start in range(0, length, step)]
        metrics.prefill_chunks(len(self.chunks))
        self.futures: list[Future] = []  # one answer per chunk; the last one holds the logits
        self.target = target  # the group these sequences join once prefilled
        self.route = target.route  # the stages it is sent to: its group's
        self.request_ids = [sequence.request_id for sequence in sequences]  # for the stages' logs
        # Every row wants one token: the last chunk frees the session on the stages as it passes,
        # instead of an EndSession round trip between the answer and the caller (~2.4 ms).
        self.ends_with_last_chunk = all(sequence.max_new_tokens <= 1 for sequence in sequences)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def sent_mask(self, end: int) -> torch.Tensor | None:
        """The mask a chunk ending at `end` is sent with: None when no row is padded (Group.padded)."""
        return self.mask[:, :end] if self.padded else None


class Group:
    """A running session on the stages: its rows in cache order and their mask."""

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.rows: list[LiveSequence] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        # Whether any row has left padding. Steps of a group without are sent with no mask: the stages
        # then attend causally over every cached position, which an all-ones mask says at the cost of
        # decoding, checking and expanding it on every stage each step (4 float32 stages, one request
        # decoding: 0.917 of the unsplit model's tokens/s without the mask, 0.899 with).
        self.padded = False
        self._ones_to_append = 0  # mask columns of 1s owed by steps sent (made when needed, see step_inputs)
        self.joining: list[Prefill] = []  # prefilled, merged at the next step
        self.incoming = 0  # rows still being prefilled for this group
        self.in_flight: Future | None = None
        self.chaining = False  # the step in flight may be followed by steps the last stage sends itself
        self.stop_asked = False  # StopChain has been sent for this chain
        self.route = None  # the stages its session and its joining prefills live on (a PipelineClient)

    @property
    def idle(self) -> bool:
        """No session, nobody joining or on the way, no step in flight: free to take a new route."""
        return self.empty and not self.joining and self.incoming == 0 and self.in_flight is None

    @property
    def empty(self) -> bool:
        return self.session_id is None

    @property
    def load(self) -> int:
        """Rows it holds or is about to receive."""
        return len(self.rows) + sum(len(p.sequences) for p in self.joining)

    def adopt(self, prefill: Prefill) -> None:
        """Become the session of a finished prefill (the group was empty)."""
        self.session_id = prefill.session_id
        self.rows = list(prefill.sequences)
        self.mask = prefill.mask
        self.padded = prefill.padded
        self._ones_to_append = 0

    def next_edit(self) -> stage_pb2.CacheEdit | None:
        """Drop finished rows and left padding nobody needs, append joining sessions.

        Returns the edit the stages must apply before the next step (None when nothing
        changes) and updates this group's rows and mask the same way. The caller has
        made sure the group keeps at least one row or has a session to adopt.
        """
        keep = [i for i, sequence in enumerate(self.rows) if sequence.finish is None]
        if len(keep) == len(self.rows) and not self.joining:
            return None  # nothing changes: an unpadded group's owed mask columns stay owed
        self._append_owed_ones()
        edit = stage_pb2.CacheEdit()
        if len(keep) < len(self.rows):
            edit.keep_rows.extend(keep)
            self.rows = [self.rows[i] for i in keep]
            self.mask = self.mask[keep]
            used = self.mask.sum(0).nonzero()
            lead = int(used[0]) if len(used) else self.mask.shape[1]
            if lead:
                edit.keep_positions = self.mask.shape[1] - lead
                self.mask = self.mask[:, lead:]
        if self.joining:
            length = max([self.mask.shape[1]] + [p.length for p in self.joining])
            masks = [_pad_mask_left(self.mask, length)]
            for prefill in self.joining:
                edit.append_sessions.append(prefill.session_id)
                self.rows.extend(prefill.sequences)
                masks.append(_pad_mask_left(prefill.mask, length))
            self.mask = torch.cat(masks, dim=0)
            self.joining = []
        changed = bool(edit.keep_rows) or bool(edit.keep_positions) or bool(edit.append_sessions)
        if changed:
            self.padded = _has_padding(self.mask)
        return edit if changed else None

    def step_inputs(self, pad_token_id: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """Token ids [b, 1], positions [b, 1] (int64 numpy arrays: they go straight to the wire,
        with no torch call) and mask [b, P + 1] of the next decode step (the mask None when no row
        is padded; it is kept here all the same, for the edits to come)."""
        tokens = [s.last_token if s.finish is None else pad_token_id for s in self.rows]
        positions = [s.last_position if s.finish is None else 0 for s in self.rows]
        self._ones_to_append += 1
        if self.padded:
            self._append_owed_ones()
        return (np.array(tokens, dtype=np.int64).reshape(-1, 1),
                np.array(positions, dtype=np.int64).reshape(-1, 1), self.mask if self.padded else None)

    def _append_owed_ones(self) -> None:
        """Append the columns of 1s owed by the steps so far (a padded group's at once, an unpadded
        one's when an edit needs the mask)."""
        if self._ones_to_append:
            ones = torch.ones(len(self.rows), self._ones_to_append, dtype=torch.long)
            self.mask = torch.cat([self.mask, ones], dim=1)
            self._ones_to_append = 0

    def abandon(self) -> None:
        """Forget the session, its joining and incoming prefills and its step in flight (their stages
        are told apart); the route stays until the caller changes it."""
        self.reset()
        self.joining = []
        self.incoming = 0
        self.in_flight = None
        self.chaining = self.stop_asked = False

    def reset(self) -> None:
        self.session_id = None
        self.rows = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.padded = False
        self._ones_to_append = 0
