"""`stage-server`: serve layers A:B of a model over gRPC.

Owns: argument parsing, logging setup, what must happen before torch loads (the machine
lock, the OpenMP spin, heap reuse) and turning errors into exit messages that say what to
do next. Does not own: the stage itself (server.py starts, serves and stops it).
"""

from __future__ import annotations

import protos.grpc_transport  # noqa: F401  (first: picks gRPC's TCP path before anything loads gRPC)
from protos import quiet_interrupt  # first too: Ctrl-C while starting prints one line

# isort: split
import argparse
import sys

from protos.log_setup import add_log_arguments
from protos.log_setup import configure as configure_logging
from protos.shutdown import exit_now
from protos.software_versions import add_version_argument
from protos.tls_arguments import add_insecure_argument, add_tls_arguments, check_server_listen, hop_tls
from stage_server.compute_thread import set_openmp_spin
from stage_server.deployment import add_peers_argument
from stage_server.heap_reuse import DEFAULT_KEEP_MB, keep_freed_memory
from stage_server.machine_lock import MachineLock
from stage_server.metrics import add_metrics_arguments, metrics_endpoint
from stage_server.probe import add_probe_argument, main_probe
from stage_server.registration import add_join_arguments, check_join_arguments
from stage_server.step_bounds import add_step_bound_arguments
from stage_server.stream_slots import add_stream_slot_arguments


