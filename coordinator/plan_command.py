"""`coordinator plan`: spans for hosts from their `stage-server --probe` lines, and the commands to run.

Owns: the subcommand's flags, reading probe files (`FILE` or `HOST=FILE`), and printing a plan:
as text (a summary, then the `stage-server` command for each host and the `coordinator serve`
line, with the certificates `coordinator certs` writes) or as JSON (the same, plus per stage the
bytes a container needs, for manifests). Does not own: the plan itself (placement) or measuring
(stage_server/probe.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from coordinator.placement import SPEEDS, HostProbe, Span, place, stage_seconds
from coordinator.planner import PlanError, plan_partition

DEFAULT_CACHE_MB = 2048  # stage-server --max-cache-mb's default
DEFAULT_RESERVE_MB = 768  # a stage process's own memory beside its weights and cache: Python, torch, gRPC
MAX_PROBE_BYTES = 1 << 20


def add_plan_command(commands) -> None:
    """The `plan` subcommand on the coordinator's subparsers."""
    plan = commands.add_parser("plan", help="split a model over hosts by their measured speed and memory "
                                            "(stage-server --probe) and print the commands to run")
    plan.add_argument("--probe", required=True, nargs="+", metavar="[HOST=]FILE",
                      help="each host's stage-server --probe line, in pipeline order (the last host also runs the "
                           "LM head); HOST= names the host as the stages and coordinator dial it (default: the "
                           "probe's host name)")
    plan.add_argument("--model", help="model directory or known name in the printed commands (default: the probe's)")
    plan.add_argument("--cache-mb", type=_mebibytes, default=DEFAULT_CACHE_MB,
                      help=f"KV-cache budget of each stage in MiB, counted against its host's memory and passed as "
                           f"--max-cache-mb (default {DEFAULT_CACHE_MB})")
    plan.add_argument("--reserve-mb", type=_mebibytes, default=DEFAULT_RESERVE_MB,
                      help=f"memory a stage process needs beside its weights and cache, in MiB "
                           f"(default {DEFAULT_RESERVE_MB})")
    plan.add_argument("--speed", choices=SPEEDS, default="decode",
                      help="which time per token to balance: decode (one row, default) or prefill")
    plan.add_argument("--port", type=int, default=50051,
                      help="the stages' port in the printed commands (default 50051)")
    plan.add_argument("--certs", default="certs", metavar="DIR",
                      help="directory of coordinator certs' files in the printed commands (default certs)")
    plan.add_argument("--insecure", action="store_true", help="print plaintext commands instead of mutual TLS")
    plan.add_argument("--format", choices=["text", "json"], default="text",
                      help="text (default): a summary and the commands; json: the plan as one JSON object")


