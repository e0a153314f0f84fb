"""Per-sequence against batched attention on the stages: throughput and exactness under load.

For each dtype, alternated rounds of the same 2-stage pipeline (one thread per stage) started
with `stage-server --attention batched` and `--attention per-sequence`. Each round runs the
first prompts alone (the reference), then 16 and 64 concurrent clients (32 new tokens each),
and counts the concurrent answers of those prompts that match their answer alone.

    python bench/attention_modes.py [--dtypes float32,bfloat16] [--rounds 2] [--clients 16,64]
        [--json bench/results/attention_modes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_pipeline import concurrent_clients, log, pipeline  # noqa: E402
from pipeline_vs_unsplit import QUESTIONS  # noqa: E402

from coordinator.text import Tokenization  # noqa: E402
from protos.model_files.fetch import ensure_model  # noqa: E402

MODES = ("batched", "per-sequence")
REFERENCE_PROMPTS = 4  # prompts also run alone in every round


def one_round(model_dir: Path, dtype: str, mode: str, prompts: list[list[int]], levels: list[int],
              new_tokens: int) -> dict:
    with pipeline(model_dir, 2, dtype, threads=1, stage_args=("--attention", mode)) as address:
        concurrent_clients(address, prompts[:2], 4)  # warm up
        alone = [concurrent_clients(address, [p], new_tokens)[0][0] for p in prompts[:REFERENCE_PROMPTS]]
        figures = {}
        for clients in levels:
            which = [i % len(prompts) for i in range(clients)]
            outputs, tokens_per_s = concurrent_clients(address, [prompts[i] for i in which], new_tokens)
            checked = [(o, i) for o, i in zip(outputs, which) if i < REFERENCE_PROMPTS]
            figures[clients] = {"tokens_per_s": tokens_per_s, "checked": len(checked),
                                "identical_to_alone": sum(o == alone[i] for o, i in checked)}
            log(f"  {dtype} {mode:>12} {clients} clients: {tokens_per_s:.1f} tok/s, "
                f"{figures[clients]['identical_to_alone']}/{len(checked)} identical to alone")
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=lambda text: [int(v) for v in text.split(",")], default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("bench/results/attention_modes.json"))
    args = parser.parse_args()
    model_dir = ensure_model("smollm2-135m")
    tokenization = Tokenization.from_model_dir(model_dir)
    prompts = [tokenization.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    results: dict = {"model": "smollm2-135m", "rounds": args.rounds, "dtypes": {}}
    for dtype in args.dtypes.split(","):
        rounds = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:  # alternated, so both modes see the machine's slow and fast phases
                rounds[mode].append(one_round(model_dir, dtype, mode, prompts, args.clients, args.new_tokens))
        summary = {}
        for clients in args.clients:
            medians = {mode: statistics.median(r[clients]["tokens_per_s"] for r in rounds[mode]) for mode in MODES}
            summary[clients] = {
                **{f"{mode}_tokens_per_s": medians[mode] for mode in MODES},
                "per_sequence_over_batched": medians["per-sequence"] / medians["batched"],
                **{f"{mode}_identical": f"{sum(r[clients]['identical_to_alone'] for r in rounds[mode])}/"
                                        f"{sum(r[clients]['checked'] for r in rounds[mode])}" for mode in MODES}}
            row = summary[clients]
            log(f"{dtype}, {clients} clients: per-sequence ÷ batched {row['per_sequence_over_batched']:.3f}; "
                f"identical to alone {row['per-sequence_identical']} per-sequence, {row['batched_identical']} batched")
        results["dtypes"][dtype] = {"summary": summary, "rounds": rounds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({d: r["summary"] for d, r in results["dtypes"].items()}, indent=2))


if __name__ == "__main__":
    main()
