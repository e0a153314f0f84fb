"""Golden check: an uncompressed pipeline gives exactly the unsplit model's greedy tokens.

Every supported family, 1 to 4 stages, single-file and sharded checkpoints, tied and
untied heads, a single prompt and a left-padded batch of different lengths, all
through real gRPC stage servers on loopback.
"""

from __future__ import annotations

import pytest
from tiny_models import reference_greedy
from waiting import eventually, stage_sessions

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "opt"]
# Mistral's sliding window is 6: these sequences (up to 9 + 12 tokens) run past it.
SINGLE = [[5, 6, 7, 8, 9, 10, 11]]
BATCH = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5], [20, 21, 22, 23, 24, 25], [40]]
NEW_TOKENS = 12


def pipeline_greedy(addresses, prompts, micro_batches=1):
    client = PipelineClient(addresses)
    try:
        engine = Engine(client, micro_batches=micro_batches)
        results = engine.generate([SequenceRequest(p, NEW_TOKENS) for p in prompts])
        infos = client.stage_infos()
    finally:
        client.close()
    return [r.token_ids for r in results], infos


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied,sharded", [(False, False), (True, True)], ids=["untied-single", "tied-sharded"])
def test_pipeline_matches_generate(family, tied, sharded, tiny_model, stages):
    model_dir = tiny_model(family, tied=tied, sharded=sharded)
    expected_single = reference_greedy(model_dir, SINGLE, NEW_TOKENS)
    expected_batch = reference_greedy(model_dir, BATCH, NEW_TOKENS)
    assert len(set(map(tuple, expected_batch))) > 1, "reference outputs should differ between prompts"
    for num_stages in (1, 2, 3, 4):
        with stages(model_dir, num_stages) as (addresses, _):
            got_single, _ = pipeline_greedy(addresses, SINGLE)
            got_batch, infos = pipeline_greedy(addresses, BATCH)
            assert got_single == expected_single, f"{family}, {num_stages} stages, single prompt"
            assert got_batch == expected_batch, f"{family}, {num_stages} stages, padded batch"
            freed = eventually(lambda: stage_sessions(addresses), [0] * num_stages)
            assert freed == [0] * num_stages, "sessions must be freed"
            assert [(i.layer_start, i.layer_end) for i in infos][-1][1] == 4


def test_micro_batch_groups_stay_exact(tiny_model, stages):
    """Splitting the batch into groups that overlap in the pipeline changes nothing."""
    model_dir = tiny_model("llama")
    expected = reference_greedy(model_dir, BATCH, NEW_TOKENS)
    with stages(model_dir, 3) as (addresses, _):
        for groups in (2, 4):
            got, _ = pipeline_greedy(addresses, BATCH, micro_batches=groups)
            # Each group is padded only to its own longest prompt: compare row by row with
            # the unsplit model run on that same group.
            bounds = [round(i * len(BATCH) / groups) for i in range(groups + 1)]
            for g in range(groups):
                rows = BATCH[bounds[g]:bounds[g + 1]]
                assert got[bounds[g]:bounds[g + 1]] == reference_greedy(model_dir, rows, NEW_TOKENS)
            assert len(got) == len(expected)


def test_direct_and_relayed_answers_agree(tiny_model, stages):
    """Answers sent straight from the last stage (the default) and relayed back through every
    stage give the same tokens, and both count the bytes each hop sent."""
    model_dir = tiny_model("qwen2")
    expected = reference_greedy(model_dir, BATCH, NEW_TOKENS)
    with stages(model_dir, 3) as (addresses, _):
        for direct in (True, False):
            client = PipelineClient(addresses, direct_results=direct)
            try:
                engine = Engine(client)
                got = [r.token_ids for r in engine.generate([SequenceRequest(p, NEW_TOKENS) for p in BATCH])]
                sent = eventually(lambda engine=engine: engine.hop_bytes > 0, True)
            finally:
                client.close()
            assert got == expected, f"direct_results={direct}"
            assert sent, "hop bytes are reported either way"
