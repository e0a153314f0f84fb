"""Small steps run on the thread count that suits them; big ones on all (stage_server/thread_counts.py)."""

import grpc
import pytest
import torch

from stage_server.cli import build_parser
from stage_server.thread_counts import (
    AUTO_MIN_GAIN,
    PROBE_EVERY,
    PROBE_EVERY_MAX,
    PROBE_WINDOW,
    SMALL_STEP_TOKENS,
    ThreadCounts,
)


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_small_steps_get_the_small_count():
    threads = ThreadCounts(full=2, small_step=1)
    assert threads.threads_for(1) == threads.threads_for(SMALL_STEP_TOKENS) == 1
    assert threads.threads_for(SMALL_STEP_TOKENS + 1) == threads.threads_for(512) == 2
    assert threads.for_step(1) == 1 and torch.get_num_threads() == 1
    assert threads.for_step(64) == 2 and torch.get_num_threads() == 2


def test_defaults_and_bounds():
    torch.set_num_threads(2)
    assert ThreadCounts().full == 2  # 0 = what torch uses now
    assert ThreadCounts(full=3, small_step=0).threads_for(1) == 3  # 0 = as many as full
    assert ThreadCounts(full=1, small_step=4).threads_for(1) == 1  # never more than full
    for bad in ({"full": -1}, {"small_step": -2}, {"small_step": "fast"}):
        with pytest.raises(ValueError):
            ThreadCounts(**bad)


def fake_step(seconds_by_threads: dict[int, float]):
    calls = []

    def step() -> float:
        calls.append(torch.get_num_threads())
        return seconds_by_threads[torch.get_num_threads()]
    return step, calls


@pytest.mark.parametrize("one,two,chosen", [
    (1.0, 1.0, 1),  # memory-bound (float32 decode): one thread is as fast, and leaves the other core free
    (1.0, 0.6, 2),  # compute-bound (bfloat16 without bf16 units): all threads pay
    (1.0, 1.0 / AUTO_MIN_GAIN + 0.01, 1),  # not clearly faster: one thread
])
def test_auto_times_both_and_keeps_one_thread_unless_all_clearly_pay(one, two, chosen):
    threads = ThreadCounts(full=2)
    assert threads.threads_for(1) == 1  # before calibration
    step, calls = fake_step({1: one, 2: two})
    threads.calibrate(step)
    assert threads.threads_for(1) == chosen and threads.threads_for(64) == 2
    assert sorted(set(calls)) == [1, 2] and calls.count(1) == calls.count(2) >= 2
    assert torch.get_num_threads() == 2  # left at the full count


def test_fixed_counts_are_not_calibrated():
    step, calls = fake_step({1: 1.0, 2: 0.1})
    threads = ThreadCounts(full=2, small_step=1)
    threads.calibrate(step)
    assert threads.threads_for(1) == 1 and not calls


def test_cli_takes_a_count_or_auto():
    base = ["--model", "m", "--layers", "0:1"]
    assert build_parser().parse_args(base).small_step_threads == "auto"
    assert build_parser().parse_args(base + ["--small-step-threads", "0"]).small_step_threads == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--small-step-threads", "-3"])


def test_info_reports_the_thread_counts_in_use(tiny_model, stages):
    from protos import stage_pb2, stage_pb2_grpc

    with stages(tiny_model("llama"), 1, threads=2, small_step_threads=1) as (addresses, _):
        with grpc.insecure_channel(addresses[0]) as channel:
            info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
    assert (info.compute_threads, info.small_step_threads) == (2, 1)


def test_auto_probes_the_other_count_on_every_nth_single_token_step():
    threads = ThreadCounts(full=2)  # auto, one thread until told otherwise
    used = [threads.for_step(1) for _ in range(2 * PROBE_EVERY)]
    assert [i for i, count in enumerate(used) if count == 2] == [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1]
    assert {threads.for_step(2) for _ in range(3 * PROBE_EVERY)} == {1}  # only single-token steps probe
    assert {threads.for_step(64) for _ in range(3)} == {2}
    fixed = ThreadCounts(full=2, small_step=1)
    assert {fixed.for_step(1) for _ in range(3 * PROBE_EVERY)} == {1}


def serve(threads: ThreadCounts, seconds, steps: int) -> list[int]:
    """Run `steps` single-token steps as the step runner does; seconds(count, index) is each one's time.
    Returns the small-step count after each step."""
    chosen = []
    for index in range(steps):
        used = threads.for_step(1)
        threads.record(seconds(used, index))
        chosen.append(threads.threads_for(1))
    return chosen


