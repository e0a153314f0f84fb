"""What losing a replica costs a client, and what replicas give: the stall at a failover, and the
tokens/s of a replicated pipeline against a single chain.

Real processes on this machine (tests/failover_cluster.py): 2 spans × 2 replicas behind one
`coordinator serve`, and beside it a single chain of 2 stages behind another, the same layers of the
same model. For each model (the tiny test Llama and SmolLM2-135M by default):

- stall: each round, --clients concurrent greedy streams of --new-tokens run once without a failure
  (the baseline) and once with one replica killed (SIGKILL) a third of the way through (the one
  carrying the most sequences, of each span in turn; it is started again between rounds). A stream
  that crossed the failover (tokens before and after the kill) saw a stall: its largest gap between
  consecutive tokens. Reported: the median and max of those stalls over all rounds, against the
  median gap between consecutive tokens of the baseline runs, with failed requests and whether
  every token matched the baseline;
- throughput: --clients concurrent streams on the replicated pipeline and on the chain, in rounds
  that alternate which goes first (interleaved_rounds.py); tokens/s = tokens of all streams ÷ the
  wall time from the first request's start to the last one's end. Reported: medians and the median
  and quartiles of each round's replicated ÷ chain ratio.

    python bench/failover.py [--models tiny,smollm2-135m] [--rounds 3] [--clients 16]
                             [--new-tokens 32] [--threads 0] [--out bench/results/failover.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from failover_cluster import Cluster  # noqa: E402
from interleaved_rounds import interleaved, quartiles  # noqa: E402
from local_pipeline import log  # noqa: E402
from streaming_clients import StreamResult, Streams, failures, stream_all  # noqa: E402

from coordinator.planner import plan_partition  # noqa: E402

KILL_AT = 1 / 3  # of the run's tokens over all streams
WARM_RUNS = 2  # runs on each pipeline before the throughput rounds


def _gaps(result: StreamResult) -> list[float]:
    """Seconds between consecutive tokens of one stream (the wait for the first token excluded)."""
    return [b - a for a, b in zip(result.times, result.times[1:])]


def _model(name: str, work_dir: Path) -> tuple[Path, list[list[int]]]:
    """(model directory, a pool of prompts) for `name`: "tiny" (built here) or a known model name."""
    if name == "tiny":
        from tiny_models import save_tiny_model, save_tiny_tokenizer

        model_dir = work_dir / "tiny-llama"
        save_tiny_model(model_dir, "llama")
        save_tiny_tokenizer(model_dir)
        rng = random.Random(0)
        return model_dir, [[rng.randrange(3, 128) for _ in range(rng.randrange(4, 14))] for _ in range(64)]
    from coordinator.text import Tokenization
    from protos.model_files.resolve import resolve_model

    model_dir = Path(resolve_model(name))
    tokenization = Tokenization.from_model_dir(model_dir)
    topics = ["the sea", "a CPU", "Paris", "spiders", "rainbows", "bread", "winter", "trains", "the moon", "chess",
              "volcanoes", "bees", "clocks", "rivers", "libraries", "music"]
    return model_dir, [tokenization.encode_chat([{"role": "user", "content": f"Tell me about {t}."}])
                       for t in topics * 4]


def stall_round(cluster: Cluster, prompts: list[list[int]], new_tokens: int, span: int) -> dict:
    """One baseline run and one run with the busiest replica of span `span` killed a third of the way in."""
    cluster.make_whole()
    baseline = stream_all(cluster.address, prompts, new_tokens)
    streams = Streams(cluster.address, prompts, new_tokens).start()
    reached = streams.wait_tokens(int(KILL_AT * len(prompts) * new_tokens))
    stage = cluster.busiest(span)
    killed_at = time.monotonic()
    stage.kill()
    results = streams.join()
    crossed = [r for r in results if r.times and r.times[0] < killed_at < r.times[-1]]
    return {"victim": stage.address, "killed_mid_run": reached,
            "baseline_gaps": [g for r in baseline for g in _gaps(r)],
            "stalls": [max(_gaps(r)) for r in crossed],
            "failed": failures(results) + [f"baseline {line}" for line in failures(baseline)],
            "identical": [r.tokens for r in results] == [r.tokens for r in baseline]}


def tokens_per_s(address: str, prompts: list[list[int]], new_tokens: int) -> float:
    results = stream_all(address, prompts, new_tokens)
    if failures(results):
        raise RuntimeError(f"throughput round failed: {failures(results)[:3]}")
    wall = max(r.ended for r in results) - min(r.started for r in results)
    return sum(len(r.tokens) for r in results) / wall


def bench_model(name: str, args, work_dir: Path) -> dict:
    from transformers import AutoConfig

    model_dir, pool = _model(name, work_dir)
    prompts = pool[:args.clients]
    spans = plan_partition(AutoConfig.from_pretrained(model_dir).num_hidden_layers, 2)
    stage_args = ("--threads", str(args.threads)) if args.threads else ()
    log(f"{name}: starting 2 spans x 2 replicas and a chain of 2 ({spans})")
    with Cluster(model_dir, spans, 2, work_dir / f"{name}-replicated", stage_args=stage_args) as replicated, \
            Cluster(model_dir, spans, 1, work_dir / f"{name}-chain", stage_args=stage_args) as chain:
        rounds = []
        for index in range(args.rounds):
            rounds.append(stall_round(replicated, prompts, args.new_tokens, span=index % len(spans)))
            stalls = rounds[-1]["stalls"]
            log(f"{name}: stall round {index + 1}/{args.rounds}: killed {rounds[-1]['victim']}, "
                f"{len(stalls)} streams crossed, largest stall {max(stalls, default=0):.3f}s, "
                f"{len(rounds[-1]['failed'])} failed")
        replicated.make_whole()
        for _ in range(WARM_RUNS):  # first steps allocate; a fresh stage's do too
            for cluster in (replicated, chain):
                stream_all(cluster.address, prompts, args.new_tokens)
        measures = {"replicated": lambda: tokens_per_s(replicated.address, prompts, args.new_tokens),
                    "chain": lambda: tokens_per_s(chain.address, prompts, args.new_tokens)}
        samples = interleaved(measures, args.rounds)
    stalls = [s for r in rounds for s in r["stalls"]]
    gaps = [g for r in rounds for g in r["baseline_gaps"]]
    gap = statistics.median(gaps) if gaps else 0.0
    ratios = [a / b for a, b in zip(samples["replicated"], samples["chain"], strict=True)]
    result = {
        "stall": {"median_s": round(statistics.median(stalls), 4) if stalls else None,
                  "max_s": round(max(stalls), 4) if stalls else None,
                  "baseline_gap_median_s": round(gap, 4),
                  "baseline_gap_max_s": round(max(gaps), 4) if gaps else None,
                  "median_over_gap": round(statistics.median(stalls) / gap, 1) if stalls and gap else None,
                  "max_over_gap": round(max(stalls) / gap, 1) if stalls and gap else None,
                  "streams_crossed": len(stalls), "failed_requests": sum(len(r["failed"]) for r in rounds),
                  "failures": [line for r in rounds for line in r["failed"]][:10],
                  "tokens_identical": all(r["identical"] for r in rounds),
                  "killed_mid_run": all(r["killed_mid_run"] for r in rounds),
                  "victims": [r["victim"] for r in rounds]},
        "throughput": {"replicated_tokens_per_s": round(statistics.median(samples["replicated"]), 1),
                       "chain_tokens_per_s": round(statistics.median(samples["chain"]), 1),
                       "ratio_median": round(statistics.median(ratios), 3),
                       "ratio_quartiles": [round(q, 3) for q in quartiles(ratios)],
                       "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()}}}
    stall = result["stall"]
    log(f"{name}: stall at a failover median {stall['median_s']}s, max {stall['max_s']}s "
        f"({stall['median_over_gap']}x / {stall['max_over_gap']}x the median gap {stall['baseline_gap_median_s']}s)"
        f"; {stall['failed_requests']} failed; tokens identical: {stall['tokens_identical']}")
    log(f"{name}: replicated {result['throughput']['replicated_tokens_per_s']} tok/s vs chain "
        f"{result['throughput']['chain_tokens_per_s']} tok/s: ratio {result['throughput']['ratio_median']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m", help="comma separated: tiny and/or known names")
    parser.add_argument("--rounds", type=int, default=3, help="stall rounds, and throughput rounds (default 3)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="stage-server --threads (0: its default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "failover.json")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 1 <= args.clients <= 64 or not 4 <= args.new_tokens <= 1024:
        parser.error("--rounds 1-100, --clients 1-64, --new-tokens 4-1024")
    report = {"cpus": os.cpu_count(), "clients": args.clients, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "kill_at": round(KILL_AT, 3), "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            report["models"][name] = bench_model(name, args, Path(scratch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
