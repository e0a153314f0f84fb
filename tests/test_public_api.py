"""The public Coordinator API over a 2-stage tiny pipeline: results, streaming, sampling, stops, info."""

from __future__ import annotations

import grpc
import pytest
import torch
from tiny_models import reference_greedy
from transformers import AutoTokenizer
from waiting import eventually, stage_sessions

from coordinator.client import CoordinatorClient
from coordinator.pipeline_client import PipelineClient
from protos import coordinator_pb2


@pytest.fixture(scope="module")
def client(tiny_api):
    with CoordinatorClient(tiny_api[0], timeout_s=60) as c:
        yield c


def test_prompt_matches_unsplit_greedy(client, tiny_api):
    _, stages, model_dir = tiny_api
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer("The tiny model says")["input_ids"]
    reply = client.generate(prompt="The tiny model says", max_new_tokens=10)
    assert list(reply.token_ids) == reference_greedy(model_dir, [prompt_ids], 10)[0]
    assert reply.text == tokenizer.decode(reply.token_ids, skip_special_tokens=True)
    assert reply.prompt_tokens == len(prompt_ids) and reply.completion_tokens == 10
    assert reply.finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
    assert eventually(lambda: stage_sessions(stages), [0, 0]) == [0, 0]


def test_token_ids_and_chat_inputs(client, tiny_api):
    model_dir = tiny_api[2]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_ids = client.generate(token_ids=[5, 6, 7, 8], max_new_tokens=6)
    assert list(by_ids.token_ids) == reference_greedy(model_dir, [[5, 6, 7, 8]], 6)[0]
    messages = [{"role": "user", "content": "hi there"}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_ids, add_special_tokens=False)["input_ids"]
    by_chat = client.generate(messages=messages, max_new_tokens=6)
    assert by_chat.prompt_tokens == len(chat_ids)
    assert list(by_chat.token_ids) == reference_greedy(model_dir, [chat_ids], 6)[0]


def test_stream_concatenates_to_unary(client, tiny_api):
    unary = client.generate(prompt="stream me", max_new_tokens=12)
    messages = list(client.generate_stream(prompt="stream me", max_new_tokens=12))
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert len([m for m in messages if m.token_ids]) == 12, "one message per token"
    assert messages[-1].finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
    assert all(m.finish_reason == 0 for m in messages[:-1])
    assert eventually(lambda: stage_sessions(tiny_api[1]), [0, 0]) == [0, 0]


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(prompt="sample", max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    first = client.generate(seed=7, **kwargs)
    again = client.generate(seed=7, **kwargs)
    other = [client.generate(seed=s, **kwargs).token_ids for s in (8, 9, 10)]
    assert list(first.token_ids) == list(again.token_ids)
    assert any(list(o) != list(first.token_ids) for o in other), "different seeds should differ"


def test_top_k_one_is_greedy(client):
    greedy = client.generate(prompt="k one", max_new_tokens=8)
    top1 = client.generate(prompt="k one", max_new_tokens=8, temperature=0.8, top_k=1, seed=3)
    assert list(top1.token_ids) == list(greedy.token_ids)


def test_stop_string_cuts_text(client):
    full = client.generate(prompt="stop test", max_new_tokens=16)
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = client.generate(prompt="stop test", max_new_tokens=16, stop=[stop])
    assert cut.finish_reason == coordinator_pb2.FINISH_REASON_STOP
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    streamed = list(client.generate_stream(prompt="stop test", max_new_tokens=16, stop=[stop]))
    assert "".join(m.text for m in streamed) == cut.text
    assert streamed[-1].finish_reason == coordinator_pb2.FINISH_REASON_STOP


def test_eos_stops_generation(tiny_api):
    """Declare the 4th greedy token an end-of-sequence token: generation must stop right there."""
    from coordinator.engine import Engine, SequenceRequest

    _, stage_addresses, model_dir = tiny_api
    expected = reference_greedy(model_dir, [[9, 8, 7]], 12)[0]
    eos = expected[3]
    first = expected.index(eos)
    pipeline = PipelineClient(stage_addresses)
    try:
        result = Engine(pipeline).generate([SequenceRequest([9, 8, 7], 12, eos_token_ids=frozenset({eos}))])[0]
    finally:
        pipeline.close()
    assert result.token_ids == expected[: first + 1]
    assert result.finish_reason == "eos"


def test_model_info(client, tiny_api):
    info = client.model_info()
    assert info.num_layers == 4 and info.model_type == "llama"
    assert [(s.layer_start, s.layer_end) for s in info.stages] == [(0, 2), (2, 4)]
    assert [s.address for s in info.stages] == tiny_api[1]
    assert [s.attention for s in info.stages] == ["batched", "batched"], "float32 stages keep stock attention"
    assert info.max_context == 256 and info.has_chat_template and len(info.model_fingerprint) == 16


def test_concurrent_clients(client, tiny_api):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"client {i}" for i in range(6)]
    alone = [list(client.generate(prompt=p, max_new_tokens=8).token_ids) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: list(client.generate(prompt=p, max_new_tokens=8).token_ids), prompts))
    assert together == alone
    assert eventually(lambda: stage_sessions(tiny_api[1]), [0, 0]) == [0, 0]


def test_greedy_matches_torch_argmax_reference(tiny_api):
    """Sanity check of the reference helper itself against a hand-written argmax loop."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_api[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[9, 10, 11]])
    with torch.inference_mode():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ids[0, 3:].tolist() == reference_greedy(model_dir, [[9, 10, 11]], 5)[0]


def test_rpc_error_is_grpc_status(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt="", max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_matches_sync(client, tiny_api):
    import asyncio

    from coordinator.client import AsyncCoordinatorClient

    async def run():
        async with AsyncCoordinatorClient(tiny_api[0], timeout_s=60) as aclient:
            unary = await aclient.generate(prompt="async please", max_new_tokens=6)
            streamed = [m async for m in aclient.generate_stream(prompt="async please", max_new_tokens=6)]
            info = await aclient.model_info()
        return unary, streamed, info

    unary, streamed, info = asyncio.run(run())
    expected = client.generate(prompt="async please", max_new_tokens=6)
    assert list(unary.token_ids) == list(expected.token_ids)
    assert [t for m in streamed for t in m.token_ids] == list(expected.token_ids)
    assert info.num_layers == 4
