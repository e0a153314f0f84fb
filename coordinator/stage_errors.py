"""How a failure of the coordinator's calls to the stages is raised.

Owns: `StageCallError` (a micro-batch failed somewhere in the chain of stages, or the stream that
carried it ended: the gRPC status, and the stage that failed where known) and
`status_code_from_value` (a status code as the stages send it in-band), and what a failed call's
status says of its server (`SERVER_FAILURES`, `SESSION_LOST`). Raised by the streams to
the stages (stage_streams) and by reading an answer (pipeline_client.logits_of); the gRPC service
(service) turns it into the caller's status.

Does not own: errors in the coordinator's own requests (validation) or the stages' own errors
(stage_server/errors.py).
"""

from __future__ import annotations

import grpc

# A call failing with these lost its server (gone, reset, frozen past a deadline): replay elsewhere.
SERVER_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.UNKNOWN})
# The session is gone from a server that still serves (it restarted, or expired the session): replay.
SESSION_LOST = grpc.StatusCode.NOT_FOUND


class StageCallError(Exception):
    """A micro-batch failed somewhere in the chain."""

    def __init__(self, code: grpc.StatusCode, message: str, failed_stage: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.failed_stage = failed_stage


def status_code_from_value(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)
