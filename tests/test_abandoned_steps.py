"""EndSession stops a session's queued work on every stage: the chunks of a long prefill still waiting
for a stage's compute thread, there or forwarded to the next stage, are refused NOT_FOUND as they
would compute, and the model never runs them."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import grpc
import torch
from test_bad_input import code_of
from waiting import eventually, stage_sessions

from protos import codec, stage_pb2, stage_pb2_grpc

CHUNKS, CHUNK_TOKENS = 20, 4
WAIT_S = 30.0


def _chunk(session_id: str, index: int, route: list[str]) -> stage_pb2.ForwardRequest:
    first = index * CHUNK_TOKENS
    ids = torch.full((1, CHUNK_TOKENS), 5 + index, dtype=torch.int64)
    return stage_pb2.ForwardRequest(
        session_id=session_id, micro_batch_id=index + 1, route=route, start_session=index == 0,
        activations=codec.encode(ids), position_ids=codec.encode(torch.arange(first, first + CHUNK_TOKENS).view(1, -1)),
        attention_mask=codec.encode(torch.ones(1, first + CHUNK_TOKENS, dtype=torch.int64)))


class CountedForward:
    """Wraps a stage's model.forward: each call takes at least `delay_s` more, and its start and end
    times are kept, so that a test sees which forwards ran and when."""

    def __init__(self, server, delay_s: float) -> None:
        self.model, self.delay_s = server.service.model, delay_s
        self.forward = self.model.forward
        self.calls: list[tuple[float, float]] = []

    def __call__(self, *args, **kwargs):
        started = time.monotonic()
        time.sleep(self.delay_s)
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.calls.append((started, time.monotonic()))

    @contextlib.contextmanager
    def installed(self):
        self.model.forward = self
        try:
            yield self
        finally:
            self.model.forward = self.forward


class Prefill:
    """CHUNKS chunks of one session sent at once on a Forward stream to `address`; answers go to a queue."""

    def __init__(self, address: str, session_id: str, route: list[str]) -> None:
        self.channel = grpc.insecure_channel(address)
        self.answers: queue.Queue = queue.Queue()
        requests = [_chunk(session_id, i, route) for i in range(CHUNKS)]
        self.call = stage_pb2_grpc.StageStub(self.channel).Forward(iter(requests), timeout=WAIT_S)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for answer in self.call:
                self.answers.put(answer)

    def next_answer(self) -> stage_pb2.ForwardResponse:
        return self.answers.get(timeout=WAIT_S)

    def all_answers(self) -> list[stage_pb2.ForwardResponse]:
        return [self.next_answer() for _ in range(CHUNKS)]

    def close(self) -> None:
        self.call.cancel()
        self.reader.join(5)
        self.channel.close()


def _end_session(address: str, session_id: str, route: list[str]) -> int:
    with grpc.insecure_channel(address) as channel:
        return stage_pb2_grpc.StageStub(channel).EndSession(
            stage_pb2.EndSessionRequest(session_id=session_id, route=route), timeout=10).stages_freed


def test_chunks_queued_on_the_next_stage_are_not_computed_once_the_session_ends(tiny_model, stages):
    """The next stage is busy while the first forwards every chunk to it; EndSession comes before it
    has computed any, even the one that starts the session: none of them is computed there."""
    with stages(tiny_model("llama"), 2) as (addresses, servers):
        gate = threading.Event()
        servers[1].compute.submit(lambda: gate.wait(WAIT_S))  # the next stage is busy with other work
        with CountedForward(servers[0], 0.0).installed() as first, \
                CountedForward(servers[1], 0.0).installed() as second:
            prefill = Prefill(addresses[0], "abandoned", [addresses[1]])
            try:
                assert eventually(lambda: len(first.calls), CHUNKS, WAIT_S) == CHUNKS, "the first stage computes all"
                _end_session(addresses[0], "abandoned", [addresses[1]])
                gate.set()
                answers = prefill.all_answers()
            finally:
                gate.set()
                prefill.close()
            assert second.calls == [], f"{len(second.calls)} abandoned chunks computed on the next stage"
        assert {code_of(a) for a in answers} == {grpc.StatusCode.NOT_FOUND}
        assert "not computed" in answers[0].error_message
        assert eventually(lambda: stage_sessions(addresses), [0, 0]) == [0, 0], "no session is left behind"


def test_a_chunked_prefill_stops_within_a_chunk_of_its_end(tiny_model, stages):
    """20 chunks of 50 ms or more a forward on each of two stages, EndSession after the first answer:
    each stage computes at most the chunk it is on, and both are idle within about one chunk's time."""
    chunk_s = 0.05
    with stages(tiny_model("llama"), 2) as (addresses, servers):
        with CountedForward(servers[0], chunk_s).installed() as first, \
                CountedForward(servers[1], chunk_s).installed() as second:
            prefill = Prefill(addresses[0], "cut-short", [addresses[1]])
            try:
                assert prefill.next_answer().status_code == 0
                ended = time.monotonic()
                _end_session(addresses[0], "cut-short", [addresses[1]])
                rest = [prefill.next_answer() for _ in range(CHUNKS - 1)]
            finally:
                prefill.close()
            later = [call for call in first.calls + second.calls if call[0] > ended]
            busy_until = max(end for _, end in first.calls + second.calls)
        assert len(later) <= 2, f"{len(later)} forwards started after EndSession"
        assert busy_until - ended < 4 * chunk_s + 0.3, f"busy {busy_until - ended:.3f} s after EndSession"
        codes = [code_of(a) for a in rest]  # answers of the two stages interleave: count, not order
        assert codes.count(grpc.StatusCode.OK) <= 2, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}, codes
        print(f"\nidle {busy_until - ended:.3f} s after EndSession (one chunk: >= {chunk_s} s); "
              f"{len(later)} forward(s) began after it")


def test_the_store_remembers_ended_sessions_boundedly_and_only_for_callers_that_may_use_them(monkeypatch):
    from stage_server import sessions as sessions_module
    from stage_server.deployment import Caller
    from stage_server.sessions import SessionStore

    monkeypatch.setattr(sessions_module, "MAX_ABANDONED", 3)
    store = SessionStore(make_cache=object, bytes_per_token=1)
    owner, stranger = Caller("owner", trusted=False), Caller("stranger", trusted=False)
    arrived = time.monotonic_ns()
    store.start("mine", 1, owner)
    assert store.abandon("mine", owner) and "mine" not in store
    assert store.abandoned("mine", arrived, owner), "a step that arrived before the end is not computed"
    assert not store.abandoned("mine", time.monotonic_ns(), owner), "one that arrives after is (a new start)"
    store.abandon("theirs", stranger)  # not here: remembered, but only for what the stranger may use
    assert not store.abandoned("theirs", arrived, owner)
    for name in ("a", "b", "c"):
        store.abandon(name, owner)
    assert not store.abandoned("mine", arrived, owner), "the oldest is forgotten beyond MAX_ABANDONED"
    assert store.abandoned("c", arrived, owner)
