"""The HTTP API's refusals: unsupported fields and values, bad bodies, sizes and paths, each in
OpenAI's error shape with the documented status, and the gRPC API's limits and messages.
"""

from __future__ import annotations

import grpc
import http_pipeline
import httpx2 as httpx
import openai
import pytest
from http_pipeline import CHAT, KEY, MODEL, client, grpc_reply


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    yield from http_pipeline.serving(tmp_path_factory)



@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"user": "me"}, "user"),
    ({"colour": "blue"}, "colour"), ({"max_tokens": "many"}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"model": "gpt-4o"}, "model"),
])
def test_unsupported_fields_get_a_400_in_openais_shape(api, extra, param):
    body = {"model": MODEL, "messages": CHAT, **extra}
    reply = httpx.post(f"{api.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == (404 if param == "model" else 400), reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("extra, param", [
    ({"echo": True}, "echo"), ({"suffix": "!"}, "suffix"), ({"best_of": 2}, "best_of"), ({"logprobs": 1}, "logprobs"),
    ({"logit_bias": {"5": 1}}, "logit_bias"), ({"messages": CHAT}, "messages"), ({"n": 2}, "n"),
])
def test_unsupported_completion_fields_get_a_400(api, extra, param):
    reply = httpx.post(f"{api.url}/v1/completions", json={"model": MODEL, "prompt": "hi", **extra},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_neutral_values_are_taken(api):
    """Values that ask for nothing beyond what the server does are not refused: clients send them."""
    reply = httpx.post(f"{api.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 2, "n": 1, "logprobs": False, "presence_penalty": 0,
        "frequency_penalty": 0.0, "tools": None, "user": None, "response_format": {"type": "text"}})
    assert reply.status_code == 200, reply.text


def test_the_openai_package_gets_its_errors(api):
    with pytest.raises(openai.BadRequestError) as refused:
        client(api).chat.completions.create(model=MODEL, messages=CHAT, n=2)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as refused:
        client(api).completions.create(model=MODEL, prompt=["one", "two"])
    assert "one prompt per request" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        client(api).completions.create(model="another-model", prompt="hi")


def test_limits_and_messages_are_the_grpc_apis(api):
    with pytest.raises(grpc.RpcError) as grpc_refusal:
        grpc_reply(api, prompt="hi", max_new_tokens=100000)
    with pytest.raises(openai.BadRequestError) as refused:
        client(api).completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    assert refused.value.body["message"] == grpc_refusal.value.details()
    assert refused.value.body["code"] == "out_of_range"


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not valid JSON"), (b"", "not valid JSON"), (b"[1, 2]", "JSON object"),
    (b'{"messages": "hi"}', "non-empty list"), (b'{"messages": []}', "non-empty list"),
    (b'{"messages": [{"role": "pirate", "content": "arr"}]}', "is not one of"),
])
def test_bad_bodies_get_a_400(api, content, says):
    reply = httpx.post(f"{api.url}/v1/chat/completions", content=content, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and says in reply.json()["error"]["message"], reply.text


def test_a_body_over_the_limit_gets_a_413(api):
    reply = httpx.post(f"{api.url}/v1/completions", content=b"x" * (api.server.config.max_request_bytes + 1),
                       headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


def test_unknown_paths_and_methods_get_openais_shape(api):
    assert httpx.get(f"{api.url}/v1/engines").json()["error"]["code"] == "not_found"
    assert httpx.get(f"{api.url}/v1/completions").status_code == 405
