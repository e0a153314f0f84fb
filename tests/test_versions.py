"""One version everywhere: what a stage reports of its software, weights and protocol, what the
coordinator shows of it, and `--version` on both command lines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata

import pytest

from coordinator.client import CoordinatorClient
from coordinator.pipeline_client import PipelineClient
from protos.protocol import PROTOCOL_VERSION


def _stage_infos(addresses):
    client = PipelineClient(addresses)
    try:
        return client.stage_infos()
    finally:
        client.close()


def test_stage_info_reports_versions_protocol_device_and_weights(tiny_api):
    _, addresses, _ = tiny_api
    infos = _stage_infos(addresses)
    for info in infos:
        assert info.protocol_version == PROTOCOL_VERSION >= 1
        assert info.versions["python"] == platform.python_version()
        assert info.versions["torch"] == metadata.version("torch")
        assert info.versions["transformers"] == metadata.version("transformers")
        assert info.versions["layerline"] and info.dtype == "float32" and info.device == "cpu"
        assert len(info.weights_manifest_id) == 16
    assert infos[0].weights_manifest_id == infos[1].weights_manifest_id


def test_coordinator_info_shows_the_weights_and_each_stages_versions(tiny_api):
    address, addresses, _ = tiny_api
    stage_infos = _stage_infos(addresses)
    with CoordinatorClient(address, timeout_s=30) as coordinator:
        info = coordinator.model_info()
    assert info.weights_manifest_id == stage_infos[0].weights_manifest_id
    for shown, reported in zip(info.stages, stage_infos):
        assert dict(shown.versions) == dict(reported.versions) and shown.device == reported.device


@pytest.mark.parametrize("module", ["stage_server.cli", "coordinator.cli"])
def test_version_prints_and_exits_at_once(module):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"layerline {metadata.version('layerline')} (stage protocol {PROTOCOL_VERSION})"
    for package in ("torch", "transformers", "grpcio"):
        assert f"{package} {metadata.version(package)}" in lines[1]
    assert f"python {platform.python_version()}" in lines[1] and len(lines) == 2
    assert elapsed < 30


def test_stage_server_version_does_not_load_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "stage_server.cli", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = [line.rpartition("|")[2].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "protos.software_versions" in imported and "torch" not in imported
