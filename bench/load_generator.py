"""A bounded gRPC load generator for layerline, for where ghz is not at hand.

Sends a fixed number of Generate (or GenerateStream) requests at a fixed concurrency,
stops at the request count or the time bound, whichever comes first, and prints
requests/s, generated tokens/s, latency percentiles (time to first token too, when
streaming) and errors by status code.

    python bench/load_generator.py --address 127.0.0.1:50050 --requests 200 --concurrency 16 \
        [--stream] [--max-new-tokens 16] [--time-limit 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.client import build_request  # noqa: E402
from protos import coordinator_pb2_grpc  # noqa: E402
from protos.channel_options import channel_options  # noqa: E402

PROMPTS = ["Write one sentence about the sea.", "Name a colour.", "What is 2 + 2?", "Say hello in French.",
           "Give me a word that rhymes with cat.", "What is the capital of Italy?", "Describe a cloud.",
           "Name a fruit."]


@dataclass
class LoadResult:
    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]

    def summary(self) -> dict:
        ok = len(self.latencies_s)
        return {
            "requests": self.sent, "ok": ok, "errors": dict(self.errors), "seconds": round(self.elapsed_s, 3),
            "requests_per_s": round(ok / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "tokens_per_s": round(self.tokens / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "latency_ms": {f"p{q}": round(1000 * self.percentile(self.latencies_s, q), 1) for q in (50, 95, 99)},
            "mean_latency_ms": round(1000 * statistics.fmean(self.latencies_s), 1) if ok else None,
            "time_to_first_token_ms": ({f"p{q}": round(1000 * self.percentile(self.first_token_s, q), 1)
                                        for q in (50, 95, 99)} if self.first_token_s else None),
        }


async def run_load(address: str, *, requests: int, concurrency: int, max_new_tokens: int, stream: bool,
                   time_limit_s: float, request_timeout_s: float = 300.0) -> LoadResult:
    """Run the load and return what was measured. Never sends more than `requests` requests."""
    result = LoadResult()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    started = time.perf_counter()
    deadline = started + time_limit_s
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                request = build_request(prompt=PROMPTS[index % len(PROMPTS)], max_new_tokens=max_new_tokens)
                result.sent += 1
                t0 = time.perf_counter()
                timeout = max(0.1, min(request_timeout_s, deadline - t0))
                try:
                    if stream:
                        first = None
                        async for message in stub.GenerateStream(request, timeout=timeout):
                            if message.token_ids and first is None:
                                first = time.perf_counter() - t0
                            result.tokens += len(message.token_ids)
                        if first is not None:
                            result.first_token_s.append(first)
                    else:
                        reply = await stub.Generate(request, timeout=timeout)
                        result.tokens += len(reply.token_ids)
                    result.latencies_s.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as err:
                    result.errors[err.code().name] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50050")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="use GenerateStream (measures time to first token)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    result = asyncio.run(run_load(args.address, requests=args.requests, concurrency=args.concurrency,
                                  max_new_tokens=args.max_new_tokens, stream=args.stream,
                                  time_limit_s=args.time_limit))
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    sys.exit(1 if result.errors else 0)


if __name__ == "__main__":
    main()
