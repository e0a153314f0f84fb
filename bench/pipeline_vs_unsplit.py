"""Throughput suite: the pipeline against the unsplit Hugging Face model, side by side in one run.

Everything runs on SmolLM2-135M-Instruct on this machine, per dtype (float32, bfloat16).
Stage servers and the coordinator are separate processes (as deployed); the unsplit
model runs in this process while they sit idle. Each figure is printed as a ratio to
its baseline measured in the same run; decode, ttft and pinned alternate pipeline and
unsplit runs over several rounds (in reverse order every other round) and report the median
of the per-round ratios with its quartiles, because this machine's speed drifts by 10-20 %
within minutes (one round's decode ratio strays by ±10 %: 5 rounds left the median ~5 %
uncertain, so decode and ttft now take 9):

  1. decode      single-request decode tokens/s through 2 and 4 stages ÷ unsplit `generate`
  2. ttft        time to first token of a 512-token prompt through 2 stages ÷ unsplit
  3. concurrency aggregate tokens/s of 1, 4, 16, 64 concurrent clients (32 new tokens each)
                 through 2 stages, and ÷ one client; the unsplit model's static batch of the
                 same size beside it; every concurrent answer checked against the same
                 prompt answered alone
  4. pinned      2 stages each pinned to its own core (1 thread) vs the unsplit model pinned
                 to one core, on batches of 64, 128 and 256 sequences (stages split for the
                 batch's prompt and answer lengths): share of the ideal 2x; in bfloat16 both
                 with the default per-sequence attention and with `--attention batched`
  5. wire        activation bytes between stages per generated token, per codec

    python bench/pipeline_vs_unsplit.py [--dtypes float32,bfloat16] [--parts decode,ttft,...]
        [--json bench/results/pipeline_vs_unsplit.json] [--plot bench/results/throughput.png]

On a GPU machine, `--device cuda --parts decode,ttft` runs the stages and the unsplit model on
the GPU (the other parts measure CPU cores and refuse); `--model-dir` takes a checkpoint already
on disk where the default model cannot be fetched. The results then go to
bench/results/pipeline_vs_unsplit_cuda.json unless --json says otherwise, and no plot is drawn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.client import AsyncCoordinatorClient, CoordinatorClient  # noqa: E402
from coordinator.launcher import LocalStages  # noqa: E402
from coordinator.planner import plan_partition  # noqa: E402
from coordinator.running_batch import left_padded  # noqa: E402
from coordinator.split_costs import head_cost_in_layers  # noqa: E402
from coordinator.text import Tokenization  # noqa: E402
from protos.model_files.fetch import ensure_model  # noqa: E402
from stage_server.per_sequence_attention import mode_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import CHAT_QUESTIONS  # noqa: E402

QUESTIONS = CHAT_QUESTIONS[:16]
PARTS = ("decode", "ttft", "concurrency", "pinned", "wire")
ALL_CORES = sorted(os.sched_getaffinity(0))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the unsplit baseline ------------------------------------------------------------------------

class Unsplit:
    """The whole model in this process, run with `generate` (greedy, no early stop)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, tokenization: Tokenization, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.pad, self.device = tokenization.pad_token_id, device

    def _generate(self, rows: list[list[int]], new_tokens: int, streamer=None) -> torch.Tensor:
        ids, mask = left_padded(rows, self.pad)
        longest = ids.shape[1]
        with torch.inference_mode():
            # .cpu(): a GPU's work counts only once it is done (the pipeline's answers come back as numbers)
            return self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=self.pad, streamer=streamer)[:, longest:].cpu()

    def decode_tokens_per_s(self, prompt: list[int], new_tokens: int) -> float:
        """Tokens/s between the first and the last generated token (prefill excluded)."""
        stamps: list[float] = []

        class Stamps:
            def put(self, value):
                value.tolist()  # waits for a GPU to finish the token (a no-op on the CPU)
                stamps.append(time.perf_counter())

            def end(self):
                pass

        self._generate([prompt], new_tokens, Stamps())
        # the streamer sees the prompt once, then one call per new token
        return (new_tokens - 1) / (stamps[-1] - stamps[1])

    def first_token_s(self, prompt: list[int]) -> float:
        started = time.perf_counter()
        self._generate([prompt], 1)
        return time.perf_counter() - started

    def batch_tokens_per_s(self, prompts: list[list[int]], new_tokens: int) -> float:
        started = time.perf_counter()
        out = self._generate(prompts, new_tokens)
        return out.numel() / (time.perf_counter() - started)


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


