"""The CUDA path: stages on a GPU give the unsplit model's greedy tokens, batching included.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from test_continuous_batching import FIRST, JOINERS, run_with_joins
from tiny_models import reference_greedy

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BATCH = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5], [20, 21, 22, 23, 24, 25], [40]]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "opt"])
def test_cuda_stages_match_unsplit_cuda(family, tiny_model, stages):
    model_dir = tiny_model(family, tied=True, sharded=True)
    expected = reference_greedy(model_dir, BATCH, 12, device="cuda")
    with stages(model_dir, 2, device="cuda") as (addresses, _):
        client = PipelineClient(addresses)
        try:
            got = [r.token_ids for r in Engine(client).generate([SequenceRequest(p, 12) for p in BATCH])]
            infos = client.stage_infos()
        finally:
            client.close()
    assert got == expected
    assert all(i.device.startswith("cuda") for i in infos)


def test_cuda_continuous_batching_is_exact(tiny_model, stages):
    model_dir = tiny_model("mistral")
    want_first = reference_greedy(model_dir, [FIRST[0]], FIRST[1], device="cuda")[0]
    want = [reference_greedy(model_dir, [p], n, device="cuda")[0] for p, n, _ in JOINERS]
    with stages(model_dir, 2, device="cuda") as (addresses, _):
        got_first, got, _, sessions = run_with_joins(addresses, groups=2)
    assert got_first == want_first and got == want and sessions == [0, 0]


def test_cuda_bfloat16_stage_generates(tiny_model, stages):
    model_dir = tiny_model("llama")
    with stages(model_dir, 2, device="cuda", dtype="bfloat16") as (addresses, _):
        client = PipelineClient(addresses)
        try:
            result = Engine(client).generate([SequenceRequest([5, 6, 7], 8)])[0]
            infos = client.stage_infos()
        finally:
            client.close()
    assert len(result.token_ids) == 8 and all(i.dtype == "bfloat16" for i in infos)
