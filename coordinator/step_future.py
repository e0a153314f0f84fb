"""What a micro-batch sent down the pipeline resolves to, and how a failure of it is raised.

Owns: `StepFuture` (a micro-batch's answer to come, and the chained step it announces) and
`StageCallError` (a micro-batch failed somewhere in the chain, with the gRPC status and the stage
that failed). Shared by the coordinator's streams over gRPC (pipeline_client) and over a
same-machine socket (local_streams). Does not own matching answers to futures (pipeline_client).
"""

from __future__ import annotations

from concurrent.futures import Future

import grpc


class StageCallError(Exception):
    """A micro-batch failed somewhere in the chain."""

    def __init__(self, code: grpc.StatusCode, message: str, failed_stage: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.failed_stage = failed_stage


def status_code_from_value(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


class StepFuture(Future):
    """A micro-batch's answer to come. When the last stage chained the next step itself
    (greedy chaining), `next_in_chain` is that step's future, set before this one resolves."""

    next_in_chain: StepFuture | None = None
