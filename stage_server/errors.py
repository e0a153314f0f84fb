"""Request errors a stage raises, each tagged with the gRPC status code it maps to.

Owns: the error vocabulary of the stage (code names only). Does not own: turning them into
gRPC statuses (the step runner answers them in-band through answers.error_response); nothing
here imports grpc.
"""

from __future__ import annotations


class StageRequestError(Exception):
    """A request the stage cannot serve; `code` is a grpc.StatusCode name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequest(StageRequestError):
    code = "INVALID_ARGUMENT"


class SessionNotFound(StageRequestError):
    code = "NOT_FOUND"


class OutOfRange(StageRequestError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(StageRequestError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(StageRequestError):
    code = "PERMISSION_DENIED"


class WrongRoute(StageRequestError):
    code = "FAILED_PRECONDITION"


class StageUnavailable(StageRequestError):
    code = "UNAVAILABLE"
