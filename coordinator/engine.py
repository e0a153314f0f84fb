"""Token-level generation through the pipeline: prefill, decode, stop.

Owns: turning a batch of prompts (token ids) into left-padded micro-batch groups,
each its own session on the stages, sending prefill and decode steps so that groups
overlap in the pipeline (group g decodes while group g+1 is still in a later stage),
sampling each row, and stopping rows on EOS, on max tokens, or when the caller says
so (stop strings). Frees every session it started, on success or failure.

Knows nothing about tokenization, text or gRPC servers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import torch

from coordinator.pipeline_client import PipelineClient, logits_of
from coordinator.sampling import Sampler, SamplingParams

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"


class GenerationCancelled(Exception):
    """The caller asked to stop (client went away or deadline passed)."""


@dataclass
class SequenceRequest:
    """One sequence to continue."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    #: Called with each new token; returning True stops the sequence (e.g. a stop string appeared).
    on_token: Callable[[int], bool] | None = None


@dataclass
class SequenceResult:
    token_ids: list[int]
    finish_reason: str


class _Group:
    """Rows that share one session on the stages (one micro-batch)."""

    def __init__(self, rows: list[int], requests: list[SequenceRequest], pad_token_id: int) -> None:
        self.rows = rows
        self.session_id = uuid.uuid4().hex
        prompts = [requests[r].prompt_ids for r in rows]
        longest = max(len(p) for p in prompts)
        self.input_ids = torch.tensor([[pad_token_id] * (longest - len(p)) + p for p in prompts])  # [b, T]
        self.mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])  # [b, T]
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # [b, T]
        self.started = False
        self.done = False


class Engine:
    """Generates for batches of sequences through a PipelineClient."""

    def __init__(self, pipeline: PipelineClient, *, pad_token_id: int = 0, micro_batches: int = 1) -> None:
        self.pipeline = pipeline
        self.pad_token_id = pad_token_id
        self.micro_batches = max(1, micro_batches)
        self.hop_bytes = 0  # activation bytes the stages sent each other, over every run
        self._stats_lock = threading.Lock()

    def generate(self, requests: list[SequenceRequest],
                 keep_going: Callable[[], bool] = lambda: True) -> list[SequenceResult]:
        """Continue every request; returns results in request order."""
        if not requests:
            return []
        n_groups = min(self.micro_batches, len(requests))
        bounds = [round(i * len(requests) / n_groups) for i in range(n_groups + 1)]
        groups = [_Group(list(range(bounds[i], bounds[i + 1])), requests, self.pad_token_id)
                  for i in range(n_groups)]
        samplers = [Sampler(r.sampling) for r in requests]
        outputs: list[list[int]] = [[] for _ in requests]
        finish: list[str | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            if request.max_new_tokens <= 0:
                finish[i] = FINISH_LENGTH
        try:
            pending = {self._send(g): g for g in groups if not self._group_finished(g, finish)}
            while pending:
                if not keep_going():
                    raise GenerationCancelled("generation cancelled by the caller")
                done, _ = wait(list(pending), timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    group = pending.pop(future)
                    response = future.result()
                    logits = logits_of(response)  # [b, V]
                    with self._stats_lock:
                        self.hop_bytes += sum(response.hop_bytes)
                    next_ids = self._advance(group, logits, requests, samplers, outputs, finish)
                    if self._group_finished(group, finish):
                        self._end(group)
                    else:
                        pending[self._send(group, next_ids)] = group
        except BaseException:
            for group in groups:
                self._end(group)
            raise
        return [SequenceResult(outputs[i], finish[i] or FINISH_LENGTH) for i in range(len(requests))]

    def _send(self, group: _Group, next_ids: torch.Tensor | None = None):
        if next_ids is None:  # prefill
            group.started = True
            return self.pipeline.submit(group.session_id, group.input_ids, group.positions, group.mask,
                                        start_session=True)
        group.positions = group.positions[:, -1:] + 1  # [b, 1]
        group.mask = torch.cat([group.mask, torch.ones_like(group.mask[:, :1])], dim=1)  # [b, P+1]
        return self.pipeline.submit(group.session_id, next_ids, group.positions, group.mask)

    def _advance(self, group, logits, requests, samplers, outputs, finish) -> torch.Tensor:
        """Sample a token for every live row of the group; returns the next inputs [b, 1]."""
        next_ids = []
        for local, row in enumerate(group.rows):
            if finish[row] is not None:
                next_ids.append(self.pad_token_id)
                continue
            previous = torch.tensor(requests[row].prompt_ids + outputs[row])
            token = samplers[row](logits[local], previous)
            outputs[row].append(token)
            next_ids.append(token)
            request = requests[row]
            if request.on_token is not None and request.on_token(token):
                finish[row] = FINISH_STOP
            elif token in request.eos_token_ids:
                finish[row] = FINISH_EOS
            elif len(outputs[row]) >= request.max_new_tokens:
                finish[row] = FINISH_LENGTH
        return torch.tensor(next_ids).view(-1, 1)

    @staticmethod
    def _group_finished(group: _Group, finish) -> bool:
        return all(finish[row] is not None for row in group.rows)

    def _end(self, group: _Group) -> None:
        if group.started and not group.done:
            group.done = True
            try:
                self.pipeline.end_session(group.session_id)
            except Exception:  # the stages expire idle sessions anyway
                pass
