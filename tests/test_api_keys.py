"""API keys on the public API: the key file, the interceptor's answers and per-key limits, the
Python clients and the CLI with a key, health left open, and SIGHUP reload of a running `serve`.

The limit tests run the interceptor on a bare gRPC server whose handler holds a stream open until
the test lets it go, so a slot is released by the call ending (here: cancelled, past its deadline)
and not by the handler returning. The rest run a keyed coordinator over a tiny 2-stage pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
from conftest import running_coordinator, running_stages
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_models import save_tiny_model, save_tiny_tokenizer
from waiting import eventually, wait_for_line

from coordinator.api_keys import ApiKeyInterceptor, ApiKeys, KeyFileError, bearer_metadata, parse_key_file
from coordinator.client import AsyncCoordinatorClient, CoordinatorClient

KEY = "test-key-0123456789abcdef"
OTHER = "other-key-ZYXWVUTSRQPONMLK"
LIMITED = "limited-key-0123456789AB"
WRONG = "wrong-key-9876543210fedcba"
TIMEOUT_S = 60


def key_file(directory, text: str):
    path = directory / "keys"
    path.write_text(text)
    return path


def no_env_key(monkeypatch) -> None:
    monkeypatch.delenv("LAYERLINE_API_KEY", raising=False)


# ---- the key file --------------------------------------------------------------------------------

def test_key_file_format():
    limits, first = parse_key_file(
        f"# comment\n\n   {KEY}   \n{LIMITED} max_concurrent=4  # batch jobs\n\t{OTHER}\t# trailing\n", "keys")
    assert first == KEY
    assert sorted(limits.values()) == [0, 0, 4]


@pytest.mark.parametrize("text, says", [
    ("", "holds no API key"),
    ("# only a comment\n\n", "holds no API key"),
    ("short\n", "line 1: a key is 16 to 512 characters"),
    (f"{KEY}\n{WRONG}!\n", "line 2: a key is"),
    (f"{KEY} max_concurrent=0\n", "line 1: after the key only max_concurrent=N"),
    (f"{KEY} limit=3\n", "line 1: after the key only max_concurrent=N"),
    (f"{KEY}\n# x\n{KEY}\n", "line 3: the key of line 1 again"),
])
def test_bad_key_files_are_refused_without_showing_a_key(text, says):
    with pytest.raises(KeyFileError, match=says) as raised:
        parse_key_file(text, "keys")
    message = str(raised.value)
    assert "\n" not in message and KEY not in message and WRONG not in message


def test_unreadable_key_file_is_one_line(tmp_path):
    for path, says in ((tmp_path / "missing", "cannot read the API key file"),
                       (tmp_path, "cannot read the API key file")):
        with pytest.raises(KeyFileError, match=says):
            ApiKeys(path)
    (tmp_path / "binary").write_bytes(b"\xff" * 20)
    with pytest.raises(KeyFileError, match="not ASCII text"):
        ApiKeys(tmp_path / "binary")


def test_reload_keeps_the_old_keys_when_the_new_file_is_bad(tmp_path, caplog):
    path = key_file(tmp_path, KEY + "\n")
    keys = ApiKeys(path)
    path.write_text(OTHER + "\n")
    assert keys.reload()
    assert keys.authenticate([f"Bearer {OTHER}"])[0] is not None
    assert keys.authenticate([f"Bearer {KEY}"])[0] is None
    path.write_text("# emptied by mistake\n")
    with caplog.at_level(logging.INFO, logger="coordinator.api_keys"):
        assert not keys.reload()
    assert keys.authenticate([f"Bearer {OTHER}"])[0] is not None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "not reloaded, 1 kept" in lines[0] and "\n" not in lines[0]
    assert OTHER not in caplog.text


def test_client_metadata_takes_the_flag_then_the_environment(monkeypatch):
    no_env_key(monkeypatch)
    assert bearer_metadata(None) is None
    assert bearer_metadata(KEY) == (("authorization", f"Bearer {KEY}"),)
    monkeypatch.setenv("LAYERLINE_API_KEY", OTHER)
    assert bearer_metadata(None) == (("authorization", f"Bearer {OTHER}"),)
    assert bearer_metadata(KEY) == (("authorization", f"Bearer {KEY}"),)
    assert bearer_metadata("") is None
    with pytest.raises(ValueError, match="must be") as raised:
        bearer_metadata("key with spaces in it")
    assert "spaces" not in str(raised.value)


# ---- the interceptor on a bare server ------------------------------------------------------------

class Bare:
    """A raw-bytes server behind the interceptor: Echo (unary), Fail (unary, INVALID_ARGUMENT),
    Hold (server streaming: one message, then waits for `let_go`)."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys
        self.let_go = threading.Event()
        self.parsed = 0

        def parse(data: bytes) -> bytes:
            self.parsed += 1
            return data

        def hold(request, context):
            yield b"started"
            self.let_go.wait(TIMEOUT_S)
            yield b"done"

        def fail(request, context):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")

        handlers = {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request,
                                                                request_deserializer=parse),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                    "Hold": grpc.unary_stream_rpc_method_handler(hold)}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[ApiKeyInterceptor(keys)])
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Bare", handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def call(self, method: str, key: str | None, **kwargs):
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        kind = self.channel.unary_stream if method == "Hold" else self.channel.unary_unary
        return kind(f"/test.Bare/{method}")(b"x", metadata=metadata, timeout=kwargs.pop("timeout", TIMEOUT_S))

    def close(self) -> None:
        self.let_go.set()
        self.channel.close()
        self.server.stop(None)


