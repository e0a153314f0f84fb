"""Polling for effects that land shortly after a call returns, such as sessions freed on the stages,
and for a line a started process writes."""

from __future__ import annotations

import time
from collections.abc import Callable

from coordinator.pipeline_client import PipelineClient


def eventually(probe: Callable[[], object], expected: object, timeout_s: float = 10.0) -> object:
    """Call `probe` until it returns `expected` or the time runs out; returns the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def stage_sessions(stage_addresses: list[str]) -> list[int]:
    """Live sessions on each stage, read through Info."""
    client = PipelineClient(stage_addresses)
    try:
        return [info.active_sessions for info in client.stage_infos()]
    finally:
        client.close()


def wait_for_line(process, needle: str, timeout_s: float) -> list[str]:
    """Read `process`'s stderr until a line holds `needle`; returns the lines read (AssertionError
    with the last of them if the process ends or the time runs out first)."""
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen[-20:])}")
