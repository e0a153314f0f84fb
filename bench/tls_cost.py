"""What mutual TLS on the hops costs a decode: one greedy request's streamed tokens/s, stages on hosts.

Two stages on two network namespaces (tests/netns_hosts.py; needs root), twice over: one pair with
certificates from `coordinator certs` (--tls-*), one plaintext (--insecure), the same layers of the
same model. One coordinator per pair, in this namespace, dials its stages over the bridge (mTLS or
plaintext); its public API is plaintext on loopback for both, so that only the hops differ. With
stages off loopback, greedy steps chain stage to stage and answers come back on the Results stream:
every hop of a decode step is a TLS hop. Rounds alternate (interleaved_rounds.py) and the medians
are reported, with the median of each round's mTLS ÷ plaintext ratio, and the CPU time the
pipeline's processes (both stages and the coordinator) spent per generated token (prefill
included), a figure the machine's other load disturbs less than the rate. First, the cost of one
hop alone: round trips of a decode step's hidden state (SmolLM2-135M: 576 float32, 2.3 KB) over
a bidi stream on loopback, mTLS and plaintext in alternated blocks.

    sudo .venv/bin/python bench/tls_cost.py [--model smollm2-135m] [--rounds 8] [--new-tokens 64]
                                            [--hop-trips 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import protos.grpc_transport  # noqa: E402, F401  (before grpc: the TCP path layerline's processes take)

# isort: split

from interleaved_rounds import interleaved, quartiles  # noqa: E402
from local_pipeline import free_port, log, stream_decode_tokens_per_s  # noqa: E402
from netns_hosts import ServerProcess, namespace_hosts, netns_available  # noqa: E402

from protos.model_files.resolve import resolve_model  # noqa: E402

SUBNET = "10.241.0"
TLS_PORT, PLAIN_PORT = 50631, 50632
PROMPT = [1, 504, 3458, 314, 260, 1345, 282, 253, 1167, 30, 657, 3123, 314, 260, 1345, 282]


def _flags(certs: Path, name: str) -> list[str]:
    return ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}-key.pem"),
            "--tls-ca", str(certs / "ca.pem")]


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


def hop_round_trips(certs: Path, host: str, trips: int) -> dict[str, float]:
    """Median µs of a 2.3 KB round trip over an echo bidi stream, per mode, over 10 alternated blocks."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from protos.channel_options import bind, server_options
    from protos.tls import TlsFiles, open_channel, server_credentials

    method, same = "/layerline.bench.Echo/Echo", (lambda data: data)
    handler = grpc.method_handlers_generic_handler("layerline.bench.Echo", {
        "Echo": grpc.stream_stream_rpc_method_handler(lambda requests, _: iter(requests), same, same)})
    server_tls = TlsFiles.read(ca=str(certs / "ca.pem"), cert=str(certs / f"{host}.pem"),
                               key=str(certs / f"{host}-key.pem"))  # it names 127.0.0.1 too
    client_tls = TlsFiles.read(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"),
                               key=str(certs / "client-key.pem"))
    streams, servers = {}, []
    for mode, tls in (("mtls", server_tls), ("plaintext", None)):
        server = grpc.server(ThreadPoolExecutor(4), options=server_options(), handlers=(handler,))
        port = bind(server, "127.0.0.1", 0, server_credentials(tls) if tls else None)
        server.start()
        servers.append(server)
        outbox: queue.Queue = queue.Queue()
        channel = open_channel(f"127.0.0.1:{port}", client_tls if tls else None)
        replies = channel.stream_stream(method, request_serializer=same, response_deserializer=same)(
            iter(outbox.get, None))
        streams[mode] = (outbox, replies, channel)
    payload, blocks = os.urandom(576 * 4), {mode: [] for mode in streams}
    for index in range(11):  # the first warms up
        for mode in (streams if index % 2 else reversed(list(streams))):
            outbox, replies, _ = streams[mode]
            started = time.perf_counter()
            for _ in range(trips // 10):
                outbox.put(payload)
                next(replies)
            if index:
                blocks[mode].append((time.perf_counter() - started) / (trips // 10) * 1e6)
    for outbox, _, channel in streams.values():
        outbox.put(None)
        channel.close()
    for server in servers:
        server.stop(None)
    return {mode: round(statistics.median(values), 1) for mode, values in blocks.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--hop-trips", type=int, default=2000, help="round trips of the one-hop part (0: skip it)")
    args = parser.parse_args()
    if netns_available():
        raise SystemExit(f"tls_cost: {netns_available()}")
    model_dir = resolve_model(args.model)
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    halves = (f"0:{layers // 2}", f"{layers // 2}:{layers}")
    processes: list[ServerProcess] = []
    with tempfile.TemporaryDirectory() as scratch, namespace_hosts("tls-b", SUBNET, 2) as hosts:
        certs = Path(scratch) / "certs"
        subprocess.run([sys.executable, "-m", "coordinator.cli", "certs", "--out", str(certs), "--hosts",
                        ",".join(h.address for h in hosts)], check=True, capture_output=True, timeout=60)
        hop_us = hop_round_trips(certs, hosts[0].address, args.hop_trips) if args.hop_trips else {}
        log(f"one hop, 2.3 KB round trip: {hop_us} µs")
        try:
            for host, span in zip(hosts, halves):
                # Fixed thread counts: a count each stage times at start would differ between the pairs
                # with the machine's noise at that moment, not with TLS.
                common = ["--model", str(model_dir), "--layers", span, "--host", host.address, "--quiet",
                          "--dtype", args.dtype, "--threads", "1", "--head-threads", "1"]
                processes.append(ServerProcess(host.namespace, "stage_server.cli", *common, "--port", str(TLS_PORT),
                                               *_flags(certs, host.address), ready="stage-server ready").start())
                # plaintext from another host cannot tell a stage its deployment: --peers names it
                plain_peers = ",".join(f"{h.address}:{PLAIN_PORT}" for h in hosts)
                processes.append(ServerProcess(host.namespace, "stage_server.cli", *common, "--port",
                                               str(PLAIN_PORT), "--insecure", "--peers", plain_peers,
                                               ready="stage-server ready").start())
            for process in processes:
                process.wait_ready(600)
            apis, pids = {}, {"mtls": [p.process.pid for p in processes[0::2]],
                                "plaintext": [p.process.pid for p in processes[1::2]]}
            for mode, port, extra in (("mtls", TLS_PORT, _flags(certs, "client")), ("plaintext", PLAIN_PORT, [])):
                api_port = free_port()
                stages = ",".join(f"{h.address}:{port}" for h in hosts)
                processes.append(ServerProcess(None, "coordinator.cli", "serve", "--stages", stages, "--model",
                                               str(model_dir), "--port", str(api_port), *extra,
                                               ready="coordinator serving").start())
                processes[-1].wait_ready(300)
                apis[mode] = f"127.0.0.1:{api_port}"
                pids[mode].append(processes[-1].process.pid)
            cpu_ms: dict[str, list[float]] = {mode: [] for mode in apis}

            def measure(mode: str) -> float:
                before = _cpu_seconds(pids[mode])
                rate = stream_decode_tokens_per_s(apis[mode], PROMPT, args.new_tokens)
                cpu_ms[mode].append((_cpu_seconds(pids[mode]) - before) * 1000 / args.new_tokens)
                return rate

            measures = {mode: (lambda m=mode: measure(m)) for mode in apis}
            for warm in measures.values():  # warm both pipelines (first steps allocate)
                warm()
            for figures in cpu_ms.values():
                figures.clear()
            log(f"{args.rounds} alternated rounds of one greedy request, {args.new_tokens} new tokens")
            samples = interleaved(measures, args.rounds)
        finally:
            for process in processes:
                process.stop()
    ratios = [a / b for a, b in zip(samples["mtls"], samples["plaintext"], strict=True)]
    result = {"model": args.model, "rounds": args.rounds, "new_tokens": args.new_tokens, "hop_round_trip_us": hop_us,
              "mtls_tokens_per_s": round(statistics.median(samples["mtls"]), 2),
              "plaintext_tokens_per_s": round(statistics.median(samples["plaintext"]), 2),
              "ratio_median": round(statistics.median(ratios), 3),
              "ratio_quartiles": [round(q, 3) for q in quartiles(ratios)],
              "cpu_ms_per_token": {mode: round(statistics.median(v), 2) for mode, v in cpu_ms.items()},
              "samples": {k: [round(v, 2) for v in vs] for k, vs in samples.items()}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
