"""`coordinator top` draws a screen in a real terminal (tmux): the model, the batching line, and a
row per stage server with its state, refreshed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from coordinator.client import CoordinatorClient

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def test_top_renders_every_stage_under_tmux(tiny_api):
    address, stage_addresses, _ = tiny_api
    with CoordinatorClient(address, timeout_s=30) as client:
        client.generate(prompt="hello", max_new_tokens=4)
    session = f"layerline-top-{uuid.uuid4().hex[:8]}"
    command = (f"COLUMNS=160 LINES=30 {sys.executable} -m coordinator top --address {address} --interval 0.5 "
               "--count 6; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "30", "-c", str(ROOT), command],
                   check=True, timeout=30)
    try:
        deadline, screen = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                                    timeout=10).stdout
            if "STEPS/S" in screen and all(a in screen for a in stage_addresses) and "tokens/s" in screen:
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
    assert "STEPS/S" in screen and "tokens 4" in screen, screen
    for stage in stage_addresses:
        line = next((row for row in screen.splitlines() if stage in row), "")
        assert "serving" in line and "Traceback" not in screen, screen
