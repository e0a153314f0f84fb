"""Request errors a stage raises, each tagged with the gRPC status code it maps to.

Owns: the error vocabulary of the stage (code names only), and `check_stop`, which a step's layer
loop asks before each layer so that a session ended mid-step stops computing there. Does not own: turning them into
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


class StepAbandoned(SessionNotFound):
    """The step's session was ended while the step computed: its remaining layers are not computed."""


def check_stop(stop) -> None:
    """Raise StepAbandoned when `stop` (None, or a callable) says the step's session has ended."""
    if stop is not None and stop():
        raise StepAbandoned("the session was ended (EndSession) while this step computed; the rest of it is "
                            "not computed")


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
