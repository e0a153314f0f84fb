"""Regenerate the Python stubs from the .proto files: `python -m protos.generate`.

The stubs are committed so that installing layerline needs no protoc;
tests/test_protos_in_sync.py fails when they drift from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_FILES = ("protos/stage.proto", "protos/coordinator.proto")
REPO_ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under `out_dir`/protos."""
    from grpc_tools import protoc  # only a development dependency

    args = ["protoc", f"-I{REPO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *(str(REPO_ROOT / p) for p in PROTO_FILES)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")


if __name__ == "__main__":
    generate(REPO_ROOT)
    print("stubs regenerated under", REPO_ROOT / "protos", file=sys.stderr)