# ---- the pipeline --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pipeline(model_dir: Path, num_stages: int, dtype: str, *, threads: int = 0, cpu_sets=None,
             compression: str = "none", micro_batches: int = 0, prefill_chunk: int | None = None,
             max_batch_rows: int | None = None, chain: str = "auto", balance_for: tuple[int, int] | None = None,
             stage_args: tuple[str, ...] = ()):
    """Stage server processes plus a coordinator process; yields the coordinator's address.
    `balance_for` (prompt tokens, new tokens) splits the layers for that workload (as
    `launch-local --balance-for`) instead of for decode alone. `stage_args`: more stage-server options."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    ranges = plan_partition(config.num_hidden_layers, num_stages, head_cost=head_cost_in_layers(config, balance_for))
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
        command += ["--chain", chain]
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
    keeps its channel, and a new one per request added ~2 ms of connection set-up to each figure."""
    started = time.perf_counter()
    client.generate(token_ids=prompt, max_new_tokens=1)
    return time.perf_counter() - started


async def _clients(address: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    async with AsyncCoordinatorClient(address) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*[client.generate(token_ids=p, max_new_tokens=new_tokens, ignore_eos=True)
                                         for p in prompts])
        return [list(r.token_ids) for r in replies], time.perf_counter() - started


def concurrent_clients(address: str, prompts: list[list[int]], new_tokens: int):
    """All prompts sent at once by as many clients; returns (outputs, tokens/s)."""
    outputs, seconds = asyncio.run(_clients(address, prompts, new_tokens))
    return outputs, sum(len(o) for o in outputs) / seconds


def hop_bytes(address: str) -> int:
    with CoordinatorClient(address) as client:
        return client.model_info().batching.hop_bytes


# ---- the parts -----------------------------------------------------------------------------------

def interleaved(measures: dict, rounds: int) -> dict[str, list[float]]:
    """Run every measure once per round, in turn, so slow phases of a noisy machine hit them all;
    odd rounds run them in reverse order, so that none always runs first (or right after another)."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for index in range(rounds):
        for name in (list(measures) if index % 2 == 0 else list(reversed(measures))):
            samples[name].append(measures[name]())
    return samples


def round_ratios(samples: dict[str, list[float]], name: str) -> list[float]:
    """Each round's figure of `name` ÷ the same round's unsplit one."""
    return [a / b for a, b in zip(samples[name], samples["unsplit"], strict=True)]


def quartiles(values: list[float]) -> list[float]:
    """[lower quartile, upper quartile]: how far one round's ratio strays on this machine."""
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else (values * 3)
    return [low, high]


def against_unsplit(samples: dict[str, list[float]], name: str) -> tuple[float, float]:
    """(median of `name`'s figures, median over rounds of its figure ÷ the same round's unsplit one)."""
    return statistics.median(samples[name]), statistics.median(round_ratios(samples, name))


# (result key, stages, --chain): each setup runs alone beside the unsplit model, as it would be
# deployed (an idle second pipeline on the same two cores slowed traced stage forwards by ~10 %).
# The default ("auto") does not chain stages that all share this machine; the chained run shows
# what chaining costs or gains in the same conditions.
DECODE_SETUPS = (("stages_2", 2, "auto"), ("stages_4", 4, "auto"), ("stages_2_chain_on", 2, "on"))


