"""`coordinator`: fetch models, serve a pipeline, launch one locally, generate from the terminal.

Owns: argument parsing and the user-facing flow of each subcommand, including
clean shutdown on Ctrl-C / SIGTERM and error messages that say what to do next.

Does not own: assembling a coordinator (app), starting stage processes (launcher), the
split (planner) or the --chain policy (chain_policy).
"""

from __future__ import annotations

import protos.grpc_transport  # noqa: F401  (first: picks gRPC's TCP path before anything loads gRPC)
from protos import quiet_interrupt  # first too: Ctrl-C while starting prints one line

# isort: split
import argparse
import json
import logging
import signal
import sys
import threading
import time

import grpc

from coordinator import request_log
from coordinator.api_keys import add_api_key_argument, add_api_keys_argument, api_keys_from_args, reload_on_sighup
from coordinator.batch_limits import BatchLimits
from coordinator.certs import CertificateError, add_certs_command, cmd_certs
from coordinator.chain_policy import CHAIN_SETTINGS
from coordinator.client import CoordinatorClient
from coordinator.failover import add_failover_arguments
from coordinator.http_server import add_http_port_argument, http_note, http_port_from_args
from coordinator.info_view import render
from coordinator.launcher import LaunchError, LocalStages, check_ports_free
from coordinator.metrics import add_metrics_arguments, metrics_endpoint
from coordinator.plan_command import add_plan_command, cmd_plan
from coordinator.planner import PlanError, plan_partition
from coordinator.registry import add_join_arguments, join_settings
from coordinator.stage_agreement import PipelineSetupError, add_mixed_versions_argument
from coordinator.top import add_top_command, cmd_top
from protos import coordinator_pb2, tls_arguments
from protos.channel_options import DEFAULT_MAX_REQUEST_MB
from protos.codec_names import CODEC_NAMES
from protos.log_setup import add_log_arguments
from protos.log_setup import configure as configure_logging
from protos.model_files.catalog import KNOWN_MODELS, ModelNotFoundError
from protos.shutdown import EXIT_DEADLINE_S, exit_deadline, exit_now
from protos.software_versions import add_version_argument

FINISH_NAMES = {v: k for k, v in coordinator_pb2.FinishReason.items()}


def _workload(text: str) -> tuple[int, int]:
    """'PROMPT:NEW' token counts, e.g. '40:32'."""
    prompt, _, new = text.partition(":")
    try:
        counts = int(prompt), int(new)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PROMPT:NEW token counts such as 40:32, got {text!r}") from None
    if counts[0] < 0 or counts[1] < 1:
        raise argparse.ArgumentTypeError(f"PROMPT must be >= 0 and NEW >= 1, got {text!r}")
    return counts


def _add_generation_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--prompt", help="raw text prompt")
    source.add_argument("--chat", help="a user message, rendered with the model's chat template")
    parser.add_argument("--system", help="a system message to put before --chat")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    add_failover_arguments(parser)
    parser.add_argument("--compression", default="none", choices=list(CODEC_NAMES),
                        help="codec of activations between stages (default none)")
    parser.add_argument("--micro-batches", type=int, default=0,
                        help="groups of sequences in flight at once so stages overlap (default 0 = one per "
                             "machine: a machine's stages compute one after another on all its cores)")
    parser.add_argument("--chain", choices=CHAIN_SETTINGS, default="auto",
                        help="on: the last stage sends greedy groups' next decode steps to the first stage itself; "
                             "off: every step goes through the coordinator; auto (default): on unless every stage "
                             "is on this machine, where the coordinator's work would share the stages' cores")
    parser.add_argument("--local-hops", choices=["on", "off"], default="on",
                        help="on (default, Linux): send micro-batches to a first stage on this machine and take the "
                             "last stage's answers over their Unix sockets instead of gRPC streams "
                             "(coordinator/stage_streams.py); off: gRPC only (launch-local passes it to its stages)")
    defaults = BatchLimits()
    parser.add_argument("--max-batch-rows", type=int, default=defaults.max_batch_rows,
                        help="sequences generating at once; more wait in the queue "
                             f"(default {defaults.max_batch_rows})")
    parser.add_argument("--max-cache-positions", type=int, default=defaults.max_cache_positions,
                        help="bound on the sum of prompt + max_new_tokens over running sequences "
                             f"(default {defaults.max_cache_positions})")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="queued requests beyond which new ones get RESOURCE_EXHAUSTED "
                             f"(default {defaults.max_queue})")
    parser.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk_tokens,
                        help="tokens (rows x longest prompt) per prefill micro-batch: prompts are batched whole up to "
                             "it, a longer prompt goes alone in chunks of it, so stages overlap on it; 0 = every "
                             f"admitted prompt in one micro-batch (default {defaults.prefill_chunk_tokens})")


