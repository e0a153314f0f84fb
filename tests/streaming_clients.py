"""Concurrent streaming clients of a coordinator, with each token's arrival time.

Owns: one GenerateStream call recorded as a StreamResult (tokens, arrival times, status), a set of
concurrent calls started at once that a test can act on mid-run (Streams), and clients that keep
issuing requests until stopped (LoopingClients). Every call has a deadline and every wait a bound.
Does not own: the servers (failover_cluster) or what a test checks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from coordinator.client import CoordinatorClient

DEADLINE_S = 120.0  # each request's deadline: 16 streams of SmolLM2 and a replay on two shared, busy cores
RETRY_PAUSE_S = 0.2  # a looping client's pause after a failed request, so a refusing server is not flooded


@dataclass
class StreamResult:
    """One streamed request: its tokens, when each arrived (monotonic seconds), how it ended."""
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    code: grpc.StatusCode | None = None  # None: it succeeded
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None

    def largest_gap(self) -> float:
        """The longest wait between consecutive tokens (the first from the request's start)."""
        stamps = [self.started, *self.times]
        return max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)


def stream_one(address: str, prompt: list[int], max_new_tokens: int, *, timeout_s: float = DEADLINE_S,
               on_tokens=None, **request) -> StreamResult:
    """One GenerateStream call (greedy, `ignore_eos` unless given) with each token's arrival time;
    `on_tokens(count)` is called as tokens arrive."""
    result = StreamResult(list(prompt), started=time.monotonic())
    try:
        with CoordinatorClient(address, timeout_s=timeout_s) as client:
            for message in client.generate_stream(token_ids=result.prompt, max_new_tokens=max_new_tokens,
                                                  **{"ignore_eos": True, **request}):
                now = time.monotonic()
                result.tokens.extend(message.token_ids)
                result.times.extend([now] * len(message.token_ids))
                if on_tokens is not None:
                    on_tokens(len(message.token_ids))
    except grpc.RpcError as err:
        result.code, result.message = err.code(), err.details() or ""
    result.ended = time.monotonic()
    return result


class Streams:
    """Concurrent GenerateStream calls, one thread each, started at once; `wait_tokens` lets a test
    act at a chosen point of the run, `join` returns every request's StreamResult in prompt order."""

    def __init__(self, address: str, prompts: list[list[int]], max_new_tokens: int, *, timeout_s: float = DEADLINE_S,
                 **request) -> None:
        self.address, self.max_new_tokens, self.timeout_s, self.request = address, max_new_tokens, timeout_s, request
        self.results: list[StreamResult | None] = [None] * len(prompts)
        self.tokens_seen = 0
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._run, args=(i, p), daemon=True) for i, p in enumerate(prompts)]

    def start(self) -> Streams:
        for thread in self._threads:
            thread.start()
        return self

    def _arrived(self, count: int) -> None:
        with self._changed:
            self.tokens_seen += count
            self._changed.notify_all()

    def _run(self, index: int, prompt: list[int]) -> None:
        try:
            self.results[index] = stream_one(self.address, prompt, self.max_new_tokens, timeout_s=self.timeout_s,
                                             on_tokens=self._arrived, **self.request)
        finally:
            self._arrived(0)

    def wait_tokens(self, count: int, timeout_s: float = DEADLINE_S) -> bool:
        """Until `count` tokens have arrived over all streams (True), or every stream has ended or the
        time runs out (False)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.tokens_seen < count:
                left = deadline - time.monotonic()
                if left <= 0 or not any(t.is_alive() for t in self._threads):
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def join(self, timeout_s: float | None = None) -> list[StreamResult]:
        """Every result, once every stream has ended (AssertionError if one has not after `timeout_s`,
        by default the requests' own deadline plus a margin)."""
        deadline = time.monotonic() + (self.timeout_s + 10.0 if timeout_s is None else timeout_s)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = sum(t.is_alive() for t in self._threads)
        if hung:
            raise AssertionError(f"{hung} of {len(self._threads)} streams still open")
        return list(self.results)


class LoopingClients:
    """One thread per prompt, each streaming its prompt again and again until `stop()`: a steady load
    that keeps issuing new requests. `stop()` lets the requests in flight finish and returns every
    request's StreamResult."""

    def __init__(self, address: str, prompts: list[list[int]], max_new_tokens: int, *, timeout_s: float = DEADLINE_S,
                 max_requests: int = 1000, **request) -> None:
        self.address, self.max_new_tokens, self.timeout_s, self.request = address, max_new_tokens, timeout_s, request
        self.max_requests = max_requests  # per client: bounds the run whatever happens
        self.results: list[list[StreamResult]] = [[] for _ in prompts]
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, p), daemon=True) for i, p in enumerate(prompts)]

    def start(self) -> LoopingClients:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, index: int, prompt: list[int]) -> None:
        while not self._stopping.is_set() and len(self.results[index]) < self.max_requests:
            result = stream_one(self.address, prompt, self.max_new_tokens, timeout_s=self.timeout_s, **self.request)
            self.results[index].append(result)
            if not result.ok:
                self._stopping.wait(RETRY_PAUSE_S)

    def completed(self) -> int:
        return sum(len(r) for r in self.results)

    def stop(self) -> list[list[StreamResult]]:
        self._stopping.set()
        deadline = time.monotonic() + self.timeout_s + 10.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = sum(t.is_alive() for t in self._threads)
        if hung:
            raise AssertionError(f"{hung} of {len(self._threads)} looping clients still streaming")
        return self.results


def stream_all(address: str, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[StreamResult]:
    """Stream every prompt at once and wait for all of them."""
    return Streams(address, prompts, max_new_tokens, **kwargs).start().join()


def failures(results: list[StreamResult]) -> list[str]:
    """One line per failed request: its index, status code and message, the tokens it got and when
    the last one came and the call ended (seconds after its start)."""
    return [f"#{i}: {r.code.name}: {r.message} ({len(r.tokens)} tokens, the last at "
            f"{(r.times[-1] - r.started) if r.times else 0:.1f}s, ended at {r.ended - r.started:.1f}s)"
            for i, r in enumerate(results) if not r.ok]
