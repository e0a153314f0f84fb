"""Throughput suite: the pipeline against the unsplit Hugging Face model, side by side in one run.

Everything runs on SmolLM2-135M-Instruct on this machine, per dtype (float32, bfloat16).
Stage servers and the coordinator are separate processes (as deployed); the unsplit
model runs in this process while they sit idle. Each figure is printed as a ratio to
its baseline measured in the same run; decode, ttft and pinned alternate pipeline and
unsplit runs over several rounds (in reverse order every other round) and report the median
of the per-round ratios with its quartiles, because this machine's speed drifts by 10-20 %
within minutes; decode and ttft take 9 rounds, since one round's decode ratio strays by ±10 %
and 5 rounds leave the median ~5 % uncertain:

  1. decode      single-request decode tokens/s through 2 and 4 stages ÷ unsplit `generate`
  2. ttft        time to first token of a 512-token prompt through 2 stages ÷ unsplit
  3. concurrency aggregate tokens/s of 1, 4, 16, 64 concurrent clients (32 new tokens each)
                 through 2 stages started as `launch-local` starts them (no tuning flags),
                 and ÷ one client; the unsplit model's static batch of the same size beside
                 it; every concurrent answer checked against the same prompt answered alone;
                 then 1 and 16 clients whose requests stop at end-of-sequence, and 1 and 16
                 clients through 4 stages
  4. neighbour   16 clients through 2 stages (defaults) with another process keeping one
                 core busy ÷ the same quiet, in alternated rounds
  5. pinned      a tuned setup: 2 stages each pinned to its own core (1 thread) vs the unsplit model pinned
                 to one core, on batches of 64, 128 and 256 sequences (stages split for the
                 batch's prompt and answer lengths): share of the ideal 2x; in bfloat16 both
                 with the default per-sequence attention and with `--attention batched`
  6. wire        activation bytes between stages per generated token, per codec

    python bench/pipeline_vs_unsplit.py [--dtypes float32,bfloat16] [--parts decode,ttft,...]
        [--json bench/results/pipeline_vs_unsplit.json] [--plot bench/results/throughput.png]

On a GPU machine, `--device cuda --parts decode,ttft` runs the stages and the unsplit model on
the GPU (the other parts measure CPU cores and refuse); `--model-dir` takes a checkpoint already
on disk where the default model cannot be fetched. The results then go to
bench/results/pipeline_vs_unsplit_cuda.json unless --json says otherwise, and no plot is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_prompts import CHAT_QUESTIONS  # noqa: E402
from local_pipeline import log  # noqa: E402
from pinned_cores import ALL_CORES  # noqa: E402
from suite_parts import PARTS  # noqa: E402
from unsplit_model import Unsplit  # noqa: E402

from coordinator.text import Tokenization  # noqa: E402
from protos.model_files.fetch import ensure_model  # noqa: E402

QUESTIONS = CHAT_QUESTIONS[:16]


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
            parts[part] = PARTS[part](ctx)
            parts[part]["seconds"] = time.perf_counter() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if "concurrency" in args.parts.split(","):
        plot(results, args.plot)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
