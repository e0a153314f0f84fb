"""A pipeline of real processes on this machine for the benchmarks, and the client-side measures on it.

Owns: starting stage servers and a coordinator as separate processes (as deployed) and stopping
them, the facts read back from them (their pids' CPU time, the stages' single-token thread counts,
hop bytes), the client-side figures (streamed decode tokens/s, time to first token, many concurrent
clients), and `log`, the benchmarks' progress line on stderr. Does not own: the unsplit baseline
(unsplit_model.py), how rounds alternate (interleaved_rounds.py), or what a benchmark reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.client import AsyncCoordinatorClient, CoordinatorClient  # noqa: E402
from coordinator.launcher import LocalStages  # noqa: E402
from coordinator.planner import plan_partition  # noqa: E402
from coordinator.split_costs import head_cost_in_layers  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pipeline(model_dir: Path, num_stages: int, dtype: str, *, threads: int = 0, cpu_sets=None,
             compression: str = "none", micro_batches: int = 0, prefill_chunk: int | None = None,
             max_batch_rows: int | None = None, chain: str = "auto", balance_for: tuple[int, int] | None = None,
             stage_args: tuple[str, ...] = (), ranges: list[tuple[int, int]] | None = None,
             coordinator_args: tuple[str, ...] = ()):
    """Stage server processes plus a coordinator process; yields the coordinator's address.
    `balance_for` (prompt tokens, new tokens) splits the layers for that workload (as
    `launch-local --balance-for`) instead of for decode alone; `ranges` gives the split itself.
    `stage_args`, `coordinator_args`: more stage-server and coordinator serve options."""
    from transformers import AutoConfig

    if ranges is None:
        config = AutoConfig.from_pretrained(model_dir)
        ranges = plan_partition(config.num_hidden_layers, num_stages,
                                head_cost=head_cost_in_layers(config, balance_for))
    with LocalStages(str(model_dir), ranges, dtype=dtype, threads=threads, cpu_sets=cpu_sets, echo=False,
                     extra_args=stage_args) as stages:
        addresses = stages.start()
        port = free_port()
        command = [sys.executable, "-m", "coordinator.cli", "serve", "--stages", ",".join(addresses),
                   "--model", str(model_dir), "--port", str(port), "--compression", compression,
                   "--micro-batches", str(micro_batches)]
        if prefill_chunk is not None:
            command += ["--prefill-chunk", str(prefill_chunk)]
        if max_batch_rows is not None:
            command += ["--max-batch-rows", str(max_batch_rows)]
        command += ["--chain", chain, *coordinator_args]
        coordinator = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        address = f"127.0.0.1:{port}"
        _PROCESSES[address] = [coordinator.pid] + [stage.process.pid for stage in stages.stages]
        _STAGES[address] = addresses
        try:
            _wait_ready(address, coordinator)
            yield address
        finally:
            coordinator.terminate()
            try:
                coordinator.wait(10)
            except subprocess.TimeoutExpired:
                coordinator.kill()


_PROCESSES: dict[str, list[int]] = {}  # coordinator address → pids of (coordinator, stage 0, stage 1, ...)
_STAGES: dict[str, list[str]] = {}  # coordinator address → its stages' addresses


def stage_pids(address: str) -> list[int]:
    """The process ids of a pipeline's stages, in layer order."""
    return _PROCESSES[address][1:]


def small_step_threads(address: str) -> list[int]:
    """The thread count each stage of a pipeline chose for single-token steps (at start, "auto")."""
    import grpc

    from protos import stage_pb2, stage_pb2_grpc

    counts = []
    for stage in _STAGES[address]:
        with grpc.insecure_channel(stage) as channel:
            info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
            counts.append(info.small_step_threads)
    return counts


def cpu_seconds(address: str) -> list[float]:
    """CPU time used so far by the coordinator and each stage process of a pipeline."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = []
    for pid in _PROCESSES[address]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds.append((int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
    return seconds


def _wait_ready(address: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"coordinator exited: {process.stderr.read()[-2000:]}")
        try:
            with CoordinatorClient(address, timeout_s=2) as client:
                client.model_info()
                return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError("coordinator did not come up")


def stream_decode_tokens_per_s(address: str, prompt: list[int], new_tokens: int) -> float:
    stamps = []
    with CoordinatorClient(address) as client:
        for message in client.generate_stream(token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True):
            if message.token_ids:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def pipeline_first_token_s(client: CoordinatorClient, prompt: list[int]) -> float:
    """One request's time to its first (and only) token, on a connected client: a serving client
    keeps its channel, and a new one per request would add ~2 ms of connection set-up to each figure."""
    started = time.perf_counter()
    client.generate(token_ids=prompt, max_new_tokens=1)
    return time.perf_counter() - started


async def _clients(address: str, prompts: list[list[int]], new_tokens: int,
                   ignore_eos: bool) -> tuple[list[list[int]], float]:
    async with AsyncCoordinatorClient(address) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*[client.generate(token_ids=p, max_new_tokens=new_tokens, ignore_eos=ignore_eos)
                                         for p in prompts])
        return [list(r.token_ids) for r in replies], time.perf_counter() - started


def concurrent_clients(address: str, prompts: list[list[int]], new_tokens: int, *, ignore_eos: bool = True):
    """All prompts sent at once by as many clients; returns (outputs, tokens/s). With `ignore_eos`
    False a request ends at end-of-sequence, as a chat client's does."""
    outputs, seconds = asyncio.run(_clients(address, prompts, new_tokens, ignore_eos))
    return outputs, sum(len(o) for o in outputs) / seconds


def hop_bytes(address: str) -> int:
    with CoordinatorClient(address) as client:
        return client.model_info().batching.hop_bytes