def _whole_number(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _thread_count(text: str) -> int | str:
    return text if text == "auto" else _whole_number(text, 0, "a thread count >= 0 or 'auto'")


def _at_least_one(text: str) -> int:
    return _whole_number(text, 1, "a whole number >= 1")


def _at_least_zero(text: str) -> int:
    return _whole_number(text, 0, "a whole number >= 0")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 86400, got {text!r}")
    return value


def _head_threads(text: str) -> int | str:
    return text if text == "auto" else _at_least_one(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stage-server", description=__doc__.splitlines()[0])
    add_version_argument(parser)
    parser.add_argument("--model", required=True,
                        help="a local Hugging Face model directory, or a known name such as smollm2-135m")
    parser.add_argument("--layers", help="layer range START:END (END exclusive), e.g. 0:10 (required unless --probe)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1); a non-loopback one needs --tls-* or --insecure")
    parser.add_argument("--port", type=int, default=50051, help="port (0 picks a free one; default 50051)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--max-sessions", type=_at_least_one, default=64, help="live KV-cache sessions (default 64)")
    parser.add_argument("--max-streams", type=_at_least_one, default=64,
                        help="Forward and Results streams open at once (default 64; a coordinator holds one or "
                             "two per stage); more are refused with RESOURCE_EXHAUSTED")
    add_stream_slot_arguments(parser)
    parser.add_argument("--max-cache-mb", type=_at_least_one, default=2048,
                        help="KV-cache budget in MiB (default 2048)")
    add_step_bound_arguments(parser, _at_least_one)
    parser.add_argument("--session-timeout", type=float, default=300.0,
                        help="seconds before an idle session's cache is freed (default 300)")
    parser.add_argument("--drain-timeout", type=_seconds, default=30.0,
                        help="on SIGTERM, seconds to let the sessions held end before stopping (default 30); "
                             "meanwhile the stage takes no new session; a second SIGTERM stops at once")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads, fixed (default: the usable cores, shared step by step with the "
                             "other stages of this machine)")
    parser.add_argument("--small-step-threads", type=_thread_count, default="auto",
                        help="threads for steps of at most 4 new tokens (one sequence decoding): a count, 0 = as "
                             "many as --threads, or auto (default): time the slice at start and use one thread "
                             "unless all threads are clearly faster")
    parser.add_argument("--head-threads", type=_head_threads, default="auto",
                        help="last stage: threads that share the LM head on steps of at most 4 rows, each "
                             "computing a slice of the vocabulary (1 = not split; auto (default) = the CPUs this "
                             "process may use, up to 4; steps torch already runs on that many threads stay whole)")
    parser.add_argument("--attention", default="auto", choices=["auto", "per-sequence", "batched"],
                        help="per-sequence: each sequence of a batch attends over its own keys in its own call, "
                             "so its tokens are the ones it gets alone; batched: one masked call over the padded "
                             "batch (stock sdpa); auto (default): per-sequence for float16/bfloat16 on CPU, batched "
                             "otherwise")
    parser.add_argument("--heap-keep-mb", type=_at_least_zero, default=DEFAULT_KEEP_MB,
                        help="glibc: take blocks of up to this many MiB from the heap and keep up to this much "
                             "freed memory for the next step instead of faulting it in anew (default "
                             f"{DEFAULT_KEEP_MB}; 0 = the C library's defaults)")
    parser.add_argument("--trace-steps", metavar="FILE", default="",
                        help="append one JSON line per micro-batch to FILE: when it arrived, started, finished "
                             "computing and went on (monotonic ns; stages on one machine may share FILE; "
                             "bench/step_timeline.py reads it)")
    parser.add_argument("--local-hops", choices=["on", "off"], default="on",
                        help="on (default, Linux): take micro-batches from stages of this machine on a Unix "
                             "socket named after the port, and send to next stages at loopback addresses on "
                             "theirs, instead of gRPC streams (stage_server/unix_listener.py); off: gRPC only")
    add_tls_arguments(parser)
    add_insecure_argument(parser)
    add_peers_argument(parser)
    add_join_arguments(parser)
    add_metrics_arguments(parser)
    add_probe_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_arguments(parser, "INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BaseException:  # Ctrl-C while starting (later, the server's own handler drains and stops)
        if not quiet_interrupt.interrupted():
            raise
        print("stage-server: interrupted", file=sys.stderr)
        exit_now(130)  # without the interpreter's teardown: threads and libraries half started say nothing


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.probe and not args.layers:
        parser.error("the following arguments are required: --layers (or --probe)")
    if args.probe:  # measures this host and exits: listens on nothing, so no TLS check
        set_openmp_spin()
        return main_probe(args)
    try:  # before anything loads: a stage that may not listen says so at once
        tls = hop_tls(args)
        check_server_listen(args, hops=tls is not None)
        check_join_arguments(args)
    except (OSError, ValueError) as err:
        print(f"stage-server: error: {err}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    # Held shared through the heavy imports and the weight load, so that a stage starting beside
    # this one does not time its threads while this one keeps a core busy (stage_server/machine_lock.py).
    startup_lock = MachineLock()
    startup_lock.acquire(exclusive=False)
    set_openmp_spin()  # before torch is imported (stage_server/compute_thread.py)
    keep_freed_memory(args.heap_keep_mb)  # before anything allocates much (stage_server/heap_reuse.py)
    from protos.model_files.catalog import ModelNotFoundError
    from protos.model_files.fetch import ensure_model
    from stage_server.architectures import UnsupportedArchitectureError
    from stage_server.server import StageServer, StageServerConfig, run_until_signalled
    from stage_server.slice_loader import SliceLoadError, parse_layer_range

    try:
        start, end = parse_layer_range(args.layers)
        model_dir = ensure_model(args.model, progress=not args.quiet)  # a known name not cached yet is fetched
        config = StageServerConfig(
            model_dir=str(model_dir), layer_start=start, layer_end=end, host=args.host, port=args.port,
            dtype=args.dtype, device=args.device, max_sessions=args.max_sessions, max_streams=args.max_streams,
            stream_idle_timeout_s=args.stream_idle_timeout,
            max_cache_bytes=args.max_cache_mb << 20, max_step_tokens=args.max_step_tokens,
            session_timeout_s=args.session_timeout, drain_timeout_s=args.drain_timeout,
            threads=args.threads, small_step_threads=args.small_step_threads,
            head_threads=args.head_threads, attention=args.attention, trace_steps=args.trace_steps,
            local_hops=args.local_hops == "on", peers=args.peers, progress=not args.quiet, tls=tls,
            join=args.join, advertise=args.advertise,
            metrics=metrics_endpoint(args))
        run_until_signalled(StageServer(config, startup_lock))
    except (SliceLoadError, UnsupportedArchitectureError, ModelNotFoundError, OSError) as err:
        print(f"stage-server: error: {err}", file=sys.stderr)
        return 2
    finally:
        startup_lock.release()  # normally released once the weights are in; here on early errors
    return 0


if __name__ == "__main__":
    sys.exit(main())
