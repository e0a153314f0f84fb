"""How a failure of the coordinator's calls to the stages is raised.

Owns: `StageCallError` (a micro-batch failed somewhere in the chain of stages, or the stream that
carried it ended: the gRPC status, and the stage that failed where known) and
`status_code_from_value` (a status code as the stages send it in-band). Raised by the streams to
the stages (stage_streams) and by reading an answer (pipeline_client.logits_of); the gRPC service
(service) turns it into the caller's status.

Does not own: errors in the coordinator's own requests (validation) or the stages' own errors
(stage_server/errors.py).
"""

from __future__ import annotations

import grpc


class StageCallError(Exception):
    """A micro-batch failed somewhere in the chain."""

    def __init__(self, code: grpc.StatusCode, message: str, failed_stage: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.failed_stage = failed_stage


def status_code_from_value(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)
