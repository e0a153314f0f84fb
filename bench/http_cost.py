"""What the OpenAI-compatible HTTP face costs: tokens/s of concurrent clients through it and through
the gRPC API of the same coordinator, in the same run.

One pipeline of real processes (stages and a `coordinator serve --http-port`, as deployed); each
round sends the same requests (token-id prompts, `ignore_eos`, a fixed number of new tokens) from
`--clients` concurrent clients once per API and mode: gRPC `GenerateStream` against HTTP
`/v1/completions` with `stream: true` (server-sent events), and gRPC `Generate` against the unstreamed
HTTP answer. Rounds alternate the order (interleaved_rounds.py); it reports each measure's median
and the median over rounds of HTTP ÷ gRPC, per mode, the coordinator process's CPU time per token
under each API (a figure the machine's other load disturbs less than the rate), and checks that
both APIs gave the same text.

    python bench/http_cost.py [--model smollm2-135m] [--stages 2] [--clients 16] [--new-tokens 64]
                              [--rounds 5] [--out bench/results/http_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protos.grpc_transport  # noqa: E402, F401  (before grpc: the TCP path layerline's processes take)

# isort: split

import httpx2 as httpx  # noqa: E402
from interleaved_rounds import interleaved, quartiles  # noqa: E402
from local_pipeline import cpu_seconds, free_port, log, pipeline  # noqa: E402

from coordinator.client import AsyncCoordinatorClient, CoordinatorClient  # noqa: E402
from protos.model_files.resolve import resolve_model  # noqa: E402

BASE_PROMPT = [1, 504, 3458, 314, 260, 1345, 282, 253, 1167, 30, 657, 3123, 314, 260, 1345, 282]
TIMEOUT_S = 600.0


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _prefills(address: str) -> int:
    with CoordinatorClient(address) as client:
        return client.model_info().batching.prefills


def prompts(clients: int, vocab: int) -> list[list[int]]:
    """One prompt per client, each a little different, all inside the vocabulary."""
    return [[(token + 7 * i) % vocab for token in BASE_PROMPT] for i in range(clients)]


async def grpc_clients(address: str, batch: list[list[int]], new_tokens: int, stream: bool) -> tuple[list[str], float]:
    async with AsyncCoordinatorClient(address, timeout_s=TIMEOUT_S) as client:
        async def one(prompt: list[int]) -> tuple[str, int]:
            if not stream:
                reply = await client.generate(token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)
                return reply.text, len(reply.token_ids)
            text, count = [], 0
            async for message in client.generate_stream(token_ids=prompt, max_new_tokens=new_tokens,
                                                        ignore_eos=True):
                text.append(message.text)
                count += len(message.token_ids)
            return "".join(text), count

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in batch))
        seconds = time.perf_counter() - started
    return [a[0] for a in answers], sum(a[1] for a in answers) / seconds


async def http_clients(url: str, batch: list[list[int]], new_tokens: int, stream: bool) -> tuple[list[str], float]:
    limits = httpx.Limits(max_connections=len(batch), max_keepalive_connections=len(batch))
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as client:
        async def one(prompt: list[int]) -> tuple[str, int]:
            body = {"prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True}
            if not stream:
                reply = (await client.post("/v1/completions", json=body)).raise_for_status().json()
                return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]
            body.update(stream=True, stream_options={"include_usage": True})
            text, count = [], 0
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", ()):
                        text.append(choice["text"])
            return "".join(text), count

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in batch))
        seconds = time.perf_counter() - started
    return [a[0] for a in answers], sum(a[1] for a in answers) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model directory or known name")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="stream,unary", help="stream, unary, or both (comma separated)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http_cost.json")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.clients < 1 or args.rounds < 1 or args.new_tokens < 1 or set(modes) - {"stream", "unary"} or not modes:
        parser.error("--clients, --rounds and --new-tokens must be at least 1; --modes: stream, unary")
    from transformers import AutoConfig

    model_dir = resolve_model(args.model)
    batch = prompts(args.clients, AutoConfig.from_pretrained(model_dir).vocab_size)
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    texts: dict[str, list[str]] = {}
    cpu_ms: dict[str, list[float]] = {}  # the coordinator process's CPU time per generated token
    client_cpu_ms: dict[str, list[float]] = {}  # this process's (the clients') CPU time per generated token
    with pipeline(Path(model_dir), args.stages, "auto", coordinator_args=("--http-port", str(http_port))) as address:
        def measure(api: str, mode: str):
            def run() -> float:
                call = grpc_clients(address, batch, args.new_tokens, mode == "stream") if api == "grpc" else \
                    http_clients(url, batch, args.new_tokens, mode == "stream")
                before, client_before, prefills_before = cpu_seconds(address)[0], _own_cpu_s(), _prefills(address)
                answers, rate = asyncio.run(call)
                tokens = args.clients * args.new_tokens
                per_token = 1000 * (cpu_seconds(address)[0] - before) / tokens
                client_ms = 1000 * (_own_cpu_s() - client_before) / tokens
                prefills = _prefills(address) - prefills_before
                texts.setdefault(f"{api}-{mode}", answers)
                cpu_ms.setdefault(f"{api}-{mode}", []).append(per_token)
                client_cpu_ms.setdefault(f"{api}-{mode}", []).append(client_ms)
                log(f"{api:4} {mode:6} {rate:8.1f} tokens/s, CPU a token: coordinator {per_token:.2f} ms, "
                    f"clients {client_ms:.2f} ms; {prefills} prefills")
                return rate
            return run

        log(f"warming up ({args.clients} clients, {args.new_tokens} tokens each)")
        measure("grpc", "unary")()
        measure("http", "unary")()
        texts.clear()
        cpu_ms.clear()
        client_cpu_ms.clear()
        samples = interleaved({f"{api}-{mode}": measure(api, mode) for mode in modes for api in ("grpc", "http")},
                              args.rounds)
    report = {"model": args.model, "stages": args.stages, "clients": args.clients, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "command": " ".join(["python", *sys.argv]), "modes": {}}
    for mode in modes:
        grpc_rates, http_rates = samples[f"grpc-{mode}"], samples[f"http-{mode}"]
        ratios = [h / g for h, g in zip(http_rates, grpc_rates, strict=True)]
        same = texts[f"grpc-{mode}"] == texts[f"http-{mode}"]
        report["modes"][mode] = {
            "grpc_tokens_per_s": grpc_rates, "http_tokens_per_s": http_rates,
            "grpc_median": statistics.median(grpc_rates), "http_median": statistics.median(http_rates),
            "http_over_grpc_median": statistics.median(ratios), "http_over_grpc_quartiles": quartiles(ratios),
            "same_text": same, "coordinator_cpu_ms_per_token": {
                "grpc": statistics.median(cpu_ms[f"grpc-{mode}"]), "http": statistics.median(cpu_ms[f"http-{mode}"])},
            "client_cpu_ms_per_token": {"grpc": statistics.median(client_cpu_ms[f"grpc-{mode}"]),
                                        "http": statistics.median(client_cpu_ms[f"http-{mode}"])}}
        print(f"{mode}: HTTP/gRPC tokens/s = {statistics.median(ratios):.3f} (median of {args.rounds} rounds; "
              f"quartiles {quartiles(ratios)[0]:.3f}-{quartiles(ratios)[1]:.3f}); gRPC "
              f"{statistics.median(grpc_rates):.1f}, HTTP {statistics.median(http_rates):.1f} tokens/s; "
              f"same text: {same}; coordinator CPU a token: gRPC {statistics.median(cpu_ms[f'grpc-{mode}']):.2f} ms, "
              f"HTTP {statistics.median(cpu_ms[f'http-{mode}']):.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
