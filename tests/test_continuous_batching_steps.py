"""Continuous batching's decode steps: each is sent before the caller hears of the previous
token, carries a mask only when a row is padded, and its answer is handled on the thread that
read it while the loop is idle (queued for the loop otherwise); every answer stays exact."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
from tiny_models import reference_greedy
from waiting import eventually

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from coordinator.running_batch import Group


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
    """A decode step's answer is handled where it was read while the engine's loop is idle (the
    next step leaves without waking the loop's thread), also when a chained step's answer is
    already there as its predecessor is handled (queued then, not handled re-entrantly), and the
    tokens stay exact."""
    model_dir = tiny_model("llama")
    prompt, new_tokens = [5, 6, 7, 8], 10
    handled_on: list[str] = []
    depth = [0]
    step_done = Engine._step_done

    def recording_step_done(self, group, future):
        handled_on.append(threading.current_thread().name)
        depth[0] += 1
        try:
            assert depth[0] == 1, "an answer was handled inside another one's handling"
            return step_done(self, group, future)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(Engine, "_step_done", recording_step_done)
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
    class NoPipeline:
        can_chain = False
        hop_bytes = 0

    engine = Engine(NoPipeline())
    handled = []
    engine._step_done = lambda group, future: handled.append(future)
    answered: Future = Future()
    answered.set_result(None)
    with engine._lock, engine._busy():  # the loop (or another answer) is scheduling on this thread
        engine._step_answered(Group(), answered)
    assert handled == [] and engine._events.get_nowait()[2] is answered
    engine._step_answered(Group(), answered)  # nobody scheduling: handled at once, here
    assert handled == [answered]
