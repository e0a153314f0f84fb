"""The parts of the throughput suite (bench/pipeline_vs_unsplit.py), one function per part.

Owns: what each part measures and the figures it returns (decode, ttft, concurrency, neighbour, pinned,
wire),
each given the suite's context (`ctx`: options, model, dtype, prompts, the unsplit model). Does not
own: starting processes (local_pipeline.py), the baseline (unsplit_model.py), alternating rounds
(interleaved_rounds.py), or the report (pipeline_vs_unsplit.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interleaved_rounds import against_unsplit, interleaved, quartiles, round_ratios  # noqa: E402
from local_pipeline import (  # noqa: E402
    concurrent_clients,
    cpu_seconds,
    hop_bytes,
    log,
    pipeline,
    pipeline_first_token_s,
    small_step_threads,
    stream_decode_tokens_per_s,
)
from pinned_cores import ALL_CORES, busy_neighbour, pinned_to, two_core_ceiling  # noqa: E402

from coordinator.client import CoordinatorClient  # noqa: E402
from stage_server.per_sequence_attention import mode_for  # noqa: E402

# (result key, stages, --chain): each setup runs alone beside the unsplit model, as it would be
# deployed (an idle second pipeline on the same two cores slows traced stage forwards by ~10 %).
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


def _clients_run(ctx, address: str, levels: list[int], *, ignore_eos: bool = True) -> tuple[dict, dict]:
    """Aggregate tokens/s at each client count of `levels` (1 = one request at a time over every
    prompt, the baseline and the reference answers) and how many answers equal the reference."""
    n = ctx.args.new_tokens
    concurrent_clients(address, ctx.prompts[:2], 4)  # warm up
    alone, started = [], time.perf_counter()
    for prompt in ctx.prompts:
        outputs, _ = concurrent_clients(address, [prompt], n, ignore_eos=ignore_eos)
        alone.append(outputs[0])
    pipe, exact = {1: sum(len(o) for o in alone) / (time.perf_counter() - started)}, {}
    for c in levels[1:]:
        batch_index = [i % len(ctx.prompts) for i in range(c)]
        outputs, pipe[c] = concurrent_clients(address, [ctx.prompts[i] for i in batch_index], n, ignore_eos=ignore_eos)
        exact[c] = sum(o == alone[i] for o, i in zip(outputs, batch_index))
    return pipe, exact


def part_concurrency(ctx) -> dict:
    """Concurrent clients against the pipeline as `launch-local` starts it (no tuning flags): 2 stages
    at every level, requests that stop at end-of-sequence too, and 4 stages."""
    n = ctx.args.new_tokens
    levels = [c for c in (1, 4, 16, 64) if c <= ctx.args.max_clients]
    unsplit = {}
    for c in levels:
        batch = [ctx.prompts[i % len(ctx.prompts)] for i in range(c)]
        unsplit[c] = ctx.unsplit.batch_tokens_per_s(batch, n)
    runs = {}
    for name, stages, ignore_eos, run_levels in (("", 2, True, levels), ("until_eos_", 2, False, [1, 16]),
                                                 ("stages_4_", 4, True, [1, 16])):
        run_levels = [c for c in run_levels if c <= ctx.args.max_clients]
        with pipeline(ctx.model_dir, stages, ctx.dtype_name) as address:
            pipe, exact = _clients_run(ctx, address, run_levels, ignore_eos=ignore_eos)
        for c in run_levels[1:]:
            log(f"  concurrency, {stages} stages{'' if ignore_eos else ', until end-of-sequence'}, {c} clients: "
                f"{pipe[c]:.1f} tok/s ({pipe[c] / pipe[1]:.2f}x one client), {exact[c]}/{c} identical to alone"
                + (f"; unsplit batch {unsplit[c]:.1f} tok/s" if ignore_eos and stages == 2 else ""))
        runs[name] = {"clients": run_levels, "pipeline_tokens_per_s": pipe,
                      "ratio_to_one_client": {c: pipe[c] / pipe[1] for c in run_levels}, "identical_to_alone": exact}
    result = {**runs.pop(""), "unsplit_batch_tokens_per_s": unsplit}
    for name, run in runs.items():
        result.update({name + key: value for key, value in run.items()})
    return result


def part_neighbour(ctx) -> dict:
    """16 clients on 2 stages as `launch-local` starts them, quiet against another process keeping
    one core busy, in interleaved rounds."""
    n, clients = ctx.args.new_tokens, 16
    batch = [ctx.prompts[i % len(ctx.prompts)] for i in range(clients)]
    with pipeline(ctx.model_dir, 2, ctx.dtype_name) as address:
        concurrent_clients(address, batch[:2], 4)

        def with_neighbour() -> float:
            with busy_neighbour(ALL_CORES[-1]):
                return concurrent_clients(address, batch, n)[1]

        samples = interleaved({"quiet": lambda: concurrent_clients(address, batch, n)[1],
                               "neighbour": with_neighbour}, ctx.args.rounds)
    ratios = [b / a for a, b in zip(samples["quiet"], samples["neighbour"])]
    ratio = statistics.median(ratios)
    log(f"  neighbour: 16 clients {statistics.median(samples['neighbour']):.1f} tok/s with a core kept busy vs "
        f"{statistics.median(samples['quiet']):.1f} quiet → {ratio:.3f} (median of {ctx.args.rounds} rounds)")
    return {"rounds": ctx.args.rounds, "samples_tokens_per_s": samples, "ratio": ratio,
            "ratio_quartiles": quartiles(ratios)}


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


PARTS = {"decode": part_decode, "ttft": part_ttft, "concurrency": part_concurrency, "neighbour": part_neighbour,
         "pinned": part_pinned, "wire": part_wire}
