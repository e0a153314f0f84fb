"""Stages of one machine share its usable cores step by step (stage_server/core_share.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stage_server.core_share import CLEAN_EVERY_S, CoreShare, usable_cores
from stage_server.foreign_load import ForeignLoad
from stage_server.thread_counts import ThreadCounts


@pytest.fixture(autouse=True)
def quiet_machine(request, monkeypatch):
    """The share's arithmetic, apart from whatever else this machine runs (tested on its own below)."""
    if "foreign" not in request.node.name:
        monkeypatch.setattr(ForeignLoad, "cores_taken", lambda self, pids: 0)


def fake_proc(root, cpu_busy: list[int], stage_ticks: dict[int, int]):
    """/proc/stat with one line per CPU (user time = `cpu_busy`), /proc/PID/stat per stage process."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{i} {busy} 0 0 1000 0 0 0 0 0 0" for i, busy in enumerate(cpu_busy)]
    (root / "stat").write_text("\n".join(lines) + "\n")
    for pid, ticks in stage_ticks.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "stat").write_text(f"{pid} (python (x)) S 1 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0\n")


def cgroup(tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


@pytest.mark.parametrize("v2, v1, want", [
    (None, None, 64),  # no cgroup files: the affinity mask
    ("max 100000", None, 64),  # v2, unlimited
    ("200000 100000", None, 2),  # a container limited to 2 CPUs on a 64-core host
    ("150000 100000", None, 2),  # 1.5 CPUs: two threads can use it
    ("50000 100000", None, 1),
    (None, (300000, 100000), 3),  # v1
    (None, (-1, 100000), 64),  # v1, unlimited
])
def test_usable_cores_honour_a_cgroup_quota(tmp_path, v2, v1, want):
    assert usable_cores(set(range(64)), cgroup(tmp_path, v2, v1)) == want


def test_usable_cores_honour_the_affinity_mask(tmp_path):
    assert usable_cores({3, 5}, cgroup(tmp_path, "800000 100000")) == 2
    assert usable_cores({7}, tmp_path) == 1
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_busy_stages_split_the_cores_and_never_oversubscribe(tmp_path):
    table = tmp_path / "table"
    cores = 4
    shares = [CoreShare(cores, table) for _ in range(6)]
    try:
        assert shares[0].neighbours() == 5
        for busy in range(1, 7):
            counts = [share.begin_step() for share in shares[:busy]]
            assert counts[-1] == max(1, cores // busy)
            if busy <= cores:
                assert busy * counts[-1] <= cores, "the busy stages' threads fit the cores"
            else:
                assert counts[-1] == 1, "more busy stages than cores: one thread each"
            for share in shares[:busy]:
                share.end_step()
        assert shares[0].begin_step() == cores, "alone busy again: every core"
        shares[0].end_step()
    finally:
        for share in shares:
            share.close()
    fresh = CoreShare(cores, table)
    assert fresh.neighbours() == 0, "closed stages gave their slots back"
    fresh.close()


def test_a_dead_stage_holds_no_share(tmp_path):
    table = tmp_path / "table"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    ghost = CoreShare(2, table, pid=int(dead.stdout))  # a stage killed in the middle of a step
    ghost.begin_step()
    live = CoreShare(2, table)
    try:
        assert live.neighbours() == 0, "the dead process's slot is freed when a stage joins"
        live._next_clean = 0.0
        assert live.begin_step() == 2, "its busy mark is cleared before counting"
        live.end_step()
        assert CLEAN_EVERY_S > 0
    finally:
        live.close()


def test_thread_counts_take_no_more_than_the_share(tmp_path):
    table = tmp_path / "table"
    neighbour, mine = CoreShare(2, table), CoreShare(2, table)
    before = torch.get_num_threads()
    try:
        threads = ThreadCounts(2, 2, share=mine)
        assert threads.for_step(1) == 2, "alone busy: all threads"
        threads.record(0.01)
        neighbour.begin_step()
        assert threads.for_step(64) == 1, "a neighbour computing: half the cores"
        threads.record(0.01)
        neighbour.end_step()
        assert threads.for_step(64) == 2
        threads.record(0.01)
        assert mine.begin_step() == 2, "record ended the step's busy mark"
        mine.end_step()
    finally:
        torch.set_num_threads(before)
        neighbour.close()
        mine.close()


def test_threads_flag_overrides_and_the_choice_is_reported(tiny_model, stages):
    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (_, shared), stages(model_dir, 1, threads=1) as (_, fixed):
        infos = [server.service.Info(None, None) for server in shared]
        assert [info.compute_threads for info in infos] == [usable_cores()] * 2
        assert all(info.colocated_stages >= 1 for info in infos), "each sees the other"
        assert [server.core_share is not None for server in shared] == [True, True]
        info = fixed[0].service.Info(None, None)
        assert (info.compute_threads, info.colocated_stages, fixed[0].core_share) == (1, 0, None)


def test_the_coordinators_in_flight_count_decides_the_share(tmp_path):
    """One micro-batch in the pipeline: its stages compute one at a time, so each takes every core
    even while a neighbour's busy mark lingers; more: at most that many of this machine's stages
    compute at once, each on its part of the cores."""
    table = tmp_path / "table"
    shares = [CoreShare(8, table) for _ in range(4)]  # 4 stages of one pipeline on an 8-core machine
    try:
        shares[1].begin_step()
        assert shares[0].begin_step(in_flight=1) == 8
        assert shares[0].begin_step(in_flight=2) == 4
        assert shares[0].begin_step(in_flight=16) == 2, "never more stages than this machine holds"
        assert shares[0].begin_step(in_flight=0) == 4, "not said: the two busy now"
    finally:
        for share in shares:
            share.close()


def test_every_hop_passes_the_in_flight_count_on(tiny_model, stages, monkeypatch):
    """The coordinator's count reaches every stage's thread choice: 1 for a lone request's steps."""
    from coordinator.pipeline_client import PipelineClient

    seen = []
    real = ThreadCounts.for_step
    monkeypatch.setattr(ThreadCounts, "for_step", lambda self, tokens, in_flight=0: (
        seen.append(in_flight), real(self, tokens, in_flight))[1])
    with stages(tiny_model("llama"), 3) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            ids = torch.tensor([[5, 6, 7]])
            client.submit("s", ids, torch.arange(3)[None], None, start_session=True, end_session=True).result(30)
        finally:
            client.close()
    assert seen == [1, 1, 1]