@pytest.fixture
def bare(tmp_path):
    server = Bare(ApiKeys(key_file(tmp_path, f"{KEY}\n{LIMITED} max_concurrent=1\n")))
    yield server
    server.close()


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_a_call_without_a_valid_key_is_refused_before_its_request_is_parsed(bare):
    for headers in (None, (("authorization", f"Bearer {WRONG}"),), (("authorization", KEY),),
                    (("authorization", f"Basic {KEY}"),)):
        with pytest.raises(grpc.RpcError) as raised:
            bare.channel.unary_unary("/test.Bare/Echo")(b"x", metadata=headers, timeout=TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert KEY not in raised.value.details() and WRONG not in raised.value.details()
    assert code_of(lambda: list(bare.call("Hold", WRONG))) == grpc.StatusCode.UNAUTHENTICATED
    assert bare.parsed == 0
    assert bare.call("Echo", KEY) == b"x" and bare.parsed == 1


def test_the_limit_is_per_key_and_freed_when_a_call_returns_or_fails(bare):
    for _ in range(3):
        assert bare.call("Echo", LIMITED) == b"x"
        assert code_of(lambda: bare.call("Fail", LIMITED)) == grpc.StatusCode.INVALID_ARGUMENT
    assert bare.keys.running() == 0


def test_the_limit_refuses_a_second_call_and_a_cancelled_stream_frees_its_slot(bare):
    held = bare.call("Hold", LIMITED)
    assert next(held) == b"started"
    with pytest.raises(grpc.RpcError) as raised:
        bare.call("Echo", LIMITED)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent" in raised.value.details() and "\n" not in raised.value.details()
    assert bare.call("Echo", KEY) == b"x", "another key is not limited by this one"
    # The handler stays blocked after the cancel: only the call's end can give the slot back.
    held.cancel()
    assert eventually(bare.keys.running, 0) == 0
    again = bare.call("Hold", LIMITED)
    assert next(again) == b"started"
    again.cancel()


def test_a_stream_past_its_deadline_frees_its_slot(bare):
    held = bare.call("Hold", LIMITED, timeout=1.0)
    assert next(held) == b"started"
    assert code_of(lambda: list(held)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert eventually(bare.keys.running, 0) == 0
    assert bare.call("Echo", LIMITED) == b"x"


# ---- a keyed coordinator over a tiny pipeline ----------------------------------------------------

@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory):
    """(coordinator address, stage addresses, model dir, key file, ApiKeys)."""
    directory = tmp_path_factory.mktemp("keyed-llama")
    save_tiny_model(directory, "llama")
    save_tiny_tokenizer(directory)
    keys_path = key_file(tmp_path_factory.mktemp("keys"), f"{KEY}\n{LIMITED} max_concurrent=1\n")
    keys = ApiKeys(keys_path)
    with running_stages(directory, 2) as (addresses, _):
        with running_coordinator(directory, addresses, api_keys=keys) as (address, _):
            yield address, addresses, directory, keys_path, keys


def test_python_client_needs_the_key(keyed_api, monkeypatch, caplog):
    no_env_key(monkeypatch)
    address = keyed_api[0]
    with caplog.at_level(logging.DEBUG):
        for key in (None, WRONG):
            with CoordinatorClient(address, timeout_s=TIMEOUT_S, api_key=key) as client:
                for call in (lambda: client.generate(prompt="hi", max_new_tokens=2),
                             lambda: list(client.generate_stream(prompt="hi", max_new_tokens=2)),
                             client.model_info):
                    with pytest.raises(grpc.RpcError) as raised:
                        call()
                    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert WRONG not in raised.value.details()
        with CoordinatorClient(address, timeout_s=TIMEOUT_S, api_key=KEY) as client:
            assert len(client.generate(prompt="hi", max_new_tokens=3).token_ids) == 3
            assert sum(len(m.token_ids) for m in client.generate_stream(prompt="hi", max_new_tokens=3)) == 3
            assert client.model_info().num_layers == 4
    assert "refused /layerline.v1.Coordinator/Generate" in caplog.text
    assert KEY not in caplog.text and WRONG not in caplog.text


def test_python_client_reads_the_key_from_the_environment(keyed_api, monkeypatch):
    monkeypatch.setenv("LAYERLINE_API_KEY", KEY)
    with CoordinatorClient(keyed_api[0], timeout_s=TIMEOUT_S) as client:
        assert len(client.generate(prompt="hi", max_new_tokens=2).token_ids) == 2


def test_async_client_needs_the_key(keyed_api, monkeypatch):
    no_env_key(monkeypatch)

    async def run() -> None:
        async with AsyncCoordinatorClient(keyed_api[0], timeout_s=TIMEOUT_S, api_key=WRONG) as client:
            with pytest.raises(grpc.RpcError) as raised:
                await client.generate(prompt="hi", max_new_tokens=2)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncCoordinatorClient(keyed_api[0], timeout_s=TIMEOUT_S, api_key=KEY) as client:
            assert len((await client.generate(prompt="hi", max_new_tokens=2)).token_ids) == 2
            tokens = [t async for m in client.generate_stream(prompt="hi", max_new_tokens=2) for t in m.token_ids]
            assert len(tokens) == 2

    asyncio.run(run())


def test_health_needs_no_key(keyed_api):
    with grpc.insecure_channel(keyed_api[0]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="layerline.v1.Coordinator"), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_cancelled_stream_frees_its_keys_slot(keyed_api, monkeypatch):
    no_env_key(monkeypatch)
    keys = keyed_api[4]
    with CoordinatorClient(keyed_api[0], timeout_s=TIMEOUT_S, api_key=LIMITED) as client:
        for _ in range(3):
            stream = client.generate_stream(prompt="hi", max_new_tokens=200, ignore_eos=True)
            assert next(stream).token_ids
            stream.cancel()
            assert eventually(keys.running, 0) == 0
        assert len(client.generate(prompt="hi", max_new_tokens=2).token_ids) == 2


def cli(*args: str, key_env: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LAYERLINE_API_KEY"}
    if key_env is not None:
        env["LAYERLINE_API_KEY"] = key_env
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONUNBUFFERED": "1"})


def test_cli_takes_the_key_by_flag_or_environment(keyed_api):
    address = keyed_api[0]
    done = cli("generate", "--address", address, "--prompt", "hi", "--max-new-tokens", "3", "--json",
               "--api-key", KEY)
    assert done.returncode == 0, done.stderr
    done = cli("info", "--address", address, "--json", key_env=KEY)
    assert done.returncode == 0, done.stderr
    assert '"numLayers": 4' in done.stdout
    done = cli("generate", "--address", address, "--prompt", "hi", "--json")
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr


def test_serve_refuses_a_key_file_without_keys(keyed_api, tmp_path):
    done = cli("serve", "--stages", ",".join(keyed_api[1]), "--model", str(keyed_api[2]), "--port", "0",
               "--api-keys", str(key_file(tmp_path, "# nothing yet\n")))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"coordinator: error: {tmp_path / 'keys'} holds no API key: "
                                                "write one key per line"]




def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(address: str, key: str) -> grpc.StatusCode:
    with CoordinatorClient(address, timeout_s=TIMEOUT_S, api_key=key) as client:
        return code_of(client.model_info)


def test_sighup_reloads_the_keys_of_a_running_serve(keyed_api, tmp_path):
    path = key_file(tmp_path, KEY + "\n")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "--log-level", "DEBUG", "serve", "--stages", ",".join(keyed_api[1]),
         "--model", str(keyed_api[2]), "--port", str(port), "--api-keys", str(path)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    try:
        seen += wait_for_line(process, "Ctrl-C to stop", 240)
        assert _answers(address, KEY) == grpc.StatusCode.OK
        assert _answers(address, OTHER) == grpc.StatusCode.UNAUTHENTICATED

        path.write_text(f"# rotated\n{OTHER}\n")
        process.send_signal(signal.SIGHUP)
        seen += wait_for_line(process, "API keys reloaded", 30)
        assert _answers(address, OTHER) == grpc.StatusCode.OK
        assert _answers(address, KEY) == grpc.StatusCode.UNAUTHENTICATED

        path.write_text("not a key\n")
        process.send_signal(signal.SIGHUP)
        seen += wait_for_line(process, "API keys not reloaded", 30)
        assert _answers(address, OTHER) == grpc.StatusCode.OK, "a bad file keeps the keys loaded"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        seen.append(process.stderr.read())
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    output = "".join(seen)
    assert "refused /layerline.v1.Coordinator/GetModelInfo" in output
    assert KEY not in output and OTHER not in output
