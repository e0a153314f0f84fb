"""Co-located stages take turns timing themselves (stage_server/machine_lock.py, thread_counts)."""

import time

import pytest
import torch

from stage_server import cli, machine_lock
from stage_server.machine_lock import MachineLock
from stage_server.thread_counts import ThreadCounts

pytestmark = pytest.mark.skipif(machine_lock.fcntl is None, reason="no flock on this platform")


@pytest.fixture
def lock_path(tmp_path, monkeypatch):
    path = tmp_path / "stages.lock"
    monkeypatch.setattr(machine_lock, "LOCK_PATH", path)
    return path


def test_loaders_share_and_a_timer_waits_for_them(lock_path):
    loading, also_loading = MachineLock(), MachineLock()
    assert loading.acquire(exclusive=False) and also_loading.acquire(exclusive=False)
    timer = MachineLock(wait_s=0.3)
    started = time.monotonic()
    assert not timer.acquire(exclusive=True)  # gives up after wait_s, and says so
    assert time.monotonic() - started >= 0.3
    loading.release()
    assert not timer.acquire(exclusive=True)
    also_loading.release()
    assert timer.acquire(exclusive=True)
    assert not MachineLock(wait_s=0.1).acquire(exclusive=False)  # nobody loads while one is timed
    timer.release()
    assert MachineLock(wait_s=0.1).acquire(exclusive=False)


def test_acquire_switches_modes_and_release_is_idempotent(lock_path):
    lock = MachineLock()
    assert lock.acquire(exclusive=False)
    assert lock.acquire(exclusive=True)  # its own shared hold does not block it
    lock.release()
    lock.release()
    with lock.held(exclusive=True) as held:
        assert held and not MachineLock(wait_s=0.05).acquire(exclusive=False)
    assert MachineLock(wait_s=0.05).acquire(exclusive=True)


def test_calibration_runs_under_the_exclusive_lock(lock_path):
    seen = []

    def step() -> float:
        seen.append(MachineLock(wait_s=0).acquire(exclusive=False))
        return 1.0
    before = torch.get_num_threads()
    try:
        ThreadCounts(full=2).calibrate(step, lock=MachineLock())
    finally:
        torch.set_num_threads(before)
    assert seen and not any(seen)
    assert MachineLock(wait_s=0).acquire(exclusive=True)  # released afterwards


def test_the_cli_lets_go_of_the_startup_lock_on_an_early_error(lock_path, tmp_path, capsys):
    code = cli.main(["--model", str(tmp_path / "no-such-model"), "--layers", "0:1", "--port", "0"])
    assert code == 2 and "error" in capsys.readouterr().err
    assert MachineLock(wait_s=0).acquire(exclusive=True)


def test_the_row_chunk_probe_runs_before_the_startup_lock_is_let_go(lock_path, tiny_model, monkeypatch):
    """The probe works every core for a moment; a neighbour stage timing itself meanwhile would read a
    second thread as useless (147 ms a step on two threads against 30 on one) and keep one."""
    import stage_server.server as server_module
    from stage_server.server import StageServer, StageServerConfig

    real_probe, timer_could_start = server_module.install_row_chunks, []

    def probe(model):
        timer_could_start.append(MachineLock(wait_s=0).acquire(exclusive=True))
        return real_probe(model)

    monkeypatch.setattr(server_module, "install_row_chunks", probe)
    startup_lock = MachineLock()
    assert startup_lock.acquire(exclusive=False)  # as the stage CLI does before importing torch
    server = StageServer(StageServerConfig(model_dir=str(tiny_model("llama")), layer_start=0, layer_end=4, port=0,
                                           progress=False, attention="per-sequence", drain_timeout_s=2),
                         startup_lock=startup_lock)
    try:
        server.start()
    finally:
        server.stop()
    assert timer_could_start == [False]
    assert MachineLock(wait_s=0).acquire(exclusive=True)