def _mebibytes(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB >= 1, got {text!r}")
    return int(text)


def _add_request_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-request-mb", type=_mebibytes, default=DEFAULT_MAX_REQUEST_MB,
                        help="largest public request in MiB (default %(default)s); larger ones get RESOURCE_EXHAUSTED "
                             "from gRPC before they are read")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="layerline coordinator")
    add_log_arguments(parser, "WARNING")
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch-model", help="download and convert a known model once")
    fetch.add_argument("name", choices=sorted(KNOWN_MODELS))
    fetch.add_argument("--force", action="store_true", help="convert again even if cached")

    serve = commands.add_parser("serve", help="serve the public API over running stage servers")
    serve.add_argument("--stages",
                       help="HOST:PORT of each stage, in layer order, comma separated; replicas of a span "
                            "joined by '|', e.g. A1:50051|A2:50051,B1:50051|B2:50051 (optional with --join-port)")
    serve.add_argument("--model", required=True, help="model directory or known name (for the tokenizer)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50050)
    serve.add_argument("--max-new-tokens-limit", type=int, default=4096)
    add_api_keys_argument(serve)
    add_http_port_argument(serve)
    _add_request_limit(serve)
    _add_pipeline_arguments(serve)
    add_mixed_versions_argument(serve)
    tls_arguments.add_server_tls_arguments(serve)
    add_join_arguments(serve)
    add_metrics_arguments(serve)

    launch = commands.add_parser("launch-local", help="start N local stages and the public API in one command")
    launch.add_argument("--model", required=True, help="model directory or known name, e.g. smollm2-135m")
    launch.add_argument("--num-stages", type=int, required=True)
    launch.add_argument("--layer-weights", help="relative share of the work per stage, e.g. 2,1,1")
    head = launch.add_mutually_exclusive_group()
    head.add_argument("--no-balance-head", dest="balance_head", action="store_false",
                      help="split layers evenly instead of giving the stage with the LM head fewer layers")
    head.add_argument("--balance-for", type=_workload, metavar="PROMPT:NEW",
                      help="weigh the LM head for requests of about PROMPT prompt tokens and NEW new tokens "
                           "(default: decode alone, where the head runs for every token); e.g. 40:32 for "
                           "batch work with prompts as long as the answers")
    launch.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    launch.add_argument("--attention", default="auto", choices=["auto", "per-sequence", "batched"],
                        help="the stages' attention over a batch (see stage-server --attention; default auto: "
                             "per-sequence for 16-bit dtypes on CPU, so a batched answer is the one it gets alone)")
    launch.add_argument("--host", default="127.0.0.1")
    launch.add_argument("--port", type=int, default=50050)
    launch.add_argument("--threads", type=int, default=0,
                        help="torch threads per stage, fixed (default: the stages share the usable cores step by step)")
    launch.add_argument("--max-new-tokens-limit", type=int, default=4096)
    add_api_keys_argument(launch)
    add_http_port_argument(launch)
    _add_request_limit(launch)
    _add_pipeline_arguments(launch)
    add_mixed_versions_argument(launch)
    tls_arguments.add_server_tls_arguments(launch)
    _add_generation_arguments(launch, required=False)
    launch.epilog = "With --prompt or --chat: generate once, print, and stop everything. Without: serve until Ctrl-C."

    generate = commands.add_parser("generate", help="generate text from a running coordinator or stages")
    target = generate.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", help="HOST:PORT of a coordinator")
    target.add_argument("--stages", help="HOST:PORT of each stage (then --model is needed for the tokenizer)")
    generate.add_argument("--model", help="model directory or known name (with --stages)")
    add_api_key_argument(generate)
    _add_pipeline_arguments(generate)
    tls_arguments.add_client_tls_arguments(generate)
    _add_generation_arguments(generate, required=True)

    info = commands.add_parser("info", help="show the model and stage servers behind a coordinator")
    info.add_argument("--address", required=True)
    info.add_argument("--json", action="store_true", help="print GetModelInfo as JSON (every field) instead of a table")
    add_api_key_argument(info)
    tls_arguments.add_client_tls_arguments(info)
    add_certs_command(commands)
    add_top_command(commands)
    add_plan_command(commands)
    for subcommand in commands.choices.values():
        add_log_arguments(subcommand, "WARNING", after=True)
    return parser


# ---- generation from the terminal ---------------------------------------------------------------

def _generation_kwargs(args) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        kwargs["messages"] = [*messages, {"role": "user", "content": args.chat}]
    else:
        kwargs["prompt"] = args.prompt
    return kwargs


def run_generation(address: str, args, api_key: str | None = None, tls=None) -> int:
    """Stream one completion to the terminal (or print it as JSON); `tls`: protos.tls.TlsFiles."""
    with CoordinatorClient(address, api_key=api_key or getattr(args, "api_key", None), tls=tls) as client:
        text, token_ids, finish, prompt_tokens = [], [], 0, 0
        started = time.perf_counter()
        first_token_s = None
        try:
            for message in client.generate_stream(**_generation_kwargs(args)):
                if message.token_ids and first_token_s is None:
                    first_token_s = time.perf_counter() - started
                text.append(message.text)
                token_ids.extend(message.token_ids)
                finish = message.finish_reason or finish
                prompt_tokens = message.prompt_tokens
                if not args.json:
                    print(message.text, end="", flush=True)
        except grpc.RpcError as err:
            print(f"\ncoordinator: error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids,
                          "finish_reason": FINISH_NAMES.get(finish, "").replace("FINISH_REASON_", "").lower(),
                          "prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                          "seconds": round(elapsed, 3), "time_to_first_token_s": round(first_token_s or 0, 3)}))
    else:
        rate = len(token_ids) / elapsed if elapsed > 0 else 0.0
        print(f"\n[{len(token_ids)} tokens in {elapsed:.2f}s, {rate:.1f} tok/s]", file=sys.stderr)
    return 0


# ---- subcommands --------------------------------------------------------------------------------

def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def cmd_fetch(args) -> int:
    from protos.model_files.fetch import fetch_model

    path = fetch_model(args.name, force=args.force)
    print(path)
    return 0


def _serve_config(args, stages: list[str], model_dir, host: str, port: int, **tls):
    """The CoordinatorConfig the arguments ask for (app, and with it torch, is imported only here)."""
    from coordinator.app import CoordinatorConfig

    return CoordinatorConfig(stages=tuple(stages), model_dir=str(model_dir), model_name=args.model, host=host,
                             port=port, compression=args.compression, micro_batches=args.micro_batches,
                             chain=args.chain, local_hops=args.local_hops == "on", batch_limits=BatchLimits(
                                 max_batch_rows=args.max_batch_rows, max_cache_positions=args.max_cache_positions,
                                 max_queue=args.max_queue, prefill_chunk_tokens=args.prefill_chunk),
                             max_new_tokens_limit=getattr(args, "max_new_tokens_limit", 4096),
                             max_request_bytes=getattr(args, "max_request_mb", DEFAULT_MAX_REQUEST_MB) << 20,
                             allow_mixed_versions=getattr(args, "allow_mixed_versions", False),
                             stall_timeout_s=args.stall_timeout, max_replays=args.max_replays,
                             metrics=metrics_endpoint(args), http_port=http_port_from_args(args), **tls)


def cmd_serve(args) -> int:
    tls = tls_arguments.serving_tls(args, stages_listen=False)
    joins = join_settings(args, tls)
    from coordinator.app import CoordinatorServer
    from protos.model_files.fetch import ensure_model

    model_dir = ensure_model(args.model)
    stages = [s.strip() for s in (args.stages or "").split(",") if s.strip()]
    keys = api_keys_from_args(args)
    server = CoordinatorServer(_serve_config(args, stages, model_dir, args.host, args.port, **tls, **joins),
                               api_keys=keys)
    reload_on_sighup(keys)
    port = server.start()
    joins_at = f"; stages join at {args.host}:{server.registry.port}" if server.registry else ""
    print(f"coordinator serving layerline.v1.Coordinator on {args.host}:{port} over {len(stages) or 'joined'} spans "
          f"(compression {args.compression}){joins_at}{http_note(server.http_server)}; Ctrl-C to stop",
          file=sys.stderr, flush=True)
    _wait_for_signal()
    exit_deadline(EXIT_DEADLINE_S)
    server.stop()
    exit_now(0)  # without waiting for threads a stuck gRPC call holds, or the interpreter's teardown


def cmd_launch_local(args) -> int:
    keys = api_keys_from_args(args)
    one_shot = args.prompt is not None or args.chat is not None
    if one_shot:  # the answer is the output: the request log line only at --log-level INFO or below
        request_log.log.setLevel(max(logging.INFO, logging.getLogger().level))
    tls = tls_arguments.serving_tls(args, stages_listen=True, api_listens=not one_shot)
    from transformers import AutoConfig

    from coordinator.app import CoordinatorServer
    from coordinator.split_costs import head_cost_in_layers
    from protos.model_files.fetch import ensure_model

    model_dir = ensure_model(args.model)

    config = AutoConfig.from_pretrained(model_dir)
    weights = [float(w) for w in args.layer_weights.split(",")] if args.layer_weights else None
    head_cost = head_cost_in_layers(config, args.balance_for) if args.balance_head else 0.0
    ranges = plan_partition(config.num_hidden_layers, args.num_stages, weights, head_cost=head_cost)
    check_ports_free(args.host, [0 if one_shot else args.port])  # the stages take free ports (--port 0)
    with LocalStages(str(model_dir), ranges, dtype=args.dtype, host=args.host, threads=args.threads,
                     extra_args=("--attention", args.attention, "--local-hops", args.local_hops,
                                 *tls_arguments.stage_tls_flags(args))) as stages:
        addresses = stages.start()
        # One shot: the API this process alone calls listens on loopback, plaintext.
        api = ("127.0.0.1", 0, None) if one_shot else (args.host, args.port, tls["api_tls"])
        server = CoordinatorServer(_serve_config(args, addresses, model_dir, api[0], api[1],
                                                 stage_tls=tls["stage_tls"], api_tls=api[2]), api_keys=keys)
        reload_on_sighup(keys)
        port = server.start()
        try:
            if one_shot:
                return run_generation(f"127.0.0.1:{port}", args, api_key=keys.own_key() if keys else None)
            print(f"layerline: coordinator on {args.host}:{port}, {len(addresses)} stages "
                  f"({', '.join(f'{a}:{b}' for a, b in ranges)}){http_note(server.http_server)}; Ctrl-C to stop",
                  file=sys.stderr, flush=True)
            _wait_for_signal()
            return 0
        finally:
            server.stop(grace_s=2.0)


def cmd_generate(args) -> int:
    tls = tls_arguments.client_tls(args)
    if args.address:
        return run_generation(args.address, args, tls=tls)
    if not args.model:
        raise SystemExit("coordinator generate: --stages needs --model (where the tokenizer is read from)")
    from coordinator.app import CoordinatorServer
    from protos.model_files.fetch import ensure_model

    model_dir = ensure_model(args.model)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    server = CoordinatorServer(_serve_config(args, stages, model_dir, "127.0.0.1", 0, stage_tls=tls))
    port = server.start()
    try:
        return run_generation(f"127.0.0.1:{port}", args)
    finally:
        server.stop(grace_s=1.0)


def cmd_info(args) -> int:
    from google.protobuf import json_format

    with CoordinatorClient(args.address, api_key=args.api_key, tls=tls_arguments.client_tls(args)) as client:
        info = client.model_info()
    print(json_format.MessageToJson(info, always_print_fields_with_no_presence=True) if args.json else render(info))
    return 0


COMMANDS = {"fetch-model": cmd_fetch, "serve": cmd_serve, "launch-local": cmd_launch_local,
            "generate": cmd_generate, "info": cmd_info, "certs": cmd_certs, "top": cmd_top, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return COMMANDS[args.command](args)
    except (ModelNotFoundError, PipelineSetupError, PlanError, LaunchError, CertificateError, OSError,
            ValueError) as err:
        print(f"coordinator: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"coordinator: error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except BaseException:
        if not quiet_interrupt.interrupted():
            raise
        # Ctrl-C before serving (while loading torch or waiting for stages): one line, no traceback
        print("coordinator: interrupted", file=sys.stderr)
        exit_now(130)  # without the interpreter's teardown (stage processes are already stopped by then)


if __name__ == "__main__":
    sys.exit(main())