def part_decode(ctx) -> dict:
    prompt, n = ctx.prompts[0], ctx.args.decode_tokens
    result: dict = {"rounds": ctx.args.rounds, "samples_tokens_per_s": {}}
    unsplit_all = []
    for name, stages, chain in DECODE_SETUPS:
        with pipeline(ctx.model_dir, stages, ctx.dtype_name, chain=chain, stage_args=ctx.stage_args) as address:
            stream_decode_tokens_per_s(address, prompt, 8)  # warm up
            samples = interleaved({"unsplit": lambda: ctx.unsplit.decode_tokens_per_s(prompt, n),
                                   name: lambda: stream_decode_tokens_per_s(address, prompt, n)}, ctx.args.rounds)
            threads = small_step_threads(address)
        got, ratio = against_unsplit(samples, name)
        unsplit_all += samples["unsplit"]
        result["samples_tokens_per_s"][name] = samples
        result[f"{name}_tokens_per_s"], result[f"{name}_ratio"] = got, ratio
        result[f"{name}_ratio_quartiles"] = spread = quartiles(round_ratios(samples, name))
        result[f"{name}_small_step_threads"] = threads
        log(f"  decode: {stages} stages{' (chaining on)' if chain == 'on' else ''} {got:.2f} tok/s vs unsplit "
            f"{statistics.median(samples['unsplit']):.2f} → {ratio:.3f} (median of {ctx.args.rounds} "
            f"interleaved rounds, quartiles {spread[0]:.3f}..{spread[1]:.3f}; single-token steps on "
            f"{threads} threads per stage)")
    result["unsplit_tokens_per_s"] = statistics.median(unsplit_all)
    return result


def part_ttft(ctx) -> dict:
    long_prompt = (sum(ctx.prompts, []) * 40)[: ctx.args.ttft_tokens]
    ctx.unsplit.first_token_s(long_prompt[:64])
    result = {"prompt_tokens": len(long_prompt), "rounds": ctx.args.rounds}
    # Whole-prompt prefill (the default up to 512 tokens), and chunks of 128 that let stages
    # overlap (which pays off when stages have their own cores, not when they share two).
    with pipeline(ctx.model_dir, 2, ctx.dtype_name, prefill_chunk=512, stage_args=ctx.stage_args) as whole_at, \
            pipeline(ctx.model_dir, 2, ctx.dtype_name, prefill_chunk=128, stage_args=ctx.stage_args) as chunked_at, \
            CoordinatorClient(whole_at) as whole, CoordinatorClient(chunked_at) as chunked:
        for client in (whole, chunked):
            pipeline_first_token_s(client, long_prompt[:64])
        samples = interleaved({"unsplit": lambda: ctx.unsplit.first_token_s(long_prompt),
                               "chunk_512": lambda: pipeline_first_token_s(whole, long_prompt),
                               "chunk_128": lambda: pipeline_first_token_s(chunked, long_prompt)}, ctx.args.rounds)
    result["unsplit_s"] = statistics.median(samples["unsplit"])
    for chunk in (512, 128):
        got, ratio = against_unsplit(samples, f"chunk_{chunk}")
        result[f"stages_2_chunk_{chunk}_s"], result[f"chunk_{chunk}_ratio"] = got, ratio
        log(f"  ttft ({len(long_prompt)} tokens, prefill chunks of {chunk}): 2 stages {got:.3f}s vs unsplit "
            f"{result['unsplit_s']:.3f}s → {ratio:.3f} (median of {ctx.args.rounds} interleaved rounds)")
    return result


def part_concurrency(ctx) -> dict:
    n = ctx.args.new_tokens
    levels = [c for c in (1, 4, 16, 64) if c <= ctx.args.max_clients]
    unsplit = {}
    for c in levels:
        batch = [ctx.prompts[i % len(ctx.prompts)] for i in range(c)]
        unsplit[c] = ctx.unsplit.batch_tokens_per_s(batch, n)
    pipe, exact = {}, {}
    with pipeline(ctx.model_dir, 2, ctx.dtype_name, threads=1) as address:
        concurrent_clients(address, ctx.prompts[:2], 4)  # warm up
        alone, started = [], time.perf_counter()
        for prompt in ctx.prompts:  # one client, one request at a time: the baseline and the reference
            outputs, _ = concurrent_clients(address, [prompt], n)
            alone.append(outputs[0])
        pipe[1] = sum(len(o) for o in alone) / (time.perf_counter() - started)
        for c in levels[1:]:
            batch_index = [i % len(ctx.prompts) for i in range(c)]
            outputs, pipe[c] = concurrent_clients(address, [ctx.prompts[i] for i in batch_index], n)
            exact[c] = sum(o == alone[i] for o, i in zip(outputs, batch_index))
            log(f"  concurrency {c}: {pipe[c]:.1f} tok/s ({pipe[c] / pipe[1]:.2f}x one client), "
                f"{exact[c]}/{c} identical to alone; unsplit batch {unsplit[c]:.1f} tok/s")
    return {"clients": levels, "pipeline_tokens_per_s": pipe, "unsplit_batch_tokens_per_s": unsplit,
            "ratio_to_one_client": {c: pipe[c] / pipe[1] for c in levels}, "identical_to_alone": exact}


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


