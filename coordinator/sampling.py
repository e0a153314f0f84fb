"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed.

Owns: one sampler per sequence, built from transformers' logits warpers (not
rewritten here) and its own random generator, so concurrent sequences with seeds
are reproducible independently of each other. Knows nothing about batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

GREEDY_BELOW = 1e-5  # temperatures under this are greedy


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults are greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Picks one sequence's tokens."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        warpers = []
        if not params.greedy:
            warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if 0.0 < params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self._warpers = LogitsProcessorList(warpers)
        self._generator = torch.Generator()
        if params.seed is not None:
            self._generator.manual_seed(params.seed)
        else:
            self._generator.seed()

    def __call__(self, logits: torch.Tensor, previous_ids: torch.Tensor | None = None) -> int:
        """Next token id from float logits [V] of one sequence."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        ids = previous_ids if previous_ids is not None else torch.zeros(1, 0, dtype=torch.long)
        scores = self._warpers(ids.view(1, -1), logits.view(1, -1).float())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))
