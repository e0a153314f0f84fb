"""Small steps run on fewer threads; big ones on all of them (stage_server/compute_threads.py)."""

import pytest
import torch

from stage_server.compute_threads import SMALL_STEP_TOKENS, ComputeThreads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_small_steps_get_the_small_count():
    threads = ComputeThreads(full=2, small_step=1)
    assert threads.threads_for(1) == threads.threads_for(SMALL_STEP_TOKENS) == 1
    assert threads.threads_for(SMALL_STEP_TOKENS + 1) == threads.threads_for(512) == 2
    assert threads.for_step(1) == 1 and torch.get_num_threads() == 1
    assert threads.for_step(64) == 2 and torch.get_num_threads() == 2


def test_defaults_and_bounds():
    torch.set_num_threads(2)
    assert ComputeThreads().full == 2  # 0 = what torch uses now
    assert ComputeThreads(full=3, small_step=0).threads_for(1) == 3  # 0 = as many as full
    assert ComputeThreads(full=1, small_step=4).threads_for(1) == 1  # never more than full
    with pytest.raises(ValueError):
        ComputeThreads(full=-1)