def _mebibytes(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB >= 0, got {text!r}")
    return int(text)


def read_probe(spec: str) -> HostProbe:
    """`FILE` or `HOST=FILE` as a HostProbe; PlanError when the file cannot be read or is no probe."""
    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    try:
        with Path(path).open("rb") as file:
            text = file.read(MAX_PROBE_BYTES + 1)
    except OSError as err:
        raise PlanError(f"cannot read probe {path!r}: {err.strerror or err}; make it with "
                        "`stage-server --probe --model M > FILE` on the host") from None
    if len(text) > MAX_PROBE_BYTES:
        raise PlanError(f"{path} is larger than a probe line ({MAX_PROBE_BYTES} bytes at most)")
    try:
        lines = [line for line in text.decode().splitlines() if line.strip()]
        data = json.loads(lines[-1])
    except (UnicodeDecodeError, ValueError, IndexError):
        raise PlanError(f"{path} holds no probe line (one JSON object, as stage-server --probe prints it)") from None
    return HostProbe.from_json(data, name)


def _tls(args, host: str) -> list[str]:
    if args.insecure:
        return ["--insecure"]
    certs = Path(args.certs)
    return ["--tls-cert", str(certs / f"{host}.pem"), "--tls-key", str(certs / f"{host}-key.pem"),
            "--tls-ca", str(certs / "ca.pem")]


def _unused(args, host: HostProbe) -> str:
    """Why a host got no layers."""
    smallest = host.layer_bytes + ((args.cache_mb + args.reserve_mb) << 20)
    if host.free_bytes < smallest:
        return (f"too small: {host.free_bytes / 2**30:.2f} GiB free, one layer with its cache and reserve needs "
                f"{smallest / 2**30:.2f}")
    return "giving it layers would not shorten the slowest stage"


def plan_as_dict(args, hosts: list[HostProbe], spans: list[Span]) -> dict:
    """The plan with its commands, as `--format json` prints it."""
    model = args.model or hosts[0].model
    used = [s for s in spans if s.layers]
    stages = []
    for span in used:
        command = ["stage-server", "--model", model, "--layers", f"{span.start}:{span.end}", "--dtype", span.host.dtype
                   or "auto", "--host", "0.0.0.0", "--port", str(args.port), "--max-cache-mb", str(args.cache_mb),
                   *_tls(args, span.host.name)]
        stages.append({"host": span.host.name, "layers": f"{span.start}:{span.end}", "start": span.start,
                       "end": span.end, "seconds_per_token": span.seconds, "memory_bytes": span.memory_bytes,
                       "memory_request_mib": -(-span.memory_bytes // 2**20), "free_bytes": span.host.free_bytes,
                       "command": command})
    addresses = ",".join(f"{s.host.name}:{args.port}" for s in used)
    coordinator = ["coordinator", "serve", "--stages", addresses, "--model", model,
                   *(["--insecure"] if args.insecure else _tls(args, "client"))]
    slowest = max(s.seconds for s in used)
    plan = {"model": model, "dtype": hosts[0].dtype, "num_layers": hosts[0].num_layers, "speed": args.speed,
            "stages": stages, "unused_hosts": [{"host": s.host.name, "reason": _unused(args, s.host)}
                                               for s in spans if not s.layers], "coordinator": coordinator,
            "slowest_stage_s": slowest, "tokens_per_s_bound": 1.0 / slowest}
    if len(hosts) <= hosts[0].num_layers:  # the same hosts split evenly, memory aside, to compare
        even = plan_partition(hosts[0].num_layers, len(hosts))
        plan["even_split_slowest_stage_s"] = max(stage_seconds(h, a, b, args.speed)
                                                 for h, (a, b) in zip(hosts, even, strict=True))
    return plan


def render_text(plan: dict, args) -> str:
    lines = [f"# {plan['model']} ({plan['dtype']}, {plan['num_layers']} layers) over {len(plan['stages'])} host(s), "
             f"balanced for {plan['speed']}"]
    for stage in plan["stages"]:
        lines.append(f"#   {stage['host']}: layers {stage['layers']}, {stage['seconds_per_token'] * 1e3:.2f} ms/token, "
                     f"needs {stage['memory_bytes'] / 2**30:.2f} GiB of {stage['free_bytes'] / 2**30:.2f} GiB free")
    for unused in plan["unused_hosts"]:
        lines.append(f"#   {unused['host']}: no layers ({unused['reason']})")
    summary = f"# slowest stage {plan['slowest_stage_s'] * 1e3:.2f} ms/token"
    if "even_split_slowest_stage_s" in plan:
        summary += f" (an even split: {plan['even_split_slowest_stage_s'] * 1e3:.2f} ms/token)"
    lines.append(summary)
    if not args.insecure:
        hosts = ",".join(s["host"] for s in plan["stages"])
        lines.append(f"# certificates: coordinator certs --out {shlex.quote(args.certs)} --hosts {hosts}")
    for stage in plan["stages"]:
        lines += [f"# on {stage['host']}:", shlex.join(stage["command"])]
    lines += ["# the coordinator (its API on its own machine only: add --host ADDRESS, --api-tls-cert and "
              "--api-tls-key for clients elsewhere, docs/deploy.md):", shlex.join(plan["coordinator"])]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise PlanError(f"--port must be a TCP port (1-65535), not {args.port}")
    hosts = [read_probe(spec) for spec in args.probe]
    spans = place(hosts, cache_bytes=args.cache_mb << 20, reserve_bytes=args.reserve_mb << 20, speed=args.speed)
    plan = plan_as_dict(args, hosts, spans)
    print(json.dumps(plan) if args.format == "json" else render_text(plan, args))
    return 0