def pinned_run(ctx, size: int, attention: str = "auto") -> dict:
    """`size` sequences × new_tokens: unsplit pinned to one core vs 2 stages pinned to one core each,
    in interleaved rounds (the stages idle while the unsplit model runs). `attention`: the stages'
    --attention."""
    n = ctx.args.new_tokens
    batch = [ctx.prompts[i % len(ctx.prompts)] for i in range(size)]
    busy_by_round: list[list[float]] = []

    def unsplit() -> float:
        with pinned_to({ALL_CORES[0]}, 1):
            return ctx.unsplit.batch_tokens_per_s(batch, n)

    workload = (round(statistics.mean(len(p) for p in batch)), n)  # split for prompts and answers alike
    with pipeline(ctx.model_dir, 2, ctx.dtype_name, threads=1, cpu_sets=[str(ALL_CORES[0]), str(ALL_CORES[1])],
                  micro_batches=2, max_batch_rows=size, balance_for=workload,
                  stage_args=("--attention", attention)) as address:
        concurrent_clients(address, batch[:2], 4)

        def stages() -> float:
            before, started = cpu_seconds(address), time.perf_counter()
            _, got = concurrent_clients(address, batch, n)
            wall = time.perf_counter() - started
            busy_by_round.append([(b - a) / wall for a, b in zip(before, cpu_seconds(address))])
            return got

        samples = interleaved({"unsplit": unsplit, "stages_2": stages}, ctx.args.pinned_rounds)
    (got, speedup), base = against_unsplit(samples, "stages_2"), statistics.median(samples["unsplit"])
    busy = [statistics.median(column) for column in zip(*busy_by_round)]
    spread = quartiles(round_ratios(samples, "stages_2"))
    log(f"  pinned, {size} sequences, {attention} attention: 2 stages on 2 cores {got:.1f} tok/s vs unsplit on "
        f"1 core {base:.1f} → "
        f"{speedup:.2f}x ({speedup / 2:.0%} of ideal 2x; median of {ctx.args.pinned_rounds} interleaved rounds, "
        f"quartiles {spread[0]:.2f}..{spread[1]:.2f}); CPU busy: coordinator {busy[0]:.0%}, stages "
        + ", ".join(f"{b:.0%}" for b in busy[1:]))
    return {"attention": attention, "balance_for": workload, "unsplit_one_core_tokens_per_s": base,
            "stages_2_tokens_per_s": got,
            "speedup": speedup, "speedup_quartiles": spread, "share_of_ideal": speedup / 2,
            "samples_tokens_per_s": samples, "cpu_busy": {"coordinator": busy[0], "stages": busy[1:]}}


def part_pinned(ctx) -> dict:
    """The first batch size's figures at the top level, every size's under by_batch.

    Where the stages' default attention is per-sequence (bfloat16 and float16 on a CPU: a
    sequence's answer does not depend on its batch), the same sizes run again with `--attention
    batched`, under batched_attention: the unsplit model's own padded batch is batched in that
    sense (its answers depend on the batch), so that row compares like with like."""
    if len(ALL_CORES) < 2:
        return {"skipped": "needs 2 cores"}
    by_batch = {size: pinned_run(ctx, size) for size in ctx.args.pinned_batches}
    batched = {}
    if mode_for("auto", getattr(torch, ctx.dtype_name)) == "per-sequence":
        batched = {size: pinned_run(ctx, size, "batched") for size in ctx.args.pinned_batches}
    ceiling = two_core_ceiling(ctx.model_dir, ctx.dtype_name)
    log(f"  pinned: two copies of the unsplit model on the two cores reach {ceiling:.2f}x one")
    for run in [*by_batch.values(), *batched.values()]:
        run["share_of_ceiling"] = run["speedup"] / ceiling
    first = by_batch[ctx.args.pinned_batches[0]]
    result = {**first, "two_core_ceiling": ceiling, "by_batch": by_batch}
    if batched:
        result["batched_attention"] = {"by_batch": batched}
    return result


