"""Streaming detokenization: deltas add up, stop strings never leak, partial characters wait."""

from __future__ import annotations

import pytest
from tiny_models import save_tiny_tokenizer

from coordinator.text import TextStream, Tokenization


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenization.from_model_dir(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def ids(tok, text):
    return tok.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_deltas_add_up(tok):
    stream = TextStream(tok)
    pieces = []
    for token in ids(tok, "hello world"):
        stream.add(token)
        pieces.append(stream.release())
    pieces.append(stream.release(final=True))
    assert "".join(pieces) == "hello world"


def test_stop_string_is_cut_and_held_back(tok):
    stream = TextStream(tok, stop=["STOP"])
    released = []
    for token in ids(tok, "abc STOP def"):
        if stream.add(token):
            break
        released.append(stream.release())
    released.append(stream.release(final=True))
    assert stream.stopped and "".join(released) == "abc "
    assert all("S" not in piece for piece in released), "a possible stop prefix is never released early"


def test_prefix_of_stop_released_when_it_diverges(tok):
    stream = TextStream(tok, stop=["STOP"])
    out = []
    for token in ids(tok, "STx"):
        stream.add(token)
        out.append(stream.release())
    assert out[:2] == ["", ""] and out[2] == "STx"


def test_chat_template_and_eos(tok):
    assert tok.eos_token_ids == {2}
    assert tok.has_chat_template
    rendered = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(rendered).endswith("<assistant>")
