"""Where a decode token's time goes in a pipeline on this machine, stage by stage.

Starts the stage servers with `--trace-steps` (all of them appending to one file; see
stage_server/step_trace.py), streams one single-request decode through them, and splits each
token's period into what every stage did with it:

  wait     the step waited for the stage's compute thread (received -> started)
  compute  validation, the forward pass and the answer's argmax (started -> computed)
  send     encoding it for the next hop (computed -> handed to its link), or answering it
  hop      stage k handed it to its link -> stage k+1's upstream stream had it (both processes)
  turn     the last stage handed the answer on -> stage 0 had the next token's step (the
           coordinator's part: receiving, sampling, sending; or the greedy chain's hop back)

Medians over the tokens of the run, beside the unsplit model's decode period measured in the
same run (rounds alternate, as in pipeline_vs_unsplit.py). Stamps compare across processes
only on one machine (CLOCK_MONOTONIC), so this measures a local pipeline.

    python bench/step_timeline.py [--stages 4] [--dtype float32] [--tokens 64] [--rounds 3]
        [--chain auto] [--json bench/results/step_timeline.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stage_server.step_trace import StepRecord, read_records  # noqa: E402


def _by_micro_batch(records: list[StepRecord]) -> list[dict[str, StepRecord]]:
    """The records of each micro-batch that every traced stage handled, by stage name."""
    stages = {record.stage for record in records}
    by_step: dict[tuple[str, int], dict[str, StepRecord]] = defaultdict(dict)
    for record in records:
        if record.outcome != "failed":
            by_step[(record.session_id, record.micro_batch_id)][record.stage] = record
    complete = [steps for steps in by_step.values() if len(steps) == len(stages)]
    if not complete:
        raise ValueError("no micro-batch was traced by every stage")
    return complete


def _in_pipeline_order(steps: dict[str, StepRecord]) -> list[str]:
    """The stages of one micro-batch's records in the order they received it."""
    return sorted(steps, key=lambda stage: steps[stage].received)


def stage_order(records: list[StepRecord]) -> list[str]:
    """The stages' names in pipeline order."""
    return _in_pipeline_order(_by_micro_batch(records)[0])


def token_breakdown(records: list[StepRecord], skip: int = 2) -> dict:
    """Per-token medians (µs) of the session with the most micro-batches that every stage handled.
    The first `skip` of its micro-batches (the prefill, the first decode step) are left out."""
    complete = _by_micro_batch(records)
    stages = _in_pipeline_order(complete[0])
    sessions: dict[str, list[dict[str, StepRecord]]] = defaultdict(list)
    for steps in complete:
        sessions[steps[stages[0]].session_id].append(steps)
    tokens = max(sessions.values(), key=len)
    tokens.sort(key=lambda steps: steps[stages[0]].received)
    tokens = tokens[skip:]
    if len(tokens) < 2:
        raise ValueError(f"only {len(tokens)} traced decode steps after skipping {skip}; generate more tokens")
    parts: dict[str, list[int]] = defaultdict(list)
    for index, steps in enumerate(tokens):
        for position, stage in enumerate(stages):
            record = steps[stage]
            parts[f"{stage}|wait"].append(record.started - record.received)
            parts[f"{stage}|compute"].append(record.computed - record.started)
            parts[f"{stage}|send"].append(record.sent - record.computed)
            if position + 1 < len(stages):
                parts[f"{stage}|hop"].append(steps[stages[position + 1]].received - record.sent)
        if index + 1 < len(tokens):
            following = tokens[index + 1]
            parts["turn"].append(following[stages[0]].received - steps[stages[-1]].sent)
            parts["period"].append(following[stages[0]].received - steps[stages[0]].received)
    medians = {name: statistics.median(values) / 1e3 for name, values in parts.items()}
    return {
        "tokens": len(tokens),
        "stages": [{"stage": stage, **{part: medians[f"{stage}|{part}"]
                                       for part in ("wait", "compute", "send", "hop") if f"{stage}|{part}" in medians}}
                   for stage in stages],
        "turn_us": medians["turn"],
        "period_us": medians["period"],
    }


def _print(result: dict) -> None:
    print(f"{'stage':34s} {'wait':>8s} {'compute':>9s} {'send':>8s} {'hop on':>8s}   (µs, medians)")
    for row in result["stages"]:
        print(f"{row['stage']:34s} {row['wait']:8.0f} {row['compute']:9.0f} {row['send']:8.0f} "
              f"{row.get('hop', float('nan')):8.0f}")
    compute = sum(row["compute"] for row in result["stages"])
    around = result["period_us"] - compute
    print(f"turn (last stage -> next token at stage 0) {result['turn_us']:8.0f} µs")
    print(f"token period {result['period_us']:8.0f} µs: stages computing {compute:.0f} "
          f"({compute / result['period_us']:.0%}), everything else {around:.0f}")
    if "unsplit_period_us" in result:
        print(f"unsplit model's token period {result['unsplit_period_us']:8.0f} µs; pipeline ÷ unsplit tokens/s "
              f"{result['unsplit_period_us'] / result['period_us']:.3f}; stages' compute alone ÷ unsplit period "
              f"{compute / result['unsplit_period_us']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per traced request (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="traced requests, alternated with the unsplit model")
    parser.add_argument("--chain", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.stages < 2 or args.tokens < 8 or args.rounds < 1:
        parser.error("need --stages >= 2, --tokens >= 8 and --rounds >= 1")

    import torch
    from local_pipeline import pipeline, stream_decode_tokens_per_s
    from pipeline_vs_unsplit import Context

    from protos.model_files.fetch import ensure_model

    torch.set_num_threads(2)
    model_dir = ensure_model(args.model)

    class Options:
        new_tokens, decode_tokens, device = 32, args.tokens, "cpu"

    context = Context(Options, model_dir, args.dtype)
    prompt = context.prompts[0]
    unsplit_tokens_per_s = []
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "steps.jsonl"
        with pipeline(model_dir, args.stages, args.dtype, chain=args.chain,
                            stage_args=("--trace-steps", str(trace))) as address:
            stream_decode_tokens_per_s(address, prompt, 8)  # warm up (its session has fewer steps)
            context.unsplit.decode_tokens_per_s(prompt, 8)
            results = []
            for _ in range(args.rounds):
                trace.write_bytes(b"")  # each round's request alone in the file
                stream_decode_tokens_per_s(address, prompt, args.tokens)
                unsplit_tokens_per_s.append(context.unsplit.decode_tokens_per_s(prompt, args.tokens))
                results.append(token_breakdown(read_records(trace)))
    # The round whose period is the median one, so that its parts add up to a period that happened.
    result = sorted(results, key=lambda r: r["period_us"])[len(results) // 2]
    result.update(dtype=args.dtype, chain=args.chain, rounds=args.rounds,
                  periods_us=[r["period_us"] for r in results],
                  unsplit_period_us=1e6 / statistics.median(unsplit_tokens_per_s))
    _print(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