def part_wire(ctx) -> dict:
    rows = {}
    for name in ("none", "fp16", "bf16", "int8"):
        with pipeline(ctx.model_dir, 2, ctx.dtype_name, compression=name) as address:
            before = hop_bytes(address)
            outputs, _ = concurrent_clients(address, ctx.prompts[:8], ctx.args.new_tokens)
            sent = hop_bytes(address) - before
        tokens = sum(len(o) for o in outputs)
        rows[name] = sent / tokens
        log(f"  wire {name}: {rows[name]:.0f} bytes per generated token (2 stages, prefill included)")
    return {"bytes_per_generated_token": rows}


class Context:
    def __init__(self, args, model_dir: Path, dtype_name: str) -> None:
        self.args, self.model_dir, self.dtype_name = args, model_dir, dtype_name
        self.stage_args = ("--device", args.device)
        self.tokenization = Tokenization.from_model_dir(model_dir)
        self.prompts = [self.tokenization.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
        self.unsplit = Unsplit(model_dir, getattr(torch, dtype_name), self.tokenization, args.device)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for dtype, parts in results["dtypes"].items():
        conc = parts.get("concurrency")
        if not conc:
            continue
        levels = conc["clients"]
        pipeline, unsplit = ({int(c): v for c, v in conc[key].items()}  # int keys, or str once read from JSON
                             for key in ("pipeline_tokens_per_s", "unsplit_batch_tokens_per_s"))
        ax.plot(levels, [pipeline[c] for c in levels], marker="o", label=f"layerline, 2 stages ({dtype})")
        ax.plot(levels, [unsplit[c] for c in levels], marker="s", linestyle="--",
                label=f"unsplit generate, static batch ({dtype})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (32 new tokens each)")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("SmolLM2-135M on 2 CPU cores")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--ttft-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds for the decode and ttft ratios")
    parser.add_argument("--pinned-rounds", type=int, default=3, help="interleaved rounds for the pinned ratio")
    parser.add_argument("--max-clients", type=int, default=64)
    parser.add_argument("--pinned-batches", type=lambda text: [int(v) for v in text.split(",")], default=[64, 128, 256],
                        help="sequences in the pinned batch workload, one run per size (comma-separated)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the decode and ttft parts")
    parser.add_argument("--model-dir", type=Path, help="a checkpoint on disk instead of the default model")
    parser.add_argument("--json", type=Path, help="default bench/results/pipeline_vs_unsplit[_cuda].json")
    parser.add_argument("--plot", type=Path, default=Path("bench/results/throughput.png"),
                        help="drawn when the concurrency part runs")
    args = parser.parse_args()
    on_gpu = args.device != "cpu"
    cpu_only = sorted(set(args.parts.split(",")) - {"decode", "ttft"})
    if on_gpu and cpu_only:
        parser.error(f"--device {args.device} runs the decode and ttft parts only; drop {','.join(cpu_only)}")
    if args.json is None:
        args.json = Path(f"bench/results/pipeline_vs_unsplit{'_cuda' if on_gpu else ''}.json")
    torch.set_num_threads(len(ALL_CORES))
    model_dir = args.model_dir or ensure_model("smollm2-135m")
    results = {"model": str(args.model_dir) if args.model_dir else "smollm2-135m", "cores": len(ALL_CORES),
               "torch": torch.__version__, "device": args.device, "dtypes": {}}
    if on_gpu:
        results["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    for dtype_name in args.dtypes.split(","):
        log(f"== {dtype_name}")
        ctx = Context(args, model_dir, dtype_name)
        parts = results["dtypes"].setdefault(dtype_name, {})
        for part in args.parts.split(","):
            started = time.perf_counter()
            parts[part] = globals()[f"part_{part}"](ctx)
            parts[part]["seconds"] = time.perf_counter() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if "concurrency" in args.parts.split(","):
        plot(results, args.plot)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
