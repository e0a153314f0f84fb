"""Token-level generation through the pipeline, for any number of concurrent callers.

Owns: the request and result types callers use, turning a `SequenceRequest` into a
live sequence handed to the continuous-batching scheduler, and waiting for results.
Every call — one request from a gRPC handler, or a whole batch from a benchmark —
joins the same running batch, so concurrent clients share decode steps.

Knows nothing about tokenization, text or gRPC servers.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from coordinator.pipeline_client import PipelineClient
from coordinator.running_batch import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, LiveSequence, SequenceResult
from coordinator.sampling import Sampler, SamplingParams
from coordinator.scheduler import BatchLimits, CapacityError, GenerationCancelled, Scheduler, SchedulerStats

__all__ = ["BatchLimits", "CapacityError", "Engine", "FINISH_EOS", "FINISH_LENGTH", "FINISH_STOP",
           "GenerationCancelled", "SchedulerStats", "SequenceRequest", "SequenceResult"]


@dataclass
class SequenceRequest:
    """One sequence to continue."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    #: Called with each new token; returning True stops the sequence (e.g. a stop string appeared).
    on_token: Callable[[int], bool] | None = None


def _always() -> bool:
    return True


def per_sequence_stages(infos) -> bool:
    """Whether any stage (by its InfoResponse) computes each sequence of a batch as alone
    (per-sequence attention mode)."""
    return any(info.attention == "per-sequence" for info in infos)


class Engine:
    """Generates for any number of callers through one PipelineClient.

    `micro_batches` is how many groups of sequences are in flight at once (one per
    stage keeps every stage busy during decode).
    """

    def __init__(self, pipeline: PipelineClient, *, pad_token_id: int = 0, micro_batches: int = 1,
                 limits: BatchLimits | None = None, chain: bool = True, prefill_alone: bool | None = None) -> None:
        self.pipeline = pipeline
        if prefill_alone is None:  # stages in per-sequence mode promise answers independent of the batch
            stage_infos = getattr(pipeline, "stage_infos", None)
            prefill_alone = stage_infos is not None and per_sequence_stages(stage_infos())
        self.scheduler = Scheduler(pipeline, pad_token_id=pad_token_id, groups=micro_batches, limits=limits,
                                   chain=chain, prefill_alone=prefill_alone)

    @property
    def hop_bytes(self) -> int:
        """Activation bytes the stages sent each other, over every run."""
        return self.pipeline.hop_bytes

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def submit_all(self, requests: list[SequenceRequest],
                   keep_going: Callable[[], bool] = _always) -> list[Future]:
        """Queue requests together; each future resolves to a SequenceResult (or raises)."""
        futures: list[Future] = []
        sequences: list[LiveSequence] = []
        for request in requests:
            future: Future = Future()
            futures.append(future)
            if request.max_new_tokens <= 0:
                future.set_result(SequenceResult([], FINISH_LENGTH))
                continue
            if not request.prompt_ids:
                raise ValueError("a prompt needs at least one token")
            sequences.append(LiveSequence(
                prompt_ids=list(request.prompt_ids), max_new_tokens=request.max_new_tokens,
                eos_token_ids=request.eos_token_ids, sampler=Sampler(request.sampling),
                on_token=request.on_token, keep_going=keep_going, result=future))
        if sequences:
            self.scheduler.submit(sequences)
        return futures

    def generate(self, requests: list[SequenceRequest],
                 keep_going: Callable[[], bool] = _always) -> list[SequenceResult]:
        """Continue every request; returns results in request order."""
        return [future.result() for future in self.submit_all(requests, keep_going)]
