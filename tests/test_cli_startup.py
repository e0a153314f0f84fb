"""The client commands start at once: `coordinator --help`, `info` and `generate --address` load
neither torch nor transformers, and both commands run as `python -m PACKAGE`.

Timed against `python -c pass` in the same run (this machine is shared and noisy); the bound is
the one users feel: an answer within 1.5 s.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - started


def test_client_commands_load_neither_torch_nor_transformers():
    probe = ("import sys, coordinator.cli as cli; "
             "cli.build_parser().parse_args(['info', '--address', 'x:1']); "
             "cli.build_parser().parse_args(['generate', '--address', 'x:1', '--prompt', 'hi']); "
             "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    done, _ = run("-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_help_and_info_answer_within_a_second_and_a_half():
    baseline = min(run("-c", "pass")[1] for _ in range(3))
    helped = min(run("-m", "coordinator", "--help")[1] for _ in range(3))
    refused, info_s = min((run("-m", "coordinator", "info", "--address", "127.0.0.1:1") for _ in range(3)),
                          key=lambda done: done[1])
    assert "usage: coordinator" in run("-m", "coordinator", "--help")[0].stdout
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr and "Traceback" not in refused.stderr
    assert helped - baseline < 1.5 and info_s - baseline < 1.5, (baseline, helped, info_s)


def test_both_packages_run_with_python_m():
    for package, usage in (("coordinator", "usage: coordinator"), ("stage_server", "usage: stage-server")):
        done, _ = run("-m", package, "--help")
        assert done.returncode == 0 and usage in done.stdout, done.stderr


def test_ctrl_c_while_starting_prints_one_line(tiny_model):
    """SIGINT while importing, loading or waiting for stages: exit status 130, no traceback."""
    # The stage while it imports torch and while it loads; the coordinator while it waits for its stages
    # (its own imports take well under a second).
    commands = [(("stage_server", "--model", str(tiny_model("llama")), "--layers", "0:2", "--port", "0"), (0.6, 1.5)),
                (("coordinator", "serve", "--stages", "127.0.0.1:1", "--model", str(tiny_model("llama")),
                  "--port", "0"), (2.0, 3.0))]
    for command, delays in commands:
        for delay in delays:
            process = subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            _, errors = process.communicate(timeout=60)
            assert "Traceback" not in errors and "interrupted" in errors.splitlines()[-1], (command, delay, errors)
            assert process.returncode in (130, -signal.SIGINT), (command, delay, process.returncode)