def test_auto_follows_the_faster_count_while_serving():
    threads = ThreadCounts(full=2)
    clearly_faster = {1: 1.0, 2: 0.5}
    assert set(serve(threads, lambda count, _: clearly_faster[count], 2 * PROBE_EVERY)) == {1}  # 2 probes: too few
    serve(threads, lambda count, _: clearly_faster[count], PROBE_EVERY)
    assert threads.threads_for(1) == 2  # a start-up calibration that missed the gain is corrected
    window = PROBE_WINDOW * PROBE_EVERY_MAX  # enough steps for a window of probes however far apart
    # all threads still faster, though not clearly: they stay (no flip-flopping inside the band)
    assert set(serve(threads, lambda count, _: {1: 1.0, 2: 0.95}[count], 2 * window)) == {2}
    serve(threads, lambda count, _: {1: 0.99, 2: 1.0}[count], 2 * window)  # one thread no slower: back to one
    assert threads.threads_for(1) == 1
    # all threads faster again, but not clearly: one thread stays
    assert set(serve(threads, lambda count, _: {1: 1.0, 2: 1.0 / AUTO_MIN_GAIN * 1.01}[count], 2 * window)) == {1}
    threads.for_step(4)
    threads.record(0.001)  # steps of more tokens are not comparable: ignored
    assert threads.threads_for(1) == 1


def test_only_probes_and_the_steps_just_before_them_are_compared():
    """The machine's speed drifts, so each probe is compared with the step right before it: here
    the other steps on one thread are slow, and only the timed pairs show all threads no faster."""
    threads = ThreadCounts(full=2)

    def seconds(count: int, index: int) -> float:
        if count == 2:
            return 0.9
        return 1.0 if index % PROBE_EVERY == PROBE_EVERY - 2 else 10.0

    assert set(serve(threads, seconds, 8 * PROBE_EVERY)) == {1}


def test_gains_near_the_threshold_do_not_flip_the_count_at_every_step():
    """Live timings that hover around the 15 % gain keep one count instead of flipping at every probe."""
    threads = ThreadCounts(full=2)
    chosen = serve(threads, lambda count, index: 1.0 / AUTO_MIN_GAIN if count == 2 else 1.0 + 0.02 * (-1) ** index,
                   40 * PROBE_EVERY)
    assert sum(a != b for a, b in zip(chosen, chosen[1:], strict=False)) <= 1


def probe_steps(threads: ThreadCounts, seconds, steps: int) -> list[int]:
    """The indexes of the probes (steps on the count not chosen) among `steps` served single-token steps."""
    probes = []
    for index in range(steps):
        chosen = threads.threads_for(1)
        used = threads.for_step(1)
        threads.record(seconds(used, index))
        if used != chosen:
            probes.append(index)
    return probes


def test_probes_that_confirm_the_choice_come_ever_further_apart():
    """Every stage probes the same token, so a probe is a slow token for the whole pipeline: once the
    window can decide, each probe that keeps the choice doubles the distance to the next, up to
    PROBE_EVERY_MAX."""
    threads = ThreadCounts(full=2)
    probes = probe_steps(threads, lambda count, _: {1: 1.0, 2: 1.0}[count], 12 * PROBE_EVERY_MAX)
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert probes[0] == PROBE_EVERY - 1
    assert gaps[:2] == [PROBE_EVERY, PROBE_EVERY]  # the window has too few timings to decide yet
    assert gaps[2:6] == [2 * PROBE_EVERY, 4 * PROBE_EVERY, 8 * PROBE_EVERY, 16 * PROBE_EVERY]
    assert set(gaps[-3:]) == {PROBE_EVERY_MAX}
    assert threads.threads_for(1) == 1


def test_a_change_of_count_brings_the_probes_close_again():
    threads = ThreadCounts(full=2)
    probe_steps(threads, lambda count, _: 1.0, 8 * PROBE_EVERY_MAX)  # the probes are far apart
    assert threads.probe_every == PROBE_EVERY_MAX
    steps = 0
    while threads.threads_for(1) == 1:  # all threads are now clearly faster: the probes switch to them
        probe_steps(threads, lambda count, _: {1: 1.0, 2: 0.5}[count], 1)
        steps += 1
        assert steps <= 4 * PROBE_EVERY_MAX, "never switched"
    probes = probe_steps(threads, lambda count, _: {1: 1.0, 2: 0.5}[count], PROBE_EVERY)
    assert probes == [PROBE_EVERY - 1]  # the new count is checked PROBE_EVERY steps on, not PROBE_EVERY_MAX


def test_fixed_counts_ignore_timings():
    threads = ThreadCounts(full=2, small_step=2)
    assert set(serve(threads, lambda count, _: {1: 0.1, 2: 9.0}[count], 4 * PROBE_EVERY)) == {2}
