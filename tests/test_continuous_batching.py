"""Continuous batching is exact: sequences that join and leave a running batch at different
decode steps get the same greedy tokens as each run alone through the unsplit model.

Joins are triggered from inside the token callback of the first sequence, so each one
lands at a known step of the running batch (deterministic, no sleeps). The prompts are
chosen so that a newcomer is sometimes shorter and sometimes longer than the batch's
cache, which exercises left padding on both sides of a merge, and the sequences leave
at different steps, which exercises row removal and trimming of left padding.

Admission and prefills: test_continuous_batching_admission.py; how decode steps are sent and
answered: test_continuous_batching_steps.py.
"""

from __future__ import annotations

import threading

import pytest
from tiny_models import reference_greedy
from waiting import eventually

from coordinator.engine import BatchLimits, Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient

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

@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_per_sequence_attention_matches_the_unsplit_model(family, tiny_model, stages):
    """float32 stages told to attend per sequence still give the unsplit model's tokens to
    joiners and leavers (a sliding-window family and one without grouped heads)."""
    model_dir = tiny_model(family)
    want_first, want = expected_alone(model_dir)
    with stages(model_dir, 2, attention="per-sequence") as (addresses, _):
        got_first, got, _, _ = run_with_joins(addresses, groups=2)
    assert got_first == want_first and got == want
