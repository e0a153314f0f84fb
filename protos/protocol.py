"""The version of the protocol between a coordinator and its stages, which they must share.

Owns: PROTOCOL_VERSION, reported in `Stage.Info` and compared by the coordinator before it serves
a chain (coordinator/stage_agreement.py), and DRAINING_REFUSAL, the words by which a draining stage's
UNAVAILABLE refusal of a new session is told apart from a failure (the coordinator then routes new
sessions elsewhere and lets the stage's own sessions finish). Does not own: the messages themselves
(stage.proto).
"""

from __future__ import annotations

# Raised by one when a change to stage.proto or to what a stage does with its messages would make a
# stage or coordinator without the change misread or mishandle what one with it sends; a new field
# that an older peer may ignore keeps it.
PROTOCOL_VERSION = 2

# In the message of a draining stage's refusal of a step that starts a session (UNAVAILABLE).
DRAINING_REFUSAL = "is draining: it starts no new session"
