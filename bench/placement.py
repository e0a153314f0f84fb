"""Placement on two unequal hosts: the planned split against the even split, in one run.

Two "hosts" on this machine: the fast one is core 0, the slow one core 1 inside a cgroup whose
CPU quota leaves it about half that core (cpu_throttle.py). Each host is probed as it would be
deployed (`stage-server --probe` pinned to its core, the slow one inside the cgroup; three
probes per host, alternated, the one with the median time per layer kept), `coordinator plan
--probe fast=... slow=...` splits SmolLM2-135M for them, and single-request decode tokens/s of
the planned split is measured against the even split (15:15) and against `launch-local`'s
default (equal speeds, the LM head balanced), each stage on its host, in alternated rounds.
The slow host holds the last span (and the LM head) in every split. Prints the ratios and writes
JSON:

    python bench/placement.py [--share 0.5] [--period-us 10000] [--rounds 9] [--out bench/results/placement.json]

Needs root (a cgroup) and two cores. Everything it starts runs at niceness --nice (default -15;
its session's autogroup too, restored at the end), so that other work on a shared machine takes
little of either host's core: otherwise the
quota never binds (a stage that other processes leave a quarter of its core is as slow on
either host) and the hosts' speeds are the machine's load, not the throttle's.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Stages start with a preexec_fn (into their cgroup) while this process's gRPC threads run: without
# this, grpcio's fork handlers can abort a forked child before it runs (tests/conftest.py says more).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from chat_prompts import CHAT_QUESTIONS  # noqa: E402
from cpu_throttle import CpuThrottle  # noqa: E402
from interleaved_rounds import interleaved, quartiles  # noqa: E402
from local_pipeline import log, pipeline, stage_pids, stream_decode_tokens_per_s  # noqa: E402

from coordinator.planner import plan_partition  # noqa: E402
from coordinator.split_costs import head_cost_in_layers  # noqa: E402
from coordinator.text import Tokenization  # noqa: E402
from protos.model_files.fetch import ensure_model  # noqa: E402

FAST_CORE, SLOW_CORE = "0", "1"
PROBES_PER_HOST = 3
AUTOGROUP = Path("/proc/self/autogroup")


def probe(model_dir: Path, dtype: str, core: str, throttle: CpuThrottle | None) -> dict:
    """One `stage-server --probe` line, run on `core` (inside `throttle`'s cgroup when given)."""
    command = ["taskset", "-c", core, sys.executable, "-m", "stage_server.cli", "--probe", "--model", str(model_dir),
               "--dtype", dtype, "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=throttle.enter if throttle else None)
    if done.returncode != 0:
        raise RuntimeError(f"stage-server --probe failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def raise_priority(nice: int) -> str | None:
    """Run this process, and everything it starts later, at niceness `nice`; with the kernel's
    autogroups (where niceness weighs only within a session's group) this session's group too.
    Returns the group's niceness before, to restore, or None when there are no autogroups."""
    os.nice(nice - os.nice(0))
    try:
        before = AUTOGROUP.read_text().split("nice")[-1].strip()
        AUTOGROUP.write_text(str(nice))
    except OSError:
        return None
    return before


def median_probe(lines: list[dict]) -> dict:
    """The probe whose time per layer is the median of `lines` (a noisy machine strays both ways)."""
    return sorted(lines, key=lambda line: line["decode_layer_s"])[len(lines) // 2]


def plan(probe_files: dict[str, Path]) -> dict:
    command = [sys.executable, "-m", "coordinator.cli", "plan", "--format", "json", "--insecure",
               "--probe", *(f"{host}={path}" for host, path in probe_files.items())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"coordinator plan failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    from transformers import AutoConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--share", type=float, default=0.5, help="CPUs' worth of time the slow host gets (default 0.5)")
    parser.add_argument("--period-us", type=int, default=10000, help="the quota's period in µs (default 10000)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--nice", type=int, default=-15,
                        help="niceness of this process and everything it starts (default -15; 0 = as started)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/placement.json"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two cores: one per host")
    group_nice = raise_priority(args.nice) if args.nice else None
    model_dir = ensure_model(args.model)
    tokenization = Tokenization.from_model_dir(model_dir)
    prompt = tokenization.encode_chat([{"role": "user", "content": CHAT_QUESTIONS[0]}])
    # The slow host's group claims its core as strongly as a process at --nice would (1.25x a step).
    throttle = CpuThrottle(f"layerline-placement-{os.getpid()}", args.share, args.period_us,
                           weight=1.25 ** -args.nice)
    result: dict = {"model": args.model, "dtype": args.dtype, "share": args.share, "period_us": args.period_us,
                    "nice": os.nice(0),
                    "rounds": args.rounds, "decode_tokens": args.decode_tokens, "load_average_start": os.getloadavg()}
    try:
        log(f"probing: fast host = core {FAST_CORE}, slow host = core {SLOW_CORE} at {args.share} CPU "
            f"(quota per {args.period_us} µs)")
        lines: dict[str, list[dict]] = {"fast": [], "slow": []}
        for _ in range(PROBES_PER_HOST):
            lines["fast"].append(probe(model_dir, args.dtype, FAST_CORE, None))
            lines["slow"].append(probe(model_dir, args.dtype, SLOW_CORE, throttle))
        probes = {host: median_probe(found) for host, found in lines.items()}
        for host, found in lines.items():
            figures = ", ".join(f"{line['decode_layer_s'] * 1e3:.3f}" for line in found)
            log(f"  {host}: {figures} ms per layer")
        with tempfile.TemporaryDirectory() as folder:
            files = {host: Path(folder) / f"{host}.json" for host in probes}
            for host, path in files.items():
                path.write_text(json.dumps(probes[host]))
            planned = plan(files)
        layers = probes["fast"]["num_layers"]
        head = head_cost_in_layers(AutoConfig.from_pretrained(model_dir))
        splits = {"planned": [(s["start"], s["end"]) for s in planned["stages"]],
                  "even": plan_partition(layers, 2), "default": plan_partition(layers, 2, head_cost=head)}
        if len(splits["planned"]) != 2:
            raise RuntimeError(f"the plan left a host out: {planned['stages']}")
        log(f"  plan: {splits['planned']} (even {splits['even']}, default {splits['default']}); "
            f"slowest stage {planned['slowest_stage_s'] * 1e3:.2f} ms/token, even split's "
            f"{planned['even_split_slowest_stage_s'] * 1e3:.2f}")
        result.update(probes=lines, probe_used=probes, plan=planned, splits=splits)
        samples = measure(model_dir, args, splits, prompt, throttle)
    finally:
        throttle.remove()
        if group_nice is not None:
            AUTOGROUP.write_text(group_nice)
    ratios = {name: [a / b for a, b in zip(samples[name], samples["even"], strict=True)]
              for name in ("planned", "default")}
    result.update(samples_tokens_per_s=samples, load_average_end=os.getloadavg(),
                  tokens_per_s={name: statistics.median(values) for name, values in samples.items()},
                  ratio_planned_to_even=statistics.median(ratios["planned"]),
                  ratio_planned_to_even_quartiles=quartiles(ratios["planned"]),
                  ratio_default_to_even=statistics.median(ratios["default"]),
                  ratio_planned_to_default=statistics.median(
                      [a / b for a, b in zip(samples["planned"], samples["default"], strict=True)]))
    rates, spread = result["tokens_per_s"], result["ratio_planned_to_even_quartiles"]
    log(f"decode: planned {rates['planned']:.2f} tok/s, even {rates['even']:.2f}, default {rates['default']:.2f} → "
        f"planned/even {result['ratio_planned_to_even']:.3f} (quartiles {spread[0]:.3f}..{spread[1]:.3f}), "
        f"planned/default {result['ratio_planned_to_default']:.3f} (median of {args.rounds} alternated rounds)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({key: result[key] for key in ("splits", "tokens_per_s", "ratio_planned_to_even",
                                                   "ratio_planned_to_default")}, indent=2))


def measure(model_dir: Path, args, splits: dict, prompt: list[int], throttle: CpuThrottle) -> dict[str, list[float]]:
    """Decode tokens/s of each split, its first stage on the fast host and its last on the slow one,
    in alternated rounds; all pipelines stay up so that every round sees the same machine."""
    with pipeline(model_dir, 2, args.dtype, ranges=splits["planned"], cpu_sets=[FAST_CORE, SLOW_CORE]) as planned, \
            pipeline(model_dir, 2, args.dtype, ranges=splits["even"], cpu_sets=[FAST_CORE, SLOW_CORE]) as even, \
            pipeline(model_dir, 2, args.dtype, ranges=splits["default"], cpu_sets=[FAST_CORE, SLOW_CORE]) as default:
        addresses = {"planned": planned, "even": even, "default": default}
        for address in addresses.values():
            throttle.add(stage_pids(address)[1])
            stream_decode_tokens_per_s(address, prompt, 8)  # warm up
        time.sleep(1.0)
        return interleaved({name: (lambda a=address: stream_decode_tokens_per_s(a, prompt, args.decode_tokens))
                            for name, address in addresses.items()}, args.rounds)


if __name__ == "__main__":
    main()
