"""Continuous batching is exact: sequences that join and leave a running batch at different
decode steps get the same greedy tokens as each run alone through the unsplit model.

Joins are triggered from inside the token callback of the first sequence, so each one
lands at a known step of the running batch (deterministic, no sleeps). The prompts are
chosen so that a newcomer is sometimes shorter and sometimes longer than the batch's
cache, which exercises left padding on both sides of a merge, and the sequences leave
at different steps, which exercises row removal and trimming of left padding.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from tiny_models import reference_greedy
from waiting import eventually

from coordinator.engine import BatchLimits, Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from coordinator.running_batch import LiveSequence, prefill_batches

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "opt"]

FIRST = ([5, 6, 7, 8, 9, 10, 11, 12, 13], 14)
# (prompt, max_new_tokens, submitted once FIRST has produced this many tokens)
JOINERS = [
    ([3, 4, 5], 4, 2),  # short, leaves early
    ([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], 9, 4),  # shorter than the batch's cache by then
    ([40], 7, 7),  # a one-token prompt
    ([30 + i for i in range(24)], 5, 9),  # longer than the batch's cache: the batch is padded instead
]


def run_with_joins(addresses, *, groups: int, chunk_tokens: int = 256):
    client = PipelineClient(addresses)
    engine = Engine(client, micro_batches=groups, limits=BatchLimits(prefill_chunk_tokens=chunk_tokens))
    futures = {}
    lock = threading.Lock()

    def first_token_seen(_token: int) -> bool:
        produced = len(first_tokens) + 1
        first_tokens.append(_token)
        for index, (prompt, new_tokens, at) in enumerate(JOINERS):
            if at == produced:
                with lock:
                    futures[index] = engine.submit_all([SequenceRequest(prompt, new_tokens)])[0]
        return False

    first_tokens: list[int] = []
    try:
        first = engine.submit_all([SequenceRequest(FIRST[0], FIRST[1], on_token=first_token_seen)])[0]
        got_first = first.result(timeout=120).token_ids
        with lock:
            got = [futures[i].result(timeout=120).token_ids for i in range(len(JOINERS))]
        stats = engine.stats()
        sessions = eventually(lambda: [i.active_sessions for i in client.stage_infos()], [0] * len(addresses))
    finally:
        client.close()
    return got_first, got, stats, sessions


def expected_alone(model_dir):
    first = reference_greedy(model_dir, [FIRST[0]], FIRST[1])[0]
    return first, [reference_greedy(model_dir, [p], n)[0] for p, n, _ in JOINERS]


@pytest.mark.parametrize("family", FAMILIES)
def test_joining_and_leaving_is_exact(family, tiny_model, stages):
    model_dir = tiny_model(family)
    want_first, want = expected_alone(model_dir)
    with stages(model_dir, 2) as (addresses, _):
        for groups in (1, 2):
            got_first, got, stats, sessions = run_with_joins(addresses, groups=groups)
            assert got_first == want_first, f"{family}, {groups} groups: the running sequence changed"
            for index, (tokens, expected) in enumerate(zip(got, want)):
                assert tokens == expected, f"{family}, {groups} groups: joiner {index} differs from running alone"
            assert sessions == [0, 0], "every session is freed once the batch drains"
            assert stats.decode_steps < FIRST[1] + sum(n for _, n, _ in JOINERS), "sequences shared decode steps"
            assert stats.prefills == 1 + len(JOINERS), "each arrival is prefilled once"


@pytest.mark.parametrize("groups", [1, 2])
def test_requests_arriving_together_share_prefills_and_steps(groups, tiny_model, stages):
    """A batch submitted at once is prefilled as one micro-batch per group and decoded in lockstep."""
    model_dir = tiny_model("qwen2")
    prompts = [[5, 6, 7], [9] * 7, [11, 12], [40, 41, 42, 43], [8]]
    want = [reference_greedy(model_dir, [p], 4)[0] for p in prompts]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            engine = Engine(client, micro_batches=groups)
            got = [r.token_ids for r in engine.generate([SequenceRequest(p, 4) for p in prompts])]
            stats = engine.stats()
            modes = [info.attention for info in client.stage_infos()]
        finally:
            client.close()
    assert modes == ["batched", "batched"], "auto keeps stock batched attention for float32"
    assert got == want
    assert stats.prefills == groups
    assert stats.decode_steps == 3 * groups  # the first token comes with the prefill


def test_chunked_prefill_and_three_stages_stay_exact(tiny_model, stages):
    """Prompts prefilled in chunks of a few tokens, through three stages, with sliding windows."""
    model_dir = tiny_model("mistral", tied=True, sharded=True)
    want_first, want = expected_alone(model_dir)
    with stages(model_dir, 3) as (addresses, _):
        got_first, got, _, sessions = run_with_joins(addresses, groups=3, chunk_tokens=4)
    assert got_first == want_first and got == want
    assert sessions == [0, 0, 0]


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


def test_the_next_step_is_on_its_way_before_the_caller_hears_of_a_token(tiny_model, stages):
    """Streaming a token out and checking stop strings overlap the stages' work on the next step;
    a sequence that a stop string ends mid-batch still leaves exact neighbours and no session.
    (Without greedy chaining, where the coordinator sends every step.)"""
    model_dir = tiny_model("llama")
    prompts, new_tokens = [[5, 6, 7], [9, 10]], 6
    want = [reference_greedy(model_dir, [p], new_tokens)[0] for p in prompts]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        submitted = []
        send = client.submit
        client.submit = lambda *args, **kwargs: (submitted.append(1), send(*args, **kwargs))[1]
        seen: list[int] = []

        def count_sends(_token: int) -> bool:
            seen.append(len(submitted))
            return False

        def stop_at_third(_token: int) -> bool:
            stopped.append(_token)
            return len(stopped) == 3
        stopped: list[int] = []
        try:
            engine = Engine(client, chain=False)
            alone = engine.generate([SequenceRequest(prompts[0], new_tokens, on_token=count_sends)])[0]
            pair = engine.generate([SequenceRequest(prompts[0], new_tokens, on_token=stop_at_third),
                                    SequenceRequest(prompts[1], new_tokens)])
            sessions = eventually(lambda: [i.active_sessions for i in client.stage_infos()], [0, 0])
        finally:
            client.close()
    assert alone.token_ids == want[0]
    # token 1 comes with the prefill (1 send); the step that makes token k+1 is sent before token k
    # is handed over (k + 1 sends); after the last token nothing more is sent.
    assert seen == [1] + list(range(3, new_tokens + 1)) + [new_tokens]
    assert pair[0].token_ids == want[0][:3] and pair[0].finish_reason == "stop"
    assert pair[1].token_ids == want[1]
    assert sessions == [0, 0]


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
            time.sleep(0.3)  # ample for the scheduler to admit them, were it going to
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


def alone_through(addresses, prompts_and_lengths):
    """Each prompt's greedy answer run alone through the pipeline at `addresses`."""
    client = PipelineClient(addresses)
    try:
        engine = Engine(client)
        return [engine.generate([SequenceRequest(p, n)])[0].token_ids for p, n in prompts_and_lengths]
    finally:
        client.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_sequences_get_in_a_batch_what_they_get_alone(family, tiny_model, stages):
    """In bfloat16 a padded batch rounds differently from a sequence alone unless each sequence
    attends over its own keys and its prompt is prefilled in one piece: with per-sequence
    attention (the default for 16-bit dtypes) batches of mixed lengths, joiners and leavers
    all match their own runs alone through the same pipeline."""
    model_dir = tiny_model(family)
    together = [([5, 6, 7], 6), ([9] * 11, 6), ([11, 12], 6), ([40 + i for i in range(17)], 6), ([8], 6)]
    with stages(model_dir, 2, dtype="bfloat16") as (addresses, _):
        want_first, *want_joiners = alone_through(addresses, [FIRST] + [(p, n) for p, n, _ in JOINERS])
        want_together = alone_through(addresses, together)
        got_first, got_joiners, _, sessions = run_with_joins(addresses, groups=2, chunk_tokens=32)
        client = PipelineClient(addresses)
        try:
            engine = Engine(client, micro_batches=1, limits=BatchLimits(prefill_chunk_tokens=40))
            got_together = [r.token_ids for r in engine.generate([SequenceRequest(p, n) for p, n in together])]
            prefills = engine.stats().prefills
            modes = [info.attention for info in client.stage_infos()]
        finally:
            client.close()
    assert modes == ["per-sequence", "per-sequence"], "auto picks per-sequence attention for bfloat16"
    assert got_first == want_first and got_joiners == want_joiners, f"{family}: joiners"
    assert got_together == want_together, f"{family}: a batch submitted at once"
    assert prefills == len(together), "stages in per-sequence mode get one prompt per prefill"
    assert sessions == [0, 0]


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


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_per_sequence_attention_matches_the_unsplit_model(family, tiny_model, stages):
    """float32 stages told to attend per sequence still give the unsplit model's tokens to
    joiners and leavers (a sliding-window family and one without grouped heads)."""
    model_dir = tiny_model(family)
    want_first, want = expected_alone(model_dir)
    with stages(model_dir, 2, attention="per-sequence") as (addresses, _):
        got_first, got, _, _ = run_with_joins(addresses, groups=2)
    assert got_first == want_first and got == want


