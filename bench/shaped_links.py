"""Pipelines across hosts over shaped links against the unsplit model: decode, 16 clients and TTFT
by round-trip time, bandwidth and codec.

Stages on network-namespace hosts (tests/shaped_hosts.py; needs root), one host per stage and one
for the coordinator, started as the container starts them, mutual TLS on every hop, every default
a user gets (no thread or batching flags; the layers split as `launch-local` splits them). Latency:
a delaying TCP relay in front of each stage (RTT/2 each way on every hop; RTT 0 dials the stages
directly); bandwidth: tc's tbf on every host's egress. For each number of hosts, RTT, codec and
rate: one request's streamed decode tokens/s (`--new-tokens`, prefill excluded), the aggregate
tokens/s of `--clients` requests sent at once, and the time to the first token of a
`--prompt-tokens` prompt, each alternated round by round with the same figure of the unsplit model
in this process (Hugging Face `generate`; bench/unsplit_model.py), medians and the medians of the
rounds' ratios reported. Then the issue's three checks where the run covers them, and a plot of
tokens/s against RTT (matplotlib, from the `bench` extra).

    sudo .venv/bin/python bench/shaped_links.py [--hosts 2,3] [--rtt-ms 0,2,10] [--rates 1gbit,20mbit]
        [--codecs none,fp16,int8] [--rounds 3] [--coordinator-flags "--micro-batches 3"]
        [--out bench/results/shaped_links.json]

Figures of record take no --coordinator-flags: they measure the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import protos.grpc_transport  # noqa: E402, F401  (before grpc: the TCP path layerline's processes take)

# isort: split

from interleaved_rounds import interleaved  # noqa: E402
from local_pipeline import log  # noqa: E402
from netns_hosts import netns_available  # noqa: E402
from shaped_hosts import shaped_deployment  # noqa: E402

from coordinator.client import AsyncCoordinatorClient, CoordinatorClient  # noqa: E402
from coordinator.planner import plan_partition  # noqa: E402
from coordinator.split_costs import head_cost_in_layers  # noqa: E402
from coordinator.text import Tokenization  # noqa: E402
from protos.model_files.fetch import ensure_model  # noqa: E402

SUBNET = "10.63.2"
PROMPT = [1, 504, 3458, 314, 260, 1345, 282, 253, 1167, 30, 657, 3123, 314, 260, 1345, 282]


def _csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def _decode_tokens_per_s(client: CoordinatorClient, new_tokens: int) -> float:
    stamps = []
    for message in client.generate_stream(token_ids=PROMPT, max_new_tokens=new_tokens, ignore_eos=True):
        if message.token_ids:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _clients_tokens_per_s(address: str, tls, prompts: list[list[int]], new_tokens: int) -> float:
    async def run() -> float:
        async with AsyncCoordinatorClient(address, tls=tls, timeout_s=600) as client:
            started = time.perf_counter()
            replies = await asyncio.gather(*[client.generate(token_ids=p, max_new_tokens=new_tokens, ignore_eos=True)
                                             for p in prompts])
            return sum(len(r.token_ids) for r in replies) / (time.perf_counter() - started)
    return asyncio.run(run())


def _first_token_s(client: CoordinatorClient, prompt: list[int]) -> float:
    started = time.perf_counter()
    client.generate(token_ids=prompt, max_new_tokens=1)
    return time.perf_counter() - started


def _summary(samples: dict[str, list[float]]) -> dict:
    """Medians, and the median of the rounds' pipeline ÷ unsplit ratios (for TTFT above 1 is slower)."""
    ratios = [a / b for a, b in zip(samples["pipeline"], samples["unsplit"], strict=True)]
    return {"pipeline": round(statistics.median(samples["pipeline"]), 3),
            "unsplit": round(statistics.median(samples["unsplit"]), 3),
            "vs_unsplit": round(statistics.median(ratios), 3)}


def measure(address: str, tls, unsplit, args, prompts: dict) -> dict:
    """The three figures of one configuration, each alternated with the unsplit model's."""
    with CoordinatorClient(address, tls=tls, timeout_s=600) as client:
        _decode_tokens_per_s(client, 4)  # warm: first steps allocate
        _first_token_s(client, prompts["long"])
        decode = interleaved({"pipeline": lambda: _decode_tokens_per_s(client, args.new_tokens),
                              "unsplit": lambda: unsplit.decode_tokens_per_s(PROMPT, args.new_tokens)}, args.rounds)
        clients = interleaved({
            "pipeline": lambda: _clients_tokens_per_s(address, tls, prompts["clients"], args.new_tokens),
            "unsplit": lambda: unsplit.batch_tokens_per_s(prompts["clients"], args.new_tokens)}, args.rounds)
        ttft = interleaved({"pipeline": lambda: _first_token_s(client, prompts["long"]),
                            "unsplit": lambda: unsplit.first_token_s(prompts["long"])}, args.rounds)
    return {"decode_tokens_per_s": _summary(decode), "clients_tokens_per_s": _summary(clients),
            "ttft_s": _summary(ttft)}


def _find(results: list[dict], **where) -> dict | None:
    return next((r for r in results if all(r[k] == v for k, v in where.items())), None)


