"""The stage's stream slots: how many Forward and Results streams it serves at once, and which
idle stream gives its slot up when a new one needs it.

Owns: `StreamSlots`, the `--max-streams` slots every stream holds for its life (gRPC calls and
same-machine connections alike), each slot's last activity (a request read, an answer sent), and
reclaiming: when every slot is taken, a new stream takes the slot of the stream idle longest, if
that one has been idle longer than `--stream-idle-timeout`, and that stream is ended (a gRPC call
is cancelled, a same-machine connection shut). Streams are reaped only when a slot is needed, so a
healthy coordinator's idle streams stay open while there is room; one that loses a stream opens
it again on its next step (coordinator/stage_streams.py reopens a stream that has ended).

Does not own: what a stream carries (forward_stream, collectors), refusing a stream (the servicer
answers RESOURCE_EXHAUSTED, the same-machine listener its REFUSED byte), or the flag's parsing
beyond `add_stream_slot_arguments`.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

DEFAULT_STREAM_IDLE_TIMEOUT_S = 300.0


class StreamSlot:
    """One stream's slot: `touch` on every message, `watch` an iterable to touch on each item."""

    def __init__(self, end: Callable[[], None], clock: Callable[[], float]) -> None:
        self.end = end  # ends the stream (from any thread) when its slot is reclaimed
        self._clock = clock
        self.last_active = clock()

    def touch(self) -> None:
        self.last_active = self._clock()

    def watch(self, items: Iterable) -> Iterator:
        for item in items:
            self.last_active = self._clock()
            yield item

    def watching(self, send: Callable[[object], bool]) -> Callable[[object], bool]:
        """`send`, touching the slot on every call."""
        def send_and_touch(message) -> bool:
            self.last_active = self._clock()
            return send(message)
        return send_and_touch


class StreamSlots:
    """At most `max_streams` slots; a stream idle longer than `idle_timeout_s` yields its slot to a new one."""

    def __init__(self, max_streams: int, idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_streams = max_streams
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._held: set[StreamSlot] = set()
        self._lock = threading.Lock()

    def acquire(self, end: Callable[[], None]) -> StreamSlot | None:
        """A slot for a new stream that `end()` ends; None when every slot is held by a stream active
        within the idle timeout."""
        slot = StreamSlot(end, self._clock)
        with self._lock:
            reclaimed = None
            if len(self._held) >= self.max_streams:
                reclaimed = min(self._held, key=lambda held: held.last_active, default=None)
                if reclaimed is None or slot.last_active - reclaimed.last_active <= self.idle_timeout_s:
                    return None
                self._held.discard(reclaimed)
            self._held.add(slot)
        if reclaimed is not None:
            log.info("ended a stream idle for %.0fs to free its slot for a new one (--stream-idle-timeout)",
                     slot.last_active - reclaimed.last_active)
            reclaimed.end()
        return slot

    def release(self, slot: StreamSlot) -> None:
        """The stream has ended (a reclaimed slot is already free)."""
        with self._lock:
            self._held.discard(slot)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


def add_stream_slot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream-idle-timeout", type=float, default=DEFAULT_STREAM_IDLE_TIMEOUT_S,
                        help="seconds without a message after which a Forward or Results stream gives its slot up "
                             "to a new stream when all --max-streams slots are taken (default %(default)s); "
                             "a coordinator reopens such a stream on its next step")
