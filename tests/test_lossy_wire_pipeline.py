"""Lossy wire codecs through real stage servers: every codec generates, and the hops carry the bytes
the codec promises.

The exactness of uncompressed pipelines is tests/test_equivalence_tiny.py's job; what compression
does to a real model's answers is measured by bench/wire_codecs.py. Here a 3-stage tiny Llama
(hidden size 64) checks the plumbing: the codec asked for is the one the stages use on every hop,
and the decoded activations stay close enough that greedy answers survive (unknown codecs are
tests/test_bad_input.py's).
"""

from __future__ import annotations

import pytest

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos import codec

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42], [3] * 20]
NEW_TOKENS = 8
HIDDEN = 64


def generate(addresses, codec_name: str) -> tuple[list[list[int]], float]:
    client = PipelineClient(addresses, wire_codec=codec.codec_from_name(codec_name))
    engine = Engine(client)
    try:
        tokens, elements = [], 0
        for prompt in PROMPTS:
            result = engine.generate([SequenceRequest(prompt, NEW_TOKENS)])[0]
            assert len(result.token_ids) == NEW_TOKENS
            tokens.append(result.token_ids)
            elements += (len(prompt) + NEW_TOKENS - 1) * (len(addresses) - 1) * HIDDEN
        return tokens, engine.hop_bytes / elements
    finally:
        client.close()


@pytest.fixture(scope="module")
def three_stages(tiny_model):
    from conftest import running_stages

    with running_stages(tiny_model("llama"), 3) as (addresses, _):
        yield addresses


@pytest.mark.parametrize("name,bytes_per_element", [("none", 4.0), ("fp16", 2.0), ("bf16", 2.0), ("int8", 1.25)])
def test_codec_bytes_and_answers(three_stages, name, bytes_per_element):
    exact, raw_bytes = generate(three_stages, "none")
    assert raw_bytes == pytest.approx(4.0)  # float32 activations, nothing else counted
    tokens, sent = generate(three_stages, name)
    if name == "int8":
        assert 0.8 < sent <= bytes_per_element  # Rice coded: variable, but about a byte
    else:
        assert sent == pytest.approx(bytes_per_element)
    assert tokens == exact
