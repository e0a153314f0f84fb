"""What the public API refuses before it spends memory on it: oversized requests and prompts, fields
the API does not declare, and token ids outside the model's vocabulary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from coordinator.client import CoordinatorClient
from protos import coordinator_pb2
from protos.channel_options import channel_options

REPO = Path(__file__).resolve().parent.parent
PROMPT_MB = 100
RSS_GROWTH_LIMIT_MB = 200
SERVING_LINE = re.compile(r"coordinator serving \S+ on (\S+):(\d+)")


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of process `pid`, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def _raw_call(address: str, method: str, payload: bytes, streaming: bool = False):
    """Call a Coordinator method with `payload` as the request's bytes; returns the answer(s) as bytes."""
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(f"/layerline.v1.Coordinator/{method}", request_serializer=None, response_deserializer=None)
        answer = call(payload, timeout=60)
        return list(answer) if streaming else answer


@pytest.fixture(scope="module")
def coordinator_process(tiny_model, tmp_path_factory):
    """A `coordinator serve` process over two in-process tiny stages: (address, pid)."""
    from conftest import running_stages

    model_dir = tiny_model("llama")
    with running_stages(model_dir, 2) as (addresses, _):
        log = tmp_path_factory.mktemp("coordinator") / "stderr.txt"
        with open(log, "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "serve", "--stages", ",".join(addresses),
                 "--model", str(model_dir), "--port", "0"],
                cwd=REPO, stderr=stderr, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.monotonic() + 120
            while not (match := SERVING_LINE.search(log.read_text())):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the coordinator did not start in 120 s"
                time.sleep(0.2)
            yield f"{match.group(1)}:{match.group(2)}", process.pid
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_huge_prompt_leaves_the_coordinator_memory_alone(coordinator_process):
    """A 100 MB prompt is refused by the request limit, a prompt under that limit but longer than the
    context could hold is refused before tokenizing: the coordinator's resident memory, now and at its
    peak, stays within 200 MB of what it was idle, and it still serves."""
    address, pid = coordinator_process
    with CoordinatorClient(address, timeout_s=60) as client:
        assert len(client.generate(prompt="warm up", max_new_tokens=2).token_ids) == 2
        idle = _memory_mb(pid)
        huge, long = (_refusal(client, "x" * (PROMPT_MB << 20)),
                      _refusal(client, "word " * 600_000))  # 3 MB: under the request limit
        after = _memory_mb(pid)
        assert len(client.generate(prompt="still fine", max_new_tokens=2).token_ids) == 2
    assert after["VmRSS"] - idle["VmRSS"] < RSS_GROWTH_LIMIT_MB, (idle, after)
    assert after["VmHWM"] - idle["VmHWM"] < RSS_GROWTH_LIMIT_MB, (idle, after)
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, huge.details()
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT, long.details()
    assert "characters" in long.details() and "context" in long.details() and "\n" not in long.details()


def _refusal(client: CoordinatorClient, prompt: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt=prompt, max_new_tokens=2)
    return err.value


def test_a_long_token_id_list_is_refused_before_it_is_copied(tiny_api):
    with CoordinatorClient(tiny_api[0], timeout_s=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(token_ids=[5] * 100_000)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "100000 tokens" in err.value.details() and "context" in err.value.details()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("extra,words", [
    (bytes([(4 << 3) | 2, 2, 1, 2]), "field 4 (max_new_tokens) sent as length-delimited"),
    (bytes([(15 << 3) | 0, 1]), "field 15"),
], ids=["max_new_tokens as bytes", "undeclared field"])
def test_fields_the_api_does_not_declare_are_refused(extra, words, streaming, tiny_api):
    """A field the schema lacks, or a declared one sent with another wire type (protobuf sets such a
    field aside instead of reading it), is INVALID_ARGUMENT naming the field, not silently ignored."""
    payload = coordinator_pb2.GenerateRequest(prompt="hello").SerializeToString() + extra
    method = "GenerateStream" if streaming else "Generate"
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(tiny_api[0], method, payload, streaming)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_an_unknown_field_inside_a_chat_message_is_refused(tiny_api):
    message = coordinator_pb2.ChatMessage(role="user", content="hi").SerializeToString() + bytes([(9 << 3) | 0, 1])
    payload = bytes([(2 << 3) | 2, len(message)]) + message
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(tiny_api[0], "Generate", payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 9 in messages[0]" in err.value.details()


def test_token_ids_are_checked_against_the_models_vocabulary(tiny_api):
    """The tiny model's vocabulary has 128 ids, its tokenizer 98 tokens: GetModelInfo's vocab_size is
    the bound, on both sides of the tokenizer's length."""
    with CoordinatorClient(tiny_api[0], timeout_s=30) as client:
        vocab_size = client.model_info().vocab_size
        assert vocab_size == 128
        answer = client.generate(token_ids=[5, 100, vocab_size - 1], max_new_tokens=2)
        assert len(answer.token_ids) == 2
        with pytest.raises(grpc.RpcError) as err:
            client.generate(token_ids=[5, vocab_size], max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"[0, {vocab_size})" in err.value.details()
