"""The committed Python stubs must be exactly what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import PROTO_FILES, REPO_ROOT, generate


def test_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    generate(tmp_path)
    for proto in PROTO_FILES:
        stem = Path(proto).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = (tmp_path / f"{stem}{suffix}").read_text()
            committed = (REPO_ROOT / f"{stem}{suffix}").read_text()
            assert fresh == committed, f"{stem}{suffix} is stale: run `python -m protos.generate`"
