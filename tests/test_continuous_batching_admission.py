"""Continuous batching's admission: the queue beyond the batch bound, admission rounds, and how
admitted prompts are cut into prefills; every answer stays exact."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from tiny_models import reference_greedy
from waiting import eventually

from coordinator.engine import BatchLimits, Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from coordinator.running_batch import prefill_batches
from coordinator.scheduler import MAX_PREFILLS_PER_ROUND
from coordinator.sequence import LiveSequence


def test_queue_beyond_the_batch_bound(tiny_model, stages):
    """With room for two rows, six requests queue, run two at a time, and all come out exact."""
    model_dir = tiny_model("llama")
    prompts = [[5 + i, 6, 7 + i] for i in range(6)]
    want = [reference_greedy(model_dir, [p], 6)[0] for p in prompts]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            engine = Engine(client, micro_batches=2, limits=BatchLimits(max_batch_rows=2))
            futures = engine.submit_all([SequenceRequest(p, 6) for p in prompts])
            queued = engine.stats().queued
            got = [f.result(timeout=120).token_ids for f in futures]
        finally:
            client.close()
    assert queued >= 4, "requests beyond the bound wait in the queue"
    assert got == want


def hold_prefills(client: PipelineClient, release: threading.Event) -> None:
    """Make `client` hand back each prefill's answer only once `release` is set (the stages
    compute it at once; the coordinator sees it later), so a prefill stays "on its way"."""
    send = client.submit

    def held_prefills(*args, start_session=False, **kwargs):
        sent = send(*args, start_session=start_session, **kwargs)
        if not start_session:
            return sent
        held = Future()
        sent.add_done_callback(lambda done: threading.Thread(
            target=lambda: (release.wait(30), held.set_result(done.result()))).start())
        return held
    client.submit = held_prefills


def test_arrivals_during_a_prefill_wait_and_are_prefilled_together(tiny_model, stages):
    """Requests arriving one by one while a prefill is on its way queue, then share one prefill."""
    model_dir = tiny_model("qwen3")
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [15], [16, 17], [18, 19, 20]]
    want = [reference_greedy(model_dir, [p], 4)[0] for p in prompts]
    release = threading.Event()
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        hold_prefills(client, release)
        try:
            engine = Engine(client)
            futures = engine.submit_all([SequenceRequest(prompts[0], 4)])
            eventually(lambda: engine.stats().prefills, 1)
            for prompt in prompts[1:]:  # one at a time, as separate clients would
                futures += engine.submit_all([SequenceRequest(prompt, 4)])
            time.sleep(0.3)  # ample for the engine to admit them, were it going to
            held_stats = engine.stats()
            release.set()
            got = [f.result(timeout=60).token_ids for f in futures]
            stats = engine.stats()
        finally:
            release.set()
            client.close()
    assert held_stats.queued == len(prompts) - 1 and held_stats.prefills == 1
    assert got == want
    assert stats.prefills == 2, "the five that waited share one prefill"


def test_prefills_keep_each_prompt_whole_within_the_token_budget():
    def sequence(length):
        return LiveSequence(list(range(length)), 1, frozenset(), None, None, lambda: True, Future())

    sequences = [sequence(n) for n in (3, 30, 5, 9, 4, 12, 2)]
    batches = prefill_batches(sequences, 20)
    assert sorted(id(s) for b in batches for s in b) == sorted(id(s) for s in sequences), "each sequence once"
    for batch in batches:
        longest = max(len(s.prompt_ids) for s in batch)
        assert len(batch) == 1 or len(batch) * longest <= 20, "rows × longest prompt within the budget"
    assert [len(s.prompt_ids) for s in batches[-1]] == [30], "a prompt over the budget goes alone"
    assert [[len(s.prompt_ids) for s in b] for b in batches] == [[2, 3, 4, 5], [9], [12], [30]]
    assert prefill_batches(sequences, 0) == [sequences], "budget 0: everything in one prefill"
    alone = prefill_batches(sequences, 20, alone=True)
    assert [[len(s.prompt_ids) for s in b] for b in alone] == [[2], [3], [4], [5], [9], [12], [30]]


def test_an_admission_round_opens_a_bounded_number_of_prefill_sessions(tiny_model, stages):
    """Twelve prompts that each need a prefill of their own: eight sessions open in the first
    round, the other four wait at the head of the queue for the next, and all come out exact."""
    model_dir = tiny_model("llama")
    prompts = [[5 + i, 6, 7 + i] for i in range(12)]  # 3 tokens each, 5 a micro-batch: one row per prefill
    want = [reference_greedy(model_dir, [p], 3)[0] for p in prompts]
    release = threading.Event()
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        hold_prefills(client, release)
        try:
            engine = Engine(client, micro_batches=2, limits=BatchLimits(prefill_chunk_tokens=5))
            futures = engine.submit_all([SequenceRequest(p, 3) for p in prompts])
            eventually(lambda: engine.stats().prefills, MAX_PREFILLS_PER_ROUND)
            time.sleep(0.3)  # ample for the engine to open more, were it going to
            held_stats = engine.stats()
            sessions_held = [i.active_sessions for i in client.stage_infos()]
            release.set()
            got = [f.result(timeout=60).token_ids for f in futures]
            stats = engine.stats()
        finally:
            release.set()
            client.close()
    assert MAX_PREFILLS_PER_ROUND == 8 and held_stats.prefills == 8 and held_stats.queued == 4
    assert sessions_held == [8, 8]
    assert got == want
    assert stats.prefills == 12


def test_one_token_requests_free_their_prefill_session_with_its_last_chunk(tiny_model, stages, monkeypatch):
    """A prefill whose rows each want one token carries end_session on its last chunk: the stages
    free the session as it passes, so the caller's answer waits for no EndSession round trip, and
    nothing is left behind (chunked prompts included)."""
    model_dir = tiny_model("llama")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    want = [reference_greedy(model_dir, [p], 1)[0] for p in prompts]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        ended: list[str] = []
        real_end = client.end_session
        monkeypatch.setattr(client, "end_session", lambda session_id, **kw: ended.append(session_id) or
                            real_end(session_id, **kw))
        try:
            engine = Engine(client, limits=BatchLimits(prefill_chunk_tokens=6))
            alone = [engine.generate([SequenceRequest(p, 1)])[0].token_ids for p in prompts]
            together = [r.token_ids for r in engine.generate([SequenceRequest(p, 1) for p in prompts])]
            left = [i.active_sessions for i in client.stage_infos()]
            engine.generate([SequenceRequest(prompts[0], 2)])  # two tokens: the session ends the usual way
        finally:
            client.close()
    assert alone == want and together == want
    assert left == [0, 0]
    assert len(ended) == 1
