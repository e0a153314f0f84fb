"""A chain's stages must agree on protocol, model, weights and numeric libraries before the coordinator
serves them; every refusal is one line naming the stages and the values that differ."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model, save_tiny_tokenizer

from coordinator.app import CoordinatorConfig, CoordinatorServer, PipelineSetupError
from coordinator.stage_agreement import chain_refusal
from protos import stage_pb2
from protos.protocol import PROTOCOL_VERSION
from stage_server.server import StageServer, StageServerConfig
from stage_server.weights_manifest import MANIFEST_NAME

ADDRESSES = ("10.0.0.1:50051", "10.0.0.2:50052", "10.0.0.3:50053")
SPANS = ((0, 10), (10, 20), (20, 30))


def infos(**differences) -> list[stage_pb2.InfoResponse]:
    """Three agreeing stages' Info; `differences` maps a field to the value the last stage reports
    ("torch" and "transformers" are keys of its versions map)."""
    replies = []
    for start, end in SPANS:
        replies.append(stage_pb2.InfoResponse(
            model_fingerprint="f1f1f1f1f1f1f1f1", weights_manifest_id="a1a1a1a1a1a1a1a1",
            protocol_version=PROTOCOL_VERSION, layer_start=start, layer_end=end, num_layers=30,
            device="cpu", dtype="bfloat16",
            versions={"layerline": "0.1.0", "torch": "2.13.0", "transformers": "5.25.0", "grpcio": "1.85.4"}))
    for field, value in differences.items():
        if field in ("torch", "transformers", "grpcio", "layerline"):
            replies[-1].versions[field] = value
        else:
            setattr(replies[-1], field, value)
    return replies


def test_an_agreeing_chain_is_served():
    assert chain_refusal(ADDRESSES, infos()) is None


@pytest.mark.parametrize("field, value, words", [
    ("model_fingerprint", "0000000000000000", "different models"),
    ("weights_manifest_id", "b2b2b2b2b2b2b2b2", "different weights"),
    ("weights_manifest_id", "", "different weights"),
])
def test_stages_of_other_models_or_weights_are_refused_naming_them(field, value, words):
    replies = infos(**{field: value})
    refusal = chain_refusal(ADDRESSES, replies)
    assert refusal is not None and "\n" not in refusal and words in refusal
    expected = getattr(replies[0], field)
    assert f"{expected} on 10.0.0.1:50051 (layers 0:10), 10.0.0.2:50052 (layers 10:20)" in refusal
    assert f"{value or '(none)'} on 10.0.0.3:50053 (layers 20:30)" in refusal
    # The flag for library versions does not let other weights through.
    assert chain_refusal(ADDRESSES, replies, allow_mixed_versions=True) == refusal


def test_a_stage_of_another_protocol_is_refused_naming_it():
    refusal = chain_refusal(ADDRESSES, infos(protocol_version=PROTOCOL_VERSION + 1))
    assert refusal is not None and "\n" not in refusal and "protocol" in refusal
    assert f"{PROTOCOL_VERSION + 1} on 10.0.0.3:50053 (layers 20:30)" in refusal
    # A stage that reports no protocol (0) does not speak this one either.
    assert "0 on 10.0.0.3:50053" in chain_refusal(ADDRESSES, infos(protocol_version=0))


@pytest.mark.parametrize("library", ["torch", "transformers"])
def test_other_library_versions_are_refused_unless_allowed_then_warned_once(library, caplog):
    replies = infos(**{library: "9.9.9"})
    refusal = chain_refusal(ADDRESSES, replies)
    assert refusal is not None and "\n" not in refusal and "--allow-mixed-versions" in refusal
    assert f"{library} 9.9.9" in refusal and "10.0.0.3:50053 (layers 20:30)" in refusal
    with caplog.at_level(logging.WARNING, logger="coordinator.stage_agreement"):
        assert chain_refusal(ADDRESSES, replies, allow_mixed_versions=True) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "10.0.0.3:50053 (layers 20:30)" in warnings[0] and "9.9.9" in warnings[0]


def test_other_versions_of_libraries_that_do_not_compute_are_served(caplog):
    with caplog.at_level(logging.WARNING, logger="coordinator.stage_agreement"):
        assert chain_refusal(ADDRESSES, infos(grpcio="1.70.0", layerline="0.2.0")) is None
    assert caplog.records == []


def test_a_chain_of_cpu_and_gpu_stages_is_served_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="coordinator.stage_agreement"):
        assert chain_refusal(ADDRESSES, infos(device="cuda:0")) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cpu on 10.0.0.1:50051" in lines[0] and "cuda:0 on 10.0.0.3:50053" in lines[0]


def _stage(model_dir: Path, start: int, end: int) -> StageServer:
    server = StageServer(StageServerConfig(model_dir=str(model_dir), layer_start=start, layer_end=end, port=0,
                                           progress=False, drain_timeout_s=2.0))
    server.start()
    return server


def test_stages_with_other_weights_of_the_same_model_are_refused_by_serve(tmp_path):
    """Two checkpoints of one config (one fingerprint) with different weights: `coordinator serve` over a
    stage of each exits with status 2 and one line naming both stages and their manifest ids."""
    first, second = tmp_path / "first", tmp_path / "second"
    for directory, seed in ((first, 0), (second, 1)):
        save_tiny_model(directory, "llama", seed=seed)
        save_tiny_tokenizer(directory)
    servers = [_stage(first, 0, 2), _stage(second, 2, 4)]
    try:
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        loaded = [s.service.steps.served.model.loaded for s in servers]
        assert loaded[0].fingerprint == loaded[1].fingerprint
        assert loaded[0].weights_manifest_id != loaded[1].weights_manifest_id
        result = subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--stages", ",".join(addresses),
                                 "--model", str(first), "--port", "0", "--allow-mixed-versions"],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("coordinator: error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "different weights" in errors[0]
        for address, piece, span in zip(addresses, loaded, ("0:2", "2:4")):
            assert f"{piece.weights_manifest_id} on {address} (layers {span})" in errors[0]
        # The same stages over one checkpoint's weights serve.
        servers.append(_stage(first, 2, 4))
        server = CoordinatorServer(CoordinatorConfig(stages=(addresses[0], f"127.0.0.1:{servers[2].port}"),
                                                     model_dir=str(first), port=0, stage_wait_s=30))
        server.stop(grace_s=0)
        with pytest.raises(PipelineSetupError, match="different weights"):
            CoordinatorServer(CoordinatorConfig(stages=tuple(addresses), model_dir=str(first), port=0,
                                                stage_wait_s=30))
    finally:
        for server in servers:
            server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_other_weights_at_the_same_path_on_another_machine_are_refused(tmp_path):
    """A second 'machine' (a mount namespace) holds other weights of the same config at the same path:
    its stage makes its manifest from its own bytes, so the coordinator sees two ids and refuses."""
    here, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    for directory, seed in ((here, 0), (elsewhere, 1)):
        save_tiny_model(directory, "llama", seed=seed)
        save_tiny_tokenizer(directory)
    local = _stage(here, 0, 2)
    port = _free_port()
    script = (f"mount --bind {elsewhere} {here} && exec {sys.executable} -m stage_server.cli --model {here} "
              f"--layers 2:4 --port {port} --quiet --small-step-threads 1 --head-threads 1")
    remote = subprocess.Popen(["unshare", "--mount", "sh", "-c", script], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with pytest.raises(PipelineSetupError) as caught:
            CoordinatorServer(CoordinatorConfig(stages=(f"127.0.0.1:{local.port}", f"127.0.0.1:{port}"),
                                                model_dir=str(here), port=0, stage_wait_s=90))
        assert "different weights" in str(caught.value), str(caught.value)
        assert f"127.0.0.1:{port} (layers 2:4)" in str(caught.value)
        made_there = json.loads((elsewhere / MANIFEST_NAME).read_text())  # by that stage, from its bytes
        assert made_there["id"] != json.loads((here / MANIFEST_NAME).read_text())["id"]
        assert made_there["id"] in str(caught.value)
    finally:
        remote.terminate()
        try:
            remote.wait(timeout=20)
        except subprocess.TimeoutExpired:
            remote.kill()
            remote.wait(timeout=10)
        remote.stderr.close()
        local.stop()
