"""The last stage's LM head split by vocabulary rows across threads (stage_server/split_head.py).

The joined logits must be bit-identical to the whole product (or greedy answers would drift from
the unsplit model's); the split must stand aside where it does not pay; and a pipeline running it
must still give the unsplit model's greedy tokens, tied heads included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import reference_greedy
from torch import nn

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from stage_server.cli import build_parser
from stage_server.core_share import usable_cores
from stage_server.split_head import (
    CUT_ALIGN,
    MAX_PARTS,
    SPLIT_MAX_ROWS,
    SplitHead,
    install_split_head,
    parts_for,
    vocabulary_cuts,
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a small step's thread count when the split pays
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("vocab,parts", [(128, 2), (1000, 2), (1000, 3), (49152, 4), (64, 2), (65, 2), (30, 4)])
def test_cuts_cover_the_vocabulary_in_aligned_slices(vocab, parts):
    cuts = vocabulary_cuts(vocab, parts)
    assert cuts[0][0] == 0 and cuts[-1][1] == vocab
    assert all(end == start for (_, end), (start, _) in zip(cuts, cuts[1:], strict=False))  # contiguous
    assert all(start % CUT_ALIGN == 0 for start, _ in cuts)
    assert len(cuts) == min(parts, -(-vocab // CUT_ALIGN))  # fewer parts only when blocks run out
    sizes = [end - start for start, end in cuts]
    assert max(sizes) - min(sizes) <= CUT_ALIGN + vocab % CUT_ALIGN  # nearly equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,hidden,bias", [(128, 64, False), (1000, 96, True), (4099, 576, False),
                                               (49152, 576, False)])
def test_joined_logits_are_bit_identical_to_the_whole_product(dtype, vocab, hidden, bias):
    torch.manual_seed(vocab)
    linear = nn.Linear(hidden, vocab, bias=bias).to(dtype)
    head = SplitHead(linear, 2)
    try:
        with torch.inference_mode():
            for rows in range(1, SPLIT_MAX_ROWS + 1):
                for shape in ((rows, hidden), (rows, 1, hidden)):
                    states = torch.randn(shape).to(dtype)
                    before = head.split_steps
                    assert torch.equal(head(states), linear(states)), (rows, shape)
                    assert head.split_steps == before + 1, "the step should have been split"
    finally:
        head.close()


def test_the_split_stands_aside_for_batches_and_threaded_steps():
    linear = nn.Linear(64, 256)
    head = SplitHead(linear, 2)
    try:
        with torch.inference_mode():
            batch = torch.randn(SPLIT_MAX_ROWS + 1, 64)
            assert torch.equal(head(batch), linear(batch)) and head.split_steps == 0
            torch.set_num_threads(2)  # torch already runs this step on as many threads as there are parts
            assert torch.equal(head(batch[:1]), linear(batch[:1])) and head.split_steps == 0
            torch.set_num_threads(1)
            head(batch[:1])
            assert head.split_steps == 1
    finally:
        head.close()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_parts_start_no_openmp_team_of_their_own():
    """A part's thread left at MKL's default would start an OpenMP team of its own for the product
    (one more native thread), and the stage's all-thread steps would then sleep between parallel
    regions (split_head.py): a split step may add the part threads and nothing else."""
    def native_threads() -> int:
        return len(list(Path("/proc/self/task").iterdir()))

    linear = nn.Linear(576, 49152, bias=False)  # SmolLM2's head: large enough for MKL to thread it
    states = torch.randn(1, 576)
    with torch.inference_mode():
        linear(states)  # whatever the calling thread starts, it starts now
        before = native_threads()
        head = SplitHead(linear, 2)
        try:
            head(states)
            head(states)
            assert head.split_steps == 2
            assert native_threads() == before + len(head.cuts) - 1
            assert head._pool.submit(torch.get_num_threads).result() == 1
        finally:
            head.close()


def test_install_replaces_only_a_plain_linear_head_and_keeps_its_weight():
    model = nn.Module()
    model.lm_head = nn.Linear(64, 256, bias=False)
    weight = model.lm_head.weight
    assert install_split_head(model, "lm_head", 1) is None  # one part: nothing to split
    assert install_split_head(model, "lm_head", 2) is not None
    assert isinstance(model.lm_head, SplitHead) and model.lm_head.weight is weight  # shared, not copied
    small = nn.Module()
    small.lm_head = nn.Linear(64, CUT_ALIGN)  # one block of rows: a single part
    assert install_split_head(small, "lm_head", 4) is None and type(small.lm_head) is nn.Linear
    model.lm_head.close()


def test_head_thread_settings():
    assert parts_for("auto") == max(1, min(usable_cores(), MAX_PARTS))
    assert parts_for(3) == 3
    for bad in (0, -1, "many"):
        with pytest.raises(ValueError):
            parts_for(bad)
    parser = build_parser()
    required = ["--model", "m", "--layers", "0:1"]
    assert parser.parse_args(required).head_threads == "auto"
    assert parser.parse_args([*required, "--head-threads", "2"]).head_threads == 2
    for option in ("--head-threads", "--max-streams", "--max-sessions", "--max-cache-mb"):
        for bad in ("0", "-3", "x"):
            with pytest.raises(SystemExit):
                parser.parse_args([*required, option, bad])


@pytest.mark.parametrize("family,tied", [("llama", True), ("gpt2", False), ("opt", True)])
def test_a_pipeline_with_a_split_head_keeps_greedy_tokens_exact(family, tied, tiny_model, stages):
    model_dir = tiny_model(family, tied=tied)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    want = reference_greedy(model_dir, [prompts[0]], 10) + reference_greedy(model_dir, [prompts[1]], 10)
    with stages(model_dir, 2, small_step_threads=1, head_threads=2) as (addresses, servers):
        last = servers[-1]
        assert last.split_head is not None and servers[0].split_head is None
        client = PipelineClient(addresses)
        try:
            got = [Engine(client).generate([SequenceRequest(p, 10)])[0].token_ids for p in prompts]
        finally:
            client.close()
        assert got == want
        # every decode step of a lone request (chained) splits its head; prefills carry no chaining fields
        assert last.split_head.split_steps == 2 * 9


def test_groups_that_share_the_stages_keep_the_head_whole(tiny_model, stages):
    """Two requests at once run as two groups: the coordinator chains neither, and the head stays
    whole (the other stage's core is busy with the other group)."""
    model_dir = tiny_model("llama")
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    want = reference_greedy(model_dir, [prompts[0]], 10) + reference_greedy(model_dir, [prompts[1]], 10)
    with stages(model_dir, 2, small_step_threads=1, head_threads=2) as (addresses, servers):
        client = PipelineClient(addresses)
        try:
            got = [r.token_ids for r in Engine(client, micro_batches=2).generate(
                [SequenceRequest(p, 10) for p in prompts])]
        finally:
            client.close()
    assert got == want
    assert servers[-1].split_head.split_steps == 0
