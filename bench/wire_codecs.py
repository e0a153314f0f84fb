"""Wire codecs on the real model: how often compressed activations change the answer, and what they cost.

Runs SmolLM2-135M-Instruct as a 3-stage pipeline of real stage servers on loopback
(cuts after layers 10 and 20), once per codec, over 20 chat prompts x 32 greedy
tokens, and compares every continuation with the uncompressed pipeline's. Bytes per
hidden element are the bytes the stages actually sent each other (reported by the
stages in every answer) divided by the hidden-state elements they carried.

    python bench/wire_codecs.py [--prompts 20] [--new-tokens 32] [--json bench/results/wire_codecs.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.engine import Engine, SequenceRequest  # noqa: E402
from coordinator.pipeline_client import PipelineClient  # noqa: E402
from coordinator.planner import plan_partition  # noqa: E402
from coordinator.text import Tokenization  # noqa: E402
from protos import codec  # noqa: E402
from protos.model_files.fetch import ensure_model  # noqa: E402
from stage_server.server import StageServer, StageServerConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import CHAT_QUESTIONS  # noqa: E402

PROMPTS = CHAT_QUESTIONS


def run_codec(addresses, name, prompts, tokenization, new_tokens):
    # Answers relayed along the chain: each hop's byte count arrives with the answer itself.
    client = PipelineClient(addresses, wire_codec=codec.codec_from_name(name), direct_results=False)
    client.set_deployment()  # the stages send only to the addresses a coordinator names
    engine = Engine(client, pad_token_id=tokenization.pad_token_id)
    outputs, elements = [], 0
    started = time.perf_counter()
    try:
        for ids in prompts:
            result = engine.generate([SequenceRequest(ids, new_tokens, eos_token_ids=tokenization.eos_token_ids)])[0]
            outputs.append(result.token_ids)
            fed = len(ids) + len(result.token_ids) - 1  # positions that crossed each cut
            elements += fed * (len(addresses) - 1)
    finally:
        client.close()
    return outputs, engine.hop_bytes, elements, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    model_dir = ensure_model("smollm2-135m")
    tokenization = Tokenization.from_model_dir(model_dir)
    prompts = [tokenization.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    servers = []
    for start, end in plan_partition(config.num_hidden_layers, args.stages):
        server = StageServer(StageServerConfig(model_dir=str(model_dir), layer_start=start, layer_end=end, port=0,
                                               progress=False))
        server.start()
        servers.append(server)
    addresses = [f"127.0.0.1:{s.port}" for s in servers]
    print(f"{args.stages} stages {[(s.config.layer_start, s.config.layer_end) for s in servers]}, "
          f"{len(prompts)} chat prompts x {args.new_tokens} greedy tokens", flush=True)
    rows = []
    try:
        baseline, *_ = run_codec(addresses, "none", prompts, tokenization, args.new_tokens)
        for name in codec.CODEC_NAMES:
            outputs, sent, elements, seconds = run_codec(addresses, name, prompts, tokenization, args.new_tokens)
            same = sum(a == b for a, b in zip(outputs, baseline))
            rows.append({"codec": name, "identical": same, "prompts": len(prompts),
                         "bytes_per_element": sent / (elements * config.hidden_size), "seconds": seconds})
            print(f"  {name:5s} {same}/{len(prompts)} identical, "
                  f"{rows[-1]['bytes_per_element']:.3f} bytes/element, {seconds:.1f}s", flush=True)
    finally:
        for server in servers:
            server.stop()

    print("\n| wire codec | continuations identical to uncompressed | bytes per hidden element |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['codec']} | {row['identical']}/{row['prompts']} | {row['bytes_per_element']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": "smollm2-135m", "stages": args.stages, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
