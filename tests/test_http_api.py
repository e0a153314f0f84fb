"""The OpenAI-compatible HTTP API: the official `openai` package against `--http-port`, its answers
token for token the gRPC API's, the curl examples of docs/api.md as written, metrics and request
ids, API keys and their slots, a cut stream freeing its sessions, stopping, and TLS (refusals:
test_http_refusals.py).

One keyed coordinator over a tiny 2-stage Llama serves both APIs for most tests (http_pipeline.py).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import http_pipeline
import httpx2 as httpx
import openai
import pytest
from conftest import running_coordinator, running_stages
from http_pipeline import CHAT, KEY, MODEL, ONE_SLOT, TIMEOUT_S, client, decode, grpc_reply
from prometheus_client.parser import text_string_to_metric_families
from test_cancellation import slowed_forward
from waiting import eventually, stage_sessions

from coordinator.app import CoordinatorConfig, CoordinatorServer
from coordinator.certs import make_certificates
from coordinator.http_server import listen
from protos.tls import TlsFiles


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    yield from http_pipeline.serving(tmp_path_factory)


# ---- the answers are the gRPC API's ----------------------------------------------------------------

@pytest.mark.parametrize("ignore_eos", [False, True])
def test_chat_answers_are_the_grpc_apis(api, ignore_eos):
    expected = grpc_reply(api, messages=CHAT, max_new_tokens=12, ignore_eos=ignore_eos)
    reply = client(api).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": ignore_eos})
    assert reply.choices[0].message.content == expected.text == decode(api, expected.token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids) == expected.completion_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.choices[0].finish_reason == ("length" if len(expected.token_ids) == 12 else "stop")

    chunks = list(client(api).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, stream=True,
                                                      stream_options={"include_usage": True},
                                                      extra_body={"ignore_eos": ignore_eos}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


@pytest.mark.parametrize("prompt", ["Once upon a time", [5, 17, 33, 60, 12, 8]])
def test_completion_answers_are_the_grpc_apis(api, prompt):
    source = {"prompt": prompt} if isinstance(prompt, str) else {"token_ids": prompt}
    expected = grpc_reply(api, **source, max_new_tokens=10, ignore_eos=True)
    reply = client(api).completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected.text == decode(api, expected.token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids) == 10
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    stream = client(api).completions.create(model=MODEL, prompt=prompt, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 10


def test_sampling_seed_and_stop_are_the_grpc_apis(api):
    expected = grpc_reply(api, prompt="The sea", max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7,
                          ignore_eos=True)
    reply = client(api).completions.create(model=MODEL, prompt="The sea", max_tokens=12, temperature=0.9,
                                           top_p=0.8, seed=7, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected.text
    stop = expected.text[3:5]
    assert stop, expected.text
    stopped = grpc_reply(api, prompt="The sea", max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7,
                         ignore_eos=True, stop=[stop])
    reply = client(api).completions.create(model=MODEL, prompt="The sea", max_tokens=12, temperature=0.9,
                                           top_p=0.8, seed=7, stop=stop, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == stopped.text and stop not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_models_and_health(api):
    assert [model.id for model in client(api).models.list()] == [MODEL]
    assert httpx.get(f"{api.url}/health").json() == {"status": "serving"}
    server = api.server
    server.health.set("", 2)  # NOT_SERVING
    try:
        refused = httpx.get(f"{api.url}/health")
        assert refused.status_code == 503 and refused.json() == {"status": "not_serving"}
    finally:
        server.health.set("", 1)
    assert httpx.get(f"{api.url}/health").status_code == 200


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the HTTP port's /metrics, read by prometheus_client's parser."""
    reply = httpx.get(f"{url}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def test_http_requests_show_in_the_metrics_on_the_http_port(api):
    """/metrics (no key needed) parses; HTTP requests count by status, their tokens and first tokens too."""
    before = _samples(api.url)

    def count(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    client(api).completions.create(model=MODEL, prompt="hi", max_tokens=5, extra_body={"ignore_eos": True})
    list(client(api).completions.create(model=MODEL, prompt="hi", max_tokens=7, stream=True,
                                        extra_body={"ignore_eos": True}))
    httpx.post(f"{api.url}/v1/completions", json={"prompt": "hi", "n": 2}, headers={"Authorization": f"Bearer {KEY}"})
    after = eventually(lambda: _samples(api.url), None, timeout_s=0.5)
    assert count(after, "layerline_requests_total", api="http", code="200") - \
        count(before, "layerline_requests_total", api="http", code="200") == 2
    assert count(after, "layerline_requests_total", api="http", code="400") - \
        count(before, "layerline_requests_total", api="http", code="400") == 1
    assert count(after, "layerline_completion_tokens_total", api="http") - \
        count(before, "layerline_completion_tokens_total", api="http") == 12
    assert count(after, "layerline_time_to_first_token_seconds_count", api="http") - \
        count(before, "layerline_time_to_first_token_seconds_count", api="http") == 2


def test_a_request_id_goes_back_and_into_the_request_log(api, caplog):
    """The caller's X-Request-Id comes back as a header and names the request's one log line (API
    http, its status and tokens), as for the gRPC API; without one the server makes one."""
    caplog.set_level(logging.INFO, logger="coordinator.requests")
    for stream in (False, True):
        request_id = f"http-request-{int(stream)}"
        with httpx.stream("POST", f"{api.url}/v1/completions", timeout=TIMEOUT_S, json={
                "prompt": "hi", "max_tokens": 3, "ignore_eos": True, "stream": stream},
                headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": request_id}) as reply:
            reply.read()
        assert reply.status_code == 200 and reply.headers["x-request-id"] == request_id
        lines = eventually(lambda rid=request_id: [r for r in caplog.records if getattr(r, "request_id", "") == rid],
                           None,
                           timeout_s=1.0)
        assert len(lines) == 1 and lines[0].api == "http" and lines[0].status == "200", lines
        assert lines[0].completion_tokens == 3 and lines[0].route
    made = httpx.post(f"{api.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                      headers={"Authorization": f"Bearer {KEY}"})
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["x-request-id"])


# ---- the docs' curl examples ---------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def docs_curl_commands() -> list[str]:
    """Each `curl` command of the OpenAI-compatible HTTP section's bash blocks, lines joined."""
    section = DOCS.read_text().split("## OpenAI-compatible HTTP", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("curl "):
                commands.append(command.strip())
    return commands


def test_the_docs_curl_examples_work_as_written(api, monkeypatch):
    commands = docs_curl_commands()
    assert len(commands) >= 4
    port = api.url.rsplit(":", 1)[1]
    for command in commands:
        command = command.replace("localhost:8000", f"localhost:{port}")
        if shutil.which("curl"):
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=TIMEOUT_S,
                                    env={"PATH": "/usr/bin:/bin", "LAYERLINE_API_KEY": KEY})
            assert result.returncode == 0, result.stderr
            output = result.stdout
        else:  # the same request through httpx: URL, headers and body as the command gives them
            output = _as_httpx(command)
        if "stream" in command:
            events = [line[6:] for line in output.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 16
        else:
            body = json.loads(output)
            assert "error" not in body, body
            assert body.get("status") == "serving" or body.get("object") in ("chat.completion", "list")


def _as_httpx(command: str) -> str:
    words = shlex.split(command.replace("$LAYERLINE_API_KEY", KEY))
    url = next(w for w in words if w.startswith("http"))
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    data = next((words[i + 1] for i, w in enumerate(words) if w == "-d"), None)
    reply = httpx.request("POST" if data else "GET", url, headers=headers, content=data, timeout=TIMEOUT_S)
    return reply.text


# ---- keys ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789abcdef"},
                                     {"Authorization": f"Basic {KEY}"}])
def test_bad_keys_get_a_401(api, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")):
        reply = httpx.request(method, f"{api.url}{path}", json={"messages": CHAT}, headers=headers)
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["type"] == "authentication_error"
        assert KEY not in reply.text
    with pytest.raises(openai.AuthenticationError):
        client(api, key="wrong-key-0123456789abcdef").models.list()


def test_a_keys_slots_hold_across_a_stream_and_then_free(api):
    """A stream holds its key's only slot until it ends: a second request gets 429 with Retry-After."""
    keys = api.server.api_keys
    with client(api, ONE_SLOT).completions.create(model=MODEL, prompt="hi", max_tokens=200, stream=True,
                                                  extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        refused = httpx.post(f"{api.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                             headers={"Authorization": f"Bearer {ONE_SLOT}"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
    assert eventually(keys.running, 0) == 0
    assert client(api, ONE_SLOT).completions.create(model=MODEL, prompt="hi", max_tokens=2).usage


# ---- cancellation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_the_stage_sessions(api, stream):
    """A client that drops its connection mid-answer stops its generation and frees every stage's
    session (and its key's slot) within seconds: the 240 tokens asked for take over 9 s."""
    stages, keys = api.stages, api.server.api_keys
    assert eventually(lambda: stage_sessions(stages), [0, 0]) == [0, 0]
    body = {"prompt": "hi", "max_tokens": 240, "ignore_eos": True, "stream": stream}
    started = threading.Event()

    def request() -> None:
        try:
            with httpx.stream("POST", f"{api.url}/v1/completions", json=body, timeout=1.5,
                              headers={"Authorization": f"Bearer {KEY}"}) as reply:
                for _ in reply.iter_lines():
                    started.set()
                    break  # leaving the block closes the connection
        except httpx.TimeoutException:
            pass  # the unstreamed answer: the client gives up and closes

    with slowed_forward(api.stage_servers[0], 0.02), slowed_forward(api.stage_servers[1], 0.02):
        worker = threading.Thread(target=request)
        worker.start()
        if stream:
            assert started.wait(TIMEOUT_S)
        else:
            assert eventually(lambda: max(stage_sessions(stages)) > 0, True) is True
        worker.join(TIMEOUT_S)
        assert eventually(lambda: stage_sessions(stages), [0, 0], timeout_s=5) == [0, 0]
        assert eventually(keys.running, 0) == 0


# ---- the listening side ------------------------------------------------------------------------------

def test_a_taken_port_is_one_line_naming_the_flag():
    held = listen("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=r"cannot listen for HTTP on 127.0.0.1:\d+: .*choose another --http-port"):
            listen("127.0.0.1", held.getsockname()[1])
    finally:
        held.close()


def test_https_with_the_apis_tls_files(tiny_model, tmp_path):
    """--api-tls-cert/--api-tls-key make the HTTP port HTTPS only; --api-tls-ca requires a client
    certificate of that CA."""
    make_certificates(tmp_path, ["localhost"])
    server_tls = TlsFiles.read(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "localhost.pem"),
                               key=str(tmp_path / "localhost-key.pem"))
    model_dir = tiny_model("llama")
    with running_stages(model_dir, 2) as (stages, _):
        with running_coordinator(model_dir, stages, api_tls=server_tls, http_port=0) as (_, server):
            url = f"https://localhost:{server.http_server.port}/health"
            trusting = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            with httpx.Client(verify=trusting) as no_certificate:
                with pytest.raises(httpx.HTTPError):
                    no_certificate.get(url).raise_for_status()
            trusting.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem"))
            with httpx.Client(verify=trusting) as https:
                assert https.get(url).json() == {"status": "serving"}
            with pytest.raises(httpx.HTTPError):
                httpx.get(url.replace("https", "http"), timeout=5).raise_for_status()


def test_stopping_ends_open_streams_within_the_grace(tiny_model):
    """A coordinator stopped while an HTTP stream runs cancels it, ends the stream with an error
    event, frees the stages' sessions and returns within its grace plus a little, not after the
    whole answer (240 tokens at over 40 ms each)."""
    model_dir = tiny_model("llama")
    with running_stages(model_dir, 2) as (stages, stage_servers):
        with slowed_forward(stage_servers[0], 0.02), slowed_forward(stage_servers[1], 0.02):
            server = CoordinatorServer(CoordinatorConfig(stages=tuple(stages), model_dir=str(model_dir), port=0,
                                                         stage_wait_s=30, http_port=0))
            server.start()
            stopped = False
            try:
                url = f"http://127.0.0.1:{server.http_server.port}/v1/completions"
                body = {"prompt": "hi", "max_tokens": 240, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", url, json=body, timeout=TIMEOUT_S) as reply:
                    lines = reply.iter_lines()
                    next(lines)
                    started = time.monotonic()
                    server.stop(grace_s=1.0)
                    stopped = True
                    assert time.monotonic() - started < 4.0
                    rest = "".join(lines)
                assert "[DONE]" not in rest and "the coordinator is stopping" in rest, rest[-500:]
            finally:
                if not stopped:
                    server.stop(grace_s=1.0)
            assert eventually(lambda: stage_sessions(stages), [0, 0], timeout_s=5) == [0, 0]