def _steps_until(load, now, until, pids):
    """A stage stepping every 0.1 s up to `until`; the last step's answer."""
    while now[0] < until - 1e-9:
        now[0] = round(now[0] + 0.1, 6)
        taken = load.cores_taken(pids)
    return taken


def test_foreign_load_counts_the_cores_other_programs_keep_busy(tmp_path):
    """A busy loop on one of two cores is one core taken; the stages' own time and a light
    coordinator are not; only the CPUs the stage may use count."""
    now = [0.0]
    ticks = ForeignLoad({0, 1})._ticks_per_s
    load = ForeignLoad({0, 1}, proc=tmp_path, clock=lambda: now[0])
    fake_proc(tmp_path, [0, 0, 0], {11: 0, 12: 0})
    assert load.cores_taken([11, 12]) == 0  # the first sample only starts the interval
    assert _steps_until(load, now, 0.9, [11, 12]) == 0
    # by the end of the second: the stages used 1.2 cores, a busy loop one more, on cpus 0 and 1
    fake_proc(tmp_path, [ticks, int(1.2 * ticks), 5 * ticks], {11: int(0.6 * ticks), 12: int(0.6 * ticks)})
    assert _steps_until(load, now, 1.0, [11, 12]) == 1, "cpu 2 is not this stage's, its load does not count"
    fake_proc(tmp_path, [0, 0, 0], {})
    assert _steps_until(load, now, 1.5, [11, 12]) == 1, "re-sampled at most once a second"
    # the next second: the stages 1.8 cores, a coordinator 0.2
    fake_proc(tmp_path, [int(2.1 * ticks), int(2.1 * ticks), 5 * ticks], {11: int(1.5 * ticks), 12: int(1.5 * ticks)})
    assert _steps_until(load, now, 2.0, [11, 12]) == 0


def test_foreign_load_while_the_stage_sat_idle_does_not_count(tmp_path):
    """A program that kept both cores busy while the stage sat idle for 10 s takes nothing from the
    stage's next steps; load that goes on while it steps is counted within a second."""
    now = [0.0]
    ticks = ForeignLoad({0, 1})._ticks_per_s
    load = ForeignLoad({0, 1}, proc=tmp_path, clock=lambda: now[0])
    fake_proc(tmp_path, [0, 0], {11: 0})
    assert _steps_until(load, now, 1.0, [11]) == 0
    now[0] = 11.0  # ten seconds of both cores busy with another program, the stage idle
    fake_proc(tmp_path, [10 * ticks, 10 * ticks], {11: 0})
    assert load.cores_taken([11]) == 0, "a step after a pause starts a new interval"
    fake_proc(tmp_path, [11 * ticks, 11 * ticks], {11: 0})  # it goes on: one more second of both cores
    assert _steps_until(load, now, 12.0, [11]) == 2
    now[0] = 13.5  # a pause shorter than two sampling periods, both cores busy through it
    fake_proc(tmp_path, [int(12.5 * ticks), int(12.5 * ticks)], {11: 0})
    assert load.cores_taken([11]) == 0, "any pause of the stage's steps starts a new interval"


def test_a_share_leaves_out_the_cores_taken_by_a_foreign_program(tmp_path, monkeypatch):
    monkeypatch.setattr(ForeignLoad, "cores_taken", lambda self, pids: 1)
    share = CoreShare(2, tmp_path / "table")
    try:
        assert share.begin_step(in_flight=1) == 1
    finally:
        share.close()
    monkeypatch.setattr(ForeignLoad, "cores_taken", lambda self, pids: 5)
    share = CoreShare(2, tmp_path / "table")
    try:
        assert share.begin_step(in_flight=1) == 1, "at least one thread"
    finally:
        share.close()
