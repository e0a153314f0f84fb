"""One gRPC hop's latency: gRPC's default TCP path against the one layerline's processes choose.

A client process streams a payload to an echo server process over a bidi stream (with
layerline's channel and server options) and waits for each echo before it sends the next: the
round trip of one message each way, as a decode step's hidden state crosses a stage hop. Both
processes of a pair start with the same GRPC_EXPERIMENTS: empty for gRPC's defaults, unset for
layerline's choice (protos/grpc_transport.py). Pairs of the two kinds alternate, round after
round, and the medians are compared: these VMs drift, so only ratios within one run count.

    python bench/hop_latency.py                     # writes bench/results/hop_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Bytes per hop: SmolLM2-135M's hidden state for one decode token in float32 (576 x 4), and
# for a 512-token prompt (the time-to-first-token workload).
PAYLOADS = {"decode step (2.3 KB)": 576 * 4, "512-token prompt (1.2 MB)": 512 * 576 * 4}
METHOD = "/layerline.bench.Echo/Echo"
VARIANTS = {"gRPC default": {"GRPC_EXPERIMENTS": ""}, "layerline": {}}


def _same(data: bytes) -> bytes:
    return data


def serve(port_file: str) -> None:
    """Echo every message of a bidi stream until killed; writes the bound port to port_file."""
    import protos.grpc_transport  # noqa: F401  (before grpc, as in the real processes)

    # isort: split
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from protos.channel_options import server_options

    class Echo(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method != METHOD:
                return None
            return grpc.stream_stream_rpc_method_handler(lambda requests, _: iter(requests), _same, _same)

    server = grpc.server(ThreadPoolExecutor(4), options=server_options())
    server.add_generic_rpc_handlers((Echo(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def measure(trips: int) -> dict[str, object]:
    """Start an echo server process, then time `trips` round trips per payload (µs, medians of 5
    blocks); also says which GRPC_EXPERIMENTS both processes ran with."""
    import protos.grpc_transport  # noqa: F401  (before grpc, as in the real processes)

    # isort: split
    import queue
    import tempfile

    import grpc

    from protos.channel_options import channel_options

    with tempfile.TemporaryDirectory() as scratch:
        port_file = Path(scratch, "port")
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the echo server did not start")
                time.sleep(0.05)
            channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}", options=channel_options())
            outbox: queue.Queue = queue.Queue()
            replies = channel.stream_stream(METHOD, request_serializer=_same, response_deserializer=_same)(
                iter(outbox.get, None))
            result = {}
            for name, size in PAYLOADS.items():
                payload = os.urandom(size)
                count = max(10, trips if size < 1 << 16 else trips // 10)
                blocks = []
                for block in range(6):  # the first warms up
                    started = time.perf_counter()
                    for _ in range(count):
                        outbox.put(payload)
                        if len(next(replies)) != size:
                            raise RuntimeError("the echo came back with a different size")
                    if block:
                        blocks.append((time.perf_counter() - started) / count * 1e6)
                result[name] = statistics.median(blocks)
            outbox.put(None)
            channel.close()
            return {"round_trip_us": result, "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS")}
        finally:
            server.kill()
            server.wait()


def run_pair(variant: str, trips: int) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    env.update(VARIANTS[variant])
    output = subprocess.run([sys.executable, __file__, "--measure", str(trips)], env=env, check=True,
                            capture_output=True, text=True, timeout=600).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds, each one pair of each kind")
    parser.add_argument("--trips", type=int, default=400, help="round trips per block (a tenth for the large payload)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "hop_latency.json")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return None

    import grpc  # only for its version, in this parent process

    samples: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PAYLOADS} for v in VARIANTS}
    experiments: dict[str, object] = {}
    for round_index in range(args.rounds):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            pair = run_pair(variant, args.trips)
            experiments[variant] = pair["grpc_experiments"]
            for payload, micros in pair["round_trip_us"].items():
                samples[variant][payload].append(micros)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{v} {samples[v][p][-1]:.0f} µs" for v in VARIANTS for p in PAYLOADS), flush=True)
    result = {"grpcio": grpc.__version__, "rounds": args.rounds, "trips": args.trips,
              "grpc_experiments": experiments, "payloads": {}}
    print(f"\n{'payload':28s} {'gRPC default':>14s} {'layerline':>12s} {'ratio':>7s}  (median round trip, µs)")
    for payload in PAYLOADS:
        default = statistics.median(samples["gRPC default"][payload])
        ours = statistics.median(samples["layerline"][payload])
        per_round = [o / d for o, d in zip(samples["layerline"][payload], samples["gRPC default"][payload])]
        result["payloads"][payload] = {
            "bytes": PAYLOADS[payload], "grpc_default_us": default, "layerline_us": ours,
            "ratio": ours / default, "ratio_per_round": per_round,
            "samples_us": {v: samples[v][payload] for v in VARIANTS}}
        print(f"{payload:28s} {default:14.0f} {ours:12.0f} {ours / default:7.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return None


if __name__ == "__main__":
    main()
