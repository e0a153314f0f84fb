"""The CUDA path: stages on a GPU give the unsplit model's greedy tokens, batching included.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_continuous_batching import FIRST, JOINERS, run_with_joins
from test_lean_layers import assert_lean_matches_stock
from tiny_models import reference_greedy

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos import codec
from stage_server.slice_loader import load_slice

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


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_lean_layers_pass_their_check_and_match_transformers(family, dtype, tiny_model):
    piece = load_slice(tiny_model(family), 1, 4, dtype=dtype, device="cuda", progress=False)
    assert piece.architecture.lean is not None
    assert_lean_matches_stock(piece, device="cuda")


def test_cuda_continuous_batching_is_exact(tiny_model, stages):
    model_dir = tiny_model("mistral")
    want_first = reference_greedy(model_dir, [FIRST[0]], FIRST[1], device="cuda")[0]
    want = [reference_greedy(model_dir, [p], n, device="cuda")[0] for p, n, _ in JOINERS]
    with stages(model_dir, 2, device="cuda") as (addresses, _):
        got_first, got, _, sessions = run_with_joins(addresses, groups=2)
    assert got_first == want_first and got == want and sessions == [0, 0]


@pytest.mark.parametrize("stage_count", [2, 3])
def test_cuda_lone_request_chains_on_each_stage_compute_thread(stage_count, tiny_model, stages, monkeypatch):
    """A lone greedy request: decode steps chain stage to stage on the GPU, each on its stage's compute thread."""
    model_dir = tiny_model("qwen2")
    prompt, new_tokens = [5, 6, 7, 8, 9, 10], 10
    expected = reference_greedy(model_dir, [prompt], new_tokens, device="cuda")[0]
    with stages(model_dir, stage_count, device="cuda") as (addresses, servers):
        ran_on: list[set[str]] = [set() for _ in servers]
        for seen, server in zip(ran_on, servers):
            step = server.service.steps.run

            def recording_step(*args, _step=step, _seen=seen, **kwargs):
                _seen.add(threading.current_thread().name)
                return _step(*args, **kwargs)

            monkeypatch.setattr(server.service.steps, "run", recording_step)
        client = PipelineClient(addresses)
        try:
            got = Engine(client, chain=True).generate([SequenceRequest(prompt, new_tokens)])[0].token_ids
        finally:
            client.close()
    assert got == expected
    assert all(len(seen) == 1 and next(iter(seen)).startswith("compute") for seen in ran_on), ran_on


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


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8"])
def test_cuda_tensors_encode_like_cpu_ones(name):
    """A stage on a GPU sends the same bytes as one on the CPU would for the same activations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 576, generator=g) * 4
    x[:, 0, 17] = 20000.0  # an attention-sink-like outlier
    on_gpu = codec.encode(x.cuda(), codec.codec_from_name(name))
    on_cpu = codec.encode(x, codec.codec_from_name(name))
    back = codec.decode(on_gpu)
    assert back.device.type == "cpu" and back.shape == x.shape
    assert torch.allclose(back, codec.decode(on_cpu), rtol=0, atol=1e-2)
    assert abs(codec.payload_bytes(on_gpu) - codec.payload_bytes(on_cpu)) <= codec.payload_bytes(on_cpu) // 100
