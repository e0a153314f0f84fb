"""A link: one stream of messages from a layerline process to a stage, with the stage's answers back.

Owns: the `Link` interface, which both transports implement (gRPC calls, protos/grpc_link.py; the
same-machine Unix socket, protos/unix_link.py), and `LinkReader`, the base of everything that
reads a link's answers: it runs the one reader thread per link, keeps `alive`, and once the link
ends lets the link release what it holds and its subclass fail whatever still waits on it. Both
sides build on it: a stage's link to its next hop (stage_server/next_hop.py) and the
coordinator's stream to the first stage and Results subscription (coordinator/stage_streams.py).

Does not own: choosing a transport (the callers, which try the Unix socket first for a loopback
stage that listens on one), what is sent, or what is kept of it (the subclasses).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

import grpc
from google.protobuf.message import Message

from protos import stage_pb2


class Link(Protocol):
    """One stream to a stage, whichever transport carries it."""

    #: how messages name the transport ("gRPC", "same-machine")
    kind: str
    #: what reading `answers()` raises when the link fails (rather than ends)
    read_errors: tuple[type[Exception], ...]

    def send(self, message: Message) -> bool:
        """Send one message without waiting for the stage; False once the link has failed."""

    def answers(self) -> Iterable[stage_pb2.ForwardResponse]:
        """The stage's answers in order, until it ends the stream; raises one of `read_errors` on a failure."""

    def close(self) -> None:
        """No more messages; answers in flight still come back."""

    def cancel(self) -> None:
        """End the link now, both ways; `answers()` ends or fails."""

    def release(self) -> None:
        """Reading is over: free what the link holds (a writer thread, a socket)."""

    def status(self, failure: Exception) -> grpc.StatusCode:
        """The status code a failure of the link (one of `read_errors`) stands for."""

    def describe(self, failure: Exception) -> str:
        """A failure of the link in words, for error messages and logs."""


class LinkReader:
    """Reads one link's answers on a thread of its own and hands each to `on_answer`; when the link ends,
    `alive` turns False (under `lock`), the link is released, and `_ended` runs once.

    A subclass sets up what `_ended` needs, then calls `_start_reading`."""

    def __init__(self, link: Link, address: str, on_answer: Callable[[stage_pb2.ForwardResponse], None]) -> None:
        self.link = link
        self.address = address
        self.alive = True
        self.failure: Exception | None = None  # what ended the link, once it has (None: it ended cleanly)
        self.lock = threading.Lock()  # held where a check of `alive` and what follows must not interleave with the end
        self._on_answer = on_answer

    def _start_reading(self, thread_name: str) -> None:
        threading.Thread(target=self._read, name=thread_name, daemon=True).start()

    def _ended(self, failure: Exception | None) -> None:
        """The link has ended, cleanly (None) or with `failure`: fail what still waits on it."""
        raise NotImplementedError

    def how_it_ended(self, failure: Exception | None) -> str:
        """ "ended", or "failed: " and what failed."""
        return "ended" if failure is None else f"failed: {self.link.describe(failure)}"

    def _read(self) -> None:
        failure: Exception | None = None
        on_answer = self._on_answer
        try:
            for answer in self.link.answers():
                on_answer(answer)
        except self.link.read_errors as err:
            failure = err
        finally:
            with self.lock:
                self.alive, self.failure = False, failure
            self.link.release()
            self._ended(failure)