def test_an_admission_round_opens_a_bounded_number_of_prefill_sessions(tiny_model, stages):
    """Twelve prompts that each need a prefill of their own: eight sessions open in the first
    round, the other four wait at the head of the queue for the next, and all come out exact."""
    from coordinator.scheduler import MAX_PREFILLS_PER_ROUND

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
            time.sleep(0.3)  # ample for the scheduler to open more, were it going to
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


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_steps_without_padding_carry_no_mask_and_stay_exact(family, tiny_model, stages, monkeypatch):
    """A lone prompt (or prompts of one length) has no padding: its steps go without a mask, and
    the tokens still match the unsplit model; once a row is padded, every step carries the mask."""
    model_dir = tiny_model(family)
    with_mask: list[bool] = []
    original = PipelineClient.submit

    def recording_submit(self, session_id, activations, position_ids, attention_mask, **kwargs):
        with_mask.append(attention_mask is not None)
        return original(self, session_id, activations, position_ids, attention_mask, **kwargs)

    monkeypatch.setattr(PipelineClient, "submit", recording_submit)
    runs = {"alone": [[5, 6, 7, 8]], "same length": [[9, 10, 11], [12, 13, 14]],
            "padded": [[9, 10, 11], [15, 16, 17, 18, 19]]}
    masks, tokens = {}, {}
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            engine = Engine(client, chain=False)  # every step from here, so every step is seen
            for name, prompts in runs.items():
                with_mask.clear()
                tokens[name] = [r.token_ids for r in engine.generate([SequenceRequest(p, 6) for p in prompts])]
                masks[name] = list(with_mask)
        finally:
            client.close()
    assert {name: (len(sent), any(sent), all(sent)) for name, sent in masks.items()} == {
        "alone": (6, False, False), "same length": (6, False, False), "padded": (6, True, True)}
    for name, prompts in runs.items():
        assert tokens[name] == [reference_greedy(model_dir, [p], 6)[0] for p in prompts], name


