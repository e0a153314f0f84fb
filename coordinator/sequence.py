"""One request's life in the coordinator, from what the caller asks to the result it gets.

Owns: `SequenceRequest` (what a caller asks: prompt ids, new tokens, sampling, end tokens, a
per-token callback), `SequenceResult` and the finish reasons (what it gets back), and
`LiveSequence`, the engine's record of one request while it generates: its sampler, its tokens
and next position, picking its next token from a step's logits, telling its caller, and resolving
the caller's future once. A failing sampler or callback ends only its own sequence.

Replay: after its route lost a server, a sequence starts again on a new one (`restart`) from its
prompt, and each step then re-feeds the token it had already produced instead of picking one, until
the new caches hold everything the caller has seen; the caller hears nothing of it, and the sampler's
random state is untouched, so the next token is the one it would have been. Tokens are re-fed one
decode step at a time, not as one prefill: a decode step gives each row the bits it gets alone,
while a prefill of many tokens may sum in another order (greedy answers would then differ).

Does not own: where a sequence sits in the batch (running_batch), when it is admitted
(scheduler), or the loop that moves it (engine).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from coordinator.pipeline_client import StepLogits
from coordinator.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_CANCELLED = "length", "eos", "stop", "cancelled"


@dataclass
class SequenceRequest:
    """One sequence to continue."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    #: Called with each new token; returning True stops the sequence (e.g. a stop string appeared).
    on_token: Callable[[int], bool] | None = None
    request_id: str = ""  # the public request's id, passed to the stages for their logs


@dataclass
class SequenceResult:
    token_ids: list[int]
    finish_reason: str
    route: tuple[str, ...] = ()  # the stage servers that produced its last tokens
    replays: int = 0  # routes it restarted on after losing a server


@dataclass
class LiveSequence:
    """One request being generated, wherever it currently sits."""

    prompt_ids: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    sampler: Sampler
    on_token: Callable[[int], bool] | None
    keep_going: Callable[[], bool]
    result: Future
    output: list[int] = field(default_factory=list)
    finish: str | None = None
    last_position: int = 0  # position of the newest token (the input of the next decode step)
    rebuilt: int | None = None  # replaying: how many of `output` the new route's caches have produced
    replays: int = 0  # routes it restarted on
    request_id: str = ""
    route: tuple[str, ...] = ()  # the stage servers of its session (set when its prefill is sent)

    @classmethod
    def from_request(cls, request: SequenceRequest, keep_going: Callable[[], bool], result: Future) -> LiveSequence:
        return cls(prompt_ids=list(request.prompt_ids), max_new_tokens=request.max_new_tokens,
                   eos_token_ids=request.eos_token_ids, sampler=Sampler(request.sampling),
                   on_token=request.on_token, keep_going=keep_going, result=result, request_id=request.request_id)

    @property
    def cache_positions(self) -> int:
        """Positions this sequence may come to occupy in every stage's cache."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.sampler.params.greedy

    @property
    def last_token(self) -> int:
        """The input of the next decode step: the newest token, or while replaying the one just re-fed."""
        return self.output[-1] if self.rebuilt is None else self.output[self.rebuilt - 1]

    @property
    def replaying(self) -> bool:
        return self.rebuilt is not None

    def restart(self) -> None:
        """Start again from the prompt on a new route, re-feeding the tokens produced so far."""
        self.replays += 1
        self.rebuilt = 0 if self.output else None
        self.last_position = 0

    def sample(self, logits: StepLogits, row: int) -> bool:
        """Pick this sequence's next token from its row of the step's logits and record whether it
        ends here by EOS or length; True if it got one. The caller hears of the token from `notify`,
        after. A finished sequence gets none; a failing sampler cancels the sequence."""
        if self.finish is not None:
            return False
        if self.rebuilt is not None:
            self._refeed(logits, row)
            return False
        try:
            if self.greedy:
                token = logits.best(row)
            else:
                token = self.sampler(logits.row(row), torch.tensor(self.prompt_ids + self.output))
        except Exception as err:
            self.cancel(err)
            return False
        self.output.append(token)
        self.last_position += 1
        if token in self.eos_token_ids:
            self.finish = FINISH_EOS
        elif len(self.output) >= self.max_new_tokens:
            self.finish = FINISH_LENGTH
        return True

    def _refeed(self, logits: StepLogits, row: int) -> None:
        """Replaying: the step's token is the one produced before; a greedy row checks it is the same."""
        known = self.output[self.rebuilt]
        if self.greedy and logits.best(row) != known:
            log.warning("a replayed greedy step gave token %d where the lost route gave %d; the answer keeps %d",
                        logits.best(row), known, known)
        self.rebuilt += 1
        self.last_position += 1
        if self.rebuilt == len(self.output):
            self.rebuilt = None

    def notify(self) -> bool:
        """Hand the newest token to `on_token`; if it answers True (a stop string), the sequence ends.
        True if the sequence has just finished (resolve it after); a failing callback cancels it."""
        try:
            if self.on_token is not None and self.on_token(self.output[-1]):
                self.finish = FINISH_STOP
        except Exception as err:
            self.cancel(err)
            return False
        return self.finish is not None

    def still_wanted(self) -> bool:
        """Whether the caller still wants the sequence (a failing `keep_going` counts as no)."""
        try:
            return bool(self.keep_going())
        except Exception:
            return False

    def cancel(self, error: Exception) -> None:
        """End the sequence here (whatever it finished by before) and resolve it with `error`."""
        self.finish = FINISH_CANCELLED
        self.resolve(error)

    def resolve(self, error: Exception | None = None) -> None:
        """Resolve the caller's future once: with the tokens, or with the error that ended it."""
        if self.result.done():
            return
        if error is not None:
            self.result.set_exception(error)
        else:
            self.result.set_result(SequenceResult(list(self.output), self.finish, self.route, self.replays))


def resolve_all(finished: list[LiveSequence]) -> None:
    for sequence in finished:
        sequence.resolve()


def cancel_all(sequences: list[LiveSequence], error: Exception) -> None:
    """Cancel every sequence of `sequences` that has not finished."""
    for sequence in sequences:
        if sequence.finish is None:
            sequence.cancel(error)
