"""Work pinned to CPU cores: this process's pinning, and the most a 2-core split can gain here.

Owns: the cores this process may use (`ALL_CORES`), running a block pinned to some of them with a
given torch thread count, and the two-core ceiling (two pinned copies of the unsplit model's decode
steps against one). Also owns `busy_neighbour`, another process keeping one core busy. Does not own: pinning the
stage servers (their --cpu-set, set by
local_pipeline.pipeline's `cpu_sets`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ALL_CORES = sorted(os.sched_getaffinity(0))


@contextlib.contextmanager
def busy_neighbour(core: int, limit_s: float = 600.0):
    """While the block runs, another process spins on `core` (it ends by itself after `limit_s`)."""
    spin = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end:\n    pass\n"
    process = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # running before the measure starts
        yield
    finally:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def pinned_to(cores: set[int], threads: int):
    """Run this process on `cores` with `threads` torch threads, then restore both."""
    old_cores, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old_cores)
        torch.set_num_threads(old_threads)


_CEILING_SCRIPT = """
import os, sys, time, torch
from transformers import AutoModelForCausalLM
os.sched_setaffinity(0, {int(sys.argv[2])}); torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3])).eval()
ids = torch.randint(0, 1000, (32, 30))
with torch.inference_mode():
    cache = model(ids, use_cache=True).past_key_values
    time.sleep(max(0.0, float(sys.argv[4]) - time.time()))  # start together with the other copy
    started = time.perf_counter()
    for _ in range(12):
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
print(12 / (time.perf_counter() - started))
"""


def two_core_ceiling(model_dir: Path, dtype_name: str) -> float:
    """How much faster two copies of the same work run on two cores than one copy on one.

    Each copy runs the whole model's decode steps (batch 32, one thread, pinned). Cores that
    share memory bandwidth and cache slow each other down: this is the most any 2-core split
    can gain on this machine, measured in the same run.
    """
    def steps_per_s(core: int, start_at: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _CEILING_SCRIPT, str(model_dir), str(core), dtype_name,
                                 str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    alone = float(steps_per_s(ALL_CORES[0], 0).communicate()[0])
    start_at = time.time() + 20  # both copies loaded and warmed up by then
    pair = [steps_per_s(core, start_at) for core in ALL_CORES[:2]]
    together = sum(float(p.communicate()[0]) for p in pair)
    return together / alone