@pytest.mark.parametrize("chain", [False, True])
def test_a_lone_groups_answers_are_handled_on_the_thread_that_read_them(chain, tiny_model, stages, monkeypatch):
    """A decode step's answer is handled where it was read while the scheduler's loop is idle (the
    next step leaves without waking the loop's thread), also when a chained step's answer is
    already there as its predecessor is handled (queued then, not handled re-entrantly), and the
    tokens stay exact."""
    from coordinator.scheduler import Scheduler

    model_dir = tiny_model("llama")
    prompt, new_tokens = [5, 6, 7, 8], 10
    handled_on: list[str] = []
    depth = [0]
    step_done = Scheduler._step_done

    def recording_step_done(self, group, future):
        handled_on.append(threading.current_thread().name)
        depth[0] += 1
        try:
            assert depth[0] == 1, "an answer was handled inside another one's handling"
            return step_done(self, group, future)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(Scheduler, "_step_done", recording_step_done)
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            result = Engine(client, chain=chain).generate([SequenceRequest(prompt, new_tokens)])[0]
        finally:
            client.close()
    assert result.token_ids == reference_greedy(model_dir, [prompt], new_tokens)[0]
    assert len(handled_on) == new_tokens - 1  # every decode step's answer once (the first token: the prefill)
    elsewhere = [name for name in handled_on if name != "batch-scheduler"]
    assert len(elsewhere) >= len(handled_on) // 2, handled_on


def test_an_answer_arriving_during_scheduling_is_queued_for_the_loop():
    from coordinator.running_batch import Group
    from coordinator.scheduler import Scheduler

    class NoPipeline:
        can_chain = False
        hop_bytes = 0

    scheduler = Scheduler(NoPipeline())
    handled = []
    scheduler._step_done = lambda group, future: handled.append(future)
    answered: Future = Future()
    answered.set_result(None)
    with scheduler._lock, scheduler._busy():  # the loop (or another answer) is scheduling on this thread
        scheduler._step_answered(Group(), answered)
    assert handled == [] and scheduler._events.get_nowait()[2] is answered
    scheduler._step_answered(Group(), answered)  # nobody scheduling: handled at once, here
    assert handled == [answered]
