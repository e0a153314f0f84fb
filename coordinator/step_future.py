"""What a micro-batch sent down the pipeline resolves to.

Owns: `StepFuture` (a micro-batch's answer to come, and the chained step it announces). Does not
own matching answers to futures (pipeline_client) or how a failure is raised (stage_errors).
"""

from __future__ import annotations

from concurrent.futures import Future


class StepFuture(Future):
    """A micro-batch's answer to come. When the last stage chained the next step itself
    (greedy chaining), `next_in_chain` is that step's future, set before this one resolves."""

    next_in_chain: StepFuture | None = None
