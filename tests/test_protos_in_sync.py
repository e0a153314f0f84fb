"""The committed Python stubs must be what the .proto files generate, whichever patch release of
grpcio-tools is installed, and must not demand a newer grpcio than pyproject.toml promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protos.generate import PROTO_FILES, REPO_ROOT, generate

# Lines that name the generator's own release rather than anything the .proto files say.
_GENERATOR_VERSION = re.compile(r"^(GRPC_GENERATED_VERSION = |# Protobuf Python Version: ).*$", re.MULTILINE)
_RUNTIME_CHECK = re.compile(
    r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,")


def without_generator_version(text: str) -> str:
    return _RUNTIME_CHECK.sub(r"\1 X, Y, Z,", _GENERATOR_VERSION.sub(r"\1<version>", text))


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def test_version_lines_are_what_the_comparison_ignores():
    """The normalisation must really touch the committed stubs, or the comparison would be blind."""
    grpc_stub = (REPO_ROOT / "protos/stage_pb2_grpc.py").read_text()
    message_stub = (REPO_ROOT / "protos/stage_pb2.py").read_text()
    assert without_generator_version(grpc_stub) != grpc_stub
    assert without_generator_version(message_stub) != message_stub


def test_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    generate(tmp_path)
    for proto in PROTO_FILES:
        stem = Path(proto).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = without_generator_version((tmp_path / f"{stem}{suffix}").read_text())
            committed = without_generator_version((REPO_ROOT / f"{stem}{suffix}").read_text())
            assert fresh == committed, f"{stem}{suffix} is stale: run `python -m protos.generate`"


def test_stubs_run_on_the_oldest_grpcio_we_promise():
    """A stub refuses to import on a grpcio older than the one that generated it: regenerating with
    a newer grpcio-tools must come with a matching floor in pyproject.toml."""
    floor = re.search(r'"grpcio>=([\d.]+)', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    for proto in PROTO_FILES:
        stub = (REPO_ROOT / f"{Path(proto).with_suffix('')}_pb2_grpc.py").read_text()
        generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", stub).group(1)
        assert _release(generated) <= _release(floor), \
            f"{proto}'s stubs need grpcio>={generated} but pyproject.toml allows grpcio>={floor}"