def checks(results: list[dict], rates: list[str]) -> list[dict]:
    """The issue's targets, for each configuration of this run that they apply to."""
    found = []
    fast, slow = rates[0], rates[-1]
    for r in results:
        if r["rtt_ms"] == 2 and r["rate"] == fast and r["hosts"] == 2:
            found.append({"check": "2-host decode at 2 ms RTT, >= 0.90 of unsplit", "codec": r["codec"],
                          "value": r["decode_tokens_per_s"]["vs_unsplit"],
                          "met": r["decode_tokens_per_s"]["vs_unsplit"] >= 0.90})
        base = _find(results, hosts=r["hosts"], rtt_ms=0, rate=r["rate"], codec=r["codec"])
        if r["rtt_ms"] == 10 and base:
            value = r["clients_tokens_per_s"]["pipeline"] / base["clients_tokens_per_s"]["pipeline"]
            found.append({"check": f"{r['hosts']} hosts, clients at 10 ms RTT, >= 0.8 of 0 ms", "rate": r["rate"],
                          "codec": r["codec"], "value": round(value, 3), "met": value >= 0.8})
        none = _find(results, hosts=r["hosts"], rtt_ms=r["rtt_ms"], rate=r["rate"], codec="none")
        if r["codec"] == "int8" and r["rate"] == slow and slow != fast and none:
            value = r["ttft_s"]["pipeline"] / none["ttft_s"]["pipeline"]
            found.append({"check": f"{r['hosts']} hosts, int8 TTFT at {slow}, <= 0.7x of none's",
                          "rtt_ms": r["rtt_ms"], "value": round(value, 3), "met": value <= 0.7})
    return found


def plot(results: list[dict], rates: list[str], clients: int, path: Path) -> bool:
    """Tokens/s against RTT, a row of two panels per rate, a line per hosts and codec, the unsplit
    model dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib (pip install -e '.[bench]'): no plot")
        return False
    figure, axes = plt.subplots(len(rates), 2, figsize=(11, 4.2 * len(rates)), squeeze=False)
    for row, rate in zip(axes, rates, strict=True):
        chosen = [r for r in results if r["rate"] == rate]
        for axis, figure_name, title in ((row[0], "decode_tokens_per_s", "one request, decode"),
                                         (row[1], "clients_tokens_per_s", f"{clients} clients, aggregate")):
            for hosts, codec in sorted({(r["hosts"], r["codec"]) for r in chosen}):
                line = sorted((r["rtt_ms"], r[figure_name]["pipeline"]) for r in chosen
                              if r["hosts"] == hosts and r["codec"] == codec)
                axis.plot([x for x, _ in line], [y for _, y in line], marker="o", label=f"{hosts} hosts, {codec}")
            if chosen:
                axis.axhline(statistics.median(r[figure_name]["unsplit"] for r in chosen), color="black",
                             linestyle="--", label="unsplit")
            axis.set(title=f"{title} ({rate})", xlabel="round-trip time per hop (ms)", ylabel="tokens/s")
            axis.set_ylim(bottom=0)
            axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hosts", type=_csv(int), default=[2, 3], help="stage hosts, comma separated")
    parser.add_argument("--rtt-ms", type=_csv(float), default=[0.0, 2.0, 10.0], help="round-trip times per hop")
    parser.add_argument("--rates", type=_csv(str), default=["1gbit", "20mbit"], help="tc rates, fastest first")
    parser.add_argument("--codecs", type=_csv(str), default=["none", "fp16", "int8"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coordinator-flags", type=shlex.split, default=[],
                        help="more `coordinator serve` flags (quoted), to compare with the defaults")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shaped_links.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "shaped_links.png")
    args = parser.parse_args()
    if netns_available():
        raise SystemExit(f"shaped_links: {netns_available()}")
    if min(args.hosts) < 1 or args.rounds < 1 or args.new_tokens < 2 or args.clients < 1:
        raise SystemExit("shaped_links: --hosts, --rounds, --clients need at least 1 and --new-tokens 2")
    import torch
    from transformers import AutoConfig
    from unsplit_model import Unsplit

    model_dir = ensure_model(args.model, progress=False)
    config = AutoConfig.from_pretrained(model_dir)
    tokenization = Tokenization.from_model_dir(model_dir)
    unsplit = Unsplit(model_dir, torch.float32, tokenization)
    prompts = {"clients": [[1, 504 + i, 3458, 314, 260, 1345 + i, 282] for i in range(args.clients)],
               "long": [PROMPT[i % len(PROMPT)] for i in range(args.prompt_tokens)]}
    results: list[dict] = []
    started = time.monotonic()
    for hosts in args.hosts:
        spans = [f"{a}:{b}" for a, b in plan_partition(config.num_hidden_layers, hosts,
                                                       head_cost=head_cost_in_layers(config, None))]
        with tempfile.TemporaryDirectory() as scratch, \
                shaped_deployment("mhb", SUBNET, model_dir, spans, Path(scratch)) as deployment:
            tls = deployment.client_tls()
            for rtt in args.rtt_ms:
                stages = deployment.direct() if rtt == 0 else deployment.through_relays(rtt / 2)
                for codec in args.codecs:
                    with deployment.coordinator(stages, "--compression", codec, *args.coordinator_flags) as (
                            address, _):
                        for rate in args.rates:
                            deployment.shape(rate)
                            figures = measure(address, tls, unsplit, args, prompts)
                            results.append({"hosts": hosts, "spans": spans, "rtt_ms": rtt, "rate": rate,
                                            "codec": codec, **figures})
                            log(f"{hosts} hosts, RTT {rtt:g} ms, {rate}, {codec}: " + ", ".join(
                                f"{name} {v['pipeline']} ({v['vs_unsplit']}x unsplit)" for name, v in figures.items()))
            deployment.shape(None)
    found = checks(results, args.rates)
    plotted = plot(results, args.rates, args.clients, args.plot)
    report = {"model": args.model, "coordinator_flags": args.coordinator_flags, "rounds": args.rounds,
              "new_tokens": args.new_tokens, "clients": args.clients, "prompt_tokens": args.prompt_tokens,
              "seconds": round(time.monotonic() - started),
              "plot": str(args.plot) if plotted else None, "results": results, "checks": found}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"checks": found, "out": str(args.out), "plot": report["plot"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
